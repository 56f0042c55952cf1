"""This CPU's reference point: llama.cpp on the embedded model's own GGUF beside ours, batch 1, greedy.

Issue 18's reference: llama.cpp (llama-cpp-python built from source on this machine) at 15 ms per token with 2
threads on SmolLM2-135M Q4_1, prefill included. Outside CI: ``pip install llama-cpp-python`` builds it (~8 min on
2 cores); the script says so and exits when it is missing.

Every path gets the same token ids (our tokenizer's chat template around each sentence), decodes greedily up to
``--new-tokens`` and stops at eos; time covers prefill + decode, divided by the tokens made. Paths alternate
sentence by sentence, best of ``--repeats``:

- ``llama_cpp_2t`` / ``llama_cpp_1t``: ``Llama.generate(top_k=1)`` on the package's GGUF (Q4_1 / Q8_0 blocks),
  KV reset before each sentence. ggml quantizes activations to 8 bits for its dot products, so its tokens may
  differ from the exact path's; the agreement is reported.
- ``ours``: ``decode.decode`` on the generation model (the exact Q4_1/Q8_0 kernel + the lean step),
  no prefix cache (none of the paths reuses anything across sentences).
- ``hf``: HF ``generate``, fp32, eager: the issue's 4x baseline.

    python benchmarks/llamacpp_reference.py --sentences 6 --new-tokens 40 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama_cpp is not installed: pip install llama-cpp-python (builds llama.cpp, ~8 min)") from None

    from paraphrase_ray.data import SAMPLE_PATH
    from paraphrase_ray.generation.backends.lowbit import generation_model
    from paraphrase_ray.generation.decode import decode
    from paraphrase_ray.generation.rows import Row
    from paraphrase_ray.generation.rules import DecodeRules
    from paraphrase_ray.models import OFFLINE_ALIASES, load_model

    torch.set_num_threads(2)
    package, gguf_name = OFFLINE_ALIASES["smollm2-135m"]
    import importlib.util

    gguf = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations))) / gguf_name
    loaded = load_model("smollm2-135m", "fp32", "cpu")
    model, tok, n = loaded.model, loaded.tokenizer, args.new_tokens
    gen_model, quant_path = generation_model(loaded)
    eos = tok.eos_token_id
    sources = [json.loads(line)["source"] for line in SAMPLE_PATH.read_text().splitlines()[: args.sentences]]
    prompts = []
    for s in sources:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": f"Paraphrase: {s}"}], add_generation_prompt=True, return_tensors="pt"
        )
        prompts.append(ids if torch.is_tensor(ids) else ids["input_ids"])  # (1, L)

    llms = {t: Llama(model_path=str(gguf), n_threads=t, n_ctx=512, verbose=False) for t in (2, 1)}

    def llama_cpp(threads: int, ids: torch.Tensor) -> list[int]:
        llm = llms[threads]
        llm.reset()  # no KV reuse from the previous sentence: prefill every time, as the other paths do
        out = []
        for t in llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t == eos or len(out) == n:
                break
            out.append(t)
        return out

    @torch.inference_mode()
    def ours(ids: torch.Tensor) -> list[int]:
        x = gen_model.get_input_embeddings()(ids)
        rules = DecodeRules(stop_ids=[eos], pad_id=tok.pad_token_id or 0)
        toks = decode(gen_model, x, torch.ones_like(ids), [Row.bare(n)], rules)
        return [t for t in toks[0].tolist() if t != eos][:n]

    def hf(ids: torch.Tensor) -> list[int]:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return [t for t in out[0, ids.shape[1] :].tolist() if t != eos]

    paths = {"llama_cpp_2t": lambda ids: llama_cpp(2, ids), "llama_cpp_1t": lambda ids: llama_cpp(1, ids),
             "ours": ours, "hf": hf}
    for fn in paths.values():  # warm-up: first-call costs (llama.cpp's graph, our kernel build) not timed
        fn(prompts[0])
    best = {name: [float("inf")] * len(prompts) for name in paths}
    toks: dict[str, list[list[int]]] = {name: [[] for _ in prompts] for name in paths}
    for _ in range(args.repeats):
        for i, ids in enumerate(prompts):  # alternate path by path on each sentence: load hits all alike
            for name, fn in paths.items():
                t0 = time.perf_counter()
                toks[name][i] = fn(ids)
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
    res = {}
    for name in paths:
        made = sum(len(t) for t in toks[name])
        res[name] = {"new_tokens": made, "s": round(sum(best[name]), 3),
                     "ms_per_token": round(1e3 * sum(best[name]) / max(made, 1), 2)}
    for name in paths:
        res[name]["vs_hf"] = round(res["hf"]["ms_per_token"] / res[name]["ms_per_token"], 2)
    agree = {name: sum(a == b for a, b in zip(toks[name], toks["ours"])) for name in paths}
    print(json.dumps({
        "bench": "llamacpp_reference", "sentences": len(prompts), "max_new_tokens": n, "repeats": args.repeats,
        "paths": res, "rows_identical_to_ours": agree, "ours_path": quant_path,
        "median_prompt_tokens": statistics.median(int(p.shape[1]) for p in prompts),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
    }))


if __name__ == "__main__":
    main()

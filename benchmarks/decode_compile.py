"""Does a compiled decode step pay on CPU? torch.compile (inductor) + a static KV cache vs ours, batch 1.

Issue 18, item 3: "a static KV cache and torch.compile, compiled once per shape bucket, if it pays after the
low-bit kernel and prompt lookup; compile time counts against the gain". One process, one prompt (the chat
template around a 17-word sentence), greedy, up to ``--new-tokens`` new tokens, stopping at the model's eos as
``generate`` does; each path's tokens are compared with HF eager's, and time is divided by the tokens it made.

- ``hf_eager``: ``model.generate`` with its dynamic cache (the baseline of benchmarks/generate_throughput.py).
- ``hf_static``: ``cache_implementation="static"``, not compiled (transformers compiles only on CUDA by default).
- ``hf_static_compiled``: the same with ``CompileConfig(fullgraph=True, dynamic=False)`` forced on for CPU:
  inductor's C++ backend compiles the decode step (the machine's g++). The first call's time is the compile.
- ``ours``: ``decode.decode`` on the generation model (``lowbit.generation_model``: the exact Q4_1/Q8_0
  kernel) with the lean step -- what ``paraphrase`` and Serve run, without the prefix cache.

    python benchmarks/decode_compile.py --new-tokens 32 --repeats 3

One JSON line: ms per new token per path (best of ``--repeats`` warm calls), the compile seconds, and how
many warm tokens the compiled step needs to repay its compile time against HF eager.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time

# A fresh inductor cache per run: the compile time is the cold one a new machine (or a new replica) pays. With
# its on-disk cache warm (a second run) the same compile took 12 s instead of ~53 s here.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.generation.configuration_utils import CompileConfig

    from paraphrase_ray.generation.backends.lowbit import generation_model
    from paraphrase_ray.generation.decode import decode
    from paraphrase_ray.generation.rows import Row
    from paraphrase_ray.generation.rules import DecodeRules
    from paraphrase_ray.models import load_model

    loaded = load_model(args.model, "fp32", "cpu")
    model, tok, n = loaded.model, loaded.tokenizer, args.new_tokens
    text = "The company reported higher profits than analysts had expected for the third quarter of the year."
    ids = tok.apply_chat_template(
        [{"role": "user", "content": f"Paraphrase: {text}"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]  # (1, L)
    mask = torch.ones_like(ids)

    def hf(**kw) -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)
        return time.perf_counter() - t, out[0, ids.shape[1] :]

    gen_model, path = generation_model(loaded)
    eos = model.generation_config.eos_token_id
    stop_ids = [eos] if isinstance(eos, int) else list(eos or [])

    @torch.inference_mode()
    def ours() -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        x = gen_model.get_input_embeddings()(ids)  # (1, L, d)
        out = decode(gen_model, x, mask, [Row.bare(n)], DecodeRules(stop_ids=stop_ids, pad_id=tok.pad_token_id or 0))
        return time.perf_counter() - t, out[0]

    compiled = CompileConfig(fullgraph=True, dynamic=False)
    compiled._compile_all_devices = True  # transformers compiles only on CUDA unless told otherwise
    paths = {
        "hf_eager": lambda: hf(),
        "hf_static": lambda: hf(cache_implementation="static"),
        "hf_static_compiled": lambda: hf(cache_implementation="static", compile_config=compiled),
        "ours": ours,
    }
    first_s, ref = {}, None
    for name, fn in paths.items():  # first (cold) call of each: the compile happens here
        first_s[name], toks = fn()
        ref = toks if ref is None else ref
    best = {name: float("inf") for name in paths}
    same, made = {}, {}
    for _ in range(args.repeats):  # interleaved: a busy moment slows every path alike
        for name, fn in paths.items():
            s, toks = fn()
            best[name] = min(best[name], s)
            same[name] = bool(toks.shape == ref.shape and (toks == ref).all())
            made[name] = int(toks.numel())
    ms = {name: round(1e3 * s / made[name], 2) for name, s in best.items()}
    compile_s = first_s["hf_static_compiled"] - best["hf_static_compiled"]
    saved_per_token = (ms["hf_eager"] - ms["hf_static_compiled"]) / 1e3
    print(
        json.dumps(
            {
                "bench": "decode_compile",
                "model": args.model,
                "max_new_tokens": n,
                "new_tokens": made,
                "prompt_tokens": int(ids.shape[1]),
                "threads": torch.get_num_threads(),
                "ms_per_token": ms,
                "speedup_vs_hf_eager": {k: round(ms["hf_eager"] / v, 2) for k, v in ms.items()},
                "same_tokens_as_hf_eager": same,
                "first_call_s": {k: round(v, 2) for k, v in first_s.items()},
                "compile_s": round(compile_s, 1),
                "tokens_to_repay_compile": round(compile_s / saved_per_token) if saved_per_token > 0 else None,
                "ours_path": path,
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "torch": torch.__version__,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                },
            }
        )
    )


if __name__ == "__main__":
    main()

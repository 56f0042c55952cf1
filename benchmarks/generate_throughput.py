"""Generation throughput: our batched generation vs Hugging Face ``generate``, one JSON line per measurement.

For each batch size (default 1, 16, 128) and scenario, the two paths run alternately in one process on the
same rows (sources from the bundled sample), medians over ``--repeats``:

- ``plain``: greedy, no soft prompt, no penalty, no newline stop, at most ``--new-tokens`` per row (a row
  may end earlier at eos). ``hf``: ``model.generate(input_ids=..., attention_mask=...)``, what a user would
  run instead; ``ours``: ``generate.generate_rows`` on the same rows.
- ``fast`` (issue 18's target): ``hf`` is plain fp32 HF greedy ``generate`` with the soft prompt passed as
  ``inputs_embeds`` (no decoding rules: what a user would write by hand). Then an ablation of ours, all with the
  product's decoding rules (fact guard, source blocking, newline stop): ``ours_fp32`` (``quantize: none``),
  ``q4_kernel`` (the Q4_1/Q8_0 kernel, HF's forward per step, no lookup, no prefix cache), ``q4_lean`` (+ the
  lean decode step), ``q4_lean_lookup`` (+ prompt lookup, batch 1 only), ``ours_cold`` (the defaults on the first
  request of a prompt: prefix cache cleared before each call) and ``ours`` (the defaults, prefix cache warm).
  The texts differ from ``hf`` by design (ours applies the rules), so ``ms_per_token`` is per path over its own
  tokens; ``<path>_same_text`` says whether a path gave the exact ``ours_fp32`` text.
- ``paraphrase``: our defaults: a 20-token soft prompt per row, source repetition penalty 1.3, stop at the
  end of the line, per-row limits (2 x source tokens + 8, capped at ``--new-tokens``). ``hf``: the same
  through ``model.generate`` with our penalty and stopping rule as HF processors (the path ``generate_rows``
  took before the fast loop, and still takes for sampling and beams); ``ours``: ``generate_rows``.

Both paths must give the same text (``same_output``, checked every run). ``new_tokens`` counts the tokens each
row keeps (up to and including its stop), the same for both; ``new_tokens_per_s`` = new tokens / wall time;
``ms_per_token`` = wall time / decode steps (the longest row's tokens; it includes the prefill). Also by
process CPU time, for busy shared machines.

    python benchmarks/generate_throughput.py --batches 1 16 --repeats 3 --threads 1          # CPU: SmolLM2
    python benchmarks/generate_throughput.py --device cuda     # OPT-125m shape, random init, bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import paraphrase_ray.generation.decode as decode_mod
import paraphrase_ray.generation.generate as G
import paraphrase_ray.generation.lookup as lookup
from paraphrase_ray.config import GenerationConfig, PromptConfig, TemplateConfig
from paraphrase_ray.data import SAMPLE_PATH
from paraphrase_ray.generation import prefix_cache
from paraphrase_ray.generation.backends.lowbit import generation_model
from paraphrase_ray.generation.rows import Row
from paraphrase_ray.generation.rules import newline_token_ids
from paraphrase_ray.models import DEFAULT_MODEL, LoadedModel, load_model
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import machine  # noqa: E402

N_PROMPT = 20
OPT_125M = dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, word_embed_proj_dim=768,
                do_layer_norm_before=True, vocab_size=50272, max_position_embeddings=2048)


def load(name: str, device: str) -> LoadedModel:
    if name != "opt-125m-random":
        return load_model(name, "auto", device)
    from transformers import OPTConfig, OPTForCausalLM

    tok = load_model(DEFAULT_MODEL, "fp32", "cpu").tokenizer  # any BPE tokenizer with ids < 50272 will do
    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = OPTConfig(**OPT_125M, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id)
    with dev:
        model = OPTForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    return LoadedModel("opt-125m-random", model, tok, dev, torch.bfloat16)


def kept(ids: list[int], limit: int, eos: int, nl: set[int], stop_at_newline: bool) -> int:
    """Tokens a row keeps: up to and including eos / the newline that ends its line, at most ``limit``."""
    seen_text = False
    for i, t in enumerate(ids[:limit]):
        if t == eos or (stop_at_newline and t in nl and seen_text):
            return i + 1
        seen_text |= t not in nl
    return min(limit, len(ids))


class NoLean:
    """Decode steps through the HF forward instead of backends/llama_step.py (for the ablation)."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        if self.active:
            self.saved = decode_mod.llama_step, lookup.llama_step
            decode_mod.llama_step = lookup.llama_step = lambda model: None
        return self

    def __exit__(self, *exc):
        if self.active:
            decode_mod.llama_step, lookup.llama_step = self.saved


class Spy:
    """Records what a generate function returned (token ids) without changing it."""

    def __init__(self, name: str, module=G):
        self.name, self.module, self.out = name, module, None
        self.orig = getattr(module, name)

    def __enter__(self):
        def wrapped(*a, **k):
            self.out = self.orig(*a, **k)
            return self.out

        setattr(self.module, self.name, wrapped)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.orig)


def plain_hf(loaded: LoadedModel, rows: list[Row], gen: GenerationConfig):
    """(texts, per-row new token ids) for hf: model.generate(input_ids) and ours: generate_rows."""
    tok, dev = loaded.tokenizer, loaded.device
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, as generate_rows builds its batch
        ids[i, width - len(r.ids):] = torch.tensor(r.ids)
        mask[i, width - len(r.ids):] = 1

    def hf():
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                        max_new_tokens=gen.max_new_tokens, pad_token_id=tok.pad_token_id)
        new = out[:, width:].tolist()
        return [G.clean_text(tok.decode(n, skip_special_tokens=True)) for n in new], new

    return hf


def timed(fn, cuda: bool):
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    w, c = time.perf_counter(), time.process_time()
    res = fn()
    sync()
    return time.perf_counter() - w, time.process_time() - c, res


def bench(loaded: LoadedModel, sources: list[str], scenario: str, n_new: int, repeats: int, prompt,
          warmup: bool = True) -> dict:
    tok, cuda = loaded.tokenizer, loaded.device.type == "cuda"
    t = TemplateConfig()
    if scenario == "plain":
        gen = GenerationConfig(max_new_tokens=n_new, source_repetition_penalty=1.0, stop_at_newline=False)
        rows = []
        for s in sources:
            ids = tok(s, add_special_tokens=True)["input_ids"]
            rows.append(Row(None, ids, tok(s, add_special_tokens=False)["input_ids"], n_new))
        hf = plain_hf(loaded, rows, gen)
    else:
        gen = GenerationConfig(max_new_tokens=n_new)  # our defaults otherwise
        rows = [G.row_for(loaded, s, prompt, t, gen) for s in sources]

        def hf():
            with Spy("hf_generate") as spy, Spy("fast_greedy_applies"):
                G.fast_greedy_applies = lambda *a: False  # the HF path of generate_rows
                texts = [c[0] for c in G.generate_rows(loaded, rows, gen)]
            return texts, spy.out.tolist()

    def ours_with(g: GenerationConfig):
        def ours():
            with Spy("decode") as spy:
                texts = [c[0] for c in G.generate_rows(loaded, rows, g)]
            assert spy.out is not None, "the fast loop did not run"
            return texts, spy.out.tolist()

        return ours

    paths = {"hf": hf, "ours": ours_with(gen)}
    if cuda and scenario == "paraphrase":  # the CUDA-graph step's own gain, same run (backends/cuda_graphs.py)
        paths["ours_no_graphs"] = ours_with(dataclasses.replace(gen, cuda_graphs="off"))
    samples = {k: {"wall": [], "cpu": []} for k in paths}
    outputs = {}
    for name, fn in paths.items():  # warm-up (first-call overheads; the outputs checked if nothing else runs)
        if warmup or not repeats:
            outputs[name] = fn()
    for _ in range(repeats):
        for name, fn in paths.items():
            w, c, outputs[name] = timed(fn, cuda)
            samples[name]["wall"].append(w)
            samples[name]["cpu"].append(c)
    nl = set(newline_token_ids(tok)) if gen.stop_at_newline else set()
    counts = {name: [kept(ids, r.max_new_tokens, tok.eos_token_id, nl, gen.stop_at_newline)
                     for ids, r in zip(out[1], rows)] for name, out in outputs.items()}
    same = all(outputs["hf"][0] == outputs[k][0] and counts["hf"] == counts[k] for k in paths)
    new_tokens, steps = sum(counts["hf"]), max(counts["hf"])
    res = {}
    for name, s in samples.items():
        wall, cpu = statistics.median(s["wall"]), statistics.median(s["cpu"])
        res[name] = {"wall_s": round(wall, 3), "wall_s_all": [round(x, 3) for x in s["wall"]],
                     "new_tokens_per_s": round(new_tokens / wall, 1), "new_tokens_per_cpu_s": round(new_tokens / cpu, 1),
                     "ms_per_token": round(1000 * wall / steps, 2)}
    return {"same_output": same, "new_tokens": new_tokens, "steps": steps,
            "row_limits": sorted({r.max_new_tokens for r in rows}), **{k: v for k, v in res.items()},
            "speedup": round(res["hf"]["wall_s"] / res["ours"]["wall_s"], 3),
            **({"speedup_graphs": round(res["ours_no_graphs"]["wall_s"] / res["ours"]["wall_s"], 3),
                "engine": G.engine_label(loaded, gen, len(rows))} if "ours_no_graphs" in res else {}),
            "speedup_cpu": round(res["ours"]["new_tokens_per_cpu_s"] / res["hf"]["new_tokens_per_cpu_s"], 3)}


def load_avg() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def bench_fast(loaded: LoadedModel, sources: list[str], n_new: int, repeats: int, prompt, warmup: bool = True,
               extra: dict | None = None, template: TemplateConfig | None = None) -> dict:
    """Plain HF greedy (fp32, inputs_embeds) vs our defaults, interleaved; ms per new token per path."""

    tok, cuda = loaded.tokenizer, loaded.device.type == "cuda"
    t = template or TemplateConfig()  # a trained prompt runs with the template it was trained with
    gen = GenerationConfig(max_new_tokens=n_new, max_new_tokens_ratio=100.0)
    rows = [G.row_for(loaded, s, prompt, t, gen) for s in sources]
    x, mask = G.build_batch(loaded, rows)
    eos = tok.eos_token_id

    def hf():
        with torch.no_grad():
            out = loaded.model.generate(inputs_embeds=x, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                                        pad_token_id=tok.pad_token_id, eos_token_id=eos)
        return [G.clean_text(tok.decode(o, skip_special_tokens=True)) for o in out.tolist()], out.tolist()

    def ours_with(g, lean: bool = True, cold: bool = False):
        def run():
            if cold:  # the first request for this prompt: its [prompt][template head] is not cached yet
                prefix_cache.clear()
            with Spy("decode") as spy, Spy("lookup_decode", lookup) as lspy, NoLean(not lean):
                texts = [c[0] for c in G.generate_rows(loaded, rows, g)]
            return texts, (spy.out if spy.out is not None else lspy.out).tolist()
        return run

    plain = dataclasses.replace(gen, prompt_lookup=0, prefix_cache=False)
    # the ablation, each row adding one thing; "ours" is the product default with a warm prefix cache
    paths = {"hf": hf, "ours_fp32": ours_with(dataclasses.replace(gen, quantize="none")),
             "q4_kernel": ours_with(plain, lean=False), "q4_lean": ours_with(plain)}
    if len(rows) == 1:  # prompt-lookup drafting runs on one row at a time
        paths["q4_lean_lookup"] = ours_with(dataclasses.replace(plain, prompt_lookup=gen.prompt_lookup))
    paths["ours_cold"] = ours_with(gen, cold=True)
    paths["ours"] = ours_with(gen)
    for name, g in (extra or {}).items():
        paths[name] = ours_with(g)
    t0 = time.perf_counter()
    generation_model(loaded, gen.quantize)  # the low-bit copy is built once per process: time it apart
    build_s = time.perf_counter() - t0
    samples = {k: [] for k in paths}
    outputs = {}
    if warmup:
        for name, fn in paths.items():
            outputs[name] = fn()
    for _ in range(repeats):
        for name, fn in paths.items():
            w, _, outputs[name] = timed(fn, cuda)
            samples[name].append(w)
    nl = set(newline_token_ids(tok))
    res = {}
    for name, out in outputs.items():
        stop_nl = name != "hf"
        counts = [kept(ids, r.max_new_tokens, eos, nl, stop_nl) for ids, r in zip(out[1], rows)]
        wall = statistics.median(samples[name])
        res[name] = {"wall_s": round(wall, 3), "new_tokens": sum(counts), "steps": max(counts),
                     "ms_per_token": round(1000 * wall / max(1, max(counts)), 2),
                     "new_tokens_per_s": round(sum(counts) / wall, 1)}
    for name in res:
        res[name]["speedup_vs_hf_ms_per_token"] = round(res["hf"]["ms_per_token"] / res[name]["ms_per_token"], 2)
    same = {f"{name}_same_text": outputs[name][0] == outputs["ours_fp32"][0] for name in outputs if name != "hf"}
    return {**same, "quant_path": generation_model(loaded, gen.quantize)[1], "quant_build_s": round(build_s, 2), **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default=None, help="default: smollm2-135m on CPU, opt-125m-random on CUDA")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--scenarios", nargs="+", default=["plain", "paraphrase"], choices=["plain", "paraphrase", "fast"])
    ap.add_argument("--new-tokens", type=int, default=None, help="cap on new tokens per row (CPU 16, CUDA 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first run")
    ap.add_argument("--prompt", default=None, help="a trained prompt directory (default: an untrained one)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    name = args.model or ("opt-125m-random" if args.device == "cuda" else DEFAULT_MODEL)
    n_new = args.new_tokens or (32 if args.device == "cuda" else 16)
    loaded = load(name, args.device)
    template = None
    if args.prompt:
        from paraphrase_ray.prompt.directory import PromptMeta

        prompt = SoftPrompt.load(args.prompt, expected_dim=loaded.embed_dim).to(loaded.device)
        template = PromptMeta.read(args.prompt).template
    else:
        prompt = SoftPrompt.init(loaded.model, loaded.tokenizer, PromptConfig(n_tokens=N_PROMPT)).to(loaded.device)
    pool = [json.loads(line)["source"] for line in SAMPLE_PATH.read_text().splitlines() if line.strip()]
    info = machine()
    for b in args.batches:
        sources = [pool[i % len(pool)] for i in range(b)]
        for scenario in args.scenarios:
            if scenario == "fast":
                res = bench_fast(loaded, sources, n_new, args.repeats, prompt, args.warmup, template=template)
            else:
                res = bench(loaded, sources, scenario, n_new, args.repeats, prompt, args.warmup)
            print(json.dumps({"bench": "generate_throughput", "scenario": scenario, "batch": b, "model": name,
                              "device": info.get("gpu", "cpu"), "dtype": str(loaded.dtype), "max_new_tokens": n_new,
                              "repeats": args.repeats, "prompt": args.prompt or "untrained (vocab init)", **res, "machine": info,
                              "loadavg": load_avg()}), flush=True)


if __name__ == "__main__":
    main()

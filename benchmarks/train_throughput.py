"""Training throughput: our prompt-training step vs PEFT prompt tuning, one JSON line per measurement.

Same model, batch, prompt length (20), rows (32 source + 32 target tokens, loss on the target half; or real
pairs of mixed lengths with ``--data``, batched as ``train()`` batches them), optimizer
(AdamW, lr 0.03, grad clip 1.0) and step (forward, backward, clip, update) for every path, in one process,
alternating path by path so a busy machine slows all of them alike; medians over ``--repeats``.

- ``peft``: PEFT prompt tuning with its defaults (``get_peft_model`` + ``PromptTuningConfig``; loss from
  ``labels``, i.e. full-vocabulary logits at every position). fp32 on CPU, bf16 autocast on CUDA.
- ``ours``: ``train.prompt_loss`` as ``train()`` runs it, with ``precision=auto``: on CPU the GEMM probe
  (``training/precision.py``) decides at this run's shape, and ``ours`` runs on what it decided (bf16 Linear
  weights with fp32 activations, or fp32); on CUDA bf16 weights. The prompt and AdamW are fp32 everywhere.
- ``ours_fp32`` (CPU): the same step on the fp32 weights (what ``auto`` gives where bf16 does not pay).
- breakdown (CPU, ``--no-breakdown`` drops it): ``ours_bf16`` (bf16 Linear weights whatever the probe says),
  ``ours_bf16_full`` (the model loaded in bf16: every activation, norm and attention in bf16, as
  ``load_model(precision="bf16")`` gives), and in fp32 ``ours_full_logits`` (``prompt_loss(fast=False)``: the
  straightforward forward) and ``ours_target_only`` (logits only at target positions, the prompt run per row).

CPU lines also carry the probe's decision (``precision``: label, probe timings), the CPU's bf16/AMX flags and the
load average before and after (``load_avg``): on a shared machine the wall-clock ratios measure the neighbours too.

Each line has tokens/s by wall clock and by process CPU time (on a shared machine wall time also measures
the neighbours), ``ratio`` (ours / peft, wall; ``ratio_cpu`` by CPU time), the loss of every timed step (the
paths start from the same prompt and see the same batch, so their loss curves must agree), and on CUDA the
peak memory of the path's own trial and its MFU (``mfu``: the matmul FLOPs the path executes / time / peak;
``mfu_6n``: the common 6 x params x tokens convention, as in docs/BENCHMARKS.md).

    python benchmarks/train_throughput.py --device cpu --repeats 5 --threads 1
    python benchmarks/train_throughput.py --device cpu --repeats 1 --batch 2 --model <tiny dir>  # smoke run
    python benchmarks/train_throughput.py --device cpu --data /path/mrpc/train.jsonl   # real, padded rows
    python benchmarks/train_throughput.py --device cuda          # OPT-125m, 350m, 1.3b shapes, random init
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from paraphrase_ray.config import PromptConfig
from paraphrase_ray.data import IGNORE, Batch
from paraphrase_ray.models import cpu_has_bf16, load_model
from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.training.loss import prompt_loss
from paraphrase_ray.training.precision import Precision, decide, training_module

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")

N_PROMPT, N_SOURCE, N_TARGET, LR = 20, 32, 32, 0.03
# Real OPT shapes (the hub configs), built with random weights: nothing is downloaded.
OPT_SHAPES = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                     word_embed_proj_dim=768, do_layer_norm_before=True, batch=256),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                     word_embed_proj_dim=512, do_layer_norm_before=False, batch=256),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     word_embed_proj_dim=2048, do_layer_norm_before=True, batch=64),
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}  # dense


def machine() -> dict:
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "cpu_bf16": cpu_has_bf16()}
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import peft
    import transformers

    info["transformers"], info["peft"] = transformers.__version__, peft.__version__
    return info


def make_batch(vocab: int, bsz: int, device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab - 10, (bsz, N_SOURCE + N_TARGET), generator=g)
    labels = ids.clone()
    labels[:, :N_SOURCE] = IGNORE
    return Batch(ids, torch.ones_like(ids), labels).to(device)


def target_only_loss(model, prompt: SoftPrompt, batch: Batch) -> torch.Tensor:
    """Breakdown only: logits at target positions, but the prompt runs through the model for every row."""
    emb = model.get_input_embeddings()(batch.input_ids)
    bsz, n_p = emb.shape[0], prompt.n_tokens
    x = torch.cat([prompt.expand(bsz, emb.dtype), emb], dim=1)
    mask = torch.cat([batch.attention_mask.new_ones(bsz, n_p), batch.attention_mask], dim=1)
    h = model.base_model(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, n_p:-1]
    y = batch.labels[:, 1:]
    sel = y != IGNORE
    return F.cross_entropy(model.get_output_embeddings()(h[sel]).float(), y[sel])


def ours_step(model, prompt: SoftPrompt, loss_fn):
    opt = torch.optim.AdamW([prompt.weight], lr=LR)

    def step(batch: Batch) -> float:
        loss = loss_fn(model, prompt, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([prompt.weight], 1.0)
        opt.step()
        return loss.item()

    return step


def peft_step(model, init: torch.Tensor, autocast_dtype):
    """PEFT's defaults; token_dim is set by hand only where PEFT would crash (OPT-350m: 512 != hidden 1024)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    kwargs = {}
    embed_dim = model.get_input_embeddings().embedding_dim
    if embed_dim != model.config.hidden_size:
        kwargs["token_dim"] = embed_dim
    pm = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_PROMPT, **kwargs))
    table = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(init)  # same starting prompt as ours, so the loss curves are comparable
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    dev = init.device.type
    ctx = (lambda: torch.autocast(dev, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext

    def step(batch: Batch) -> float:
        with ctx():
            loss = pm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    return step, kwargs


def matmul_flops(cfg, bsz: int, path: str) -> float:
    """Matmul FLOPs one step executes (frozen weights: backward computes input gradients only, = forward)."""
    d, f, n_l = cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers
    per_pos = n_l * 2 * (4 * d * d + 2 * d * f)  # attention projections + MLP, forward
    head = 2 * cfg.word_embed_proj_dim * cfg.vocab_size
    seq = N_PROMPT + N_SOURCE + N_TARGET
    if path == "ours":
        body, heads = N_PROMPT + bsz * (N_SOURCE + N_TARGET), bsz * N_TARGET
    elif path == "ours_target_only":
        body, heads = bsz * seq, bsz * N_TARGET
    else:
        body, heads = bsz * seq, bsz * seq
    return 2 * (body * per_pos + heads * head)  # forward + input-gradient backward


def time_paths(paths: dict, batches, repeats: int, steps: int, cuda: bool) -> dict:
    """Alternate paths on the same batches; per path and repeat: tokens/s by wall and CPU time, and losses."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {k: {"tps": [], "tps_cpu": [], "wall": [], "losses": []} for k in paths}
    warm = next(batches)
    for name, fn in paths.items():  # warm-up: allocator, kernels, first-call overheads
        out[name]["losses"].append(fn(warm))
    for _ in range(repeats):
        group = [next(batches) for _ in range(steps)]
        tokens = sum(b.n_tokens + N_PROMPT * b.input_ids.shape[0] for b in group)  # as train() counts them
        for name, fn in paths.items():
            sync()
            w, c = time.perf_counter(), time.process_time()
            for b in group:
                out[name]["losses"].append(fn(b))
            sync()
            w, c = time.perf_counter() - w, time.process_time() - c
            out[name]["wall"].append(w / steps)
            out[name]["tps"].append(tokens / w)
            out[name]["tps_cpu"].append(tokens / c)
    return out


def report(res: dict, extra: dict, flops: dict | None = None, peak: float | None = None) -> None:
    base = res.get("peft") or next(iter(res.values()))  # (ratios are to the first path if PEFT could not run)
    for name, r in res.items():
        tps, tps_cpu = statistics.median(r["tps"]), statistics.median(r["tps_cpu"])
        line = {"bench": "train_throughput", "path": name, **extra,
                "step_s": round(statistics.median(r["wall"]), 4), "tokens_per_s": round(tps, 1),
                "tokens_per_cpu_s": round(tps_cpu, 1), "step_s_all": [round(x, 3) for x in r["wall"]],
                "ratio": round(tps / statistics.median(base["tps"]), 3),
                "ratio_cpu": round(tps_cpu / statistics.median(base["tps_cpu"]), 3),
                **({"ratio_vs_ours_fp32": round(tps / statistics.median(res["ours_fp32"]["tps"]), 3),
                    "ratio_cpu_vs_ours_fp32": round(tps_cpu / statistics.median(res["ours_fp32"]["tps_cpu"]), 3)}
                   if "ours_fp32" in res else {}),
                "losses": [round(x, 5) for x in r["losses"]],
                "max_loss_diff_vs_peft": round(max(abs(a - b) for a, b in zip(r["losses"], base["losses"])), 5)}
        if flops and peak:
            line["mfu"] = round(flops[name] / statistics.median(r["wall"]) / peak, 3)
            line["mfu_6n"] = round(6 * extra["params"] * tps / peak, 3)
        if "peak_mem_gib" in r:
            line["peak_mem_gib"] = r["peak_mem_gib"]
        print(json.dumps(line), flush=True)


def batches(args, tokenizer, vocab: int, bsz: int, device):
    """Endless batches: the same fixed-shape rows (default), or real pairs from ``--data`` as train() makes them."""
    if not args.data:
        fixed = make_batch(vocab, bsz, device)
        while True:
            yield fixed
    from paraphrase_ray.config import DataConfig, TemplateConfig
    from paraphrase_ray.data import BatchStream, encode_pair, load_pairs

    pairs, _, _ = load_pairs(DataConfig(sources=(args.data,), val_fraction=0.0))
    enc = [encode_pair(tokenizer, p, TemplateConfig(), 64, 64) for p in pairs]
    stream = BatchStream(enc, bsz, tokenizer.pad_token_id, seed=0)
    while True:
        yield stream.next().to(device)


def run_cpu(args) -> None:
    load_before = os.getloadavg()
    loaded = load_model(args.model, "fp32", "cpu")  # the exact fp32 weights, as train / tune load them on CPU
    peft_model = load_model(args.model, "fp32", "cpu", cache=False).model  # PEFT's defaults: fp32
    data = batches(args, loaded.tokenizer, loaded.model.config.vocab_size, args.batch, "cpu")
    first = next(data)
    # the probe at this run's GEMM rows (the batch's real positions), as train() runs it
    precision = decide(loaded, "auto", int(first.attention_mask.sum()))
    init = SoftPrompt.init(loaded.model, None, PromptConfig(n_tokens=N_PROMPT, init="random_std")).weight
    models = {"ours": training_module(loaded, precision), "ours_fp32": loaded.model}
    if args.breakdown:
        models["ours_bf16"] = training_module(loaded, Precision("bf16", "asked"))
        models["ours_bf16_full"] = load_model(args.model, "bf16", "cpu", cache=False).model
    paths = {"peft": peft_step(peft_model, init, None)[0]}
    for name, model in models.items():
        paths[name] = ours_step(model, SoftPrompt(init), prompt_loss)
    if args.breakdown:
        paths["ours_full_logits"] = ours_step(loaded.model, SoftPrompt(init), lambda m, p, b: prompt_loss(m, p, b, fast=False))
        paths["ours_target_only"] = ours_step(loaded.model, SoftPrompt(init), target_only_loss)
    res = time_paths(paths, data, args.repeats, args.steps, cuda=False)
    rows = args.data or f"fixed: {N_SOURCE} source + {N_TARGET} target tokens"
    report(res, {"device": "cpu", "model": args.model, "batch": args.batch, "rows": rows, "prompt_tokens": N_PROMPT,
                 "precision": precision.record(), "peft_dtype": "torch.float32", "machine": machine(),
                 "load_avg": {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}})


def run_cuda(args) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    peak = peak * 1e12 if peak else None
    for shape in args.shapes:
        spec = dict(OPT_SHAPES[shape])
        bsz = args.batch or spec["batch"]
        del spec["batch"]
        cfg = OPTConfig(vocab_size=50272, max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0, **spec)
        torch.manual_seed(0)
        with dev:
            base = OPTForCausalLM(cfg).eval().requires_grad_(False)  # fp32, for PEFT + autocast
        ours_model = copy.deepcopy(base).to(torch.bfloat16)  # our defaults on CUDA: bf16 frozen weights
        data = batches(args, None, cfg.vocab_size, bsz, dev)
        probe = make_batch(cfg.vocab_size, bsz, dev)
        init = SoftPrompt.init(ours_model, None, PromptConfig(n_tokens=N_PROMPT, init="random_std")).weight.to(dev)
        paths, mem = {}, {}
        bytes_of = {m: sum(p.numel() * p.element_size() for p in m.parameters()) for m in (base, ours_model)}
        peft_fn, hand = peft_step(base, init, torch.bfloat16)
        candidates = [("peft", peft_fn, base), ("ours", ours_step(ours_model, SoftPrompt(init), prompt_loss), ours_model)]
        if args.breakdown:
            candidates.append(("ours_target_only", ours_step(ours_model, SoftPrompt(init), target_only_loss), ours_model))
        for pname, fn, model in candidates:  # one step alone per path: the memory its own trial would need
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn(probe)
                torch.cuda.synchronize()
                other = sum(b for m, b in bytes_of.items() if m is not model)
                mem[pname] = round((torch.cuda.max_memory_allocated() - other) / 2**30, 2)
                paths[pname] = fn
            except torch.OutOfMemoryError:
                print(json.dumps({"bench": "train_throughput", "path": pname, "model": shape, "error": "OOM"}))
                torch.cuda.empty_cache()
        res = time_paths(paths, data, args.repeats, args.steps, cuda=True)
        for pname in res:
            res[pname]["peak_mem_gib"] = mem[pname]
        flops = {p: matmul_flops(cfg, bsz, p) for p in res}
        params = sum(p.numel() for p in base.parameters())
        report(res, {"device": name, "model": shape + " (random init)", "batch": bsz, "prompt_tokens": N_PROMPT,
                     "rows": f"fixed: {N_SOURCE} source + {N_TARGET} target tokens", "ours_dtype": "torch.bfloat16",
                     "peft_dtype": "fp32 weights + bf16 autocast", "peft_hand_settings": hand, "params": params,
                     "machine": machine()}, flops, peak)
        del base, ours_model, paths, res
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="smollm2-135m", help="CPU model (alias, hub id or directory)")
    ap.add_argument("--batch", type=int, default=None, help="CPU default 8; CUDA default per shape")
    ap.add_argument("--shapes", nargs="+", default=list(OPT_SHAPES), choices=list(OPT_SHAPES))
    ap.add_argument("--data", default=None, help="CPU: real pairs (file, hf: spec or 'sample') instead of fixed rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="steps per timed sample (CPU 1, CUDA 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default by GPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        args.batch, args.steps = args.batch or 8, args.steps or 1
        run_cpu(args)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        if args.data:
            raise SystemExit("--data is for --device cpu (the CUDA runs use the fixed OPT-shaped rows)")
        args.steps = args.steps or 10
        run_cuda(args)


if __name__ == "__main__":
    main()

"""fp32 vs fbgemm int8 vs our fused Q4_1 / Q8_0 kernels (paraphrase_ray/generation/backends/lowbit.py), per Linear shape and for
the whole embedded SmolLM2-135M decoding one token.

    python benchmarks/linear_kernels.py            # both parts, ~1-2 min on 2 cores (model load included)
    python benchmarks/linear_kernels.py --no-model # the per-shape table only (<30 s)

Per shape, each format cycles through copies of the weights that together exceed ``--pool-mb`` (default 224 MB,
> the 32 MB L3), so every call reads its weights from memory as decoding does; formats alternate round by round
and the median round is reported. The output projection (576 -> 49152) uses Q8_0, as the embedded model's does.
Whole model: prefill ~60 tokens, then one-token forward steps with the KV cache; fp32 / q4 / int8 alternate.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
import warnings

import torch

from paraphrase_ray.generation.backends import lowbit as quant

CLOCK = time.perf_counter
SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]  # (in K, out N)


def _fp32(k, n, copies):
    w0 = torch.randn(n, k) * 0.02
    ws = [w0.clone() for _ in range(copies)]  # distinct memory, same values: the values do not matter here
    return lambda i, x: torch.nn.functional.linear(x, ws[i % copies])


def _int8(k, n, copies):
    packs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        qw = torch._make_per_channel_quantized_tensor(w, torch.full((n,), 1e-3, dtype=torch.double),
                                                      torch.zeros(n, dtype=torch.long), 0)
        for _ in range(copies):
            packs.append(torch.ops.quantized.linear_prepack(qw, None))
    rr = not quant._vnni()
    return lambda i, x: torch.ops.quantized.linear_dynamic(x, packs[i % copies], rr)


def _lowbit(k, n, copies, fmt, kern):
    nb = k // 32
    per = 16 if fmt == "q4_1" else 32
    q0, d0, m0 = torch.randint(0, 256, (n, nb * per), dtype=torch.uint8), torch.rand(n, nb) * 1e-3, torch.rand(n, nb)
    qs = [q0.clone() for _ in range(copies)]
    ds = [d0.half() for _ in range(copies)]
    if fmt == "q4_1":
        ms = [(-m0 * 1e-2).half() for _ in range(copies)]
        return lambda i, x: kern.q4_1_mm(x, qs[i % copies], ds[i % copies], ms[i % copies], None)
    return lambda i, x: kern.q8_0_mm(x, qs[i % copies], ds[i % copies], None)


def bench_shapes(pool_mb: float, rounds: int, round_ms: float, stat=statistics.median) -> None:
    kern = quant.load_kernels()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, kernel: "
          f"{'ok' if kern else quant.kernel_error()}, pool {pool_mb:.0f} MB per format")
    print(f"{'K x N':>11} {'M':>3} | {'fp32 us':>8} | {'int8 us':>8} {'ratio':>6} | {'lowbit us':>9} {'ratio':>6} fmt")
    for k, n in SHAPES:
        fmt = "q8_0" if n > 10000 else "q4_1"
        bpw = {"fp32": 4.0, "int8": 1.0, "q4_1": 20 / 32, "q8_0": 34 / 32}

        def copies(b, k=k, n=n):
            return max(2, int(pool_mb * 2**20 / (k * n * b)) + 1)

        fns = {"fp32": _fp32(k, n, copies(4.0)), "int8": _int8(k, n, copies(1.0))}
        if kern:
            fns[fmt] = _lowbit(k, n, copies(bpw[fmt]), fmt, kern)
        for m in (1, 16):
            x = torch.randn(m, k)
            times: dict[str, list[float]] = {f: [] for f in fns}
            ncalls = {}
            for f, fn in fns.items():  # warm-up, and calls per round from ~round_ms of work
                t = CLOCK()
                for i in range(3):
                    fn(i, x)
                ncalls[f] = max(3, int(round_ms * 1e-3 / ((CLOCK() - t) / 3)))
            for _ in range(rounds):
                for f, fn in fns.items():
                    t = CLOCK()
                    for i in range(ncalls[f]):
                        fn(i, x)
                    times[f].append((CLOCK() - t) / ncalls[f] * 1e6)
            med = {f: stat(v) for f, v in times.items()}
            lb = f"{med[fmt]:9.0f} {med['fp32'] / med[fmt]:5.2f}x {fmt}" if fmt in med else "      n/a"
            print(f"{k:>5}x{n:<5} {m:>3} | {med['fp32']:8.0f} | {med['int8']:8.0f} {med['fp32'] / med['int8']:5.2f}x"
                  f" | {lb}")
        del fns


def bench_model(steps: int, rounds: int) -> None:
    from paraphrase_ray.models import load_model

    t = CLOCK()
    loaded = load_model("smollm2-135m", "fp32", "cpu")
    print(f"\nSmolLM2-135M fp32 loaded in {CLOCK() - t:.1f} s")
    model, tok = loaded.model, loaded.tokenizer
    variants = {"fp32": model}
    for method in ("q4", "int8"):
        t = CLOCK()
        mod, path = quant.quantize_for_generation(model, method)
        summ = getattr(mod, "quant_summary", {})
        counts = {f: list(summ.values()).count(f) for f in sorted(set(summ.values()))}
        print(f"quantize_for_generation({method!r}) -> {path} in {CLOCK() - t:.1f} s, layers {counts}")
        variants[method] = mod
    text = ("Paraphrase the following sentence. Reply with the paraphrase only.\n\nThe weather was so cold that "
            "the lake froze overnight, and the children of the village went skating on it the next morning before "
            "school, while their parents watched from the shore and wondered how long the ice would hold them.")
    ids = tok(text, return_tensors="pt")["input_ids"][:, :60]
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(mod, tokens, cache):
        out = mod(input_ids=tokens, use_cache=True, **({key: cache} if cache is not None else {}))
        return out.logits, getattr(out, "cache", None) or out.past_key_values

    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for name in ("q4", "int8"):
            # prefill (> KERNEL_MAX_ROWS rows) runs the fp32 matmul; feed one token per step to use the kernel
            cache, logits = None, []
            for j in range(ids.shape[1]):
                lg, cache = step(variants[name], ids[:, j : j + 1], cache)
                logits.append(lg)
            lg = torch.cat(logits, 1)
            err = (lg - ref).abs()
            agree = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"{name} logits vs fp32 over {ids.shape[1]} positions (one token per step): max abs "
                  f"{err.max():.2e}, max abs / max|logit| {err.max() / ref.abs().max():.2e}, "
                  f"argmax agreement {agree:.3f}")
        times: dict[str, list[float]] = {n: [] for n in variants}
        nxt = ids[:, -1:]
        for _ in range(rounds):
            for name, mod in variants.items():
                cache = step(mod, ids, None)[1]
                t = CLOCK()
                for _ in range(steps):
                    cache = step(mod, nxt, cache)[1]
                times[name].append((CLOCK() - t) / steps * 1e3)
    base = statistics.median(times["fp32"])
    print(f"one-token forward with a {ids.shape[1]}-{ids.shape[1] + steps} token KV cache, batch 1 "
          f"(median of {rounds} rounds x {steps} steps):")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"  {name:5} {med:7.1f} ms/token  {base / med:5.2f}x  (rounds: {', '.join(f'{t:.1f}' for t in v)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool-mb", type=float, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-ms", type=float, default=40, help="time per round and format (at least 3 calls)")
    ap.add_argument("--min", action="store_true", help="report the fastest round instead of the median")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round, whole model")
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the calling thread's CPU time (robust on a busy shared machine); needs --threads 1")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cpu_time:
        global CLOCK
        if torch.get_num_threads() != 1:
            ap.error("--cpu-time measures the calling thread only: use it with --threads 1")
        CLOCK = time.thread_time
    with torch.no_grad():
        bench_shapes(a.pool_mb, a.rounds, a.round_ms, min if a.min else statistics.median)
    if not a.no_model:
        bench_model(a.steps, a.rounds)


if __name__ == "__main__":
    main()

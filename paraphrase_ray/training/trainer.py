"""Train one soft prompt on a frozen causal LM for a step budget.

Fast path (the default everywhere): frozen weights in bf16 where the hardware does bf16 fast, an fp32 prompt
master copy, the prompt run once per batch instead of once per row (its keys/values are shared through a KV
cache), and logits computed only at target positions -- the full-vocabulary projection of prompt and source
positions is the single largest waste in a naive prompt-tuning step. All three keep the step's math: the
losses and gradients match the straightforward full-logits forward (tests/test_fast_paths.py).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from paraphrase_ray.config import RunConfig
from paraphrase_ray.data import IGNORE, Batch, BatchStream, Pair, collate, encode_pair, load_pairs
from paraphrase_ray.errors import PromptFileError
from paraphrase_ray.files import atomic_write
from paraphrase_ray.models import LoadedModel, cache_kwarg
from paraphrase_ray.prompt.soft_prompt import PromptMeta, SoftPrompt, trainable_parameters

log = logging.getLogger("paraphrase_ray")

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"

# event dict -> True to stop early. Tune trials report from here.
Callback = Callable[[dict[str, Any], SoftPrompt], bool | None]


@dataclass
class TrainResult:
    status: str  # completed | early_stopped | stopped | nan
    steps: int
    prompt: SoftPrompt  # the best prompt by validation loss (the last one when there is no validation set)
    best_val_loss: float | None
    final_train_loss: float | None
    tokens_per_s: float
    wall_s: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "best_val_loss": self.best_val_loss,
            "final_train_loss": self.final_train_loss,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "wall_s": round(self.wall_s, 2),
        }


def prompt_loss(
    model: torch.nn.Module, prompt: SoftPrompt, batch: Batch, fast: bool = True, copy_weight: float = 1.0
) -> torch.Tensor:
    """Mean cross-entropy over target tokens of ``[prompt][input_ids]``; with ``copy_weight`` < 1 a weighted
    mean in which target tokens that also occur in the row's input count ``copy_weight`` (see ``TrainConfig``).

    fast=True runs the prompt once for the whole batch (``_token_hidden``), splits rows of very different
    lengths into two groups each cut to its own width (``_length_groups``), and projects to the vocabulary only
    the hidden states that predict a target token; fast=False is the straightforward full-logits forward (kept
    as the reference in tests).
    """
    total, weight = loss_terms(model, prompt, batch, fast, copy_weight)
    return total / weight


def loss_terms(
    model: torch.nn.Module, prompt: SoftPrompt, batch: Batch, fast: bool = True, copy_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum of target-token cross-entropies, sum of their weights): sums add up across batches."""
    emb = model.get_input_embeddings()(batch.input_ids)  # (B, S, d_embed), model dtype
    bsz, n_p = emb.shape[0], prompt.n_tokens
    mask = torch.cat([batch.attention_mask.new_ones(bsz, n_p), batch.attention_mask], dim=1)  # (B, P+S)
    w = token_weights(batch, copy_weight)  # (B, S), 0 outside targets
    if not fast:
        x = torch.cat([prompt.expand(bsz, emb.dtype), emb], dim=1)  # (B, P+S, d_embed)
        labels = torch.cat([batch.labels.new_full((bsz, n_p), IGNORE), batch.labels], dim=1)
        logits = model(inputs_embeds=x, attention_mask=mask).logits.float()  # (B, P+S, vocab)
        ce = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="none"
        )  # (B * (P+S-1),), 0 where ignored
        wf = torch.cat([w.new_zeros(bsz, n_p), w], dim=1)[:, 1:]  # (B, P+S-1), aligned with the labels
        return (ce * wf.flatten()).sum(), wf.sum()
    # rows of very different lengths: each group is cut to its own longest row, so no position runs that is
    # padding in every row of its group; the sums over groups are the sums over the batch
    total, weight = 0.0, 0.0
    for rows, width in _length_groups(batch.attention_mask):
        y, wy = batch.labels[rows, :width], w[rows, :width]
        total = total + _target_ce(model, prompt, emb[rows, :width], mask[rows, : n_p + width], y, wy)
        weight = weight + wy[:, 1:].sum()
    return total, weight


def token_weights(batch: Batch, copy_weight: float) -> torch.Tensor:
    """(B, S) loss weights: 1 on target tokens, ``copy_weight`` on target tokens found in the row's input
    (positions with labels IGNORE and attention 1), 0 off the target."""
    is_target = batch.labels != IGNORE
    w = is_target.float()
    if copy_weight != 1.0:
        for b in range(w.shape[0]):
            inp = batch.input_ids[b][~is_target[b] & (batch.attention_mask[b] == 1)]
            copied = is_target[b] & torch.isin(batch.labels[b], inp)
            w[b, copied] = copy_weight
    return w


def _target_ce(model, prompt: SoftPrompt, emb, mask, labels, weights) -> torch.Tensor:
    """Weighted sum of cross-entropies over the target tokens of ``[prompt][emb]``, from logits at target
    positions only."""
    hidden = _token_hidden(model, prompt, emb, mask)  # (B, S, h)
    # hidden at token position j predicts token j+1: drop the last position.
    h = hidden[:, :-1]  # (B, S-1, h)
    y = labels[:, 1:]  # (B, S-1)
    sel = y != IGNORE
    logits = model.get_output_embeddings()(h[sel]).float()  # (n_target, vocab)
    return (F.cross_entropy(logits, y[sel], reduction="none") * weights[:, 1:][sel]).sum()


def _length_groups(attention_mask: torch.Tensor, min_saving: float = 0.1) -> list[tuple[Any, int]]:
    """Split a right-padded batch into two groups by length when that skips >= ``min_saving`` of its positions.

    Returns [(row index, width), ...]; ``[(slice(None), S)]`` keeps the batch whole. Each group keeps at
    least a quarter of the rows, so the matmuls stay large.
    """
    bsz, width = attention_mask.shape
    whole = [(slice(None), width)]
    if bsz < 4:
        return whole
    lengths = attention_mask.sum(dim=1).tolist()
    order = sorted(range(bsz), key=lengths.__getitem__)
    ranked = [lengths[i] for i in order]
    cost, k = min((ranked[k - 1] * k + ranked[-1] * (bsz - k), k) for k in range(bsz // 4, bsz - bsz // 4 + 1))
    if cost > (1 - min_saving) * width * bsz:
        return whole
    idx = torch.tensor(order, device=attention_mask.device)
    return [(idx[:k], int(ranked[k - 1])), (idx[k:], int(ranked[-1]))]


def _token_hidden(model: torch.nn.Module, prompt: SoftPrompt, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, S, h) at the token positions of ``[prompt][tokens]``.

    Rows are right-padded, so every row starts with the same prompt at positions 0..P-1, and causal attention
    keeps the prompt's hidden states, keys and values independent of the row. So the prompt runs once at batch
    1, its KV cache is repeated over the batch, and only the S token positions run per row: P*(B-1) fewer
    positions through every layer, forward and backward. Gradients reach the prompt through the cached keys
    and values (the cache concatenates, which autograd differentiates). Models whose base model takes no
    cache fall back to one full forward.
    """
    base = model.base_model
    bsz, n_p = emb.shape[0], prompt.n_tokens
    key = cache_kwarg(base)
    if key is not None:
        cache = base(inputs_embeds=prompt.expand(1, emb.dtype), use_cache=True).get(key)  # prompt, once
        if cache is not None and hasattr(cache, "batch_repeat_interleave"):
            if bsz > 1:
                cache.batch_repeat_interleave(bsz)  # (1, heads, P, d) -> (B, heads, P, d) per layer
            return base(inputs_embeds=emb, attention_mask=mask, use_cache=True, **{key: cache}).last_hidden_state
    x = torch.cat([prompt.expand(bsz, emb.dtype), emb], dim=1)  # (B, P+S, d_embed)
    return base(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, n_p:]


@torch.inference_mode()
def validation_loss(
    model, prompt: SoftPrompt, encoded, batch_size: int, device, pad_id: int, max_batches=None, copy_weight=1.0
):
    """Token-weighted mean loss over the validation examples (the training loss's weighting)."""
    total, count = 0.0, 0.0
    for i, start in enumerate(range(0, len(encoded), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = collate(encoded[start : start + batch_size], pad_id).to(device)
        t, w = loss_terms(model, prompt, batch, copy_weight=copy_weight)
        total, count = total + float(t), count + float(w)
    return total / max(count, 1e-9)


def lr_factor(step: int, cfg) -> float:
    """Linear warm-up, then cosine/linear decay to ``min_lr_ratio`` or constant (plateau cuts lr separately).

    A pure function of the step, so a resumed run gets exactly the lr an uninterrupted one would.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule in ("constant", "plateau"):
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def save_checkpoint(ckpt_dir: Path, prompt: SoftPrompt, opt, state: dict[str, Any], base_model: str) -> Path:
    """Prompt (PEFT format) + AdamW moments as safetensors + counters as JSON: no pickles anywhere."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    prompt.save(ckpt_dir, base_model)
    tensors = {}
    for k, v in opt.state.get(prompt.weight, {}).items():
        if torch.is_tensor(v):
            tensors[k] = v.detach().cpu().contiguous().reshape(v.shape if v.dim() else (1,))
    if "best_weight" in state:
        tensors["best_weight"] = state.pop("best_weight").detach().cpu().contiguous()
    atomic_write(ckpt_dir / STATE_TENSORS, lambda p: save_file(tensors, str(p)))
    atomic_write(ckpt_dir / STATE_JSON, lambda p: p.write_text(json.dumps(state, indent=2)))
    return ckpt_dir


def load_checkpoint(ckpt_dir: Path, prompt: SoftPrompt, opt) -> dict[str, Any]:
    loaded = SoftPrompt.load(ckpt_dir, expected_dim=prompt.dim)
    if loaded.n_tokens != prompt.n_tokens:
        raise PromptFileError(f"checkpoint {ckpt_dir} has {loaded.n_tokens} prompt tokens, config says {prompt.n_tokens}")
    with torch.no_grad():
        prompt.weight.copy_(loaded.weight)
    state = json.loads((ckpt_dir / STATE_JSON).read_text())
    tensors = load_file(str(ckpt_dir / STATE_TENSORS))
    if "best_weight" in tensors:
        state["best_weight"] = tensors.pop("best_weight")
    if tensors:
        dev = prompt.weight.device
        opt.state[prompt.weight] = {
            k: (v.reshape(()) if k == "step" else v).to(dev) for k, v in tensors.items()
        }
    return state


def train(
    loaded: LoadedModel,
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    train_pairs: list[Pair] | None = None,
    val_pairs: list[Pair] | None = None,
    callback: Callback | None = None,
    resume_from: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train one prompt. Saves the best prompt to ``out_dir`` (if given) unless the loss went NaN.

    ``checkpoint_dir`` (default ``out_dir/checkpoint``) receives resumable checkpoints; ``resume_from`` restarts
    from one. The base model is never modified: only the prompt has ``requires_grad``.
    """
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    if train_pairs is None:
        train_pairs, val_pairs, report = load_pairs(cfg.data)
        _log(f"data: {report.summary()}; {len(train_pairs)} train / {len(val_pairs)} validation pairs", tcfg)
    val_pairs = val_pairs or []

    def enc(pairs):
        return [encode_pair(tok, p, cfg.template, cfg.data.max_source_tokens, cfg.data.max_target_tokens) for p in pairs]

    stream = BatchStream(enc(train_pairs), tcfg.batch_size, tok.pad_token_id, tcfg.seed)
    val_enc = enc(val_pairs)

    prompt = SoftPrompt.init(model, tok, cfg.prompt).to(device)
    n_trainable = trainable_parameters(prompt, model)
    assert n_trainable == prompt.n_tokens * loaded.embed_dim, "base model is not frozen"
    opt = torch.optim.AdamW([prompt.weight], lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)

    state: dict[str, Any] = {"step": 0, "best_val_loss": None, "bad_evals": 0, "lr_scale": 1.0, "history": []}
    if resume_from is not None and (Path(resume_from) / STATE_JSON).is_file():
        state = load_checkpoint(Path(resume_from), prompt, opt)
        _log(f"resumed from {resume_from} at step {state['step']}", tcfg)
    start_step = state["step"]
    for _ in range(start_step):  # keep the data order identical to an uninterrupted run
        stream.next()
    if state.get("best_weight") is not None:
        state["best_weight"] = state["best_weight"].to(device)
    state.setdefault("history", [])
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else (Path(out_dir) / "checkpoint" if out_dir else None)

    status, last_loss, tokens, t0 = "completed", None, 0, time.perf_counter()
    bar = tqdm(
        total=tcfg.steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
        disable=not tcfg.progress or not sys.stderr.isatty(), dynamic_ncols=True,
    )
    step = start_step
    while step < tcfg.steps:
        batch = stream.next().to(device)
        loss = prompt_loss(model, prompt, batch, copy_weight=tcfg.copy_token_weight)
        if not torch.isfinite(loss):
            status = "nan"
            _log(f"loss became {loss.item()} at step {step + 1}; stopping without saving (try a lower lr)", tcfg)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([prompt.weight], tcfg.grad_clip)
        for g in opt.param_groups:  # the plateau schedule scales the scheduled lr
            g["lr"] = tcfg.lr * lr_factor(step, tcfg) * state["lr_scale"]
        opt.step()
        step += 1
        tokens += batch.n_tokens + prompt.n_tokens * batch.input_ids.shape[0]
        last_loss = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)

        if step % tcfg.eval_every == 0 or step == tcfg.steps:
            event = evaluate_step(loaded, prompt, val_enc, state, tcfg, step, last_loss, opt.param_groups[0]["lr"])
            if bar.disable:  # no live bar (log file, CI, Ray worker): one line per evaluation instead
                _log(_eval_line(event, tcfg, (time.perf_counter() - t0) / max(1, step - start_step)), tcfg)
            bar.set_postfix(loss=f"{last_loss:.3f}", val=f"{event.get('val_loss', float('nan')):.3f}")
            if ckpt_dir is not None and (tcfg.checkpoint_every is None or step % tcfg.checkpoint_every == 0):
                save_checkpoint(ckpt_dir, prompt, opt, dict(state), loaded.name)
            if callback is not None and callback(event, prompt):
                status = "stopped"
                break
            if tcfg.early_stop_patience is not None and state["bad_evals"] >= tcfg.early_stop_patience:
                status = "early_stopped"
                break
    bar.close()
    wall = time.perf_counter() - t0
    if state.get("best_weight") is not None and status != "nan":
        with torch.no_grad():
            prompt.weight.copy_(state["best_weight"])
    result = TrainResult(
        status=status, steps=step, prompt=prompt, best_val_loss=state["best_val_loss"], final_train_loss=last_loss,
        tokens_per_s=tokens / wall if wall > 0 else 0.0, wall_s=wall, history=state["history"],
    )
    if out_dir is not None and status != "nan":
        meta = {**PromptMeta.record(cfg), "metrics": result.metrics(), **(extra_meta or {})}
        prompt.save(out_dir, loaded.name, model, meta)
        _log(f"saved prompt to {out_dir}", tcfg)
    return result


def evaluate_step(
    loaded: LoadedModel, prompt: SoftPrompt, val_enc, state: dict[str, Any], tcfg, step: int, loss: float, lr: float
) -> dict[str, Any]:
    """One evaluation: validation loss, best-prompt bookkeeping, the plateau lr cut; returns the event.

    Updates ``state`` in place (``best_val_loss``, ``best_weight``, ``bad_evals``, ``lr_scale``, ``history``,
    ``step``): everything a checkpoint must carry for a resumed run to continue exactly.
    """
    event: dict[str, Any] = {"step": step, "train_loss": loss, "lr": lr}
    if val_enc:
        tok = loaded.tokenizer
        vl = validation_loss(
            loaded.model, prompt, val_enc, tcfg.batch_size * 2, loaded.device, tok.pad_token_id,
            tcfg.eval_batches, tcfg.copy_token_weight,
        )
        event["val_loss"] = vl
        if state["best_val_loss"] is None or vl < state["best_val_loss"] - 1e-4:
            state.update(best_val_loss=vl, bad_evals=0, best_weight=prompt.weight.detach().clone())
        else:
            state["bad_evals"] += 1
            if tcfg.schedule == "plateau" and state["bad_evals"] % tcfg.plateau_patience == 0:
                state["lr_scale"] *= tcfg.plateau_factor
    state["history"].append(event)
    state["step"] = step
    return event


def _eval_line(event: dict[str, Any], tcfg, s_per_step: float) -> str:
    vl = f" val {event['val_loss']:.3f}" if "val_loss" in event else ""
    return f"step {event['step']}/{tcfg.steps} loss {event['train_loss']:.3f}{vl} lr {event['lr']:.3g} ({s_per_step:.1f} s/step)"


def _log(msg: str, tcfg) -> None:
    """Library output goes through ``logging`` ("paraphrase_ray"); the CLI prints it to stderr."""
    if tcfg.progress:
        log.info(msg)

"""Train one soft prompt on a frozen causal LM for a step budget: AdamW on the prompt alone (an fp32 master copy;
frozen weights in bf16 where a probe measures bf16 faster: ``precision.py``), schedules, clipping, validation and
the best prompt, resumable checkpoints, a NaN stop, and a per-eval callback (Tune trials report from it). The
loss: ``loss.py``.
"""

from __future__ import annotations

import dataclasses
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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from paraphrase_ray.config import RunConfig
from paraphrase_ray.data import BatchStream, Pair, encode_pair, load_pairs
from paraphrase_ray.errors import PromptFileError
from paraphrase_ray.files import atomic_write, publish_dir
from paraphrase_ray.models import LoadedModel
from paraphrase_ray.prompt.directory import PromptMeta, check_out_dir
from paraphrase_ray.prompt.soft_prompt import SoftPrompt, trainable_parameters
from paraphrase_ray.training.loss import prompt_loss, validation_loss
from paraphrase_ray.training.precision import Precision, decide, training_module

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
    precision: Precision | None = None  # what the frozen weights trained in, and why

    def metrics(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "best_val_loss": self.best_val_loss,
            "final_train_loss": self.final_train_loss,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "wall_s": round(self.wall_s, 2),
            "precision": self.precision.label if self.precision else None,
        }


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
    """Prompt (PEFT format) + AdamW moments as safetensors + counters as JSON: no pickles anywhere.

    Published as a whole (``files.publish_dir``): a crash mid-save leaves the previous checkpoint, never a mix."""
    tensors = {}
    for k, v in opt.state.get(prompt.weight, {}).items():
        if torch.is_tensor(v):
            tensors[k] = v.detach().cpu().contiguous().reshape(v.shape if v.dim() else (1,))
    if "best_weight" in state:
        tensors["best_weight"] = state.pop("best_weight").detach().cpu().contiguous()

    def fill(staged: Path) -> None:
        prompt.save(staged, base_model)
        atomic_write(staged / STATE_TENSORS, lambda p: save_file(tensors, str(p)))
        atomic_write(staged / STATE_JSON, lambda p: p.write_text(json.dumps(state, indent=2)))

    return publish_dir(ckpt_dir, fill)


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
) -> TrainResult:
    """Train one prompt. Saves the best prompt to ``out_dir`` (if given) unless the loss went NaN.

    ``checkpoint_dir`` (default ``out_dir/checkpoint``) receives resumable checkpoints; ``resume_from`` restarts
    from one. Only the prompt has ``requires_grad``; the base model's weights are never changed (a bf16 decision
    trains on a bf16 copy of its Linear layers, or swaps them in place when ``loaded.train_only``).
    """
    tcfg = cfg.train
    if out_dir is not None:
        check_out_dir(out_dir)  # before any work: never a directory of someone else's files
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    if train_pairs is None:
        train_pairs, val_pairs, report = load_pairs(cfg.data)
        _log(f"data: {report.summary()}; {len(train_pairs)} train / {len(val_pairs)} validation pairs", tcfg)
    val_pairs = val_pairs or []

    def enc(pairs):
        return [encode_pair(tok, p, cfg.template, cfg.data.max_source_tokens, cfg.data.max_target_tokens) for p in pairs]

    train_enc = enc(train_pairs)
    stream = BatchStream(train_enc, tcfg.batch_size, tok.pad_token_id, tcfg.seed)
    val_enc = enc(val_pairs)
    # the frozen weights' precision, measured at this run's GEMM shape (rows x positions), and the weights
    # that trains on: the bf16 training copy or the model itself (``precision.py``); generation keeps loaded.model
    positions = sum(len(ids) for ids, _ in train_enc[:512]) / max(1, min(len(train_enc), 512))
    precision = decide(loaded, tcfg.precision, round(tcfg.batch_size * positions))
    model = training_module(loaded, precision)
    tl = dataclasses.replace(loaded, model=model)  # validation runs on the same weights as the steps
    _log(f"training precision: {precision.label}", tcfg)

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
            event = evaluate_step(tl, prompt, val_enc, state, tcfg, step, last_loss, opt.param_groups[0]["lr"])
            event["precision"] = precision.label
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
        tokens_per_s=tokens / wall if wall > 0 else 0.0, wall_s=wall, history=state["history"], precision=precision,
    )
    if out_dir is not None and status != "nan":
        meta = {**PromptMeta.record(cfg), "metrics": result.metrics(), **precision_meta(precision)}
        prompt.save(out_dir, loaded.name, model, meta)
        _log(f"saved prompt to {out_dir}", tcfg)
    return result


def precision_meta(precision: Precision) -> dict[str, Any]:
    """What ``paraphrase_ray.json`` records of the training precision (``train``, trial checkpoints)."""
    out: dict[str, Any] = {"train_precision": precision.label}
    if precision.probe is not None:
        out["train_precision_probe"] = precision.probe.record()
    return out


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

"""Training loop: learning, NaN handling, resume equivalence, schedule."""

from __future__ import annotations

import json

import pytest
import torch

from paraphrase_ray.config import PromptConfig, RunConfig, TrainConfig
from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.training.trainer import lr_factor, train


def cfg(**train_kw) -> RunConfig:
    base = dict(steps=8, eval_every=4, lr=0.3, batch_size=8, progress=False, warmup_steps=0)
    base.update(train_kw)
    return RunConfig(model="tiny", prompt=PromptConfig(n_tokens=4, init="random"), train=TrainConfig(**base))


def test_prompt_learns_on_a_tiny_model(tiny, tmp_path):
    result = train(tiny, cfg(steps=40, eval_every=10, early_stop_patience=None), out_dir=tmp_path / "p")
    losses = [h["val_loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.01
    assert result.status == "completed" and result.steps == 40 and result.tokens_per_s > 0
    meta = json.loads((tmp_path / "p" / "paraphrase_ray.json").read_text())
    assert meta["metrics"]["best_val_loss"] == pytest.approx(min(losses))
    assert meta["template"]["separator"] == "\nParaphrase:" and meta["train_config"]["lr"] == 0.3


def test_nan_loss_stops_with_status_and_saves_nothing(tiny, tmp_path):
    bad = RunConfig(model="tiny", prompt=PromptConfig(n_tokens=4, init="random", random_range=1e39),
                    train=TrainConfig(steps=5, progress=False))
    result = train(tiny, bad, out_dir=tmp_path / "p")
    assert result.status == "nan" and result.steps == 0
    assert not (tmp_path / "p" / "adapter_model.safetensors").exists()


def test_resume_reproduces_an_uninterrupted_run(tiny, tmp_path):
    full = train(tiny, cfg(steps=8, eval_every=4, schedule="cosine", warmup_steps=2))
    train(tiny, cfg(steps=4, eval_every=4), checkpoint_dir=tmp_path / "ck")
    # a 4-step run of an 8-step schedule has a different lr curve; build the checkpoint from the 8-step config
    interrupted = {"n": 0}

    def stop_after_first_eval(event, prompt):
        interrupted["n"] += 1
        return True

    train(tiny, cfg(steps=8, eval_every=4, schedule="cosine", warmup_steps=2), checkpoint_dir=tmp_path / "ck8",
          callback=stop_after_first_eval)
    resumed = train(tiny, cfg(steps=8, eval_every=4, schedule="cosine", warmup_steps=2), resume_from=tmp_path / "ck8")
    assert interrupted["n"] == 1 and resumed.steps == 8
    torch.testing.assert_close(resumed.prompt.weight, full.prompt.weight, rtol=1e-5, atol=1e-6)
    assert [h["step"] for h in resumed.history] == [4, 8]


def test_early_stop_on_no_improvement(tiny):
    # lr tiny enough that validation loss cannot improve by the 1e-4 margin
    result = train(tiny, cfg(steps=50, eval_every=1, lr=1e-9, early_stop_patience=2))
    assert result.status == "early_stopped" and result.steps == 3


def test_best_prompt_is_returned_not_the_last(tiny, tmp_path):
    # One training pair at a high lr: the prompt over-fits it, so validation loss on other pairs bottoms out at
    # the second evaluation (step 8) and rises after it. The saved prompt must be step 8's, not the last step's.
    from paraphrase_ray.config import DataConfig
    from paraphrase_ray.data import Pair, load_pairs

    val = load_pairs(DataConfig(sources=("sample",)))[1][:16]
    snapshots = {}

    def keep(event, prompt):
        snapshots[event["step"]] = prompt.weight.detach().clone().cpu()

    result = train(tiny, cfg(steps=24, eval_every=4, lr=3.0, batch_size=1, schedule="constant",
                             early_stop_patience=None),
                   out_dir=tmp_path / "p", train_pairs=[Pair("Hi.", "Hi.")], val_pairs=val, callback=keep)
    losses = {h["step"]: h["val_loss"] for h in result.history}
    best_step = min(losses, key=losses.get)
    assert list(losses) == [4, 8, 12, 16, 20, 24] and result.steps == 24
    assert best_step not in (4, 24) and losses[24] > losses[best_step] + 5e-3, losses  # best is not the last
    assert result.best_val_loss == pytest.approx(losses[best_step])
    assert not torch.equal(snapshots[best_step], snapshots[24])
    saved = SoftPrompt.load(tmp_path / "p")
    assert torch.equal(saved.weight, snapshots[best_step])  # the best evaluation's weights were restored
    assert torch.equal(result.prompt.weight.detach().cpu(), snapshots[best_step])
    meta = json.loads((tmp_path / "p" / "paraphrase_ray.json").read_text())
    assert meta["metrics"]["best_val_loss"] == pytest.approx(losses[best_step])


def test_plateau_schedule_cuts_lr_after_patience_evals_without_improvement(tiny):
    # lr so small that validation loss never improves by the 1e-4 margin: every eval after the first is "bad";
    # each `plateau_patience` bad evals halve the lr of the steps that follow
    lr = 1e-9
    result = train(tiny, cfg(steps=7, eval_every=1, lr=lr, schedule="plateau", plateau_patience=2,
                             plateau_factor=0.5, early_stop_patience=None))
    lrs = [h["lr"] / lr for h in result.history]
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    constant = train(tiny, cfg(steps=7, eval_every=1, lr=lr, schedule="constant", early_stop_patience=None))
    assert [h["lr"] / lr for h in constant.history] == pytest.approx([1.0] * 7)  # the cuts are plateau's own


def test_lr_schedule_shapes():
    c = TrainConfig(steps=100, warmup_steps=10, lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0) and lr_factor(100, c) == pytest.approx(0.1)
    lin = TrainConfig(steps=100, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(50, lin) == pytest.approx(0.5)
    assert lr_factor(70, TrainConfig(schedule="constant", warmup_steps=0)) == 1.0

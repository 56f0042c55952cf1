"""A checkpoint is several files; killing the trainer while it writes one never leaves a checkpoint that loads
but is neither the previous one nor the new one (issue 24): it is published as a whole (``files.publish_dir``)."""

from __future__ import annotations

import json

import pytest
import torch
from kill_helpers import kill_when_paused, run_script

from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.training.trainer import STATE_JSON, load_checkpoint, save_checkpoint

SAVE = '''
import torch
import paraphrase_ray.prompt.directory as directory
import paraphrase_ray.training.trainer as trainer
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

ckpt, seed, step, hook = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if hook == "write_card":  # the prompt's last file: its weights, adapter config and meta are written
    directory.write_card = pausing(directory.write_card, lambda *a: True)
elif hook == "save_file":  # the optimizer state, after the whole prompt
    trainer.save_file = pausing(trainer.save_file, lambda *a: True)
torch.manual_seed(seed)
prompt = SoftPrompt(torch.randn(4, 16))
opt = torch.optim.AdamW([prompt.weight], lr=0.1)
prompt.weight.grad = torch.ones_like(prompt.weight)
opt.step()
trainer.save_checkpoint(ckpt, prompt, opt, {"step": step, "best_val_loss": None, "history": []}, "base")
'''


def stepped(seed: int) -> tuple[SoftPrompt, torch.optim.AdamW]:
    """The prompt and optimizer ``SAVE`` checkpoints for ``seed``: random weights after one AdamW step."""
    torch.manual_seed(seed)
    prompt = SoftPrompt(torch.randn(4, 16))
    opt = torch.optim.AdamW([prompt.weight], lr=0.1)
    prompt.weight.grad = torch.ones_like(prompt.weight)
    opt.step()
    return prompt, opt


def weights(seed: int) -> torch.Tensor:
    return stepped(seed)[0].weight.detach()


def loaded(ckpt) -> tuple[int, torch.Tensor]:
    """(step, prompt weights) of a checkpoint, through the trainer's own reader."""
    prompt = SoftPrompt(torch.zeros(4, 16))
    opt = torch.optim.AdamW([prompt.weight], lr=0.1)
    state = load_checkpoint(ckpt, prompt, opt)
    assert set(opt.state[prompt.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert json.loads((ckpt / STATE_JSON).read_text())["step"] == state["step"]
    return state["step"], prompt.weight.detach().clone()


@pytest.mark.parametrize("hook", ["write_card", "save_file"])
def test_killing_a_checkpoint_write_leaves_the_old_checkpoint_whole(tmp_path, hook):
    ckpt = tmp_path / "checkpoint"
    run_script(SAVE, str(ckpt), "1", "10", "none", tmp_path=tmp_path)
    kill_when_paused(SAVE, str(ckpt), "2", "20", hook, tmp_path=tmp_path)
    step, w = loaded(ckpt)
    assert (step, w.tolist()) in [(10, weights(1).tolist()), (20, weights(2).tolist())], "a mix of two checkpoints"
    assert step == 10  # killed before the swap: the previous one
    # the next save publishes whole and removes the killed writer's temp
    prompt, opt = stepped(3)
    save_checkpoint(ckpt, prompt, opt, {"step": 30, "best_val_loss": None, "history": []}, "base")
    step, w = loaded(ckpt)
    assert step == 30 and torch.equal(w, weights(3))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ready-")) == ["checkpoint"]

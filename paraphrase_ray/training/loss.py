"""The prompt-tuning loss: cross-entropy over target tokens only, never the prompt or the source.

Fast path (the default everywhere): the prompt is run once per batch instead of once per row (its keys/values are
shared through a KV cache), rows of very different lengths are split into two groups, and logits are computed only
at target positions -- the full-vocabulary projection of prompt and source positions is the single largest waste
in a naive prompt-tuning step. All of it keeps the step's math: the losses and gradients match the
straightforward full-logits forward (tests/generation/test_fast_paths.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from paraphrase_ray.data import IGNORE, Batch, collate
from paraphrase_ray.models import cache_kwarg
from paraphrase_ray.prompt.soft_prompt import SoftPrompt


def prompt_loss(
    model: torch.nn.Module, prompt: SoftPrompt, batch: Batch, fast: bool = True, copy_weight: float = 1.0
) -> torch.Tensor:
    """Mean cross-entropy over target tokens of ``[prompt][input_ids]``; with ``copy_weight`` < 1 a weighted
    mean in which target tokens that also occur in the row's input count ``copy_weight`` (see ``TrainConfig``).

    fast=True runs the prompt once for the whole batch (``_token_hidden``), splits rows of very different
    lengths into two groups each cut to its own width (``length_groups``), and projects to the vocabulary only
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
    for rows, width in length_groups(batch.attention_mask):
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


def length_groups(attention_mask: torch.Tensor, min_saving: float = 0.1) -> list[tuple[Any, int]]:
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

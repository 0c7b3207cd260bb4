"""Shared-prefix packing: one respondent's prompts in one row, their common prefix computed once.

Every prompt of a respondent starts with the same tokens (the chat template's system turn holding the profile). A
packed row holds that common prefix once, followed by each prompt's remainder. A 4-D attention mask lets each
remainder see the prefix and itself only, and its position ids continue from the prefix, so every token computes
what it computes in its own unpacked row: logits, and the losses read from them, are today's up to float rounding.

`token_weights` says how many unpacked rows each packed token stands for (the prefix: one per prompt; padding: 0),
which is how a load-balancing loss over tokens (CuMA's `aux_token_weights=`) stays the unpacked one.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """input_ids and position_ids int64 [B, S]; attention_mask bool [B, 1, S, S] (True: may attend);
    token_weights float32 [B, S]; ends int64 [N, 2]: (row, column) of each input sequence's last token, in input
    order (rows are filled in input order, each group's sequences in a row of their own)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_weights: torch.Tensor
    ends: torch.Tensor

    def logit_columns(self, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns, index): the distinct columns to compute logits at (for `logits_to_keep=`), and for each
        sequence the place of its column `end + offset` among them (offset -1: the token before the last; pack
        with own_tokens=1 - offset)."""
        columns, index = torch.unique(self.ends[:, 1] + offset, return_inverse=True)
        return columns, index


def indices_by_key(keys: Sequence) -> list[list[int]]:
    """The indices of each distinct key (e.g. a respondent id: prompts that share their profile prefix), in order
    of first appearance."""
    rows: dict = {}
    for i, k in enumerate(keys):
        rows.setdefault(k, []).append(i)
    return list(rows.values())


def prefix_groups(keys: Sequence, size: int) -> list[list[int]]:
    """The indices of equal keys (e.g. one respondent's prompts, which share their profile prefix), in pieces of at
    most `size`; each index alone when `size` is 1 or less."""
    if size <= 1:
        return [[i] for i in range(len(keys))]
    return [rows[j: j + size] for rows in indices_by_key(keys) for j in range(0, len(rows), size)]


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all sequences share."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def pack(groups: Sequence[Sequence[Sequence[int]]], pad_id: int, own_tokens: int = 1) -> PackedBatch:
    """One row per group of token sequences (e.g. one respondent's prompts), right-padded to the longest row.

    Each row is the group's common prefix followed by each sequence's remainder. Every sequence keeps at least
    `own_tokens` tokens in its remainder (2 where the logits of its next-to-last token are read: a column of the
    prefix or of another remainder would be read otherwise)."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("pack needs at least one group and no empty group")
    if any(len(s) < own_tokens or len(s) == 0 for g in groups for s in g):
        raise ValueError(f"pack cannot place an empty sequence, or one shorter than own_tokens={own_tokens}")
    layouts = []
    for g in groups:
        p = max(0, min(common_prefix_length(g), min(len(s) for s in g) - max(own_tokens, 1)))
        layouts.append((p, [list(s[p:]) for s in g], list(g[0][:p])))
    width = max(p + sum(len(r) for r in rest) for p, rest, _ in layouts)
    b = len(groups)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    segment = torch.full((b, width), -1, dtype=torch.long)  # 0: the prefix, i + 1: remainder i, -1: padding
    weights = torch.zeros((b, width), dtype=torch.float32)
    ends = []
    for row, (p, rest, prefix) in enumerate(layouts):
        input_ids[row, :p] = torch.tensor(prefix, dtype=torch.long)
        position_ids[row, :p] = torch.arange(p)
        segment[row, :p] = 0
        weights[row, :p] = len(rest)
        col = p
        for i, r in enumerate(rest):
            input_ids[row, col: col + len(r)] = torch.tensor(r, dtype=torch.long)
            position_ids[row, col: col + len(r)] = torch.arange(p, p + len(r))
            segment[row, col: col + len(r)] = i + 1
            weights[row, col: col + len(r)] = 1.0
            col += len(r)
            ends.append((row, col - 1))
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & (key >= 0) & ((key == 0) | (key == query))
    # padding sees itself, so that no attention row is empty (an empty softmax is NaN, and NaN reaches the gradients)
    visible |= torch.eye(width, dtype=torch.bool) & (query < 0)
    return PackedBatch(input_ids, visible[:, None], position_ids, weights, torch.tensor(ends, dtype=torch.long))


def _attention(model) -> str:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"


def takes_4d_mask(model) -> bool:
    """Whether `model`'s attention takes a 4-D mask as it is (SDPA, eager), which packing needs."""
    return _attention(model) in ("sdpa", "eager")


def require_4d_mask(model) -> None:
    """Refuse, before any work, a model whose attention takes no 4-D mask (flash attention): it cannot be packed."""
    if takes_4d_mask(model):
        return
    impl = _attention(model)
    raise ValueError(f"packing shared prefixes needs a 4-D attention mask, which {impl!r} attention does not take: "
                     "load the model with attn_implementation='sdpa' or 'eager', or train without packing "
                     "(--questions-per-respondent 0; scoring then packs nothing either)")


def attention_mask_for(model, visible: torch.Tensor) -> torch.Tensor:
    """`visible` (bool [B, 1, S, S]) as the 4-D mask `model`'s attention takes as it is: bool for SDPA, an additive
    float mask (0 or the dtype's minimum) for eager attention. Other kernels (flash attention) take no 4-D mask."""
    require_4d_mask(model)
    if _attention(model) == "sdpa":
        return visible
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)

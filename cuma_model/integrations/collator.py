"""z through any trainer's collator: `CuMACollator(collator)` for TRL's SFTTrainer and DPOTrainer (and Trainer).

TRL's collators build their batch from the keys they know and drop the rest, so a `demographic_embeds` column
never reaches the model. Wrapped, the collator builds its batch from the other keys and `demographic_embeds`
([rows, D]) is added with one z row per batch row. The trainers hand every batch key to the model, and a patched
model's forward (and its backbone, which TRL's fused LM head calls) takes the keyword.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

EMBEDS_KEY = "demographic_embeds"


class CuMACollator:
    """`collator`, with each example's z stacked into `demographic_embeds`, one row per row of the batch.

    - z comes from each example's `demographic_embeds` (see `add_demographic_embeds`), or, with `encoder` given,
      from `encoder(list of texts)` -> [N, D] applied to each example's `text_column` (a `DemographicEncoder`).
    - TRL's preference collator makes two rows per example, all chosen rows then all rejected rows; their z is
      `[z; z]`. Any other row count than one (or, for preference examples, two) per example is refused: packed or
      padding-free batches put several examples in one row, which one z per row cannot condition.
    - The trainer must keep the z (or text) column: `remove_unused_columns=False` in `SFTConfig` / `DPOConfig`,
      whose column filter keeps only the columns TRL itself reads.
    """

    def __init__(self, collator: Callable[[list[dict]], dict], encoder: Callable | None = None,
                 text_column: str = "profile"):
        self.collator, self.encoder, self.text_column = collator, encoder, text_column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        z = self._embeds(examples)
        batch = self.collator([{k: v for k, v in e.items() if k != EMBEDS_KEY} for e in examples])
        batch[EMBEDS_KEY] = self._rows(z, batch, examples)
        return batch

    def _embeds(self, examples: list[dict]) -> torch.Tensor:
        return embeds_of(examples, self.encoder, self.text_column)

    @staticmethod
    def _rows(z: torch.Tensor, batch: dict, examples: list[dict]) -> torch.Tensor:
        rows, n = batch["input_ids"].shape[0], len(examples)
        if rows == n:
            return z
        if rows == 2 * n and all("chosen_ids" in e and "rejected_ids" in e for e in examples):
            return torch.cat([z, z])  # TRL's preference layout: [chosen rows; rejected rows]
        raise ValueError(
            f"CuMACollator: the wrapped collator made {rows} rows from {n} examples; CuMA conditions each row on one "
            "z, so it needs one row per example (padding_free / packing put several examples in one row)")


def embeds_of(examples: list[dict], encoder: Callable | None = None, text_column: str = "profile") -> torch.Tensor:
    """z [N, D] float32 of a list of rows: each row's `demographic_embeds`, or `encoder` on each row's
    `text_column` (a `DemographicEncoder`: texts -> [N, D])."""
    if all(EMBEDS_KEY in e for e in examples):
        return torch.stack([torch.as_tensor(e[EMBEDS_KEY], dtype=torch.float32) for e in examples])
    if encoder is not None and all(text_column in e for e in examples):
        return torch.as_tensor(encoder([e[text_column] for e in examples])).float()
    wanted = f"'{EMBEDS_KEY}'" + (f" or '{text_column}'" if encoder is not None else "")
    lacking = next(e for e in examples if EMBEDS_KEY not in e)
    raise ValueError(
        f"an example has no {wanted} (its keys: {sorted(lacking)}); keep the column with "
        "remove_unused_columns=False in the trainer's config, and do not pack examples (packing merges rows)")

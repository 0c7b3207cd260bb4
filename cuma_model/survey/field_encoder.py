"""FieldEncoder: a respondent's demographic group labels -> z, one indicator per (field, value) seen in training.

The alternative to the sentence encoder for tabular surveys. z then holds exactly what the logistic-regression floor
is fitted on, and nothing a sentence encoder would blur: two profiles that differ in one field differ in two
coordinates of z. A router's first layer applied to an indicator vector adds one learned vector per field value, so
this is an embedding per field value, trained with the router.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

FIELD_ENCODER_NAME = "field_encoder.json"  # its file in a checkpoint folder


class FieldEncoder:
    """z [B, D] float32 from `groups` mappings (dimension -> label, as `SurveyExample.groups` holds them).

    `vocabulary` lists the (dimension, label) pairs that get a coordinate, in order; a label outside it (a value
    never seen in training) or a missing dimension leaves that field's coordinates at 0.

    Reads `SurveyExample.groups` where the sentence encoder reads `.profile` (`example_field`).
    """

    example_field = "groups"

    def __init__(self, vocabulary: Sequence[tuple[str, str]]):
        vocabulary = [(str(d), str(v)) for d, v in vocabulary]
        if not vocabulary:
            raise ValueError("a FieldEncoder needs at least one (dimension, label) pair; do the examples have groups?")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("the FieldEncoder vocabulary lists a (dimension, label) pair twice")
        self.vocabulary = vocabulary
        self._column = {pair: i for i, pair in enumerate(vocabulary)}

    @classmethod
    def fit(cls, groups: Iterable[Mapping[str, str]]) -> FieldEncoder:
        """Every (dimension, label) pair of `groups` (the training examples'), sorted so the order is reproducible."""
        return cls(sorted({(d, v) for g in groups for d, v in g.items()}))

    @property
    def dim(self) -> int:
        """Size D of z: one coordinate per (dimension, label) pair."""
        return len(self.vocabulary)

    def encode(self, groups: Sequence[Mapping[str, str]]) -> torch.Tensor:
        """[B, D] float32, row i the indicators of groups[i]."""
        table, index = self.encode_unique(groups)
        return table[index]

    def encode_unique(self, groups: Sequence[Mapping[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [U, D] float32, index [B] int64) with `table[index]` the z of `groups`; U counts distinct
        mappings, in order of first occurrence (the interface of `DemographicEncoder.encode_unique`)."""
        position: dict[tuple, int] = {}
        index = []
        for g in groups:
            if not isinstance(g, Mapping):
                raise TypeError(f"FieldEncoder encodes group mappings (SurveyExample.groups), got {type(g).__name__}")
            index.append(position.setdefault(tuple(sorted(g.items())), len(position)))
        table = torch.zeros(len(position), self.dim, dtype=torch.float32)
        for row, items in enumerate(position):
            for pair in items:
                column = self._column.get(pair)
                if column is not None:
                    table[row, column] = 1.0
        return table, torch.tensor(index, dtype=torch.long)

    def to_json(self) -> dict:
        return {"type": "fields", "vocabulary": [list(pair) for pair in self.vocabulary]}

    @classmethod
    def from_json(cls, data: Mapping) -> FieldEncoder:
        if data.get("type") != "fields" or not isinstance(data.get("vocabulary"), list):
            raise ValueError("not a FieldEncoder file: expected {'type': 'fields', 'vocabulary': [[dimension, label], ...]}")
        return cls([tuple(pair) for pair in data["vocabulary"]])

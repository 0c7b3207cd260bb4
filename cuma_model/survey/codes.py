"""Cell codes: the canonical text of a data cell, which answers and labels are matched by."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd


def _code(value: Any) -> str | None:
    """Canonical string form of a data cell; None when missing. Numbers lose a trailing ".0" (1.0 -> "1")."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None if pd.isna(value) else str(value)
    if math.isnan(number):
        return None
    return str(int(number)) if number.is_integer() else repr(number)


def _codes(series: pd.Series) -> list[str | None]:
    return [_code(v) for v in series.tolist()]


def _code_map(mapping: Mapping | None) -> dict[str, str] | None:
    if mapping is None:
        return None
    out = {}
    for key, text in mapping.items():
        code = _code(key)
        if code is None:
            raise ValueError(f"label key {key!r} is not a valid code")
        out[code] = str(text)
    return out

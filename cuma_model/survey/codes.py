"""Cell codes: the canonical text of a data cell, which answers and labels are matched by."""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd


# An integral number written as text with a sign or a zero fraction ("1.0", "-1.00", "+2"). Leading zeros are not
# matched: "02134" is an identifier (a postcode), not the number 2134.
_INTEGRAL_TEXT = re.compile(r"([+-]?)(0|[1-9][0-9]*)(?:\.0*)?")


def _code(value: Any) -> str | None:
    """Canonical string form of a data cell; None when missing. Numbers lose a trailing ".0" (1.0 -> "1"), and so
    does text that writes an integral number ("1.0" -> "1", "+1" -> "1"): a code compares equal to the number."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        integral = _INTEGRAL_TEXT.fullmatch(value)
        if integral:
            return str(int(integral.group(1) + integral.group(2)))
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


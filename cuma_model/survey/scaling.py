"""A scaling curve: methods trained on several numbers of training answers, scored on the same evaluation answers.

    python -m cuma_model.survey.scaling --sizes 864 3456 13824 --methods cuma mixlora lora \\
        --output-dir runs/scaling [any option of python -m cuma_model.train]

Each (method, size) trains once into OUTPUT_DIR/<method>-<size>/ with `--train-examples <size>` and the other
options as given; a run that finished earlier is not trained again and one that was interrupted resumes from its
newest checkpoint, so the command can be stopped and started again. Every run has the same data seed, hence the
same evaluation answers, so the first method is compared with each other one answer by answer: paired differences
with 95% intervals from a bootstrap over respondents (a difference whose interval holds 0 is a tie).

Outputs: OUTPUT_DIR/scaling.json (every metric with its interval and the paired differences, per size),
scaling.md (the same as tables) and scaling.png (NLL, NLL at the run's temperature, accuracy, EMD and group JS
against training size). A run's temperature is fitted on the validation answers it scored (val_predictions.jsonl).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from cuma_model.atomic import atomic_write_bytes
from cuma_model.survey import evaluate as E
from cuma_model.survey import run_checkpoint as R

# proper scores first; NLL@T: at each run's temperature, fitted on its validation answers (val_predictions.jsonl)
METRICS = {"nll": "NLL", "calibrated_nll": "NLL@T", "brier": "Brier", "accuracy": "accuracy", "emd": "EMD",
           "group_js": "group JS", "spread": "spread"}
PROPER = ("nll", "calibrated_nll", "brier")


def run_dir(out_dir: Path, method: str, size: int) -> Path:
    return Path(out_dir) / f"{method}-{size}"


def train_grid(sizes: Sequence[int], methods: Sequence[str], out_dir: str | Path, train_argv: Sequence[str] = (),
               train_one: Callable | None = None) -> None:
    """Train every (method, size) not trained yet (resuming an interrupted one). `train_one(argv)` trains one run
    (default `cuma_model.survey.train.train`; tests pass one that builds their own model)."""
    from cuma_model.survey import train as T

    for size in sizes:
        for method in methods:
            folder = run_dir(out_dir, method, size)
            if (folder / "predictions.jsonl").exists() and (folder / "metrics.json").exists():
                continue
            argv = [*train_argv, "--method", method, "--train-examples", str(size), "--output-dir", str(folder)]
            if folder.exists() and R.find_latest_checkpoint(folder) is not None:
                argv += ["--resume", "latest"]
            (train_one or T.train)(argv)


def summarize(sizes: Sequence[int], methods: Sequence[str], out_dir: str | Path) -> dict:
    """{size: {"metrics": {method: {metric: {mean, lo, hi}}}, "paired": {other: {metric: {..., verdict}}},
    "missing": [methods]}}: the first method minus each other one, on the evaluation answers every run at that size
    shares. Runs not trained yet are listed as missing (and a size without the first method has no differences)."""
    reference, out = methods[0], {}
    for size in sizes:
        predictions, temperatures, examples, missing = {}, {}, None, []
        for method in methods:
            path = run_dir(out_dir, method, size) / "predictions.jsonl"
            if not path.exists():
                missing.append(method)
                continue
            ex, pred, logits = E.read_predictions_jsonl(path)
            if examples is not None and [(e.respondent_id, e.question_id) for e in ex] != \
                    [(e.respondent_id, e.question_id) for e in examples]:
                raise ValueError(f"{method}-{size} was scored on other answers than {next(iter(predictions))}-{size}: "
                                 "the runs of a curve need one data seed and one evaluation subset")
            examples, predictions[method] = ex, E.Predictions(pred, logits)
            val = path.parent / E.VAL_PREDICTIONS
            if val.exists() and logits is not None:
                val_ex, _, val_logits = E.read_predictions_jsonl(val)
                temperatures[method] = E.temperature_of(val_ex, val_logits)
        if not predictions:
            continue
        metrics = {}
        for method, pr in predictions.items():
            m = E.evaluate_predictions(examples, pr.choice_idx, pr.choice_logits,
                                       temperature=temperatures.get(method))
            metrics[method] = {k: m["intervals"].get(k) for k in ("accuracy", "nll", "brier", "calibrated_nll")}
        has_reference = reference in predictions
        set_iv, set_paired = E.set_metric_intervals(examples, predictions,
                                                    reference=reference if has_reference else None)
        paired = E.paired_differences(examples, predictions[reference],
                                      {k: v for k, v in predictions.items() if k != reference},
                                      temperatures.get(reference), temperatures) if has_reference else {}
        for method in predictions:
            metrics[method].update({k: set_iv[method][k] for k in ("emd", "group_js", "spread")})
        for other in paired:
            paired[other].update({k: set_paired[other][k] for k in ("emd", "group_js", "spread")})
        out[str(size)] = {"n_eval": len(examples), "metrics": metrics, "paired": paired, "missing": missing}
    return E._json_safe(out)


def _cell(iv, metric: str, sign: str = "") -> str:
    if not iv or iv.get("mean") is None:
        return "-"
    scale, f = (100, ".1f") if metric == "accuracy" else (1, ".2f" if metric == "spread" else ".3f")
    text = f"{iv['mean'] * scale:{sign}{f}} [{iv['lo'] * scale:{sign}{f}}, {iv['hi'] * scale:{sign}{f}}]"
    return text + (f": {iv['verdict']}" if "verdict" in iv else "")


def markdown(summary: dict, methods: Sequence[str]) -> str:
    """The summary as two tables: each method's metrics per size, and the first method minus each other."""
    head = "| training answers | method | " + " | ".join(METRICS.values()) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for size, s in summary.items():
        for method in s["metrics"]:
            m = s["metrics"][method]
            lines.append(f"| {size} | {method} | " + " | ".join(_cell(m.get(k), k) for k in METRICS) + " |")
    lines += ["", f"| training answers | {methods[0]} minus | " + " | ".join(METRICS.values()) + " |",
              "|" + "---|" * (2 + len(METRICS))]
    for size, s in summary.items():
        for other, d in s["paired"].items():
            lines.append(f"| {size} | {other} | " + " | ".join(_cell(d.get(k), k, "+") for k in METRICS) + " |")
    missing = [f"{m}-{size}" for size, s in summary.items() for m in s.get("missing", [])]
    if missing:
        lines += ["", "Not trained yet: " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def _finite(iv) -> dict:
    """An interval with NaN where it is undefined (e.g. no group with enough answers), as matplotlib skips NaN."""
    nan = float("nan")
    return {k: nan if not iv or iv.get(k) is None else float(iv[k]) for k in ("mean", "lo", "hi")}


def plot(summary: dict, methods: Sequence[str], path: str | Path) -> Path:
    """NLL (raw and at the run's temperature), accuracy, EMD and group JS against training size, one line per
    method, with 95% intervals."""
    from cuma_model.survey import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    sizes = [int(s) for s in summary]
    panels = ("nll", "calibrated_nll", "accuracy", "emd", "group_js")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0))
    for ax, metric in zip(axes, panels):
        for j, method in enumerate(methods):
            ivs = [_finite((summary[s]["metrics"].get(method) or {}).get(metric)) for s in summary]
            shift = [x * (1 + 0.03 * (j - (len(methods) - 1) / 2)) for x in sizes]  # side by side, not on top
            line, = ax.plot(shift, [iv["mean"] for iv in ivs], marker="o", label=method)
            # drawn as bars of their own: a basic-bootstrap interval need not contain its point estimate
            ax.vlines(shift, [iv["lo"] for iv in ivs], [iv["hi"] for iv in ivs], color=line.get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("training answers", fontsize=8)
        ax.set_title(METRICS[metric] + (" (higher is better)" if metric == "accuracy" else " (lower is better)"),
                     fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None, train_one: Callable | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cuma_model.survey.scaling", description=__doc__.split("\n")[0],
                                allow_abbrev=False,  # --method (a training option) is not --methods
                                epilog="Other options go to python -m cuma_model.train (e.g. --epochs, --survey).")
    p.add_argument("--sizes", type=int, nargs="+", required=True, metavar="N", help="training answers per run")
    p.add_argument("--methods", nargs="+", default=["cuma", "mixlora", "lora"],
                   help="the first is compared with each other one")
    p.add_argument("--output-dir", default="runs/scaling")
    p.add_argument("--no-train", dest="train", action="store_false", help="only summarize finished runs")
    a, train_argv = p.parse_known_args(argv)
    if any(s < 1 for s in a.sizes) or len(set(a.methods)) != len(a.methods) or "base" in a.methods:
        p.error("--sizes take positive numbers; --methods distinct trained methods")
    if any(x.split("=")[0] in ("--method", "--train-examples", "--output-dir", "--seeds") for x in train_argv):
        p.error("--method, --train-examples, --output-dir and --seeds are set per run by the curve")
    out = Path(a.output_dir)
    if a.train:
        train_grid(a.sizes, a.methods, out, train_argv, train_one)
    summary = summarize(a.sizes, a.methods, out)
    atomic_write_bytes(out / "scaling.json", (json.dumps(summary, indent=1) + "\n").encode())
    if not summary:
        p.error(f"no finished run in {out}")
    table = markdown(summary, a.methods)
    atomic_write_bytes(out / "scaling.md", table.encode())
    plot(summary, a.methods, out / "scaling.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

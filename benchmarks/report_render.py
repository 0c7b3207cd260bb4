"""report.md from report.json: the step table first (what passed, what failed, what timed out), then each step's
results; results of a step whose needed step did not pass are headed UNVERIFIED."""
from __future__ import annotations


def _num(v, fmt=".3f") -> str:
    return "" if v is None else format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _checks_table(rows: list[dict], with_config: bool) -> list[str]:
    """One line per failing check and one per case with its worst check: the reader sees failures first."""
    head = "| config " if with_config else ""
    lines = [f"{head}| case | result | max abs | max rel (tolerance) | worst at |",
             "|" + "---|" * (6 if with_config else 5)]
    for row in rows:
        pre = f"| {row.get('config', '')} " if with_config else ""
        if "error" in row:
            lines.append(f"{pre}| {row['case']} | ERROR | | | {row['error']} |")
            continue
        checks = row["checks"]
        shown = {n: c for n, c in checks.items() if not c["ok"]}
        if checks and not shown:
            worst = max(checks, key=lambda n: checks[n].get("max_rel", 0.0))
            shown = {worst: checks[worst]}
        for name, c in shown.items():
            state = "ok (worst)" if c["ok"] else "FAIL"
            if "error" in c:
                lines.append(f"{pre}| {row['case']} | {name}: FAIL | | | {c['error']} |")
            else:
                lines.append(f"{pre}| {row['case']} | {name}: {state} | {c['max_abs']:.2e} | "
                             f"{c['max_rel']:.2e} ({c['tolerance']:.0e}) | {c['worst']} |")
    return lines


def _timing_table(rows: list[dict]) -> list[str]:
    lines = ["| shape | provider | mode | median ms | p10-p90 | back to back ms | x base |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['provider']} | {r['mode']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['shape']} | {r['provider']} | {r['mode']} | {r['median_ms']:.3f} | "
                         f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f} | {r['back_to_back_ms']:.3f} | "
                         f"{_num(r.get('x base'), '.2f')} |")
    return lines


def _launch_table(rows: list[dict]) -> list[str]:
    cards = [k.removeprefix("floor us (").removesuffix(")") for k in rows[0] if k.startswith("floor us (")]
    lines = ["| shape | launch | phase | GFLOP | MB | measured us | TB/s | TFLOP/s | "
             + " | ".join(f"floor us {c} (% of it reached)" for c in cards) + " |", "|" + "---|" * (8 + len(cards))]
    for r in rows:
        us = r.get("measured us")
        floors = " | ".join(f"{r[f'floor us ({c})']:.1f}" + (f" ({100 * r[f'floor us ({c})'] / us:.0f}%)" if us else "")
                            for c in cards)
        lines.append(f"| {r['shape']} | {r['launch']} | {r['phase']} | {r['GFLOP']:.2f} | {r['MB']:.1f} | "
                     f"{_num(us, '.1f') or 'not measured'} | {_num(r.get('TB/s'), '.2f')} | "
                     f"{_num(r.get('TFLOP/s'), '.1f')} | {floors} |")
    return lines


def _e2e_table(rows: list[dict]) -> list[str]:
    lines = ["| model | tokens | config | median ms | back to back ms | x PEFT | trainable params | peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tokens']} | {r['config']} | {r['error']} | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['tokens']} | {r['config']} | {r['median_ms']:.2f} | "
                         f"{r['back_to_back_ms']:.2f} | {_num(r.get('x PEFT'), '.2f')} | {r['trainable_params']:,} | "
                         f"{_num(r.get('peak_memory_GB'), '.1f')} |")
    return lines


SECTIONS = {
    "precompile": "First forward+backward (compile + autotune)",
    "correctness": "Correctness of each launch against fp64 (failures, else each case's worst check)",
    "autotune configs": "Every autotune config against fp64",
    "kernel tests": "Kernel test files on the device",
    "timings": "Timings (ms; per call, and back to back)",
    "sweep": "Sweep, experts alone",
    "launches": "Each launch against the roofline (measured device time; floor = roofline.py's bound)",
    "end to end": "Training step (forward + backward + AdamW), random weights",
}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# CuMA GPU report: {m['card']}", "", " · ".join(f"{k} {v}" for k, v in m.items() if k != "card"), "",
             "| step | status | seconds |", "|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['step']} | {s['status']}{' (UNVERIFIED)' if s.get('unverified') else ''} | "
                     f"{s['seconds']:.1f} |")
    for s in report["steps"]:
        res = report["results"].get(s["step"])
        if not res:
            continue
        rows = res.get("rows", [])
        lines += ["", f"## {SECTIONS[s['step']]}", ""]
        if s.get("unverified"):
            lines += [f"**UNVERIFIED**: {s['unverified']}.", ""]
        if s["status"] == "failed":
            lines += ["Step status: failed (see the rows marked FAIL or ERROR).", ""]
        elif s["status"] != "ok":
            lines += [f"Step status: {s['status']}; the rows below are those it finished.", ""]
        if res.get("error"):
            lines += [res["error"], ""]
        if not rows:
            lines.append("(no rows)")
        elif s["step"] == "precompile":
            lines += ["| shape | first call s |", "|---|---|"]
            lines += [f"| {r['shape']} | {r['first_call_s']:.1f} |" for r in rows]
        elif s["step"] in ("correctness", "autotune configs"):
            lines += _checks_table(rows, s["step"] == "autotune configs")
        elif s["step"] == "kernel tests":
            lines += [f"{rows[0]['summary']} ({rows[0].get('passed', 0)} passed before the end)", ""]
            lines += [f"- FAILED {f}" for f in rows[0]["failures"]]
        elif s["step"] in ("timings", "sweep"):
            lines += _timing_table(rows)
        elif s["step"] == "launches":
            lines += _launch_table(rows)
            for kernel, choices in res.get("autotune choices", {}).items():
                for key, cfg in choices.items():
                    lines.append(f"- autotune chose for {kernel} {key}: {cfg}")
        elif s["step"] == "end to end":
            lines += _e2e_table(rows)
    return "\n".join(lines) + "\n"

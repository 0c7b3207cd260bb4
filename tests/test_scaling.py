"""The scaling curve: a grid of runs trained once each, resumed when interrupted, compared answer by answer."""
import json

import pytest
from test_train import parts

from cuma_model.survey import scaling as S
from cuma_model.survey import train as T

TRAIN = ["--train-examples", "0", "--eval-examples", "24", "--batch-size", "8", "--lr", "1e-2", "--epochs", "1",
         "--num-experts", "4", "--r", "4", "--router-hidden-dim", "16", "--routing-examples", "0", "--no-plots",
         "--warmup-steps", "0"]


def test_scaling_curve_trains_each_run_once_and_compares_the_first_method(tmp_path):
    trained = []

    def train_one(argv):
        trained.append(argv[argv.index("--method") + 1] + "-" + argv[argv.index("--train-examples") + 1])
        return T.train(argv, **parts())

    out = tmp_path / "curve"
    argv = ["--sizes", "16", "48", "--methods", "cuma", "lora", "--output-dir", str(out), *TRAIN[2:]]
    assert S.main(argv, train_one=train_one) == 0
    assert trained == ["cuma-16", "lora-16", "cuma-48", "lora-48"]
    summary = json.loads((out / "scaling.json").read_text())
    assert list(summary) == ["16", "48"]
    for size, s in summary.items():
        assert s["n_eval"] == 24
        run = json.loads((out / f"cuma-{size}" / "metrics.json").read_text())
        assert run["data"]["n_train"] == int(size)
        assert s["metrics"]["cuma"]["accuracy"]["mean"] == pytest.approx(run["metrics"]["accuracy"])
        lo, hi = s["paired"]["lora"]["accuracy"]["lo"], s["paired"]["lora"]["accuracy"]["hi"]
        diff = run["metrics"]["accuracy"] - json.loads(
            (out / f"lora-{size}" / "metrics.json").read_text())["metrics"]["accuracy"]
        assert s["paired"]["lora"]["accuracy"]["mean"] == pytest.approx(diff) and lo <= diff <= hi
        assert {"emd", "group_js", "spread", "nll", "brier", "calibrated_nll"} <= set(s["paired"]["lora"])
        assert s["metrics"]["cuma"]["calibrated_nll"]["mean"] == pytest.approx(run["metrics"]["calibrated"]["nll"])
    assert "| 48 | lora |" in (out / "scaling.md").read_text()
    assert (out / "scaling.png").stat().st_size > 0
    # an interval that does not contain its point estimate (basic bootstrap) still plots
    summary["16"]["metrics"]["cuma"]["emd"] = {"mean": 0.3, "lo": 0.1, "hi": 0.2}
    assert S.plot(summary, ["cuma", "lora"], tmp_path / "odd.png").stat().st_size > 0
    # run again: nothing is trained twice; a run without its predictions (interrupted) is trained again
    (out / "lora-48" / "predictions.jsonl").unlink()
    S.main(argv, train_one=train_one)
    assert trained[4:] == ["lora-48"]


def test_scaling_curve_refuses_runs_scored_on_other_answers(tmp_path):
    out = tmp_path / "curve"
    base = ["--sizes", "16", "--methods", "cuma", "lora", "--output-dir", str(out)]
    S.main(base + TRAIN[2:], train_one=lambda argv: T.train(argv, **parts()))
    T.train([*TRAIN[2:], "--method", "lora", "--train-examples", "16", "--output-dir", str(out / "lora-16"),
             "--data-seed", "5", "--overwrite"], **parts())
    with pytest.raises(ValueError, match="other answers"):
        S.main(base + ["--no-train"])
    with pytest.raises(SystemExit):
        S.main(base + ["--method", "cuma"])

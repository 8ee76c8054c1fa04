"""`spacejax bench stability` and `spacejax plot` at a tiny size: shared theta_0, the constants of
PAPER.md at the first step, curves.json / curves.csv columns, plots and summary.md."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from spacejax import bench, cli, config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "stability.yaml"
TINY = ["data.num_train=32", "data.num_eval=16", "selfplay.eval_kl_samples=64", "selfplay.sft_epochs=1",
        "selfplay.iterations=1", "train.epochs=1", "train.batch_size=16", "sampler.batch_size=64"]
METHODS = ("space:mu=1", "spin:beta=0.1")
SEEDS = (0, 1)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability")
    code = cli.main(["bench", "stability", "--config", str(CONFIG), "--out", str(out), "--seeds", str(len(SEEDS)),
                     "--methods", ",".join(METHODS), *TINY])
    assert code == 0
    return out


def test_curves_json_holds_every_run_with_a_shared_theta0(bench_out):
    curves = json.loads((bench_out / "curves.json").read_text())
    assert {(r["method"], r["seed"]) for r in curves["runs"]} == {(m, s) for m in METHODS for s in SEEDS}
    start = {(r["method"], r["seed"]): r["eval/kl"] for r in curves["records"]
             if r["record"] == "eval" and r["iteration"] == -1}
    assert set(start) == {(m, s) for m in METHODS for s in SEEDS}
    for seed in SEEDS:  # the same theta_0 and the same p_data draws: bitwise the same KL
        assert start[METHODS[0], seed] == start[METHODS[1], seed]
    assert start[METHODS[0], 0] != start[METHODS[0], 1]
    for method in METHODS:
        for seed in SEEDS:
            its = sorted(r["iteration"] for r in curves["records"]
                         if r["record"] == "eval" and (r["method"], r["seed"]) == (method, seed))
            assert its == [-1, 0]
    for seed in SEEDS:  # the first method trained theta_0; the others started from its params
        first = bench_out / f"seed_{seed}" / bench.parse_method(METHODS[0]).dirname
        assert (first / "sft" / "DONE").exists()
        for method in METHODS[1:]:
            workdir = bench_out / f"seed_{seed}" / bench.parse_method(method).dirname
            assert config.load(workdir / "config.yaml").init_from == str(first / "sft" / "final")
            assert not (workdir / "sft").exists()


def test_first_step_loss_is_the_constant_of_paper(bench_out):
    curves = json.loads((bench_out / "curves.json").read_text())
    first = {(r["method"], r["seed"]): r["loss"] for r in curves["records"]
             if r["record"] == "step" and r["iteration"] == 0 and r["step"] == 1}
    for seed in SEEDS:
        assert first["space:mu=1", seed] == pytest.approx(math.log(4), abs=1e-5)
        assert first["spin:beta=0.1", seed] == pytest.approx(math.log(2), abs=1e-5)


def test_curves_csv_columns_and_rows(bench_out):
    with (bench_out / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"method", "seed", "record", "iteration", "step", "global_step", "loss", "rewards/real",
            "rewards/generated", "rewards/margins", "rewards/accuracies", "nce/accuracy", "logps/real",
            "logps/generated", "grad_norm", "learning_rate", "eval/kl", "eval/kl_stderr", "eval/nll",
            "eval/loss_start", "eval/loss_end"} <= columns
    steps = [r for r in rows if r["record"] == "step"]
    evals = [r for r in rows if r["record"] == "eval"]
    assert len(evals) == len(METHODS) * len(SEEDS) * 2
    assert all(float(r["eval/kl"]) > 0 for r in evals)
    assert len(steps) == len(METHODS) * len(SEEDS) * 2  # 32 pairs / 16 per step, one epoch
    assert {r["method"] for r in rows} == set(METHODS)
    assert all(np.isfinite(float(r["loss"])) for r in steps)


def test_plots_and_summary(bench_out):
    for name in ("kl.png", "steps.png"):
        assert (bench_out / name).read_bytes()[:8] == PNG
    summary = (bench_out / "summary.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in summary
    assert "it -1" in summary and "monotone" in summary


def test_plot_regenerates_from_workdirs(bench_out, tmp_path):
    workdirs = sorted(str(p) for p in bench_out.glob("seed_*/*") if p.is_dir())
    assert cli.main(["plot", *workdirs, "--out", str(tmp_path)]) == 0
    for name in ("kl.png", "steps.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    again = json.loads((tmp_path / "curves.json").read_text())["records"]
    original = json.loads((bench_out / "curves.json").read_text())["records"]
    key = lambda r: (r["method"], r["seed"], r["record"], r["iteration"], r["step"])  # noqa: E731
    assert sorted(again, key=key) == sorted(original, key=key)
    assert cli.main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2


def test_method_specs():
    assert bench.parse_method("spin:beta=0.5:selfplay.mix_previous=true").overrides == (
        "loss.kind=spin", "loss.beta=0.5", "selfplay.mix_previous=true")
    assert bench.parse_method("space:mu=2").dirname == "space_mu2"
    with pytest.raises(config.ConfigError, match="unknown loss kind"):
        bench.parse_method("spinn:beta=1")
    with pytest.raises(config.ConfigError, match="key=value"):
        bench.parse_method("spin:beta")
    cfg = config.load(CONFIG, ["loss.kind=space", "loss.mu=4.0"])
    assert bench.describe(cfg) == "space:mu=4"
    assert bench.describe(config.load(CONFIG, ["loss.kind=sft"])) == "sft"
    assert bench.describe(config.load(CONFIG, ["loss.kind=spin", "loss.beta=0.1"])) == "spin:beta=0.1"
    assert bench.DEFAULT_METHODS == ("spin:beta=0.1", "spin:beta=0.5", "spin:beta=1", "space:mu=0.5", "space:mu=1",
                                     "space:mu=2", "space:mu=4", "sft")


def test_the_default_config_loads_for_every_default_method():
    for method in bench.DEFAULT_METHODS:
        cfg = config.load(CONFIG, list(bench.parse_method(method).overrides))
        assert bench.describe(cfg) == method
        assert cfg.selfplay.sft_epochs > 0 and cfg.selfplay.iterations == 3

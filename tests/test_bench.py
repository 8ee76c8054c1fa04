"""`spacejax bench stability` and `spacejax plot` at a tiny size: shared theta_0 per regime, the
constants of PAPER.md at the first step, `sft:data=4x` on 4x the rows, theta_0 on 4N, curves.json /
curves.csv columns, plots and summary.md; the paired statistics and the claims against hand
computations on synthetic records."""

import csv
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from spacejax import bench, cli, config, metrics
from spacejax.bench import claims, curves

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "stability.yaml"
TEACHER_CONFIG = ROOT / "configs" / "stability_teacher.yaml"
N, BATCH = 32, 16
TINY = [f"data.num_train={N}", "data.num_eval=16", "selfplay.eval_kl_samples=64", "selfplay.sft_epochs=1",
        "selfplay.iterations=1", "train.epochs=1", f"train.batch_size={BATCH}", "sampler.batch_size=64"]
METHODS = ("space:mu=1", "sft:data=4x")  # theta_0 on N: space:mu=1 is the theta_0 run
THETA0_METHODS = ("spin:beta=0.1",)  # theta_0 on 4N: sft:data=4x (added) is the theta_0 run
SPIN_4N = "spin:beta=0.1 [theta_0 on 4N]"
CURVES = (*METHODS, "sft:data=4x [theta_0 on 4N]", SPIN_4N)
SEEDS = (0,)  # one seed keeps CI short; the statistics over seeds are tested on synthetic curves below
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability")
    code = cli.main(["bench", "stability", "--config", str(CONFIG), "--out", str(out), "--seeds", str(len(SEEDS)),
                     "--methods", ",".join(METHODS), "--theta0", "1x,4x", "--theta0-methods", ",".join(THETA0_METHODS),
                     *TINY])
    assert code == 0
    return out


def evals(curves_json, key="eval/kl", iteration=-1) -> dict:
    return {(r["method"], r["seed"]): r[key] for r in curves_json["records"]
            if r["record"] == "eval" and r["iteration"] == iteration}


def test_curves_json_holds_every_run_with_a_shared_theta0_per_regime(bench_out):
    curves_json = json.loads((bench_out / "curves.json").read_text())
    assert {(r["method"], r["seed"]) for r in curves_json["runs"]} == {(m, s) for m in CURVES for s in SEEDS}
    start = evals(curves_json)
    assert set(start) == {(m, s) for m in CURVES for s in SEEDS}
    for seed in SEEDS:  # the same theta_0 and the same p_data draws: bitwise the same KL within a regime
        assert start[METHODS[0], seed] == start[METHODS[1], seed]
        assert start[CURVES[2], seed] == start[SPIN_4N, seed]
        assert start[METHODS[0], seed] != start[SPIN_4N, seed]  # theta_0 on N is not theta_0 on 4N
    for (method, seed) in start:
        its = sorted(r["iteration"] for r in curves_json["records"]
                     if r["record"] == "eval" and (r["method"], r["seed"]) == (method, seed))
        assert its == [-1, 0]
    for seed in SEEDS:  # each regime's first run trained theta_0; the others started from its params
        for regime, carrier, others in ((bench_out, "space_mu1", ["sft_data4x"]),
                                        (bench_out / "theta0_4N", "sft_data4x", ["spin_beta0.1"])):
            first = regime / f"seed_{seed}" / carrier
            assert (first / "sft" / "DONE").exists()
            for name in others:
                workdir = regime / f"seed_{seed}" / name
                assert config.load(workdir / "config.yaml").init_from == str(first / "sft" / "final")
                assert not (workdir / "sft").exists()


def steps_of(workdir, iteration) -> int:
    return sum(1 for r in metrics.read(workdir) if r["iteration"] == iteration and "event" not in r)


def test_sft_data_4x_trains_on_4x_the_rows_and_theta0_4n_is_sft_on_them(bench_out):
    for seed in SEEDS:
        base, four = bench_out / f"seed_{seed}" / "space_mu1", bench_out / f"seed_{seed}" / "sft_data4x"
        assert config.load(base / "config.yaml").data.num_train == N
        assert config.load(four / "config.yaml").data.num_train == 4 * N
        assert steps_of(base, 0) * BATCH == N  # one epoch: every row once
        assert steps_of(four, 0) * BATCH == 4 * N
        carrier, spin = (bench_out / "theta0_4N" / f"seed_{seed}" / name for name in ("sft_data4x", "spin_beta0.1"))
        assert steps_of(carrier, -1) * BATCH == 4 * N  # theta_0 on 4N: its SFT warm-up saw 4N rows
        assert steps_of(base, -1) * BATCH == N
        assert config.load(spin / "config.yaml").data.num_train == N and steps_of(spin, 0) * BATCH == N


def test_first_step_loss_is_the_constant_of_paper(bench_out):
    curves_json = json.loads((bench_out / "curves.json").read_text())
    first = {(r["method"], r["seed"]): r["loss"] for r in curves_json["records"]
             if r["record"] == "step" and r["iteration"] == 0 and r["step"] == 1}
    for seed in SEEDS:
        assert first["space:mu=1", seed] == pytest.approx(math.log(4), abs=1e-5)
        assert first[SPIN_4N, seed] == pytest.approx(math.log(2), abs=1e-5)


def test_curves_csv_columns_and_rows(bench_out):
    with (bench_out / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"method", "regime", "seed", "record", "iteration", "step", "global_step", "loss", "rewards/real",
            "rewards/generated", "rewards/margins", "rewards/accuracies", "nce/accuracy", "logps/real",
            "logps/generated", "grad_norm", "learning_rate", "eval/kl", "eval/kl_stderr", "eval/reverse_kl",
            "eval/reverse_kl_stderr", "eval/sample_logp_data", "eval/outside_support", "eval/nll",
            "eval/loss_start", "eval/loss_end"} <= columns
    steps = [r for r in rows if r["record"] == "step"]
    evals_ = [r for r in rows if r["record"] == "eval"]
    assert len(evals_) == len(CURVES) * len(SEEDS) * 2
    assert all(float(r["eval/kl"]) > 0 for r in evals_)
    assert len(steps) == len(SEEDS) * (2 + 8 + 8 + 2)  # N / 16 per epoch, 4N for sft:data=4x
    assert {r["method"] for r in rows} == set(CURVES)
    assert {r["regime"] for r in rows} == {"1", "4"}
    assert all(0 <= float(r["eval/outside_support"]) <= 1 for r in evals_)  # the sample-quality evaluator's
    assert all(np.isfinite(float(r["loss"])) for r in steps)


def test_plots_and_summary(bench_out):
    for name in ("kl.png", "steps.png"):
        assert (bench_out / name).read_bytes()[:8] == PNG
    summary = (bench_out / "summary.md").read_text()
    for method in CURVES:
        assert f"| {method} |" in summary
    assert "it -1" in summary and "monotone" in summary and "## PAPER.md's claims, as measured" in summary
    small = config.load(CONFIG, TINY)
    assert curves.nested_data(small, config.load(CONFIG, [*TINY, f"data.num_train={4 * N}"]))
    assert "WARNING" not in summary  # it would say that N is not a part of 4N


def test_plot_regenerates_from_workdirs(bench_out, tmp_path):
    workdirs = sorted(str(p) for p in [*bench_out.glob("seed_*/*"), *bench_out.glob("theta0_4N/seed_*/*")]
                      if p.is_dir())
    assert cli.main(["plot", *workdirs, "--out", str(tmp_path)]) == 0
    for name in ("kl.png", "steps.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    again = json.loads((tmp_path / "curves.json").read_text())
    original = json.loads((bench_out / "curves.json").read_text())
    key = lambda r: (r["method"], r["seed"], r["record"], r["iteration"], r["step"])  # noqa: E731
    assert sorted(again["records"], key=key) == sorted(original["records"], key=key)  # labels from bench.json
    assert again["notes"] == original["notes"]
    assert cli.main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2


def test_method_specs():
    assert bench.parse_method("spin:beta=0.5:selfplay.mix_previous=true").overrides == (
        "loss.kind=spin", "loss.beta=0.5", "selfplay.mix_previous=true")
    assert bench.parse_method("space:mu=2").dirname == "space_mu2"
    assert bench.parse_method("sft:data=4x") == bench.Method("sft:data=4x", ("loss.kind=sft",), data=4)
    assert bench.parse_method("spin:recipe").recipe
    for spec, match in (("spinn:beta=1", "unknown loss kind"), ("spin:beta", "key=value"),
                        ("space:recipe", "only spin has a recipe"), ("sft:data=4", "data=4x"),
                        ("sft:data=0x", "data=4x")):
        with pytest.raises(config.ConfigError, match=match):
            bench.parse_method(spec)
    cfg = config.load(CONFIG, ["loss.kind=space", "loss.mu=4.0"])
    assert bench.describe(cfg) == "space:mu=4"
    assert bench.describe(config.load(CONFIG, ["loss.kind=sft"])) == "sft"
    assert bench.describe(config.load(CONFIG, ["loss.kind=spin", "loss.beta=0.1"])) == "spin:beta=0.1"
    base = config.load(CONFIG, ["data.num_train=100"])
    four = bench.method_config(CONFIG, bench.parse_method("sft:data=4x"), ["data.num_train=100"])
    assert four.data.num_train == 400 and bench.describe(four, base) == "sft:data=4x"
    assert bench.describe(four) == "sft"  # without the benchmark's config


def test_spin_recipe_is_spins_schedule_on_the_benchmarks_learning_rate():
    cfg = bench.method_config(CONFIG, bench.parse_method("spin:recipe"))
    lr = config.load(CONFIG).train.learning_rate
    assert cfg.selfplay.mix_previous and bench.describe(cfg) == "spin:recipe"
    phases = [config.at_iteration(cfg, t) for t in range(cfg.selfplay.iterations)]
    assert [p.train.learning_rate for p in phases] == pytest.approx([lr, lr, lr / 5, lr / 5, lr / 5, lr / 5])
    assert [p.loss.beta for p in phases] == [0.1, 0.1, 0.1, 5.0, 5.0, 5.0]
    faster = bench.method_config(CONFIG, bench.parse_method("spin:recipe:train.learning_rate=1e-2"))
    assert config.at_iteration(faster, 2).train.learning_rate == pytest.approx(2e-3)  # the spec's lr wins
    assert bench.describe(config.load(CONFIG, ["loss.kind=spin", "loss.beta=0.1", "selfplay.mix_previous=true"])) \
        == "spin:beta=0.1:selfplay.mix_previous=true"


def test_plan_puts_each_regimes_theta0_run_first():
    runs = bench.plan(CONFIG, "/tmp/out", seeds=1, methods=("spin:beta=1", "sft:data=4x"), theta0=(1, 4),
                      theta0_methods=("space:mu=1",))
    carrier = "/tmp/out/theta0_4N/seed_0/sft_data4x_selfplay.iterations1"  # theta0_run(4): added, one iteration
    assert [(r.method, r.regime, str(r.workdir)) for r in runs] == [
        ("spin:beta=1", 1, "/tmp/out/seed_0/spin_beta1"), ("sft:data=4x", 1, "/tmp/out/seed_0/sft_data4x"),
        ("sft:data=4x:selfplay.iterations=1", 4, carrier), ("space:mu=1", 4, "/tmp/out/theta0_4N/seed_0/space_mu1")]
    assert [r.cfg.init_from for r in runs] == [None, "/tmp/out/seed_0/spin_beta1/sft/final", None,
                                               carrier + "/sft/final"]
    assert [r.cfg.data.num_train for r in runs] == [512, 2048, 2048, 512]
    assert [r.cfg.selfplay.iterations for r in runs] == [6, 6, 1, 6]
    assert runs[2].cfg.selfplay.sft_epochs > 0 and runs[3].cfg.selfplay.sft_epochs == 0
    with pytest.raises(config.ConfigError, match="repeats"):
        bench.plan(CONFIG, "/tmp/out", seeds=1, methods=("space:mu=1", "space:mu=1.0"))
    with pytest.raises(config.ConfigError, match="at least 1 seed"):
        bench.plan(CONFIG, "/tmp/out", seeds=0)


@pytest.mark.parametrize("path", [CONFIG, TEACHER_CONFIG])
def test_the_default_benchmark_is_checked_for_both_tasks(path, tmp_path):
    runs = bench.plan(path, tmp_path, seeds=1, theta0=bench.DEFAULT_THETA0)  # every config checked, as the bench does
    names = [curves.label(r.method, r.regime) for r in runs]
    assert names == [*bench.DEFAULT_METHODS, "sft:data=4x:selfplay.iterations=1 [theta_0 on 4N]",
                     *(curves.label(m, 4) for m in bench.DEFAULT_THETA0_METHODS)]
    assert {r.cfg.data.source for r in runs} == {"teacher" if path == TEACHER_CONFIG else "toy"}
    assert all(r.cfg.selfplay.iterations == 6 for r in runs if "iterations=1" not in r.method)
    assert runs[0].cfg.selfplay.sft_epochs > 0


# ----------------------------------------------------------------------------------- statistics


def test_t_quantile_against_the_table_and_scipy():
    table = {1: 12.7062047, 2: 4.3026527, 4: 2.7764451, 9: 2.2621572, 30: 2.0422725}  # t_{0.975, df}
    for df, value in table.items():
        assert claims.t_quantile(0.975, df) == pytest.approx(value, abs=1e-6)
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 11), 15, 20, 40):
        for p in (0.9, 0.975, 0.995):
            assert claims.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_paired_differences_against_a_hand_computation():
    # d = [0.5, 1.5, -0.5, 1.5, 1.0]: mean 0.8, sd sqrt(2.8 / 4), half-width t_{0.975,4} sd / sqrt(5)
    result = claims.paired([1.0, 2.5, 0.5, 3.0, 1.0], [0.5, 1.0, 1.0, 1.5, 0.0])
    half = 2.7764451 * math.sqrt(0.7) / math.sqrt(5)  # 1.038843
    assert (result.mean, result.below, result.above, result.n) == (pytest.approx(0.8), 1, 4, 5)
    assert (result.low, result.high) == (pytest.approx(0.8 - half, abs=1e-6), pytest.approx(0.8 + half, abs=1e-6))
    assert result.cell() == "+0.800 [-0.239, +1.839] 1-/4+"
    assert result.verdict("above") == "not resolved"
    assert claims.paired([2.0, 3.0, 4.0], [0.0, 0.5, 1.0]).verdict("above") == "yes"
    assert claims.paired([2.0, 3.0, 4.0], [0.0, 0.5, 1.0]).verdict("below") == "no"
    one = claims.paired([1.0], [0.5])
    assert math.isnan(one.low) and one.cell() == "+0.500 0-/1+" and one.verdict("above") == "not resolved"


def noise(seed: int, t: int) -> float:
    """The synthetic curves' seed-dependent noise at iteration t, the same for every method."""
    return 0.003 * ((seed * 7 + t * 3) % 5 - 2)


SYNTHETIC_SEEDS = (0, 1, 2)
SHAPES = {  # (regime, method) -> forward KL at iteration t, before the seed's offset and noise
    (1, "space:mu=1"): lambda t: 2.0 - 0.1 * (t + 1),
    (1, "space:mu=4"): lambda t: 2.0 - 0.1 * (t + 1) + 0.001 * (t + 1),
    (1, "spin:beta=1"): lambda t: 2.0 - 0.2 * min(t + 1, 3) + 0.15 * max(t - 2, 0),
    (1, "sft"): lambda t: 2.0 - 0.12 * (t + 1),
    (1, "sft:data=4x"): lambda t: 2.0 - 0.2 * (t + 1),
    (4, "sft:data=4x"): lambda t: 1.0 + 0.01 * (t + 1),
    (4, "space:mu=1"): lambda t: 1.0 + 0.05 * (t + 1),
}


def synthetic_curves() -> dict:
    """Curves of the shape `collect` makes, with known answers: SPACE falls at every iteration, SPIN
    bottoms out at iteration 2 and rises, sft:data=4x beats SPACE, on 4N nothing beats theta_0; the
    reverse KL (half the forward) and the support keys alongside."""
    curves_ = {"runs": [], "records": [], "notes": []}
    offsets = {0: 0.0, 1: 0.1, 2: -0.05}  # the seeds' theta_0 differ
    for (regime, method), shape in SHAPES.items():
        name = curves.label(method, regime)
        for seed in SYNTHETIC_SEEDS:
            curves_["runs"].append({"method": name, "base_method": method, "regime": regime, "seed": seed,
                                    "task": "toy", "workdir": f"/x/{regime}/{seed}/{method}"})
            for t in range(-1, 6):
                kl = shape(t) + offsets[seed] + noise(seed, t)
                curves_["records"].append({"method": name, "regime": regime, "seed": seed, "record": "eval",
                                           "iteration": t, "step": 0, "global_step": 0, "eval/kl": kl,
                                           "eval/reverse_kl": kl / 2, "eval/reverse_kl_stderr": 0.01,
                                           "eval/sample_logp_data": -10.0 + t, "eval/outside_support": 0.01})
    return curves_


def mean_change(regime: int, method: str, t: int, s: int) -> float:
    """The mean over the synthetic seeds of a curve's KL at t minus at s, by hand."""
    return float(np.mean([SHAPES[regime, method](t) - SHAPES[regime, method](s) + noise(seed, t) - noise(seed, s)
                          for seed in SYNTHETIC_SEEDS]))


def test_claims_answer_the_synthetic_curves():
    rows = claims.claims(synthetic_curves(), curves.regime_label)

    def claim(start, theta_0="theta_0 on N"):
        return next(r for r in rows if r["claim"].startswith(start) and r["theta_0"] == theta_0)

    for key in ("eval/kl", "eval/reverse_kl"):
        improves = claim("SPACE improves at every iteration")[key]
        assert improves.startswith("space:mu=1: yes, falls at every step in 3/3 seeds")
        assert "space:mu=4: yes" in improves
    spin = claim("SPIN falls after iteration 2")["eval/kl"]
    assert spin.startswith(f"spin:beta=1: yes, it 5 - it 2: {mean_change(1, 'spin:beta=1', 5, 2):+.3f}")
    assert spin.endswith("best mean iteration 2")
    beats = claim("SPACE on N beats SFT on 4N: (a)")["eval/kl"]
    assert beats.startswith("space:mu=1: no, minus sft:data=4x at it 5: +0.600")  # (0.2 - 0.1) x 6, same noise
    protocol = claim("SPACE on N beats SFT on 4N: (b)", "theta_0 on 4N")["eval/kl"]
    assert f"space:mu=1: no, it 5 - theta_0: {mean_change(4, 'space:mu=1', 5, -1):+.3f}" in protocol
    optimum = claim("SPACE's optimum is p_data for every mu")["eval/kl"]
    assert optimum.startswith("no: not the same value for every mu") and "space:mu=4 - space:mu=1: +0.006" in optimum
    assert not any(r["claim"].startswith("SPIN") and r["theta_0"] == "theta_0 on 4N" for r in rows)  # no SPIN there


def test_summary_plot_and_csv_of_the_new_keys(tmp_path):
    curves_ = synthetic_curves()
    curves.write(curves_, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    for title in ("## KL(p_data || p_theta_t): forward", "## KL(p_theta_t || p_data): reverse",
                  "## Fraction of the model's own samples outside", "## Mean log p_data(y|x)",
                  "### forward KL(p_data ‖ p_theta): minus space:mu=1 (theta_0 on N)",
                  "### reverse KL(p_theta ‖ p_data): minus sft (theta_0 on N)",
                  "### forward KL(p_data ‖ p_theta): minus space:mu=1 (theta_0 on 4N)",
                  "| claim | theta_0 | task | forward KL(p_data ‖ p_theta) | reverse KL(p_theta ‖ p_data) |"):
        assert title in summary
    # theta_0 against continued SFT's best on N (sft at it 5: 2 - 0.72) and on 4N (sft:data=4x at it 5: 2 - 1.2)
    offset = np.mean([0.0, 0.1, -0.05])
    start = 2.0 + offset + np.mean([noise(seed, -1) for seed in SYNTHETIC_SEEDS])
    at_5 = 2.0 + offset + np.mean([noise(seed, 5) for seed in SYNTHETIC_SEEDS])
    sft, sft_4n = at_5 - 0.12 * 6, at_5 - 0.2 * 6
    assert (f"- theta_0 on N: theta_0 {start:.3f}; minus SFT on N's best ({sft:.3f}, sft at it 5): {start - sft:+.3f}; "
            f"minus SFT on 4N's best ({sft_4n:.3f}, sft:data=4x at it 5): {start - sft_4n:+.3f}.") in summary
    start_4n = 1.0 + offset + np.mean([noise(seed, -1) for seed in SYNTHETIC_SEEDS])
    assert (f"- theta_0 on 4N: theta_0 {start_4n:.3f}; minus SFT on N's best ({sft:.3f}, sft at it 5): "
            f"{start_4n - sft:+.3f};") in summary
    # sft:data=4x minus space:mu=1 at iteration 0: -0.1 in every seed (the noise is the same for both)
    row = next(line for line in summary.splitlines() if line.startswith("| sft:data=4x | -0.100"))
    assert "3-/0+" in row
    with (tmp_path / "curves.csv").open() as f:
        columns = set(next(csv.reader(f)))
    assert {"eval/reverse_kl", "eval/reverse_kl_stderr", "eval/sample_logp_data", "eval/outside_support"} <= columns
    header = (tmp_path / "kl.png").read_bytes()[:24]
    assert header[:8] == PNG  # three panels a row (forward, reverse, support), a row per regime: 6.5 x 4.5 in each
    assert struct.unpack(">II", header[16:24]) == (round(3 * 6.5 * 110), round(2 * 4.5 * 110))

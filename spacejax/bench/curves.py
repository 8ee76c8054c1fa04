"""Loss stability curves (PAPER.md, "What loss stability curves are"): SPIN, SPACE and SFT from one
shared theta_0 on the task with known truth, over several seeds, through the real loop.

    DIR/seed_S/<method>/      a spacejax run directory (config.yaml, metrics.jsonl, sft/, iter_XXX/)
    DIR/curves.json           every step and evaluation record, tagged with method and seed
    DIR/curves.csv            the same records, one row each
    DIR/kl.png                KL(p_data || p_theta_t) per iteration: mean over seeds, min-max band
    DIR/steps.png             per-step loss, rewards/real, rewards/generated, logps/real with
                              iteration boundaries
    DIR/summary.md            KL per iteration (mean, sd), monotonicity, best iteration per method

theta_0 is shared: for each seed the first method runs the SFT warm-up (workdir/sft/, iteration -1);
every other method of that seed starts from its params (`init_from: <first>/sft/final`, no SFT of its
own), and its curve takes theta_0's evaluation from that run. So every method's curve starts at the
same KL, and every method directory is a run that `spacejax train` resumes and `spacejax plot` reads.

A method is written `KIND[:KEY=VALUE]...`: KIND is a registered loss (losses.LOSSES), a bare KEY is
a `loss.` field (`spin:beta=0.1`, `space:mu=2`, `dpo:beta=0.1:label_smoothing=0.1`, `spin:spin_kind=hinge`),
a dotted KEY is any config override (`spin:beta=0.5:selfplay.mix_previous=true`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from spacejax import config, losses, metrics, selfplay, storage


DEFAULT_METHODS = ("spin:beta=0.1", "spin:beta=0.5", "spin:beta=1", "space:mu=0.5", "space:mu=1",
                   "space:mu=2", "space:mu=4", "sft")
STEP_KEYS = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
             "nce/accuracy", "logps/real", "logps/generated", "logps/real_per_token",
             "logps/generated_per_token", "grad_norm", "learning_rate", "tokens_per_second")
EVAL_KEYS = ("eval/kl", "eval/kl_stderr", "eval/nll", "eval/nll_per_token", "eval/loss_start", "eval/loss_end",
             "eval/generation_length")
# The step plots: (metric, axis label).
STEP_PLOTS = (("loss", "loss (nats)"), ("rewards/real", "rewards/real: r(y) (nats)"),
              ("rewards/generated", "rewards/generated: r(y') (nats)"), ("logps/real", "logps/real: log p(y|x) (nats)"))


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # canonical: kind, then the loss hyperparameters it sets (`space:mu=1`)
    overrides: tuple[str, ...]

    @property
    def dirname(self) -> str:
        return self.name.replace(":", "_").replace("=", "").replace("/", "_")


def parse_method(spec: str) -> Method:
    """`KIND[:KEY=VALUE]...` -> Method; an unknown kind or a malformed part raises ConfigError."""
    kind, *parts = spec.strip().split(":")
    try:
        losses.get_loss(kind)
    except ValueError as error:
        raise config.ConfigError(f"method {spec!r}: {error}") from None
    overrides = [f"loss.kind={kind}"]
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise config.ConfigError(f"method {spec!r}: {part!r} must look like key=value")
        overrides.append(f"{key if '.' in key else 'loss.' + key}={value}")
    return Method(spec.strip(), tuple(overrides))


def describe(cfg: config.RunConfig) -> str:
    """The canonical method name of a run's config: the loss kind, then `KEY=VALUE` (KEY its `loss.`
    field) for each float hyperparameter of the loss that the config sets (not null) and each option
    off its default, then `selfplay.mix_previous=true` when set: `spin:beta=0.1`, `space:mu=2`,
    `spin:beta=0.1:spin_kind=hinge`, `sft`."""
    loss = losses.get_loss(cfg.loss.kind)
    parts = [cfg.loss.kind]
    for name, value in loss.config_values(cfg.loss).items():
        if name in loss.hyperparameters and value is not None:
            parts.append(f"{loss.config_key(name)}={value:g}")
        elif name in loss.options and value != loss.defaults[name]:
            parts.append(f"{loss.config_key(name)}={str(value).lower() if isinstance(value, bool) else value}")
    if cfg.selfplay.mix_previous:
        parts.append("selfplay.mix_previous=true")
    return ":".join(parts)


# ----------------------------------------------------------------------------------- running


def stability(config_path, out, seeds: int = 5, methods: Sequence[str] = DEFAULT_METHODS,
              overrides: Sequence[str] = (), first_seed: int = 0, plots: bool = True) -> dict:
    """Run (or resume) every method for every seed, then write curves, plots and summary.md.
    Returns the curves (see `collect`)."""
    out = Path(out).absolute()
    parsed, configs = [], {}
    for spec in methods:  # every config is built and checked before anything runs
        method = parse_method(spec)
        per_seed = {seed: config.load(config_path, [*overrides, *method.overrides, f"seed={seed}"])
                    for seed in range(first_seed, first_seed + seeds)}
        if parsed:  # from the first method's theta_0
            per_seed = {seed: dataclasses.replace(
                cfg, init_from=str(out / f"seed_{seed}" / parsed[0].dirname / "sft" / "final"),
                selfplay=dataclasses.replace(cfg.selfplay, sft_epochs=0)) for seed, cfg in per_seed.items()}
        for cfg in per_seed.values():
            if not parsed and not cfg.selfplay.sft_epochs:
                raise config.ConfigError("selfplay.sft_epochs must be > 0: the benchmark starts every method "
                                         "from the same SFT warm-up theta_0")
            selfplay.check(cfg)
        method = dataclasses.replace(method, name=describe(per_seed[first_seed]))  # `space:mu=1.0` -> `space:mu=1`
        if method.name in [m.name for m in parsed]:
            raise config.ConfigError(f"method {spec!r} repeats {method.name}")
        parsed.append(method)
        configs.update({(seed, method.name): cfg for seed, cfg in per_seed.items()})
    out.mkdir(parents=True, exist_ok=True)
    runs, seconds = [], {}
    for seed in range(first_seed, first_seed + seeds):
        for method in parsed:
            workdir = out / f"seed_{seed}" / method.dirname
            started = time.perf_counter()
            selfplay.run(configs[seed, method.name], workdir)
            seconds[str(workdir.relative_to(out))] = round(time.perf_counter() - started, 1)
            print(f"bench stability: seed {seed} {method.name}: {seconds[str(workdir.relative_to(out))]} s", flush=True)
            runs.append(workdir)
    (out / "timings.json").write_text(json.dumps(seconds, indent=1))  # this invocation's wall seconds per run
    curves = collect(runs)
    write(curves, out, plots=plots)
    return curves


# ----------------------------------------------------------------------------------- curves


def collect(workdirs: Iterable) -> dict:
    """The records of run directories: {"runs": [{method, seed, workdir}], "records": [...]}, one
    record per step (iteration >= 0, `record` "step") and per evaluation (`record` "eval", the
    SFT warm-up's as iteration -1). `global_step` counts steps across iterations."""
    runs, records = [], []
    for workdir in workdirs:
        workdir = storage.location(workdir)
        cfg = config.from_dict(config.RunConfig, _yaml(workdir / selfplay.CONFIG_FILE))
        method = describe(cfg)
        runs.append({"method": method, "seed": cfg.seed, "workdir": str(workdir)})
        read = theta0_records(cfg) + metrics.read(workdir)
        last_step: dict = {}
        for record in read:
            if "event" not in record and record["iteration"] >= 0:
                last_step[record["iteration"]] = max(last_step.get(record["iteration"], 0), record["step"])
        offsets = {i: sum(last_step.get(j, 0) for j in range(i)) for i in last_step}
        for record in read:
            iteration = record["iteration"]
            if "event" in record:
                row = {"record": "eval", "iteration": iteration, "step": record["step"]}
                row.update({k: v for k, v in record.items() if k.startswith("eval/")})
            elif iteration >= 0:
                row = {"record": "step", "iteration": iteration, "step": record["step"], "epoch": record.get("epoch")}
                row.update({k: v for k, v in record.items() if k not in ("iteration", "step", "epoch")})
            else:
                continue  # the SFT warm-up's own steps build theta_0; only its evaluation is a curve point
            row["global_step"] = offsets.get(iteration, 0) + record["step"] if iteration >= 0 else 0
            records.append({"method": method, "seed": cfg.seed, **row})
    return {"runs": runs, "records": records}


def theta0_records(cfg: config.RunConfig) -> list[dict]:
    """The evaluation records of theta_0 of a run that starts from another run's SFT warm-up
    (`init_from: RUN/sft/final`): that run's; [] for any other start."""
    start = storage.location(cfg.init_from) if cfg.init_from else None
    if start is None or (start.name, start.parent.name) != ("final", "sft"):
        return []
    return [r for r in metrics.read(start.parent.parent) if r["iteration"] == selfplay.SFT_ITERATION and "event" in r]


def _yaml(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def kl_table(curves: dict) -> dict:
    """{method: {iteration: [KL of each seed]}} from the evaluation records, seeds in order."""
    table: dict = {}
    for r in sorted((r for r in curves["records"] if r["record"] == "eval" and "eval/kl" in r),
                    key=lambda r: (r["seed"], r["iteration"])):
        table.setdefault(r["method"], {}).setdefault(r["iteration"], []).append(_float(r["eval/kl"]))
    return table


def _float(value) -> float:
    return float(value)  # 'nan' / 'inf' strings too


def methods_in_order(curves: dict) -> list[str]:
    seen = []
    for run in curves["runs"]:
        if run["method"] not in seen:
            seen.append(run["method"])
    return seen


def write(curves: dict, out, plots: bool = True) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    columns = ["method", "seed", "record", "iteration", "step", "global_step", "epoch", *STEP_KEYS, *EVAL_KEYS]
    extra = sorted({k for r in curves["records"] for k in r} - set(columns))
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns + extra, restval="")
        writer.writeheader()
        writer.writerows(curves["records"])
    (out / "summary.md").write_text(summary(curves))
    if plots:
        plot(curves, out)


# ----------------------------------------------------------------------------------- summary


def summary(curves: dict) -> str:
    table = kl_table(curves)
    methods = [m for m in methods_in_order(curves) if m in table]
    seeds = sorted({r["seed"] for r in curves["runs"]})
    iterations = sorted({i for m in methods for i in table[m]})
    lines = ["# Loss stability: KL(p_data || p_theta_t) per iteration", "",
             f"Seeds: {', '.join(map(str, seeds))}. Iteration -1 is theta_0 (the shared SFT warm-up); "
             "iteration t is theta_{t+1}, the player after self-play iteration t. KL in nats, "
             f"mean ± sd over the {len(seeds)} seed(s) (sd with ddof=1; 0 for one seed).", "",
             "| method | " + " | ".join(f"it {i}" for i in iterations) + " | monotone (mean) | monotone seeds | best it |",
             "|---" * (len(iterations) + 4) + "|"]
    facts = {}
    for method in methods:
        means = {i: float(np.mean(v)) for i, v in table[method].items()}
        sds = {i: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for i, v in table[method].items()}
        ordered = [means[i] for i in iterations if i in means]
        monotone = all(b < a for a, b in zip(ordered, ordered[1:]))
        per_seed = np.array([table[method][i] for i in iterations if i in table[method]])  # [T, seeds]
        seed_monotone = int(np.sum(np.all(np.diff(per_seed, axis=0) < 0, axis=0))) if per_seed.ndim == 2 else 0
        best = min(means, key=means.get)
        facts[method] = (means, best)
        cells = [f"{means[i]:.3f} ± {sds[i]:.3f}" if i in means else "" for i in iterations]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'yes' if monotone else 'no'} | "
                     f"{seed_monotone}/{per_seed.shape[1] if per_seed.ndim == 2 else 0} | {best} |")
    lines += ["", "Monotone: the mean KL falls at every iteration (from theta_0 on); monotone seeds: "
              "how many seeds' own curves do.", ""]
    if methods:
        last = max(iterations)
        final = {m: facts[m][0][last] for m in methods if last in facts[m][0]}
        ranked = sorted(final, key=final.get)
        lines.append(f"At the last iteration ({last}), ranked by mean KL: "
                     + ", ".join(f"{m} {final[m]:.3f}" for m in ranked) + ".")
        best_overall = {m: min(facts[m][0].values()) for m in methods}
        for family in ("space", "spin", "sft"):
            members = [m for m in methods if m.split(":")[0] == family]
            if members:
                top = min(members, key=best_overall.get)
                lines.append(f"- best {family}: {top}, KL {best_overall[top]:.3f} at iteration {facts[top][1]}.")
        spin = [m for m in methods if m.split(":")[0] == "spin"]
        space = [m for m in methods if m.split(":")[0] == "space"]
        if spin and space:
            trained = {m: min(v for i, v in facts[m][0].items() if i >= 0) for m in spin + space}
            best_spin = min(spin, key=trained.get)
            best_space = min(space, key=trained.get)
            verdict = ("SPIN is as good as or better than SPACE" if trained[best_spin] <= trained[best_space]
                       else "SPACE is better than SPIN")
            lines.append(f"- best KL over self-play iterations (t >= 0): {verdict} ({best_spin} "
                         f"{trained[best_spin]:.3f} vs {best_space} {trained[best_space]:.3f}).")
            start = [facts[m][0][-1] for m in methods if -1 in facts[m][0]]
            worse = [m for m in methods if start and min(v for i, v in facts[m][0].items() if i >= 0) >= start[0]]
            if worse:
                lines.append(f"- no self-play iteration improves on theta_0 ({start[0]:.3f}) for: {', '.join(worse)}.")
            for m in spin + space:
                rises = [i for i in iterations[1:] if i in facts[m][0] and i - 1 in facts[m][0]
                         and facts[m][0][i] > facts[m][0][i - 1]]
                if rises:
                    lines.append(f"- {m}: the mean KL rises at iteration(s) {', '.join(map(str, rises))}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- plots


BENCHMARK_PREFIX = "eval/lm_eval/"


def plot(curves: dict, out) -> list[Path]:
    """kl.png and steps.png under `out`, and benchmarks.png when the runs have lm-eval scores;
    returns their paths."""
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure  # no pyplot: any backend (a notebook's inline one too) is left alone

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = methods_in_order(curves)
    colors = {m: matplotlib.colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    styles = {m: "--" if m.startswith("spin") else (":" if m.startswith("sft") else "-") for m in methods}
    seeds = sorted({r["seed"] for r in curves["runs"]})
    written = []

    table = kl_table(curves)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for method in methods:
        if method not in table:
            continue
        its = sorted(table[method])
        values = [np.array(table[method][i]) for i in its]
        mean = np.array([v.mean() for v in values])
        ax.plot(its, mean, styles[method], marker="o", color=colors[method], label=method)
        ax.fill_between(its, [v.min() for v in values], [v.max() for v in values], color=colors[method], alpha=0.12)
    ax.set_xlabel("iteration (-1 = theta_0 after SFT; t = player after self-play iteration t)")
    ax.set_ylabel("KL(p_data || p_theta) (nats, log scale)")
    ax.set_title(f"KL to p_data per iteration: mean over {len(seeds)} seed(s), band = min-max")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_yscale("log")  # a diverging method (SPIN at small beta) would otherwise flatten the rest
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    written.append(out / "kl.png")
    fig.savefig(written[-1], dpi=110)

    steps = [r for r in curves["records"] if r["record"] == "step"]
    fig = Figure(figsize=(13, 8.5))
    axes = fig.subplots(2, 2, sharex=True)
    boundaries = set()
    for (key, label), ax in zip(STEP_PLOTS, axes.flat):
        for method in methods:
            if key == "loss" and method.split(":")[0] == "sft":
                continue  # its loss is -logps/real (~10 nats): it would flatten the self-play losses
            by_step: dict = {}
            for r in steps:
                if r["method"] == method and key in r:
                    by_step.setdefault(r["global_step"], []).append(_float(r[key]))
                    if r["step"] == 1 and r["iteration"] > 0:
                        boundaries.add(r["global_step"] - 1)
            if not by_step:
                continue
            x = np.array(sorted(by_step))
            values = [np.array(by_step[s]) for s in x]
            mean = np.array([v.mean() for v in values])
            ax.plot(x, mean, styles[method], color=colors[method], lw=1.2, label=method)
            if len(seeds) > 1:
                ax.fill_between(x, [v.min() for v in values], [v.max() for v in values], color=colors[method],
                                alpha=0.1)
        ax.set_ylabel(label)
        ax.set_title(f"{key} per step (mean over seeds, band = min-max)"
                     + (" ; sft's is -logps/real" if key == "loss" and any(m.startswith("sft") for m in methods) else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat:
        for b in sorted(boundaries):
            ax.axvline(b + 0.5, color="black", lw=0.8, alpha=0.6)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step, counted across iterations (vertical lines: iteration boundaries)")
    legend = {}
    for ax in axes.flat:  # every method, in order (the loss panel leaves sft out)
        legend.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels())})
    labels = [m for m in methods if m in legend]
    handles = [legend[m] for m in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.suptitle("Per-step stability curves within and across self-play iterations")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    written.append(out / "steps.png")
    fig.savefig(written[-1], dpi=110)
    if benchmark_keys(curves):
        written.append(plot_benchmarks(curves, out / "benchmarks.png", methods, colors, styles))
    return written


def benchmark_keys(curves: dict) -> list[str]:
    """The lm-eval scores among the evaluation records (their standard errors left out)."""
    return sorted({k for r in curves["records"] if r["record"] == "eval" for k in r
                   if k.startswith(BENCHMARK_PREFIX) and not k.endswith("_stderr")})


def plot_benchmarks(curves: dict, path: Path, methods, colors, styles) -> Path:
    """One panel per lm-eval score: its mean over seeds per iteration (-1 = theta_0), band = min-max."""
    from matplotlib.figure import Figure

    keys = benchmark_keys(curves)
    columns = min(len(keys), 3)
    rows = -(-len(keys) // columns)
    fig = Figure(figsize=(4.5 * columns, 3.5 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).flat
    for key, ax in zip(keys, axes):
        for method in methods:
            by_iteration: dict = {}
            for r in curves["records"]:
                if r["record"] == "eval" and r["method"] == method and key in r:
                    by_iteration.setdefault(r["iteration"], []).append(_float(r[key]))
            if not by_iteration:
                continue
            its = sorted(by_iteration)
            values = [np.array(by_iteration[i]) for i in its]
            ax.plot(its, [v.mean() for v in values], styles[method], marker="o", color=colors[method], label=method)
            ax.fill_between(its, [v.min() for v in values], [v.max() for v in values], color=colors[method],
                            alpha=0.12)
        ax.set_title(key[len(BENCHMARK_PREFIX):], fontsize=10)
        ax.set_xlabel("iteration (-1 = theta_0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("lm-eval scores per iteration (mean over seeds, band = min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_workdirs(workdirs: Sequence, out) -> list[Path]:
    """`spacejax plot`: the benchmark's plots, curves and summary from any run directories."""
    missing = [str(w) for w in workdirs if not metrics.has_log(w)]
    if missing:
        raise FileNotFoundError(f"no {metrics.METRICS_FILE} (or {metrics.SEGMENTS_DIR}/ on gs://) in "
                                f"{', '.join(missing)}")
    curves = collect(workdirs)
    write(curves, out, plots=False)
    return plot(curves, out)

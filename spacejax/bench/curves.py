"""The known-truth benchmark (issue 22; PAPER.md, "What loss stability curves are"): SPIN, SPACE and
SFT from one shared theta_0 on a task with known p_data, over several seeds, through the real loop.

    DIR/bench.json                   the benchmark's manifest: every run's method, theta_0 regime, seed
    DIR/seed_S/<method>/             a spacejax run directory (config.yaml, metrics.jsonl, sft/, iter_XXX/)
    DIR/theta0_4N/seed_S/<method>/   the same in the theta_0 regime "4N" (below)
    DIR/curves.json                  every step and evaluation record, tagged with method, regime and seed
    DIR/curves.csv                   the same records, one row each
    DIR/kl.png                       per iteration, one row of panels per regime: KL(p_data || p_theta)
                                     (forward), KL(p_theta || p_data) (reverse, from the model's own
                                     samples) and the fraction of those outside p_data's support, each
                                     the mean over seeds with a min-max band
    DIR/steps.png                    per-step loss, rewards/real, rewards/generated, logps/real with
                                     iteration boundaries
    DIR/summary.md                   per iteration: both KLs, the samples' log p_data and support (mean,
                                     sd); each theta_0 regime against what continued SFT reached; paired
                                     differences between methods over seeds (spacejax.bench.claims); one
                                     row per claim of PAPER.md with its measured answer

theta_0 is shared: for each seed and regime one run (the regime's theta_0 run) does the SFT warm-up
(workdir/sft/, iteration -1); every other method of that seed and regime starts from its params
(`init_from: <theta_0 run>/sft/final`, no SFT of its own), and its curve takes theta_0's evaluation
from that run. So every method's curve starts at the same point, and every method directory is a
run that `spacejax train` resumes and `spacejax plot` reads.

theta_0 regimes (`theta0`, K): theta_0 is the SFT warm-up on K x N real samples, N the config's
data.num_train. K = 1 (directory DIR/seed_S/): theta_0 and every method use the same N samples.
K = 4 (DIR/theta0_4N/seed_S/): the paper's own protocol, where theta_0 was SFT on all of UltraChat
(zephyr-7b-sft-full) and self-play then uses 50k of those samples: every method trains on the
first N of theta_0's 4N (the task's draws must be nested for that: `nested_data` checks it and
summary.md says when it does not hold). The theta_0 run of regime K is the first method whose data
is K x N (the first method at K = 1); when none is, `theta0_run` is put first (at K = 4:
`sft:data=4x:selfplay.iterations=1`, the SFT warm-up on 4N and one iteration of continued SFT).

A method is written `KIND[:recipe][:KEY=VALUE]...`: KIND is a registered loss (losses.LOSSES), a
bare KEY is a `loss.` field (`spin:beta=0.1`, `space:mu=2`, `dpo:beta=0.1:label_smoothing=0.1`,
`spin:spin_kind=hinge`), a dotted KEY is any config override (`spin:beta=0.5:selfplay.mix_previous=true`),
`data=Kx` trains on K x N real samples (data.num_train = K x the config's; `sft:data=4x`), and
`spin:recipe` is SPIN's own recipe (`spin_recipe`): its beta and learning-rate schedule and mixing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from spacejax import config, losses, metrics, selfplay, storage
from spacejax.bench import claims

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("spin:beta=0.1", "spin:beta=1", "spin:recipe", "space:mu=0.5", "space:mu=1", "space:mu=4",
                   "sft", "sft:data=4x")
DEFAULT_THETA0 = (1, 4)
# The methods of a regime K > 1 unless told (its theta_0 run is put first: `theta0_run`)
DEFAULT_THETA0_METHODS = ("space:mu=1", "spin:recipe", "sft")
MANIFEST = "bench.json"
STEP_KEYS = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
             "nce/accuracy", "logps/real", "logps/generated", "logps/real_per_token",
             "logps/generated_per_token", "grad_norm", "learning_rate", "tokens_per_second")
EVAL_KEYS = ("eval/kl", "eval/kl_stderr", "eval/reverse_kl", "eval/reverse_kl_stderr", "eval/sample_logp_data",
             "eval/outside_support", "eval/nll", "eval/nll_per_token", "eval/loss_start", "eval/loss_end",
             "eval/generation_length")
# The panels of kl.png: (evaluation key, axis label, log scale)
KL_PLOTS = (("eval/kl", "KL(p_data || p_theta), forward (nats)", True),
            ("eval/reverse_kl", "KL(p_theta || p_data), reverse, own samples (nats)", True),
            ("eval/outside_support", "fraction of own samples outside p_data's support", False))
# The step plots: (metric, axis label).
STEP_PLOTS = (("loss", "loss (nats)"), ("rewards/real", "rewards/real: r(y) (nats)"),
              ("rewards/generated", "rewards/generated: r(y') (nats)"), ("logps/real", "logps/real: log p(y|x) (nats)"))
# SPIN's recipe (PAPER.md; configs/zephyr7b_spin.yaml; uclaml/SPIN scripts/finetune_iter{1,2,3}.sh with
# configs/config_iter*.yaml): beta 0.1 at iterations 0-2 then 5.0, the learning rate 5e-7 at iterations 0-1
# then 1e-7 (a factor 1/5), from iteration 1 the previous iteration's pairs mixed in (SPIN_iter{t-1} + _iter{t})
SPIN_RECIPE_BETA, SPIN_RECIPE_LATE_BETA, SPIN_RECIPE_BETA_FROM = 0.1, 5.0, 3
SPIN_RECIPE_LR_FACTOR, SPIN_RECIPE_LR_FROM = 0.2, 2


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # canonical: kind, then the settings it changes (`space:mu=1`, `spin:recipe`, `sft:data=4x`)
    overrides: tuple[str, ...]  # loss.kind first, then the spec's KEY=VALUE parts
    recipe: bool = False  # `spin:recipe`: spin_recipe, resolved against the config (method_config)
    data: int = 1  # `data=Kx`: data.num_train = K x the config's

    @property
    def dirname(self) -> str:
        return self.name.replace(":", "_").replace("=", "").replace("/", "_")


def parse_method(spec: str) -> Method:
    """`KIND[:recipe][:KEY=VALUE]...` -> Method; an unknown kind or a malformed part raises ConfigError."""
    kind, *parts = spec.strip().split(":")
    try:
        losses.get_loss(kind)
    except ValueError as error:
        raise config.ConfigError(f"method {spec!r}: {error}") from None
    overrides, recipe, data = [f"loss.kind={kind}"], False, 1
    for part in parts:
        if part == "recipe":
            if kind != "spin":
                raise config.ConfigError(f"method {spec!r}: only spin has a recipe (spin:recipe)")
            recipe = True
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise config.ConfigError(f"method {spec!r}: {part!r} must look like key=value")
        if key == "data":
            data = data_multiple(spec, value)
        else:
            overrides.append(f"{key if '.' in key else 'loss.' + key}={value}")
    return Method(spec.strip(), tuple(overrides), recipe, data)


def data_multiple(spec: str, value: str) -> int:
    """The K of `data=Kx`: a whole number >= 1."""
    match = re.fullmatch(r"([1-9][0-9]*)x", value.strip())
    if not match:
        raise config.ConfigError(f"method {spec!r}: data={value} must be a whole multiple of the config's "
                                 "data.num_train, written like data=4x")
    return int(match.group(1))


def spin_recipe_schedule(learning_rate: float) -> tuple[str, ...]:
    """SPIN's `selfplay.from_iteration` for a peak learning rate: the rate times 1/5 from iteration 2,
    beta 5.0 from iteration 3 (later iterations keep the last values)."""
    return (f"{SPIN_RECIPE_LR_FROM}: train.learning_rate={learning_rate * SPIN_RECIPE_LR_FACTOR:g}",
            f"{SPIN_RECIPE_BETA_FROM}: loss.beta={SPIN_RECIPE_LATE_BETA:g}")


def spin_recipe(learning_rate: float) -> tuple[str, ...]:
    """`spin:recipe`'s overrides on the benchmark's config: SPIN's beta schedule, its learning-rate
    schedule relative to the config's peak `learning_rate` (SPIN's absolute 5e-7 is a 7B model's),
    and `mix_previous`. The optimizer, its schedule within an iteration and the epochs stay the
    benchmark's, so spin:recipe differs from spin:beta=0.1 by the recipe alone."""
    schedule = ", ".join(f"'{entry}'" for entry in spin_recipe_schedule(learning_rate))
    return (f"loss.beta={SPIN_RECIPE_BETA:g}", "selfplay.mix_previous=true", f"selfplay.from_iteration=[{schedule}]")


def is_spin_recipe(cfg: config.RunConfig) -> bool:
    return (cfg.loss.kind == "spin" and cfg.loss.beta == SPIN_RECIPE_BETA and cfg.selfplay.mix_previous
            and tuple(cfg.selfplay.from_iteration) == spin_recipe_schedule(cfg.train.learning_rate))


def method_config(config_path, method: Method, overrides: Sequence[str] = (), seed: int = 0) -> config.RunConfig:
    """The run config of `method` before the bench points it at its theta_0: the file with
    `overrides`, the method's loss kind, its recipe, its KEY=VALUE parts (which win over the recipe),
    `seed`, then its data multiple of the data.num_train these give."""
    head, tail = [*overrides, method.overrides[0]], [*method.overrides[1:], f"seed={seed}"]
    cfg = config.load(config_path, [*head, *tail])
    if not method.recipe and method.data == 1:
        return cfg
    recipe = list(spin_recipe(cfg.train.learning_rate)) if method.recipe else []
    if method.data != 1 and not cfg.data.num_train:
        raise config.ConfigError(f"method {method.name}: data={method.data}x needs data.num_train > 0 (N), "
                                 "not 0 (all rows)")
    data = [f"data.num_train={method.data * cfg.data.num_train}"] if method.data != 1 else []
    return config.load(config_path, [*head, *recipe, *tail, *data])


def describe(cfg: config.RunConfig, base: Optional[config.RunConfig] = None) -> str:
    """The canonical method name of a run's config: the loss kind, then `KEY=VALUE` (KEY its `loss.`
    field) for each float hyperparameter of the loss that the config sets (not null) and each option
    off its default, then `selfplay.mix_previous=true` when set and the `selfplay.from_iteration`
    changes; SPIN's recipe is `spin:recipe`. Against the benchmark's config `base`, a run on K x N
    samples ends in `data=Kx`, and one of another number of iterations in `selfplay.iterations=T`.
    `spin:beta=0.1`, `space:mu=2`, `spin:beta=0.1:spin_kind=hinge`, `sft`, `sft:data=4x`."""
    loss = losses.get_loss(cfg.loss.kind)
    recipe = is_spin_recipe(cfg)
    parts = [cfg.loss.kind] + (["recipe"] if recipe else [])
    for name, value in loss.config_values(cfg.loss).items():
        if recipe and loss.config_key(name) == "beta":
            continue
        if name in loss.hyperparameters and value is not None:
            parts.append(f"{loss.config_key(name)}={value:g}")
        elif name in loss.options and value != loss.defaults[name]:
            parts.append(f"{loss.config_key(name)}={str(value).lower() if isinstance(value, bool) else value}")
    if cfg.selfplay.mix_previous and not recipe:
        parts.append("selfplay.mix_previous=true")
    if cfg.selfplay.from_iteration and not recipe:
        parts.append("from_iteration=" + ";".join(entry.replace(" ", "") for entry in cfg.selfplay.from_iteration))
    if base is not None and base.data.num_train and cfg.data.num_train != base.data.num_train:
        multiple, rest = divmod(cfg.data.num_train, base.data.num_train)
        parts.append(f"data={multiple}x" if multiple and not rest else f"data.num_train={cfg.data.num_train}")
    if base is not None and cfg.selfplay.iterations != base.selfplay.iterations:
        parts.append(f"selfplay.iterations={cfg.selfplay.iterations}")
    return ":".join(parts)


def regime_label(regime: int) -> str:
    """The name of theta_0 regime K: `theta_0 on N`, `theta_0 on 4N`."""
    return f"theta_0 on {regime if regime != 1 else ''}N"


def label(method: str, regime: int) -> str:
    """A curve's name: the method, and its theta_0 regime when K != 1 (`space:mu=1 [theta_0 on 4N]`)."""
    return method if regime == 1 else f"{method} [{regime_label(regime)}]"


def regime_dir(out: Path, regime: int) -> Path:
    return out if regime == 1 else out / f"theta0_{regime}N"


# ----------------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the benchmark: its method, regime, seed, config (pointed at its theta_0) and directory."""

    method: str
    regime: int
    seed: int
    cfg: config.RunConfig
    workdir: Path


def plan(config_path, out, seeds: int = 5, methods: Sequence[str] = DEFAULT_METHODS,
         overrides: Sequence[str] = (), first_seed: int = 0, theta0: Sequence[int] = (1,),
         theta0_methods: Optional[Sequence[str]] = None) -> list[Run]:
    """Every run, in the order they run (seed, regime, the regime's theta_0 run first), each config
    built and checked before anything runs. `methods` are regime 1's; regimes K > 1 run
    `theta0_methods` (default: DEFAULT_THETA0_METHODS)."""
    out = Path(out).absolute()
    if seeds < 1:
        raise config.ConfigError(f"seeds {seeds}: the benchmark needs at least 1 seed (--seeds 5)")
    if not theta0 or any(k < 1 for k in theta0) or len(set(theta0)) != len(theta0):
        raise config.ConfigError(f"theta0 regimes {list(theta0)}: give distinct whole multiples >= 1 of N (1, 4)")
    runs = []
    for regime in theta0:
        specs = list(methods if regime == 1 else (theta0_methods or DEFAULT_THETA0_METHODS))
        parsed = [parse_method(spec) for spec in specs]
        carriers = [m for m in parsed if m.data == regime]
        if carriers:
            parsed.remove(carriers[0])
        parsed.insert(0, carriers[0] if carriers else theta0_run(regime))
        runs += regime_runs(config_path, out, parsed, overrides, regime, range(first_seed, first_seed + seeds))
    return sorted(runs, key=lambda run: (run.seed, theta0.index(run.regime)))  # stable: theta_0 run first


def theta0_run(regime: int) -> Method:
    """The theta_0 run of a regime that lists no method on K x N samples: `sft` for K = 1, else
    `sft:data=Kx` for one iteration (its SFT warm-up on K x N is what the regime needs; continued SFT
    on K x N for every iteration is the method sft:data=Kx)."""
    return parse_method("sft" if regime == 1 else f"sft:data={regime}x:selfplay.iterations=1")


def regime_runs(config_path, out: Path, parsed: list[Method], overrides, regime: int, seeds) -> list[Run]:
    """The runs of one regime; `parsed[0]` is its theta_0 run."""
    names, runs = [], []
    base = config.load(config_path, list(overrides))  # N and the iterations
    for index, method in enumerate(parsed):
        per_seed = {seed: method_config(config_path, method, overrides, seed) for seed in seeds}
        name = describe(per_seed[seeds[0]], base)  # `space:mu=1.0` -> `space:mu=1`
        if name in names:
            raise config.ConfigError(f"method {method.name!r} repeats {name} ({regime_label(regime)})")
        names.append(name)
        dirname = dataclasses.replace(method, name=name).dirname
        for seed, cfg in per_seed.items():
            if index == 0 and not cfg.selfplay.sft_epochs:
                raise config.ConfigError("selfplay.sft_epochs must be > 0: the benchmark starts every method "
                                         "from the same SFT warm-up theta_0")
            workdir = regime_dir(out, regime) / f"seed_{seed}" / dirname
            if index:  # from the regime's theta_0
                cfg = dataclasses.replace(
                    cfg, init_from=str(runs[seeds.index(seed)].workdir / "sft" / "final"),
                    selfplay=dataclasses.replace(cfg.selfplay, sft_epochs=0))
            selfplay.check(cfg)
            runs.append(Run(name, regime, seed, cfg, workdir))
    return runs


def nested_data(small: config.RunConfig, large: config.RunConfig) -> bool:
    """Whether `small`'s real examples are part of `large`'s: its training examples the first of
    `large`'s and its held-out examples the same (so a run on N samples trains on N of the 4N its
    theta_0 saw)."""
    a, b = selfplay.load_task(small), selfplay.load_task(large)

    def same(x, y) -> bool:
        return np.array_equal(x.prompt_ids, y.prompt_ids) and np.array_equal(x.real_ids, y.real_ids)

    return (len(a.train) <= len(b.train) and all(map(same, a.train, b.train)) and len(a.eval) == len(b.eval)
            and all(map(same, a.eval, b.eval)))


def data_notes(runs: Sequence[Run]) -> list[str]:
    """A sentence for each pair of data sizes of one seed (a theta_0 and a run from it) whose real
    samples are not nested (`nested_data`): that run's samples are not a part of theta_0's."""
    seed = runs[0].seed
    theta0 = {run.regime: run for run in runs if run.seed == seed and not run.cfg.init_from}
    notes, checked = [], set()
    for run in runs:
        start = theta0[run.regime]
        sizes = (start.cfg.data.num_train, run.cfg.data.num_train)
        if run.seed != seed or sizes[0] == sizes[1] or sizes in checked:
            continue
        checked.add(sizes)
        small, large = sorted((start.cfg, run.cfg), key=lambda c: c.data.num_train)
        if not nested_data(small, large):
            notes.append(f"WARNING: the {large.data.num_train} real samples of data.source={large.data.source} do not "
                         f"begin with the {small.data.num_train} of the smaller draw (the task draws them afresh "
                         f"for each size): {label(run.method, run.regime)} does not train on a part of its "
                         "theta_0's samples, and held-out NLLs of the two sizes are on different rows.")
    for note in notes:
        log.warning("%s", note)
    return notes


def stability(config_path, out, seeds: int = 5, methods: Sequence[str] = DEFAULT_METHODS,
              overrides: Sequence[str] = (), first_seed: int = 0, plots: bool = True,
              theta0: Sequence[int] = (1,), theta0_methods: Optional[Sequence[str]] = None) -> dict:
    """Run (or resume) every method for every seed and theta_0 regime (`plan`; `theta0` (1,): theta_0
    on N alone, `spacejax bench stability` runs DEFAULT_THETA0), then write curves, plots and
    summary.md. Returns the curves (see `collect`)."""
    out = Path(out).absolute()
    runs = plan(config_path, out, seeds, methods, overrides, first_seed, theta0, theta0_methods)
    notes = data_notes(runs)
    write_manifest(out, runs, notes, num_train=config.load(config_path, list(overrides)).data.num_train)
    seconds = {}
    for run in runs:
        started = time.perf_counter()
        selfplay.run(run.cfg, run.workdir)
        where = str(run.workdir.relative_to(out))
        seconds[where] = round(time.perf_counter() - started, 1)
        print(f"bench stability: seed {run.seed} {label(run.method, run.regime)}: {seconds[where]} s", flush=True)
    (out / "timings.json").write_text(json.dumps(seconds, indent=1))  # this invocation's wall seconds per run
    curves = collect([run.workdir for run in runs])
    write(curves, out, plots=plots)
    return curves


def write_manifest(out: Path, runs: Sequence[Run], notes: list[str], num_train: int) -> None:
    """DIR/bench.json: each run directory (relative to DIR) with its method, regime and seed, the
    benchmark's N and the data notes; runs of earlier invocations on DIR are kept."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    manifest["runs"].update({str(run.workdir.relative_to(out)): {"method": run.method, "regime": run.regime,
                                                                 "seed": run.seed} for run in runs})
    manifest.update(num_train=num_train, notes=notes)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))


def manifest_entry(workdir) -> tuple[Optional[dict], list[str]]:
    """A run directory's entry in the bench.json of the benchmark that made it (two or three levels
    up: DIR/seed_S/M, DIR/theta0_KN/seed_S/M) and that manifest's notes; (None, []) for another run."""
    workdir = storage.location(workdir)
    for root in (workdir.parent.parent, workdir.parent.parent.parent):
        path = root / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
            relative = str(workdir)[len(str(root)):].strip("/")
            if relative in manifest["runs"]:
                return manifest["runs"][relative], manifest.get("notes", [])
    return None, []


# ----------------------------------------------------------------------------------- curves


def collect(workdirs: Iterable) -> dict:
    """The records of run directories: {"runs": [{method, regime, seed, task, workdir}], "records":
    [...], "notes": [...]}, one record per step (iteration >= 0, `record` "step") and per evaluation
    (`record` "eval", the SFT warm-up's as iteration -1). A record's `method` is its curve's `label`
    (method and regime, from the run's bench.json; else `describe` and regime 1). `global_step`
    counts steps across iterations."""
    runs, records, notes = [], [], []
    for workdir in workdirs:
        workdir = storage.location(workdir)
        cfg = config.from_dict(config.RunConfig, _yaml(workdir / selfplay.CONFIG_FILE))
        entry, manifest_notes = manifest_entry(workdir)
        notes += [note for note in manifest_notes if note not in notes]
        method, regime = (entry["method"], entry["regime"]) if entry else (describe(cfg), 1)
        name = label(method, regime)
        runs.append({"method": name, "base_method": method, "regime": regime, "seed": cfg.seed,
                     "task": cfg.data.source, "workdir": str(workdir)})
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
            records.append({"method": name, "regime": regime, "seed": cfg.seed, **row})
    return {"runs": runs, "records": records, "notes": notes}


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


def kl_table(curves: dict, key: str = "eval/kl") -> dict:
    """{method: {iteration: [`key` (KL) of each seed]}} from the evaluation records, seeds in order."""
    return {method: {i: [by_seed[s] for s in sorted(by_seed)] for i, by_seed in its.items()}
            for method, its in claims.per_seed(curves, key).items()}


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
    columns = ["method", "regime", "seed", "record", "iteration", "step", "global_step", "epoch", *STEP_KEYS,
               *EVAL_KEYS]
    extra = sorted({k for r in curves["records"] for k in r} - set(columns))
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns + extra, restval="")
        writer.writeheader()
        writer.writerows(curves["records"])
    (out / "summary.md").write_text(summary(curves))
    if plots:
        plot(curves, out)


# ----------------------------------------------------------------------------------- summary

# summary.md's per-iteration tables: (evaluation key, title, whether the falling-KL columns apply)
SUMMARY_TABLES = (
    ("eval/kl", "KL(p_data || p_theta_t): forward, mass-covering (what maximum likelihood minimises), on the same "
                "fresh p_data draws at every iteration", True),
    ("eval/reverse_kl", "KL(p_theta_t || p_data): reverse, the quality of the model's own samples (temperature 1), "
                        "conditioned on landing inside p_data's support", True),
    ("eval/outside_support", "Fraction of the model's own samples outside p_data's support (log p_data = -inf; left "
                             "out of the reverse KL)", False),
    ("eval/sample_logp_data", "Mean log p_data(y|x) of the model's own samples inside the support (nats)", False),
)


def summary(curves: dict) -> str:
    """summary.md: the per-iteration tables (SUMMARY_TABLES, those the runs have), what the KLs say,
    the paired differences and the claims table (spacejax.bench.claims)."""
    seeds = sorted({r["seed"] for r in curves["runs"]})
    tasks = sorted({r.get("task", "toy") for r in curves["runs"]})
    regimes = claims.curve_index(curves)
    lines = [f"# Known-truth benchmark ({', '.join(tasks)} task): SPIN, SPACE and SFT per iteration", "",
             f"Seeds: {', '.join(map(str, seeds))}. theta_0 regimes: "
             f"{', '.join(regime_label(k) for k in regimes)}: theta_0 is the SFT warm-up on K x N real samples "
             "(N: data.num_train), and each method trains on N of them (K x N: `data=Kx`). Iteration -1 is theta_0, "
             "shared by the methods of a regime; iteration t is theta_{t+1}, the player after self-play iteration t. "
             f"Mean ± sd over the {len(seeds)} seed(s) (sd with ddof=1; 0 for one seed).", ""]
    lines += [f"- {note}" for note in curves.get("notes", [])] + ([""] if curves.get("notes") else [])
    tables = {key: kl_table(curves, key) for key, _, _ in SUMMARY_TABLES}
    for key, title, falling in SUMMARY_TABLES:
        table = tables[key]
        if table:
            lines += [f"## {title}", ""] + table_lines(curves, table, falling)
            for members in regimes.values() if falling else ():
                lines += findings({m: table[m] for m in members.values() if m in table})
            lines.append("")
    lines += theta0_regimes(curves, tables["eval/kl"])
    lines += claims.paired_sections(curves, regime_label)
    lines += claims.claims_section(curves, regime_label)
    return "\n".join(lines) + "\n"


def table_lines(curves: dict, table: dict, falling: bool) -> list[str]:
    """One row per curve: mean ± sd at each iteration; with `falling`, whether the mean falls at
    every iteration, in how many seeds the curve does, and the best iteration."""
    methods = [m for m in methods_in_order(curves) if m in table]
    iterations = sorted({i for m in methods for i in table[m]})
    extra = ["monotone (mean)", "monotone seeds", "best it"] if falling else []
    lines = ["| method | " + " | ".join(f"it {i}" for i in iterations) + "".join(f" | {e}" for e in extra) + " |",
             "|---" * (len(iterations) + 1 + len(extra)) + "|"]
    for method in methods:
        values = table[method]
        cells = [f"{np.mean(values[i]):.3f} ± {_sd(values[i]):.3f}" if i in values else "" for i in iterations]
        if falling:
            means = {i: float(np.mean(v)) for i, v in values.items()}
            ordered = [means[i] for i in iterations if i in means]
            per_seed = np.array([values[i] for i in iterations if i in values])  # [T, seeds]
            seed_monotone = int(np.sum(np.all(np.diff(per_seed, axis=0) < 0, axis=0)))
            finite = {i: v for i, v in means.items() if np.isfinite(v)}
            cells += ["yes" if all(b < a for a, b in zip(ordered, ordered[1:])) else "no",
                      f"{seed_monotone}/{per_seed.shape[1]}", str(min(finite, key=finite.get)) if finite else ""]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if falling:
        lines += ["", "Monotone: the mean falls at every iteration (from theta_0 on); monotone seeds: how many "
                  "seeds' own curves do.", ""]
    return lines


def theta0_regimes(curves: dict, table: dict) -> list[str]:
    """How far each regime's theta_0 is from what maximum likelihood reaches on the task: its forward
    KL against the best mean of each continued-SFT curve from theta_0 on N (`sft` on N, `sft:data=Kx`
    on K x N; the best iteration is chosen after the fact, so it is the most those samples gave)."""
    index = claims.curve_index(curves)
    means = {lab: {i: float(np.mean(v)) for i, v in its.items()} for lab, its in table.items()}
    limits = {}  # data multiple K -> (curve, best iteration, its mean KL)
    for method, lab in index.get(1, {}).items():
        if method.split(":")[0] == "sft" and lab in means:
            best = min(means[lab], key=means[lab].get)
            limits.setdefault(parse_method(method).data, (lab, best, means[lab][best]))
    starts = {}  # regime K -> theta_0's mean KL (every curve of a regime starts from it)
    for k, members in index.items():
        first = [means[lab][-1] for lab in members.values() if -1 in means.get(lab, {})]
        if first:
            starts[k] = first[0]
    if not limits or not starts:
        return []
    lines = ["## The theta_0 regimes: how far theta_0 is from what maximum likelihood reaches", "",
             "Forward KL of theta_0 against the best mean of continued SFT from theta_0 on N (over its iterations, "
             "-1 included, chosen after the fact: the most maximum likelihood got from those samples here).", ""]
    for k, start in starts.items():
        reach = "; ".join(f"minus SFT on {m if m != 1 else ''}N's best ({value:.3f}, {lab} at it {best}): "
                          f"{start - value:+.3f}" for m, (lab, best, value) in sorted(limits.items()))
        lines.append(f"- {regime_label(k)}: theta_0 {start:.3f}; {reach}.")
    return lines + [""]


def _sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def findings(table: dict) -> list[str]:
    """What one regime's KL table says: the ranking at the last iteration, the best of each family,
    SPIN against SPACE, the curves no iteration of which improves on theta_0, the mean's rises."""
    if not table:
        return []
    means = {m: {i: float(np.mean(v)) for i, v in its.items()} for m, its in table.items()}
    last = max(i for its in means.values() for i in its)
    final = {m: its[last] for m, its in means.items() if last in its}
    lines = [f"At the last iteration ({last}), ranked by mean: "
             + ", ".join(f"{m} {final[m]:.3f}" for m in sorted(final, key=final.get)) + "."]
    best = {m: min(its, key=its.get) for m, its in means.items()}
    for family in ("space", "spin", "sft"):
        members = [m for m in means if m.split(":")[0] == family]
        if members:
            top = min(members, key=lambda m: means[m][best[m]])
            lines.append(f"- best {family}: {top}, {means[top][best[top]]:.3f} at iteration {best[top]}.")
    trained = {m: min(v for i, v in its.items() if i >= 0) for m, its in means.items() if any(i >= 0 for i in its)}
    spin = [m for m in trained if m.split(":")[0] == "spin"]
    space = [m for m in trained if m.split(":")[0] == "space"]
    if spin and space:
        best_spin, best_space = min(spin, key=trained.get), min(space, key=trained.get)
        verdict = ("SPIN is as good as or better than SPACE" if trained[best_spin] <= trained[best_space]
                   else "SPACE is better than SPIN")
        lines.append(f"- best over self-play iterations (t >= 0): {verdict} ({best_spin} {trained[best_spin]:.3f} vs "
                     f"{best_space} {trained[best_space]:.3f}).")
    start = next((its[-1] for its in means.values() if -1 in its), None)
    worse = [m for m in trained if start is not None and trained[m] >= start]
    if worse:
        lines.append(f"- no self-play iteration improves on theta_0 ({start:.3f}) for: {', '.join(worse)}.")
    for m in spin + space:
        rises = [i for i in sorted(means[m]) if i - 1 in means[m] and means[m][i] > means[m][i - 1]]
        if rises:
            lines.append(f"- {m}: the mean rises at iteration(s) {', '.join(map(str, rises))}.")
    return lines


# ----------------------------------------------------------------------------------- plots


BENCHMARK_PREFIX = "eval/lm_eval/"


def plot(curves: dict, out) -> list[Path]:
    """kl.png and steps.png under `out`, and benchmarks.png when the runs have lm-eval scores;
    returns their paths."""
    import matplotlib

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = methods_in_order(curves)
    base = {run["method"]: run.get("base_method", run["method"]) for run in curves["runs"]}
    bases = list(dict.fromkeys(base[m] for m in methods))  # a method keeps its colour in every regime
    colors = {m: matplotlib.colormaps["tab10"](bases.index(base[m]) % 10) for m in methods}
    styles = {m: "--" if m.startswith("spin") else (":" if m.startswith("sft") else "-") for m in methods}
    written = [plot_kl(curves, out / "kl.png", colors, styles), plot_steps(curves, out / "steps.png", colors, styles)]
    if benchmark_keys(curves):
        written.append(plot_benchmarks(curves, out / "benchmarks.png", methods, colors, styles))
    return written


def plot_band(ax, by_iteration: dict, label: str, color=None, style: str = "-") -> np.ndarray:
    """One curve on `ax`: {iteration: [value of each seed]} as the mean over seeds per iteration with a
    min-max band; returns every value plotted."""
    its = sorted(by_iteration)
    values = [np.asarray(by_iteration[i], float) for i in its]
    line, = ax.plot(its, [v.mean() for v in values], style, marker="o", color=color, label=label)
    ax.fill_between(its, [v.min() for v in values], [v.max() for v in values], color=line.get_color(), alpha=0.12)
    return np.concatenate(values)


def plot_kl(curves: dict, path: Path, colors, styles) -> Path:
    """One row of panels per theta_0 regime, one column per KL_PLOTS key the runs have: the mean over
    seeds per iteration with a min-max band (log scale for a KL whose values are all positive)."""
    import matplotlib.ticker
    from matplotlib.figure import Figure  # no pyplot: any backend (a notebook's inline one too) is left alone

    panels = [(key, axis, log) for key, axis, log in KL_PLOTS if any(key in r for r in curves["records"])]
    regimes = claims.curve_index(curves)
    seeds = sorted({r["seed"] for r in curves["runs"]})
    fig = Figure(figsize=(6.5 * len(panels), 4.5 * len(regimes)))
    axes = fig.subplots(len(regimes), len(panels), squeeze=False)
    for row, (regime, members) in zip(axes, regimes.items()):
        for ax, (key, axis, log) in zip(row, panels):
            table = kl_table(curves, key)
            finite = []
            for method in members.values():
                if method in table:
                    values = plot_band(ax, table[method], method, colors[method], styles[method])
                    finite += [v for v in values if np.isfinite(v)]
            ax.set_xlabel("iteration (-1 = theta_0 after SFT; t = player after self-play iteration t)")
            ax.set_ylabel(axis + (", log scale" if log and finite and min(finite) > 0 else ""))
            ax.set_title(f"{regime_label(regime)}: mean over {len(seeds)} seed(s), band = min-max", fontsize=10)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            if log and finite and min(finite) > 0:  # a diverging method (SPIN at small beta) would flatten the rest
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("Known-truth task per iteration: forward and reverse KL to p_data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_steps(curves: dict, path: Path, colors, styles) -> Path:
    """The STEP_PLOTS metrics per optimizer step, counted across iterations: the mean over seeds of each
    curve with a min-max band, iteration boundaries as vertical lines."""
    from matplotlib.figure import Figure

    methods = methods_in_order(curves)
    seeds = sorted({r["seed"] for r in curves["runs"]})
    steps = [r for r in curves["records"] if r["record"] == "step"]
    fig = Figure(figsize=(13, 8.5))
    axes = fig.subplots(2, 2, sharex=True)
    boundaries = set()
    for (key, axis), ax in zip(STEP_PLOTS, axes.flat):
        for method in methods:
            if key == "loss" and method.split(":")[0] == "sft":
                continue  # its loss is -logps/real (~10 nats): it would flatten the self-play losses
            by_step: dict = {}
            for r in steps:
                if r["method"] == method and key in r:
                    by_step.setdefault(r["global_step"], []).append(float(r[key]))
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
        ax.set_ylabel(axis)
        ax.set_title(f"{key} per step (mean over seeds, band = min-max)"
                     + ("; sft's is -logps/real" if key == "loss" and any(m.startswith("sft") for m in methods)
                        else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat:
        for b in sorted(boundaries):
            ax.axvline(b + 0.5, color="black", lw=0.8, alpha=0.6)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step, counted across iterations (vertical lines: iteration boundaries)")
    legend = {}
    for ax in axes.flat:  # every method, in order (the loss panel leaves sft out)
        legend.update({name: handle for handle, name in zip(*ax.get_legend_handles_labels())})
    labels = [m for m in methods if m in legend]
    handles = [legend[m] for m in labels]
    if labels:  # none without step records (a run stopped before its first step)
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.suptitle("Per-step stability curves within and across self-play iterations")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    return path


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
        table = kl_table(curves, key)
        for method in methods:
            if method in table:
                plot_band(ax, table[method], method, colors[method], styles[method])
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

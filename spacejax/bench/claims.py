"""Statistics over seeds, and PAPER.md's claims as the known-truth benchmark measured them (the
paired sections and the claims table of spacejax.bench.curves' summary.md).

Every comparison is paired: two curves of one theta_0 regime share each seed's theta_0 and its
p_data draws, so the difference a_s - b_s of seed s leaves out theta_0's seed-to-seed spread.
`paired` gives the mean difference over the seeds, its 95% t-interval (n - 1 degrees of freedom,
`t_quantile`; none for one seed) and the number of seeds on each side of 0.

The claims (`claims`, one row per claim, theta_0 regime and KL direction):
    SPACE improves at every iteration     every step t-1 -> t of each SPACE curve, paired over seeds
    SPIN falls after iteration 2          each SPIN curve's last iteration minus its iteration 2
    SPACE on N beats SFT on 4N            (a) SPACE minus sft:data=4x from the same theta_0;
                                          (b) theta_0 = SFT on 4N: each method on N minus theta_0
    SPACE's optimum is p_data for every mu  the SPACE curves' last iterations against mu = 1's
A verdict is "yes" or "no" when the 95% interval excludes 0 on that side, else "not resolved".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

KL_KEYS = (("eval/kl", "forward KL(p_data ‖ p_theta)"), ("eval/reverse_kl", "reverse KL(p_theta ‖ p_data)"))
REFERENCES = ("space:mu=1", "sft")  # the curves every other one is compared with, seed by seed
LEVEL = 0.95


def per_seed(curves: dict, key: str) -> dict:
    """{label: {iteration: {seed: value of `key`}}} from the evaluation records ('nan' strings as NaN)."""
    table: dict = {}
    for r in curves["records"]:
        if r["record"] == "eval" and key in r:
            table.setdefault(r["method"], {}).setdefault(r["iteration"], {})[r["seed"]] = float(r[key])
    return {label: dict(sorted(its.items())) for label, its in table.items()}


def curve_index(curves: dict) -> dict[int, dict[str, str]]:
    """{regime: {method: its curve's label}}, regimes and methods in run order."""
    index: dict = {}
    for run in curves["runs"]:
        index.setdefault(run.get("regime", 1), {}).setdefault(run.get("base_method", run["method"]), run["method"])
    return index


# ----------------------------------------------------------------------------------- statistics


def central_t(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with a whole number `df` of degrees of freedom (Abramowitz and
    Stegun 26.7.3-4: a finite series in cos(theta), theta = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 3 terms / 2
        term, total = c, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df / 2 terms
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 1/2) of Student's t with `df` degrees of freedom, by bisection on `central_t`."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 1/2 < p < 1 and df >= 1, got p={p}, df={df}")
    target, low, high = 2 * p - 1, 0.0, 1.0
    while central_t(high, df) < target:
        high *= 2
    for _ in range(100):  # halves [0, high] down to below a double's resolution
        middle = (low + high) / 2
        low, high = (middle, high) if central_t(middle, df) < target else (low, middle)
    return (low + high) / 2


@dataclasses.dataclass(frozen=True)
class Paired:
    """Differences a - b over n seeds: their mean, its t-interval [low, high] (NaN for one seed),
    and how many seeds are below and above 0."""

    mean: float
    low: float
    high: float
    below: int
    above: int
    n: int

    def cell(self) -> str:
        """`-0.241 [-0.362, -0.120] 5-/0+`."""
        interval = f" [{self.low:+.3f}, {self.high:+.3f}]" if math.isfinite(self.low) else ""
        return f"{self.mean:+.3f}{interval} {self.below}-/{self.above}+"

    def verdict(self, side: str) -> str:
        """"yes" when the interval lies on `side` ("below" or "above") of 0, "no" on the other, else
        "not resolved"."""
        below, above = self.high < 0, self.low > 0  # False for NaN
        if (below, above) == (False, False):
            return "not resolved"
        return "yes" if (below if side == "below" else above) else "no"


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Paired:
    """The paired differences a_s - b_s over seeds s (a, b [n], in the same seed order)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n, mean = len(d), float(np.mean(d))
    half = t_quantile((1 + level) / 2, n - 1) * float(np.std(d, ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return Paired(mean, mean - half, mean + half, int(np.sum(d < 0)), int(np.sum(d > 0)), n)


def paired_at(table: dict, a: str, ia: int, b: str, ib: int) -> Optional[Paired]:
    """Curve a at iteration ia minus curve b at ib over the seeds both have (None: no such seed)."""
    if ia not in table.get(a, {}) or ib not in table.get(b, {}):
        return None
    seeds = sorted(set(table[a][ia]) & set(table[b][ib]))
    if not seeds:
        return None
    return paired([table[a][ia][s] for s in seeds], [table[b][ib][s] for s in seeds])


# ----------------------------------------------------------------------------------- summary sections


def paired_sections(curves: dict, regime_label) -> list[str]:
    """summary.md's paired differences: per KL direction and regime, every curve minus each of
    REFERENCES present, at every iteration (t >= 0; at -1 all share theta_0)."""
    lines = ["## Paired differences over seeds", "",
             f"Each cell: the mean over seeds of (row method - reference) at that iteration, its {LEVEL:.0%} "
             "t-interval over the seeds (n - 1 degrees of freedom), and the seeds in which the difference is "
             "below / above 0 (k-/j+). Negative: the row method is closer to p_data. Same theta_0 and p_data "
             "draws per seed, so theta_0's seed-to-seed spread cancels.", ""]
    for key, title in KL_KEYS:
        table = per_seed(curves, key)
        for regime, members in curve_index(curves).items():
            for reference in REFERENCES:
                ref = members.get(reference)
                others = [m for m in members.values() if m != ref and m in table]
                if ref not in table or not others:
                    continue
                iterations = sorted({i for m in others for i in table[m] if i >= 0})
                lines += [f"### {title}: minus {reference} ({regime_label(regime)})", "",
                          "| method | " + " | ".join(f"it {i}" for i in iterations) + " |",
                          "|---" * (len(iterations) + 1) + "|"]
                for m in others:
                    cells = [paired_at(table, m, i, ref, i) for i in iterations]
                    lines.append(f"| {m} | " + " | ".join(c.cell() if c else "" for c in cells) + " |")
                lines.append("")
    return lines


def claims(curves: dict, regime_label) -> list[dict]:
    """One row per claim of PAPER.md, theta_0 regime and task: {claim, theta_0, task, and for each KL
    direction of KL_KEYS measured, the answer as text}. A claim that a regime's runs cannot answer
    (no SPIN curve, no sft:data=4x, one mu) is left out; too few iterations for SPIN's says so."""
    tasks = ", ".join(sorted({run.get("task", "toy") for run in curves["runs"]}))
    tables = {key: per_seed(curves, key) for key, _ in KL_KEYS if any(key in r for r in curves["records"])}
    rows = []
    for regime, members in curve_index(curves).items():
        space = {m: lab for m, lab in members.items() if m.split(":")[0] == "space"}
        spin = {m: lab for m, lab in members.items() if m.split(":")[0] == "spin"}
        on_n = {m: lab for m, lab in members.items() if "data=" not in m}  # the methods that train on N
        tests = [("SPACE improves at every iteration", space, _space_improves),
                 ("SPIN falls after iteration 2", spin, _spin_falls_after_2)]
        if "sft:data=4x" in members:
            tests.append(("SPACE on N beats SFT on 4N: (a) continued SFT on 4N (sft:data=4x), same theta_0", space,
                          lambda table, subjects: _beats_sft_4n(table, subjects, members["sft:data=4x"])))
        if regime > 1:
            tests.append((f"SPACE on N beats SFT on 4N: (b) the paper's protocol, theta_0 = SFT on {regime}N: does a "
                          "method on N improve on it?", on_n, _improves_on_theta0))
        if len(space) > 1:
            tests.append(("SPACE's optimum is p_data for every mu", space, _same_optimum_every_mu))
        for claim, subjects, test in tests:
            if not subjects:
                continue
            row = {"claim": claim, "theta_0": regime_label(regime), "task": tasks}
            row.update({key: test(table, subjects) for key, table in tables.items()})
            rows.append(row)
    return rows


def claims_section(curves: dict, regime_label) -> list[str]:
    """summary.md's claims table (`claims`), to copy into benchmarks/BENCHMARKS.md."""
    rows = claims(curves, regime_label)
    keys = [key for key, _ in KL_KEYS if any(key in row for row in rows)]
    titles = dict(KL_KEYS)
    lines = ["## PAPER.md's claims, as measured", "",
             "One row per claim and theta_0 regime, in both KL directions. Differences are paired over seeds "
             f"(mean, {LEVEL:.0%} t-interval, seeds below/above 0); yes / no: the interval excludes 0 on the "
             "claim's side / the other side; not resolved: it contains 0.", "",
             "| claim | theta_0 | task | " + " | ".join(titles[k] for k in keys) + " |",
             "|---" * (len(keys) + 3) + "|"]
    for row in rows:
        lines.append(f"| {row['claim']} | {row['theta_0']} | {row['task']} | "
                     + " | ".join(row.get(k, "") for k in keys) + " |")
    return lines + [""]


# ----------------------------------------------------------------------------------- the claims


def _last(table: dict, label: str) -> int:
    return max(table[label])


def _space_improves(table: dict, subjects: dict) -> str:
    """Each SPACE curve: the seeds in which it falls at every step, and its least favourable step."""
    parts = []
    for method, lab in subjects.items():
        if lab not in table:
            continue
        its = list(table[lab])
        if len(its) < 2:
            continue
        steps = {(p, t): paired_at(table, lab, t, lab, p) for p, t in zip(its, its[1:])}
        seeds = sorted(set.intersection(*(set(table[lab][i]) for i in its)))
        falls = sum(all(table[lab][t][s] < table[lab][p][s] for p, t in steps) for s in seeds)
        worst = max(steps, key=lambda step: steps[step].mean)
        verdicts = {step.verdict("below") for step in steps.values()}
        verdict = "no" if "no" in verdicts else ("yes" if verdicts == {"yes"} else "not resolved")
        parts.append(f"{method}: {verdict}, falls at every step in {falls}/{len(seeds)} seeds "
                     f"({_mean(table[lab][its[0]]):.3f} -> {_mean(table[lab][its[-1]]):.3f}); "
                     f"least favourable step it {worst[0]} -> {worst[1]}: {steps[worst].cell()}")
    return "; ".join(parts)


def _spin_falls_after_2(table: dict, subjects: dict) -> str:
    """Each SPIN curve: its last iteration minus iteration 2 (> 0: it fell), and its best iteration."""
    parts = []
    for method, lab in subjects.items():
        if lab not in table:
            continue
        last = _last(table, lab)
        if last < 3:
            parts.append(f"{method}: needs iterations past 2 (selfplay.iterations >= 4; ran to {last})")
            continue
        change = paired_at(table, lab, last, lab, 2)
        best = min((i for i in table[lab] if i >= 0), key=lambda i: _mean(table[lab][i]))
        parts.append(f"{method}: {change.verdict('above')}, it {last} - it 2: {change.cell()}; "
                     f"best mean iteration {best}")
    return "; ".join(parts)


def _beats_sft_4n(table: dict, subjects: dict, sft_4n: str) -> str:
    """Each SPACE curve minus sft:data=4x at the last iteration (< 0: SPACE on N is closer to p_data),
    and at how many iterations its mean is below."""
    if sft_4n not in table:
        return ""
    parts = []
    for method, lab in subjects.items():
        if lab not in table:
            continue
        last = min(_last(table, lab), _last(table, sft_4n))
        at_last = paired_at(table, lab, last, sft_4n, last)
        its = [i for i in table[lab] if 0 <= i <= last]
        below = sum(paired_at(table, lab, i, sft_4n, i).mean < 0 for i in its)
        parts.append(f"{method}: {at_last.verdict('below')}, minus sft:data=4x at it {last}: {at_last.cell()}; "
                     f"mean below at {below}/{len(its)} iterations")
    return "; ".join(parts)


def _improves_on_theta0(table: dict, subjects: dict) -> str:
    """Each curve's last iteration minus theta_0 (< 0: it improved), and its best mean iteration's
    (chosen after the fact, so optimistic)."""
    parts = []
    for method, lab in subjects.items():
        if lab not in table or -1 not in table[lab]:
            continue
        last = _last(table, lab)
        at_last = paired_at(table, lab, last, lab, -1)
        best = min((i for i in table[lab] if i >= 0), key=lambda i: _mean(table[lab][i]))
        at_best = paired_at(table, lab, best, lab, -1)
        parts.append(f"{method}: {at_last.verdict('below')}, it {last} - theta_0: {at_last.cell()}; best mean it "
                     f"{best}: {at_best.cell()}")
    return "; ".join(parts)


def _same_optimum_every_mu(table: dict, subjects: dict) -> str:
    """The SPACE curves at their last iteration: each mu's mean, and each minus mu = 1 (or the first
    mu); 0 would be p_data itself."""
    present = {m: lab for m, lab in subjects.items() if lab in table}
    if len(present) < 2:
        return ""
    reference = "space:mu=1" if "space:mu=1" in present else next(iter(present))
    last = min(_last(table, lab) for lab in present.values())
    means = ", ".join(f"{m.partition(':')[2] or m} {_mean(table[lab][last]):.3f}" for m, lab in present.items())
    others = {m: paired_at(table, lab, last, present[reference], last) for m, lab in present.items() if m != reference}
    same = all(p.verdict("below") == "not resolved" for p in others.values())
    differences = "; ".join(f"{m} - {reference}: {p.cell()}" for m, p in others.items())
    return (f"{'yes' if same else 'no'}: {'the same' if same else 'not the same'} value for every mu (within the "
            f"interval) at it {last}: {means} (p_data itself: 0); {differences}")


def _mean(values: dict) -> float:
    return float(np.mean(list(values.values())))

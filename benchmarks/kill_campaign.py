"""SIGKILL at random points of a tiny run, then resume: every resumed run must end bitwise equal
to an uninterrupted one (every phase's final params, eval.json and the step metrics).

    python benchmarks/kill_campaign.py [--kills 20] [--seed 0] [--write]

The run is tiny_space reduced to an SFT warm-up and two iterations (OVERRIDES), started as
`spacejax train` in a subprocess. The uninterrupted run's wall time T sets the range: kill k lands
at a time drawn uniformly from [0, T] after the start (imports and compilation included, so some
kills land before anything is written), then the same command runs again to the end. A trial
fails when the resumed run exits non-zero or differs in anything compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import report  # benchmarks/report.py: the BENCHMARKS.md sections

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from runs import assert_params_equal, final_params, step_records  # noqa: E402

SECTION = "kill_campaign"
CONFIG = ROOT / "configs" / "tiny_space.yaml"
OVERRIDES = ["selfplay.sft_epochs=2", "selfplay.iterations=2", "data.num_train=64", "data.num_eval=16",
             "selfplay.eval_kl_samples=64", "train.epochs=3", "train.batch_size=16", "checkpoint.every_steps=2",
             "sampler.batch_size=8"]
PHASES = (-1, 0, 1)


def command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "spacejax.cli", "train", "--config", str(CONFIG), "--workdir", str(workdir),
            *OVERRIDES]


def run(workdir: Path, kill_after: float | None = None) -> tuple[int, float]:
    """(exit status, seconds): the run to its end, or SIGKILLed `kill_after` seconds after its start."""
    started = time.perf_counter()
    process = subprocess.Popen(command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return -signal.SIGKILL, time.perf_counter() - started
    if process.returncode:
        raise RuntimeError(f"{' '.join(command(workdir))} exited {process.returncode}: {process.stderr.read()[-2000:]}")
    return 0, time.perf_counter() - started


def where_it_stopped(workdir: Path) -> str:
    """What the killed run had reached: the last phase with files, and how far."""
    done = [t for t in PHASES if (workdir / ("sft" if t < 0 else f"iter_{t:03d}") / "DONE").exists()]
    log = workdir / "metrics.jsonl"
    last = log.read_text().splitlines()[-1] if log.exists() and log.stat().st_size else ""
    try:
        record = json.loads(last)
        position = f"iteration {record['iteration']} step {record['step']}" + (" (end)" if "event" in record else "")
    except (json.JSONDecodeError, KeyError):
        position = "a cut log line" if last else "nothing logged"
    return f"{len(done)} phases DONE, last record: {position}"


def same_result(workdir: Path, reference: Path) -> str:
    """'' when `workdir` ended exactly as `reference`, else what differs."""
    try:
        for t in PHASES:
            assert_params_equal(final_params(workdir, t), final_params(reference, t))
            phase = "sft" if t < 0 else f"iter_{t:03d}"
            if json.loads((workdir / phase / "eval.json").read_text()) != json.loads(
                    (reference / phase / "eval.json").read_text()):
                return f"{phase}/eval.json differs"
        if step_records(workdir) != step_records(reference):
            return "step metrics differ"
    except AssertionError as error:
        return f"params differ: {str(error)[:200]}"
    return ""


def campaign(kills: int, seed: int, root: Path) -> list[dict]:
    reference = root / "reference"
    _, seconds = run(reference)
    print(f"uninterrupted run: {seconds:.1f} s", flush=True)
    times = np.random.default_rng(seed).uniform(0, seconds, kills)
    trials = []
    for k, kill_after in enumerate(times):
        workdir = root / f"kill_{k:02d}"
        status, _ = run(workdir, kill_after)
        stopped = where_it_stopped(workdir) if status else "finished before the kill"
        run(workdir)
        difference = same_result(workdir, reference)
        trials.append({"kill_after_s": float(kill_after), "stopped": stopped, "difference": difference})
        print(f"kill {k + 1}/{kills} at {kill_after:.1f} s ({stopped}): "
              f"{'bitwise equal' if not difference else 'DIFFERENT: ' + difference}", flush=True)
        shutil.rmtree(workdir)
    return trials


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="rewrite this section of benchmarks/BENCHMARKS.md")
    args = parser.parse_args(argv)
    load = report.load_average()
    with tempfile.TemporaryDirectory(prefix="kill-campaign-") as folder:
        trials = campaign(args.kills, args.seed, Path(folder))
    failed = [t for t in trials if t["difference"]]
    print(f"{len(trials) - len(failed)} of {len(trials)} resumed runs ended bitwise equal to the uninterrupted one")
    if args.write:
        rows = [f"| {t['kill_after_s']:.1f} | {t['stopped']} | {'bitwise equal' if not t['difference'] else t['difference']} |"
                for t in sorted(trials, key=lambda t: t["kill_after_s"])]
        report.write_titled_section(
            SECTION, "SIGKILL at random points, then resume", f"`{report.command_line(__file__, argv)}`",
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1-minute load {load:.2f}. "
            f"tiny_space with {' '.join(OVERRIDES)}: SFT warm-up and 2 iterations.",
            f"**{len(trials) - len(failed)} of {len(trials)}** resumed runs ended bitwise equal to the uninterrupted "
            "run (every phase's final params, eval.json, step metrics).",
            "\n".join(["| kill after (s) | what the killed run had reached | resumed run |", "|---:|---|---|", *rows]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

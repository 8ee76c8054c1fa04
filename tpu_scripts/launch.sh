#!/usr/bin/env bash
# Start `spacejax train --config CONFIG --workdir WORKDIR` on every worker of a TPU VM, in the
# background (nohup), with a log file per worker. Re-running the same command resumes the run.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config CONFIG --workdir WORKDIR [options] [section.key=value ...]

Runs, on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all), in ~/spacejax
(the tree setup.sh unpacked) with ~/spacejax-venv active:

  nohup spacejax train --config CONFIG --workdir WORKDIR [section.key=value ...] \\
      >> ~/spacejax-logs/worker-\$(hostname).log 2>&1 &

and writes the process id to ~/spacejax-logs/train.pid. Every worker runs the same command: on a
TPU VM slice spacejax detects the other hosts by itself (jax's cluster detection), so no
coordinator flags are needed. WORKDIR is the run's one directory for all hosts: a gs:// URL
(spacejax writes Cloud Storage itself; setup.sh installs spacejax[gcs]) or a path every host
mounts (an NFS share). All hosts take part in each Orbax save there and process 0 writes
config.yaml and metrics.jsonl. With a gs:// WORKDIR each worker also copies its log, every
${LOG_UPLOAD_SECONDS}s and once more when the run exits, to
  WORKDIR/tpu_scripts/logs/LAUNCH_TIME/worker-HOSTNAME.log
so the logs outlive the VM (a recovery deletes it). Launching the same command again (after a
crash, or on a re-created VM) resumes from the workdir; babysit.sh does exactly that.

Required:
  --name NAME            TPU VM (node) name
  --zone ZONE            its zone
  --config CONFIG        a config of this repository, relative to its root (e.g. configs/zephyr7b_space.yaml)
  --workdir WORKDIR      the run directory, e.g. gs://BUCKET/runs/zephyr7b_space (or an NFS path)

Options:
  --project PROJECT      Google Cloud project (default: gcloud's core/project)
  --env KEY=VALUE        export this variable before starting (e.g. LIBTPU_INIT_ARGS=...); repeatable
  --restart              if a run started by launch.sh is still alive on a worker, stop it first
                         (SIGTERM: spacejax saves the current step and exits; SIGKILL after
                         --stop-timeout seconds) instead of refusing to start
  --stop                 only stop the run on every worker (as --restart does), start nothing
  --stop-timeout SECONDS how long to wait for a stopped run to exit (default 300)
  --internal-ip          ssh to the workers' internal IPs (VMs created with --internal-ips)
  --tunnel-through-iap   ssh through Identity-Aware Proxy (VMs without external IPs)
  --dry-run              print the commands (one per line, prefixed with '+ ') instead of running them
  -h, --help             this help

Logs:  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command 'tail -f ~/spacejax-logs/worker-*.log'
       gcloud storage ls WORKDIR/tpu_scripts/logs/   (gs:// WORKDIR; also after the VM is gone)
EOF
}

LOG_UPLOAD_SECONDS=60

NAME='' ZONE='' PROJECT='' CONFIG='' WORKDIR='' RESTART=0 STOP_ONLY=0 STOP_TIMEOUT=300
OVERRIDES=() ENVS=()
launch_flag() {
  if ssh_flag "$@"; then return; fi
  TAKEN=2
  case $1 in
    --config) need_value "$@"; CONFIG=$2 ;;
    --workdir) need_value "$@"; WORKDIR=$2 ;;
    --env) need_value "$@"; ENVS+=("$2") ;;
    --restart) RESTART=1; TAKEN=1 ;;
    --stop) STOP_ONLY=1; TAKEN=1 ;;
    --stop-timeout) need_value "$@"; STOP_TIMEOUT=$2 ;;
    *) override_arg "$@" ;;
  esac
}
parse_flags launch_flag "$@"

require --name "$NAME"
require --zone "$ZONE"
if ((!STOP_ONLY)); then
  require --config "$CONFIG"
  require --workdir "$WORKDIR"
  require_repo_config
fi
for env in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $env =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env must look like KEY=VALUE, got '$env'"
done
if ! [[ $STOP_TIMEOUT =~ ^[0-9]+$ ]]; then
  die "--stop-timeout must be a number of seconds, got '$STOP_TIMEOUT'"
fi
set_gcloud_flags

# The run's command: identical on every worker and on every re-launch (that is what resumes).
train_command=$(shell_join spacejax train --config "$CONFIG" --workdir "$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
run_folder=$(run_folder_url "$WORKDIR")

# shellcheck disable=SC2016  # $pid, $log, $(hostname) ...: expanded on the worker
stop_running='pid=$(cat "$pidfile" 2>/dev/null || true); if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then '
if ((RESTART || STOP_ONLY)); then
  # shellcheck disable=SC2016
  stop_running+='echo "$(hostname): stopping spacejax train (pid $pid)"; kill -TERM "$pid"; '
  # shellcheck disable=SC2016
  stop_running+="for _ in \$(seq $STOP_TIMEOUT); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done; "
  # shellcheck disable=SC2016
  stop_running+='kill -KILL "$pid" 2>/dev/null || true; fi'
else
  # shellcheck disable=SC2016
  stop_running+='echo "$(hostname): spacejax train is already running (pid $pid); launch.sh --restart stops it first" >&2; exit 1; fi'
fi

steps=("set -euo pipefail" "mkdir -p \"$REMOTE_LOGS\"" "pidfile=\"$REMOTE_LOGS/train.pid\"" "$stop_running")
if ((!STOP_ONLY)); then
  steps+=("export PATH=\"$REMOTE_VENV/bin:\$PATH\"" "cd \"$REMOTE_SRC\"")
  for env in ${ENVS[@]+"${ENVS[@]}"}; do
    steps+=("export $(shell_quote "$env")")
  done
  # shellcheck disable=SC2016
  steps+=(
    "log=\"$REMOTE_LOGS/worker-\$(hostname).log\""
    "echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) launch.sh on \$(hostname)\" >>\"\$log\""
    "nohup $train_command >>\"\$log\" 2>&1 </dev/null &"
    'pid=$!'
    'echo "$pid" >"$pidfile"'
    'echo "$(hostname): started spacejax train (pid $pid), log $log"'
  )
  if [[ -n $run_folder ]]; then
    # The same launch time on every worker: one folder per launch, so no launch overwrites another's logs.
    uploaded="$run_folder/logs/$(date -u +%Y%m%dT%H%M%SZ)/worker-"
    # shellcheck disable=SC2016  # $1 $2 $3: the arguments of the uploader's own shell, on the worker
    upload_loop='while kill -0 "$1" 2>/dev/null; do gcloud storage cp "$2" "$3"; sleep '"$LOG_UPLOAD_SECONDS"'; done; gcloud storage cp "$2" "$3"'
    steps+=(
      "nohup sh -c $(shell_quote "$upload_loop") upload \"\$pid\" \"\$log\" $(shell_quote "$uploaded")\"\$(hostname).log\" >>\"$REMOTE_LOGS/upload.log\" 2>&1 </dev/null &"
      "echo \"\$(hostname): copying that log to $(shell_quote "$uploaded")\$(hostname).log\""
    )
  fi
fi

remote=''
for step in "${steps[@]}"; do
  case $step in
    *'&') remote+="${remote:+; }$step" ;;
    *) if [[ $remote == *'&' ]]; then remote+=" $step"; else remote+="${remote:+; }$step"; fi ;;
  esac
done
tpu_ssh all "$remote"

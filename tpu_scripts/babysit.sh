#!/usr/bin/env bash
# Keep a spacejax run going on a preemptible TPU VM until its last iteration is DONE: poll the VM;
# when it is preempted, terminated or gone, delete it, re-create it, set it up and launch the same
# command again (which resumes from the workdir).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE --config CONFIG --workdir WORKDIR
       [options] [section.key=value ...]

Every --poll-interval seconds:
  1. finished?  the last iteration's DONE exists: WORKDIR/iter_XXX/DONE, XXX = selfplay.iterations - 1
                (gcloud storage ls for gs://, else a test on worker 0)  ->  exit 0;
  2. the VM state (gcloud compute tpus tpu-vm describe --format='value(state)'; with --mode queued
     the queued resource's first):
     PREEMPTED, TERMINATED, missing, or a SUSPENDED/FAILED queued resource  ->  recover:
        delete.sh, create.sh, setup.sh (the tarball packed when babysit started, so every
        recovery ships the same code), [preflight.sh], launch.sh: the same
        'spacejax train --config CONFIG --workdir WORKDIR ...' that resumes from the workdir;
     READY  ->  is spacejax train alive on every worker (the pid launch.sh recorded)? If not:
        setup.sh when the workers lack the environment, then launch.sh --restart; at most
        --max-relaunches times (a run that keeps dying has a bug: read its logs);
     CREATING, WAITING_FOR_RESOURCES, REPAIRING, ...  ->  wait.
Run it where it can stay up for days (tmux or a small always-on VM), e.g.
  nohup tpu_scripts/babysit.sh ... > babysit.log 2>&1 &

Required:
  --name NAME, --zone ZONE, --accelerator-type TYPE     as for create.sh
  --config CONFIG, --workdir WORKDIR                    as for launch.sh (positional overrides too)

Creation (passed to create.sh / delete.sh):
  --project PROJECT  --version VERSION  --mode on-demand|spot|queued  --spot  --reserved
  --queued-id ID  --valid-until-duration D
  --create-flag FLAG        one more flag for the gcloud create command (repeatable),
                            e.g. --create-flag=--service-account=SA
Setup and launch (passed to setup.sh / launch.sh):
  --source DIR  --python VERSION  --stage GS_URL=DIR (repeatable)  --env KEY=VALUE (repeatable)
  --preflight               run preflight.sh before every (re-)launch; stop if it fails

Babysitting:
  --iterations N            the run's selfplay.iterations (default: read from CONFIG and the
                            overrides with python3 and this checkout's spacejax.config)
  --poll-interval SECONDS   between checks (default 300; 30 to 3600)
  --max-relaunches N        relaunches on a READY VM whose run died (default 3); recoveries from
                            preemption are not limited
  --delete-when-done        delete the TPU VM (delete.sh --yes) once the run is finished
  --once                    one check (and its recovery) then exit
  --dry-run                 print the commands of one cycle (implies --once); nothing is queried:
                            the VM is taken to be in --assume-state
  --assume-state STATE      with --dry-run: PREEMPTED (default), TERMINATED, MISSING, READY or DONE
  -h, --help                this help
EOF
}

NAME='' ZONE='' ACCELERATOR_TYPE='' VERSION='' PROJECT='' MODE=on-demand SPOT=0 RESERVED=0 QUEUED_ID=''
VALID_UNTIL='' SOURCE=$REPO_ROOT PYTHON_VERSION='' CONFIG='' WORKDIR='' ITERATIONS='' POLL_INTERVAL=300
MAX_RELAUNCHES=3 ONCE=0 ASSUME_STATE=PREEMPTED PREFLIGHT=0 DELETE_WHEN_DONE=0
CREATE_FLAGS=() STAGES=() ENVS=() OVERRIDES=()
babysit_flag() {
  if create_flag "$@"; then return; fi
  TAKEN=2
  case $1 in
    --create-flag)
      if (($# < 2)) || [[ -z $2 ]]; then die "option --create-flag needs a value"; fi
      CREATE_FLAGS+=("$2") ;;
    --source) need_value "$@"; SOURCE=$2 ;;
    --python) need_value "$@"; PYTHON_VERSION=$2 ;;
    --stage) need_value "$@"; STAGES+=("$2") ;;
    --env) need_value "$@"; ENVS+=("$2") ;;
    --preflight) PREFLIGHT=1; TAKEN=1 ;;
    --config) need_value "$@"; CONFIG=$2 ;;
    --workdir) need_value "$@"; WORKDIR=$2 ;;
    --iterations) need_value "$@"; ITERATIONS=$2 ;;
    --poll-interval) need_value "$@"; POLL_INTERVAL=$2 ;;
    --max-relaunches) need_value "$@"; MAX_RELAUNCHES=$2 ;;
    --once) ONCE=1; TAKEN=1 ;;
    --delete-when-done) DELETE_WHEN_DONE=1; TAKEN=1 ;;
    --assume-state) need_value "$@"; ASSUME_STATE=$2 ;;
    *) override_arg "$@" ;;
  esac
}
parse_flags babysit_flag "$@"
if ((DRY_RUN)); then ONCE=1; fi  # a dry run prints one cycle

require --name "$NAME"
require --zone "$ZONE"
require --accelerator-type "$ACCELERATOR_TYPE"
require --config "$CONFIG"
require --workdir "$WORKDIR"
require_mode
if ! [[ $POLL_INTERVAL =~ ^[0-9]+$ ]] || ((POLL_INTERVAL < 30 || POLL_INTERVAL > 3600)); then
  die "--poll-interval must be between 30 and 3600 seconds, got '$POLL_INTERVAL'"
fi
if ! [[ $MAX_RELAUNCHES =~ ^[0-9]+$ ]]; then
  die "--max-relaunches must be a number, got '$MAX_RELAUNCHES'"
fi
case $ASSUME_STATE in
  PREEMPTED | TERMINATED | MISSING | READY | DONE) ;;
  *) die "--assume-state must be PREEMPTED, TERMINATED, MISSING, READY or DONE, got '$ASSUME_STATE'" ;;
esac
if [[ -z $ITERATIONS ]]; then
  # shellcheck disable=SC2016
  ITERATIONS=$(cd "$REPO_ROOT" && "${PYTHON:-python3}" -c '
import sys
from spacejax import config
print(config.load(sys.argv[1], sys.argv[2:]).selfplay.iterations)' "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"}) ||
    die "could not read selfplay.iterations of --config $CONFIG with ${PYTHON:-python3} (it needs pyyaml; set PYTHON=...); pass --iterations N"
fi
if ! [[ $ITERATIONS =~ ^[0-9]+$ ]] || ((ITERATIONS < 1)); then
  die "--iterations must be a positive number, got '$ITERATIONS'"
fi
QUEUED_ID=${QUEUED_ID:-$NAME}
set_gcloud_flags
export CLOUDSDK_CORE_DISABLE_PROMPTS=1  # unattended: gcloud must never wait for an answer
DONE_MARKER="${WORKDIR%/}/$(iteration_dir_name $((ITERATIONS - 1)))/DONE"

# What every recovery passes on: the same flags each time.
location=(--name "$NAME" --zone "$ZONE")
if [[ -n $PROJECT ]]; then location+=(--project "$PROJECT"); fi
dry=()
if ((DRY_RUN)); then dry=(--dry-run); fi
create_args=("${location[@]}" --accelerator-type "$ACCELERATOR_TYPE" --mode "$MODE" --queued-id "$QUEUED_ID")
if [[ -n $VERSION ]]; then create_args+=(--version "$VERSION"); fi
if ((SPOT)); then create_args+=(--spot); fi
if ((RESERVED)); then create_args+=(--reserved); fi
if [[ -n $VALID_UNTIL ]]; then create_args+=(--valid-until-duration "$VALID_UNTIL"); fi
if ((${#CREATE_FLAGS[@]})); then create_args+=(-- "${CREATE_FLAGS[@]}"); fi
delete_args=("${location[@]}" --mode "$MODE" --queued-id "$QUEUED_ID" --yes)
workspace=$(mktemp -d)
trap 'rm -rf "$workspace"' EXIT
TARBALL=$workspace/$REMOTE_TARBALL
setup_args=("${location[@]}" --tarball "$TARBALL")
if [[ -n $PYTHON_VERSION ]]; then setup_args+=(--python "$PYTHON_VERSION"); fi
for stage in ${STAGES[@]+"${STAGES[@]}"}; do setup_args+=(--stage "$stage"); done
launch_args=("${location[@]}" --config "$CONFIG" --workdir "$WORKDIR" --restart)
for env in ${ENVS[@]+"${ENVS[@]}"}; do launch_args+=(--env "$env"); done
preflight_args=("${location[@]}" --config "$CONFIG")

step() {
  local script=$1
  shift
  "$TPU_SCRIPTS_DIR/$script" ${dry[@]+"${dry[@]}"} "$@"  # before "$@": that may end with -- overrides
}
launch() {
  step launch.sh "${launch_args[@]}" -- ${OVERRIDES[@]+"${OVERRIDES[@]}"}
}
preflight() {
  if ((PREFLIGHT)) && ! step preflight.sh "${preflight_args[@]}" -- ${OVERRIDES[@]+"${OVERRIDES[@]}"}; then
    log "preflight failed on $NAME: fix the config or the hosts (its report is above); stopping"
    exit 1
  fi
}

is_finished() {
  local assumed=1
  if [[ $ASSUME_STATE == DONE ]]; then assumed=0; fi
  if [[ $WORKDIR == gs://* ]]; then
    if ((DRY_RUN)); then
      print_cmd gcloud storage ls "$DONE_MARKER"
      return "$assumed"
    fi
    gcloud storage ls "$DONE_MARKER" >/dev/null 2>&1
  else
    local check
    check="test -e $(shell_quote "$DONE_MARKER") && echo FINISHED || echo RUNNING"
    if ((DRY_RUN)); then
      tpu_ssh 0 "$check"
      return "$assumed"
    fi
    [[ $(tpu_ssh 0 "$check" 2>/dev/null) == *FINISHED* ]]
  fi
}

vm_state() {
  local queued
  if [[ $MODE == queued ]]; then
    queued=$(describe_state queued "$([[ $ASSUME_STATE == MISSING ]] && echo MISSING || echo ACTIVE)")
    if [[ $queued != ACTIVE ]]; then
      echo "$queued"
      return 0
    fi
  fi
  describe_state node "$([[ $ASSUME_STATE == DONE ]] && echo READY || echo "$ASSUME_STATE")"
}

# ALIVE when spacejax train runs on every worker; NOSETUP when a worker lacks the environment; else DEAD.
run_health() {
  local report
  # shellcheck disable=SC2016  # expanded on the worker
  local check='if [ ! -x "$HOME/spacejax-venv/bin/spacejax" ]; then echo "NOSETUP $(hostname)"; elif pid=$(cat "$HOME/spacejax-logs/train.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; then echo "ALIVE $(hostname)"; else echo "DEAD $(hostname)"; fi'
  if ((DRY_RUN)); then
    tpu_ssh all "$check"
    echo ALIVE
    return 0
  fi
  report=$(tpu_ssh all "$check" 2>/dev/null) || true
  if [[ $report == *NOSETUP* ]]; then
    echo NOSETUP
  elif [[ $report == *DEAD* || $report != *ALIVE* ]]; then
    echo DEAD
  else
    echo ALIVE
  fi
}

recover() {
  log "TPU $NAME is $1: recovering (delete, create, setup, launch; the run resumes from $WORKDIR)"
  if [[ $1 != MISSING ]] && ! step delete.sh "${delete_args[@]}"; then
    log "delete failed; trying again at the next check"
    return 0
  fi
  if ! step create.sh "${create_args[@]}"; then
    log "create failed (no capacity?); trying again at the next check"
    return 0
  fi
  recoveries=$((recoveries + 1))
  if ! step setup.sh "${setup_args[@]}"; then
    log "setup failed; it runs again at the next check"
    return 0
  fi
  preflight
  launch || log "launch failed; trying again at the next check"
}

relaunch() {
  relaunches=$((relaunches + 1))
  if ((relaunches > MAX_RELAUNCHES)); then
    log "spacejax train died $relaunches times on a READY VM: giving up. Read the logs:"
    log "  gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=all --command 'tail -n 40 ~/spacejax-logs/worker-*.log'"
    exit 1
  fi
  if [[ $1 == NOSETUP ]]; then
    log "the workers of $NAME are not set up: setup, then launch (relaunch $relaunches of $MAX_RELAUNCHES)"
    step setup.sh "${setup_args[@]}" || { log "setup failed; trying again at the next check"; return 0; }
    preflight
  else
    log "spacejax train is not running on every worker of $NAME: launching again (relaunch $relaunches of $MAX_RELAUNCHES)"
  fi
  launch || log "launch failed; trying again at the next check"
}

pack_source "$SOURCE" "$TARBALL"
log "babysitting $NAME ($ACCELERATOR_TYPE, $MODE) until $DONE_MARKER exists; checking every ${POLL_INTERVAL}s"
relaunches=0
recoveries=0
while true; do
  if is_finished; then
    log "the run is finished: $DONE_MARKER exists (recoveries: $recoveries, relaunches: $relaunches)"
    if ((DELETE_WHEN_DONE)) && [[ $(vm_state) != MISSING ]]; then
      step delete.sh "${delete_args[@]}"
    fi
    exit 0
  fi
  state=$(vm_state)
  case $state in
    READY)
      health=$(run_health)
      if [[ $health == ALIVE ]]; then
        log "TPU $NAME is READY and spacejax train runs on every worker"
      else
        relaunch "$health"
      fi ;;
    PREEMPTED | TERMINATED | MISSING | SUSPENDED | SUSPENDING | FAILED) recover "$state" ;;
    STOPPED)
      log "TPU $NAME was STOPPED (by someone): not touching it; start it or delete it, then run babysit again"
      exit 1 ;;
    *) log "TPU $NAME is $state: waiting" ;;
  esac
  if ((ONCE)); then
    exit 0
  fi
  sleep "$POLL_INTERVAL"
done

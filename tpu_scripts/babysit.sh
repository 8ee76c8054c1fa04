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
                (gcloud storage ls from here for gs://, else ls on worker 0)  ->  exit 0;
  2. the VM state (gcloud compute tpus tpu-vm describe --format='value(state)'; with --mode queued
     the queued resource's first):
     PREEMPTED, TERMINATED, missing, or a SUSPENDED/FAILED queued resource  ->  recover:
        delete.sh, create.sh, setup.sh (the tarball packed when babysit started, so every
        recovery ships the same code, and the versions frozen in the bucket at the first setup),
        [preflight.sh], launch.sh: the same 'spacejax train --config CONFIG --workdir WORKDIR ...'
        that resumes from the workdir;
     READY  ->  is spacejax train alive on every worker (the pid launch.sh recorded)? A reply from
        every worker, all alive: fine. Fewer replies than workers (an ssh blip): not known, nothing
        done. A worker says it is not running (or lacks the environment) two checks in a row:
        [setup.sh,] launch.sh --restart; at most --max-relaunches times with no new checkpoint in
        WORKDIR/*/train/ in between (a run that keeps dying there has a bug: read its logs);
     CREATING, WAITING_FOR_RESOURCES, REPAIRING, the API's own UNKNOWN, a failed gcloud ...  ->  wait.
  Giving up (relaunches spent, preflight failed, a VM someone STOPPED) is loud: a message on
  stderr that the TPU is still billing with the command that deletes it, exit status 1; with
  --delete-on-give-up babysit deletes it itself.
Run it where it can stay up for days (tmux or a small always-on VM), e.g.
  nohup tpu_scripts/babysit.sh ... > babysit.log 2>&1 &

Required:
  --name NAME, --zone ZONE, --accelerator-type TYPE     as for create.sh
  --config CONFIG, --workdir WORKDIR                    as for launch.sh (positional overrides too)

Creation (passed to create.sh / delete.sh):
  --project PROJECT  --version VERSION  --mode on-demand|spot|queued  --spot  --reserved
  --queued-id ID  --valid-until-duration D
  --create-flag FLAG        one more flag for the gcloud create command (repeatable),
                            e.g. --create-flag=--service-account=SA, --create-flag=--internal-ips
Setup and launch (passed to setup.sh / launch.sh / preflight.sh):
  --source DIR  --python VERSION  --stage GS_URL=DIR (repeatable)  --env KEY=VALUE (repeatable)
  --internal-ip  --tunnel-through-iap   how ssh reaches the workers (VMs with --internal-ips)
  --preflight               run preflight.sh (with the workdir) before every (re-)launch; give up if it fails

Babysitting:
  --iterations N            the run's selfplay.iterations (default: read from CONFIG and the
                            overrides with python3 and this checkout's spacejax.config)
  --poll-interval SECONDS   between checks (default 300; 30 to 3600)
  --max-relaunches N        relaunches on a READY VM whose run died, with no new checkpoint in
                            between (default 3); recoveries from preemption are not limited
  --delete-when-done        delete the TPU VM (delete.sh --yes) once the run is finished
  --delete-on-give-up       delete the TPU VM when babysit gives up, instead of leaving it billing
  --once                    one check (and its recovery) then exit (a dead run needs two checks)
  --dry-run                 print the commands of one cycle (implies --once); nothing is queried:
                            the VM is taken to be in --assume-state
  --assume-state STATE      with --dry-run: PREEMPTED (default), TERMINATED, MISSING, READY or DONE
  -h, --help                this help
EOF
}

NAME='' ZONE='' ACCELERATOR_TYPE='' VERSION='' PROJECT='' MODE=on-demand SPOT=0 RESERVED=0 QUEUED_ID=''
VALID_UNTIL='' SOURCE=$REPO_ROOT PYTHON_VERSION='' CONFIG='' WORKDIR='' ITERATIONS='' POLL_INTERVAL=300
MAX_RELAUNCHES=3 ONCE=0 ASSUME_STATE=PREEMPTED PREFLIGHT=0 DELETE_WHEN_DONE=0 DELETE_ON_GIVE_UP=0
CREATE_FLAGS=() STAGES=() ENVS=() OVERRIDES=()
babysit_flag() {
  if create_flag "$@" || ssh_flag "$@"; then return; fi
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
    --delete-on-give-up) DELETE_ON_GIVE_UP=1; TAKEN=1 ;;
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
DONE_MARKER="$(iteration_dir_name $((ITERATIONS - 1)))/DONE"  # relative to the workdir

# What every recovery passes on: the same flags each time.
location=(--name "$NAME" --zone "$ZONE")
if [[ -n $PROJECT ]]; then location+=(--project "$PROJECT"); fi
reach=("${location[@]}" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"})
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
TARBALL=$workspace/$REMOTE_TARBALL
setup_args=("${reach[@]}" --tarball "$TARBALL" --workdir "$WORKDIR")
if [[ -n $PYTHON_VERSION ]]; then setup_args+=(--python "$PYTHON_VERSION"); fi
for stage in ${STAGES[@]+"${STAGES[@]}"}; do setup_args+=(--stage "$stage"); done
launch_args=("${reach[@]}" --config "$CONFIG" --workdir "$WORKDIR" --restart)
for env in ${ENVS[@]+"${ENVS[@]}"}; do launch_args+=(--env "$env"); done
preflight_args=("${reach[@]}" --config "$CONFIG" --workdir "$WORKDIR")

step() {
  local script=$1
  shift
  "$TPU_SCRIPTS_DIR/$script" ${dry[@]+"${dry[@]}"} "$@"  # before "$@": that may end with -- overrides
}
launch() {
  step launch.sh "${launch_args[@]}" -- ${OVERRIDES[@]+"${OVERRIDES[@]}"}
}

# What must stay true: babysit never ends by an error, a give-up or a signal with the TPU still there
# and nobody told. On any exit that is not a success, stderr says the TPU is still billing and how to
# delete it (unless it was deleted).
deleted=0
on_exit() {
  local status=$?
  rm -rf "$workspace"
  if ((status != 0 && !deleted)); then
    log "!!! babysit.sh stopped (exit status $status): TPU $NAME ($ACCELERATOR_TYPE) is STILL THERE AND BILLING."
    log "!!! Delete it when you no longer need it:  $(shell_join "$TPU_SCRIPTS_DIR/delete.sh" "${delete_args[@]}")"
  fi
}
trap on_exit EXIT

delete_tpu() {
  step delete.sh "${delete_args[@]}" && deleted=1
}

# give_up REASON: stop babysitting, loudly (on_exit says the TPU is billing), or delete it with --delete-on-give-up.
give_up() {
  log "!!! GIVING UP: $1"
  if ((DELETE_ON_GIVE_UP)); then
    log "--delete-on-give-up: deleting TPU $NAME (the workdir keeps the run: babysit again to resume it)"
    delete_tpu || log "!!! deleting $NAME failed"
  fi
  exit 1
}

preflight() {
  if ((PREFLIGHT)) && ! step preflight.sh "${preflight_args[@]}" -- ${OVERRIDES[@]+"${OVERRIDES[@]}"}; then
    give_up "preflight failed on $NAME: fix the config or the hosts (its report is above)"
  fi
}

# workdir_listing GS_GLOB LOCAL_GLOB: what `gcloud storage ls WORKDIR/GS_GLOB` prints (a gs:// workdir, asked from
# here) or `ls -d WORKDIR/LOCAL_GLOB` on worker 0 (a local one); nothing when there is nothing or it could not be
# listed: an empty answer must never lead to anything being deleted.
workdir_listing() {
  if [[ $WORKDIR == gs://* ]]; then
    if ((DRY_RUN)); then print_cmd gcloud storage ls "${WORKDIR%/}/$1"; return 0; fi
    gcloud storage ls "${WORKDIR%/}/$1" 2>/dev/null || true
  else
    tpu_ssh 0 "ls -d $(shell_quote "${WORKDIR%/}")/$2 2>/dev/null || true" 2>/dev/null || true
  fi
}

is_finished() {
  local listing
  listing=$(workdir_listing "$DONE_MARKER" "$DONE_MARKER")
  if ((DRY_RUN)); then
    [[ $ASSUME_STATE == DONE ]]
  else
    [[ $listing == *"$DONE_MARKER"* ]]
  fi
}

# The checkpoint step folders of the workdir (WORKDIR/<phase>/train/<step>), one a line.
checkpoints() {
  workdir_listing '*/train/' '*/train/*' | grep -E '/train/[0-9]+/?$' || true
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

# The number of workers (hosts) of the TPU VM, from its network endpoints; nothing when gcloud fails.
worker_count() {
  local endpoints
  local cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(networkEndpoints[].ipAddress)')
  if ((DRY_RUN)); then print_cmd "${cmd[@]}"; return 0; fi
  if endpoints=$("${cmd[@]}" 2>/dev/null) && [[ -n $endpoints ]]; then
    tr ';' '\n' <<<"$endpoints" | grep -c .
  fi
}

# ALIVE: every worker replied that spacejax train runs. DEAD: a worker replied that it does not (NOSETUP: that
# it lacks the environment). UNKNOWN: fewer replies than workers (an ssh blip) or no worker count: never acted on.
run_health() {
  local workers report replies
  # shellcheck disable=SC2016  # expanded on the worker
  local check='if [ ! -x "$HOME/spacejax-venv/bin/spacejax" ]; then echo "NOSETUP $(hostname)"; elif pid=$(cat "$HOME/spacejax-logs/train.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; then echo "ALIVE $(hostname)"; else echo "DEAD $(hostname)"; fi'
  workers=$(worker_count)
  report=$(tpu_ssh all "$check" 2>/dev/null) || true  # a worker that ssh did not reach has no line
  if ((DRY_RUN)); then echo ALIVE; return 0; fi
  replies=$(grep -cE '^(ALIVE|DEAD|NOSETUP) ' <<<"$report") || true
  if grep -q '^NOSETUP ' <<<"$report"; then
    echo NOSETUP
  elif grep -q '^DEAD ' <<<"$report"; then
    echo DEAD
  elif [[ -n $workers ]] && ((replies == workers)); then
    echo ALIVE
  else
    log "heard from $replies of ${workers:-?} workers of $NAME"
    echo UNKNOWN
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

# count_relaunch: one more relaunch against --max-relaunches; a checkpoint that was not there at the previous
# relaunch resets the count (the run makes progress: it is not one that keeps dying). Gives up past the budget.
count_relaunch() {
  local current
  current=$(checkpoints)
  if [[ -n $current ]]; then  # an empty listing (none yet, or gcloud failed) keeps what was seen
    if ((relaunches)) && grep -qFxv -f <(printf '%s\n' "$seen_checkpoints") <<<"$current"; then
      log "a new checkpoint since the last relaunch: the run makes progress; relaunches counted from 0 again"
      relaunches=0
    fi
    seen_checkpoints=$current
  fi
  relaunches=$((relaunches + 1))
  if ((relaunches > MAX_RELAUNCHES)); then
    give_up "spacejax train died $relaunches times on a READY VM since its last new checkpoint. Read the logs:
  gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=all --command 'tail -n 40 ~/spacejax-logs/worker-*.log'"
  fi
}

relaunch() {
  count_relaunch
  if [[ $1 == NOSETUP ]]; then
    log "the workers of $NAME are not set up: setup, then launch (relaunch $relaunches of $MAX_RELAUNCHES)"
    step setup.sh "${setup_args[@]}" || { log "setup failed; trying again at the next check"; return 0; }
    preflight
  else
    log "spacejax train is not running on every worker of $NAME: launching again (relaunch $relaunches of $MAX_RELAUNCHES)"
  fi
  launch || log "launch failed; trying again at the next check"
}

# check_ready: a READY VM. Acts on a run that is not running only when two checks in a row say so.
check_ready() {
  local health
  health=$(run_health)
  case $health in
    ALIVE)
      not_running=0
      log "TPU $NAME is READY and spacejax train runs on every worker" ;;
    UNKNOWN)
      not_running=0
      log "TPU $NAME is READY but not every worker answered: nothing done; checking again" ;;
    *)
      not_running=$((not_running + 1))
      if ((not_running < 2)); then
        log "spacejax train is not running on some worker of $NAME ($health): checking once more before acting"
      else
        not_running=0
        relaunch "$health"
      fi ;;
  esac
}

pack_source "$SOURCE" "$TARBALL"
log "babysitting $NAME ($ACCELERATOR_TYPE, $MODE) until ${WORKDIR%/}/$DONE_MARKER exists; checking every ${POLL_INTERVAL}s"
relaunches=0 recoveries=0 not_running=0 seen_checkpoints=''
while true; do
  if is_finished; then
    log "the run is finished: ${WORKDIR%/}/$DONE_MARKER exists (recoveries: $recoveries, relaunches: $relaunches)"
    if ((DELETE_WHEN_DONE)); then
      if [[ $(vm_state) != MISSING ]]; then delete_tpu; fi
    else
      log "TPU $NAME is still there (and billing): $(shell_join "$TPU_SCRIPTS_DIR/delete.sh" "${delete_args[@]}")"
    fi
    exit 0
  fi
  state=$(vm_state)
  case $state in
    READY) check_ready ;;
    PREEMPTED | TERMINATED | MISSING | SUSPENDED | SUSPENDING | FAILED) recover "$state" ;;
    STOPPED) give_up "TPU $NAME was STOPPED (by someone): babysit does not start it; start or delete it, then run babysit again" ;;
    GCLOUD_FAILED) log "could not ask gcloud for the state of $NAME (see above): nothing done; checking again" ;;
    UNKNOWN) log "the TPU API reports the state of $NAME as UNKNOWN: nothing done; checking again" ;;
    *) log "TPU $NAME is $state: waiting" ;;
  esac
  if ((ONCE)); then
    exit 0
  fi
  sleep "$POLL_INTERVAL"
done

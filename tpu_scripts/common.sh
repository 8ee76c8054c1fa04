# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this file
# Helpers shared by the tpu_scripts: printing and running commands (--dry-run), argument checks,
# the gcloud flags every command takes, the remote layout on the TPU workers, and the run's folder.
# Sourced, never run. No bash 4 features (associative arrays, mapfile, namerefs), so that the bash 3.2
# of macOS should do too; tested with bash 5.

# Where things live on every worker (home directory of the ssh user).
# shellcheck disable=SC2016  # expanded by the remote shell, on the worker
REMOTE_SRC='$HOME/spacejax'                 # the unpacked source tree (configs/, tpu_scripts/, ...)
# shellcheck disable=SC2016
REMOTE_VENV='$HOME/spacejax-venv'           # Python >= 3.11 virtual environment with spacejax and jax[tpu]
# shellcheck disable=SC2016
REMOTE_LOGS='$HOME/spacejax-logs'           # worker-$(hostname).log and train.pid
REMOTE_TARBALL='spacejax-src.tar.gz'        # relative to the home directory (scp target)
SSH_FLAGS=()                                # --internal-ip, --tunnel-through-iap: every ssh and scp gets them

TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TPU_SCRIPTS_DIR/.." && pwd)
PROG=$(basename "$0")
DRY_RUN=0
exec 3>&1  # the script's stdout: --dry-run prints there even from inside $(...)

# A word quoted for a POSIX shell only when it needs it: `--zone=us-east5-a` stays as is,
# `a b` becomes 'a b' and it's becomes 'it'\''s'.
shell_quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# All arguments as one shell command line (each word quoted when needed).
shell_join() {
  local line='' word
  for word in "$@"; do
    line+="${line:+ }$(shell_quote "$word")"
  done
  printf '%s' "$line"
}

# Print a command as `+ cmd args...`: on stdout in --dry-run (that is the output), else on stderr (a log).
print_cmd() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(shell_join "$@")" >&3
  else
    printf '+ %s\n' "$(shell_join "$@")" >&2
  fi
}

# Run a command that changes something; in --dry-run only print it.
run() {
  print_cmd "$@"
  if ((DRY_RUN)); then
    return 0
  fi
  "$@"
}

log() {
  printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROG" "$*" >&2
}

# A usage error: the message names the flag; exit status 2 like argparse.
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# need_value "$@": the option in $1 must be followed by a value.
need_value() {
  if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then
    die "option $1 needs a value"
  fi
}

# require FLAG VALUE: a required flag must have been given.
require() {
  if [[ -z $2 ]]; then
    die "missing required flag $1"
  fi
}

# Split --flag=value into --flag value (up to a bare --); the result is in NORMALIZED_ARGS.
normalize_args() {
  NORMALIZED_ARGS=()
  while (($#)); do
    case $1 in
      --) NORMALIZED_ARGS+=("$@"); return 0 ;;
      --*=*) NORMALIZED_ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) NORMALIZED_ARGS+=("$1") ;;
    esac
    shift
  done
}

# parse_flags HANDLER "$@": the command line, --flag=value split first (normalize_args), word by word:
# the flags every script has (tpu_flag), then `HANDLER "$@"` for the script's own, which puts in TAKEN
# how many words it used (or exits with a usage error).
parse_flags() {
  local handler=$1
  shift
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while (($#)); do
    tpu_flag "$@" || "$handler" "$@"
    shift "$TAKEN"
  done
}

# tpu_flag "$@": take one of the flags every script has (-h/--help, --name, --zone, --project, --dry-run)
# and put in TAKEN how many words it used; fails (status 1) when $1 is another flag, for the script's own case.
tpu_flag() {
  TAKEN=2
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name) need_value "$@"; NAME=$2 ;;
    --zone) need_value "$@"; ZONE=$2 ;;
    --project) need_value "$@"; PROJECT=$2 ;;
    --dry-run) DRY_RUN=1; TAKEN=1 ;;
    *) return 1 ;;
  esac
}

# create_flag "$@": the flags that say which TPU to create (create.sh's; babysit.sh passes them on), TAKEN as
# for tpu_flag; fails when $1 is another flag.
create_flag() {
  TAKEN=2
  case $1 in
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2 ;;
    --version) need_value "$@"; VERSION=$2 ;;
    --mode) need_value "$@"; MODE=$2 ;;
    --spot) SPOT=1; TAKEN=1 ;;
    --reserved) RESERVED=1; TAKEN=1 ;;
    --queued-id) need_value "$@"; QUEUED_ID=$2 ;;
    --valid-until-duration) need_value "$@"; VALID_UNTIL=$2 ;;
    *) return 1 ;;
  esac
}

# ssh_flag "$@": the flags of how to reach the workers (for VMs created with --internal-ips: --internal-ip from
# inside the VPC, or --tunnel-through-iap), kept in SSH_FLAGS for every ssh and scp; TAKEN as for tpu_flag.
ssh_flag() {
  TAKEN=1
  case $1 in
    --internal-ip | --tunnel-through-iap) SSH_FLAGS+=("$1") ;;
    *) return 1 ;;
  esac
}

# require_mode: --mode is on-demand, spot or queued.
require_mode() {
  case $MODE in
    on-demand | spot | queued) ;;
    *) die "--mode must be on-demand, spot or queued, got '$MODE'" ;;
  esac
}

# override_arg "$@": a config override (section.key=value; everything after a bare --) into OVERRIDES,
# TAKEN = the words used; anything else left over is a usage error.
override_arg() {
  case $1 in
    --) shift; OVERRIDES+=("$@"); TAKEN=$(($# + 1)) ;;
    -*) die "unknown option $1" ;;
    *=*) OVERRIDES+=("$1"); TAKEN=1 ;;
    *) die "unexpected argument $1 (config overrides look like section.key=value)" ;;
  esac
}

# require_repo_config: --config names a file of the tree setup.sh ships (or an absolute path on the workers).
require_repo_config() {
  require --config "$CONFIG"
  if [[ $CONFIG != /* && ! -f $REPO_ROOT/$CONFIG ]]; then
    die "--config $CONFIG is not a file of $REPO_ROOT (setup.sh ships that tree; give the path relative to it)"
  fi
}

# The runtime (software) version of a TPU generation, from the accelerator type.
default_runtime_version() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# gcloud flags naming where the TPU is: --zone=Z [--project=P] (GCLOUD_FLAGS).
set_gcloud_flags() {
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n ${PROJECT:-} ]]; then
    GCLOUD_FLAGS+=(--project="$PROJECT")
  fi
}

# tpu_ssh WORKER REMOTE_COMMAND: run a shell command on one worker or on all (--worker=all).
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --worker="$1" --command "$2"
}

# tpu_scp LOCAL_FILE REMOTE_PATH: copy a file to every worker.
tpu_scp() {
  run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${GCLOUD_FLAGS[@]}" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --worker=all
}

# run_folder_url WORKDIR: where the scripts keep what belongs to a run, next to it in its bucket:
# WORKDIR/tpu_scripts/ (constraints.txt: the frozen package versions; logs/: the workers' logs;
# preflight.py's preflight/ while it runs). Nothing for a workdir that is not gs://.
run_folder_url() {
  if [[ $1 == gs://* ]]; then printf '%s/tpu_scripts' "${1%/}"; fi
}

# The remote prelude: fail fast, put the spacejax virtual environment first on PATH, go to the source tree.
remote_prelude() {
  # shellcheck disable=SC2016  # $PATH: expanded on the worker
  printf 'set -euo pipefail; export PATH="%s/bin:$PATH"; cd "%s"' "$REMOTE_VENV" "$REMOTE_SRC"
}

# The iteration directory name of 0-based iteration N: iter_003 (spacejax.checkpoint.iteration_dir).
iteration_dir_name() {
  printf 'iter_%03d' "$1"
}

# describe_state node|queued ASSUMED: the state of the TPU VM (READY, CREATING, PREEMPTED, ... and the API's
# own UNKNOWN) or of the queued resource (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...); MISSING when it
# does not exist; GCLOUD_FAILED when gcloud failed for another reason or answered nothing (network, auth:
# never a reason to delete anything). In --dry-run it prints the command and answers ASSUMED.
describe_state() {
  local cmd errors state
  if [[ $1 == node ]]; then
    cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)')
  else
    cmd=(gcloud compute tpus queued-resources describe "$QUEUED_ID" "${GCLOUD_FLAGS[@]}" --format='value(state.state)')
  fi
  if ((DRY_RUN)); then
    print_cmd "${cmd[@]}"
    printf '%s\n' "$2"
    return 0
  fi
  errors=$(mktemp)
  if state=$("${cmd[@]}" 2>"$errors") && [[ -n $state ]]; then
    printf '%s\n' "$state"
  elif grep -qiE 'NOT_FOUND|not found|does not exist' "$errors"; then
    echo MISSING
  else
    log "could not read the state of $1 ${NAME}: $(tr '\n' ' ' <"$errors")"
    echo GCLOUD_FAILED
  fi
  rm -f "$errors"
}

# pack_source SRC OUT: OUT (.tar.gz) holds SRC's git-tracked files and the untracked ones git does not
# ignore (.venv/, runs/, ... stay out): exactly the working tree you tested, committed or not.
pack_source() {
  local src=$1 out=$2 list file count=0
  git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1 || die "--source $src is not a git checkout"
  list=$(mktemp)
  while IFS= read -r -d '' file; do
    if [[ -f $src/$file ]]; then  # a tracked file deleted in the working tree is left out
      printf '%s\0' "$file"
      count=$((count + 1))
    fi
  done < <(git -C "$src" ls-files -z --cached --others --exclude-standard) >"$list"
  log "packing $count files of $src (git $(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo 'no commit')$(
    git -C "$src" diff --quiet HEAD 2>/dev/null || echo ', with uncommitted changes'))"
  run tar -czf "$out" -C "$src" --null -T "$list"
  rm -f "$list"
}

#!/usr/bin/env bash
# Install spacejax (this working tree) and jax[tpu] on every worker of a TPU VM, with the package
# versions frozen for the run; optionally stage the model and data from Cloud Storage onto each host's disk.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DEFAULT_PYTHON=3.11         # the Python CI tests (.ci/run)
JAX_TPU='jax[tpu]==0.10.*'  # the jax series CI tests; jax[tpu] pins the jaxlib and libtpu that go with it

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options]

Ships the source tree to every worker and installs it there:
  1. pack the working tree (git-tracked files plus untracked files git does not ignore, so
     uncommitted changes go too) into a tarball here, or take a tarball made earlier (--tarball);
  2. copy it to every worker (gcloud compute tpus tpu-vm scp --worker=all) and unpack it in
     ~/spacejax (configs/ and tpu_scripts/ come with it);
  3. on every worker (--worker=all): a Python $DEFAULT_PYTHON virtual environment ~/spacejax-venv made
     by uv (the TPU images' Python 3.10 is too old for jax >= 0.7), and in it, in one resolve,
     pip install "~/spacejax[gcs]" "$JAX_TPU" (CI tests Python $DEFAULT_PYTHON and jax 0.10.x);
  4. with a gs:// --workdir the versions are frozen for the run: the first setup resolves them on
     worker 0 and writes its pip freeze to WORKDIR/tpu_scripts/constraints.txt (never replaced);
     every later setup (a re-created VM) installs exactly those (pip -c), so a recovery never
     changes versions mid-run. Without it, every setup resolves anew;
  5. with --stage: copy gs:// prefixes onto every host's disk (gcloud storage rsync; idempotent).
Re-running it is safe: it reinstalls the source and skips what is already there.

Required:
  --name NAME            TPU VM (node) name
  --zone ZONE            its zone

Options:
  --workdir WORKDIR      the run this VM serves (gs://BUCKET/PATH): where its versions are frozen
  --project PROJECT      Google Cloud project (default: gcloud's core/project)
  --source DIR           the spacejax checkout to ship (default: $REPO_ROOT)
  --tarball FILE         ship this tarball (made by an earlier run, e.g. babysit.sh's) instead of packing
  --python VERSION       Python version of the workers' virtual environment (default $DEFAULT_PYTHON)
  --stage GS_URL=DIR     copy GS_URL (a gs:// prefix) to DIR on every host, e.g.
                         --stage gs://BUCKET/models/zephyr-7b-sft-full=/mnt/models/zephyr-7b-sft-full;
                         repeatable. A re-created VM has an empty disk: babysit.sh passes these again.
  --internal-ip          ssh/scp to the workers' internal IPs (VMs created with --internal-ips)
  --tunnel-through-iap   ssh/scp through Identity-Aware Proxy (VMs without external IPs)
  --dry-run              print the commands (one per line, prefixed with '+ ') instead of running them
  -h, --help             this help
EOF
}

NAME='' ZONE='' PROJECT='' WORKDIR='' SOURCE=$REPO_ROOT TARBALL='' PYTHON_VERSION=$DEFAULT_PYTHON
STAGES=()
setup_flag() {
  if ssh_flag "$@"; then return; fi
  TAKEN=2
  case $1 in
    --workdir) need_value "$@"; WORKDIR=$2 ;;
    --source) need_value "$@"; SOURCE=$2 ;;
    --tarball) need_value "$@"; TARBALL=$2 ;;
    --python) need_value "$@"; PYTHON_VERSION=$2 ;;
    --stage) need_value "$@"; STAGES+=("$2") ;;
    *) die "unknown argument $1" ;;
  esac
}
parse_flags setup_flag "$@"

require --name "$NAME"
require --zone "$ZONE"
if ! [[ $PYTHON_VERSION =~ ^3\.([0-9]+)$ ]] || ((BASH_REMATCH[1] < 11)); then
  die "--python must be 3.11 or newer (jax >= 0.7 needs it), got '$PYTHON_VERSION'"
fi
for stage in ${STAGES[@]+"${STAGES[@]}"}; do
  [[ $stage == gs://*=/* ]] || die "--stage must look like gs://BUCKET/PREFIX=/ABSOLUTE/DIR, got '$stage'"
done
if [[ -n $TARBALL && ! -f $TARBALL ]] && ((!DRY_RUN)); then
  die "--tarball $TARBALL does not exist"
fi
set_gcloud_flags
run_folder=$(run_folder_url "$WORKDIR")
if [[ -z $run_folder ]]; then
  log "no gs:// --workdir: the package versions are resolved anew, not frozen for a run"
fi

if [[ -z $TARBALL ]]; then
  workspace=$(mktemp -d)
  trap 'rm -rf "$workspace"' EXIT
  TARBALL=$workspace/$REMOTE_TARBALL
  pack_source "$SOURCE" "$TARBALL"
fi

tpu_scp "$TARBALL" "$REMOTE_TARBALL"

# joined STEP...: the steps as one remote command line.
joined() {
  local line='' step
  for step in "$@"; do
    line+="${line:+; }$step"
  done
  printf '%s' "$line"
}

python_tuple="(3, ${PYTHON_VERSION#3.})"
pip="\"$REMOTE_VENV/bin/python\" -m pip"
# shellcheck disable=SC2016  # $HOME, $PATH: expanded on the worker
prepare=(
  'export PATH="$HOME/.local/bin:$PATH"'
  # uv fetches a standalone CPython; PIP_BREAK_SYSTEM_PACKAGES lets pip --user work on Ubuntu 24.04 images
  'command -v uv >/dev/null || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet uv'
  "\"$REMOTE_VENV/bin/python\" -c \"import sys; sys.exit(sys.version_info[:2] != $python_tuple)\" 2>/dev/null || { rm -rf \"$REMOTE_VENV\"; uv venv --seed --python $(shell_quote "$PYTHON_VERSION") \"$REMOTE_VENV\"; }"
  "rm -rf \"$REMOTE_SRC\""
  "mkdir -p \"$REMOTE_SRC\""
  "tar -xzf \"\$HOME/$REMOTE_TARBALL\" -C \"$REMOTE_SRC\""
  "$pip uninstall --yes --quiet spacejax || true"
)

# pip_install [CONSTRAINTS_FILE]: one resolve of spacejax[gcs] and jax[tpu], so jax, jaxlib, libtpu and orbax agree.
pip_install() {
  printf '%s install --quiet %s"%s[gcs]" %s' "$pip" "${1:+-c \"$1\" }" "$REMOTE_SRC" "$(shell_quote "$JAX_TPU")"
}

install=$(pip_install)
if [[ -n $run_folder ]]; then
  frozen=$(shell_quote "$run_folder/constraints.txt")
  # shellcheck disable=SC2016  # $HOME: expanded on the worker
  local_copy='$HOME/spacejax-constraints.txt'
  # The run's first setup resolves on worker 0 and freezes the result. --no-clobber: a frozen file is never
  # replaced, even where `ls` failed for another reason than its absence.
  tpu_ssh 0 "set -euo pipefail; if gcloud storage ls $frozen >/dev/null 2>&1; then echo \"versions frozen in $frozen\"; else $(
    joined "${prepare[@]}" "$install" "$pip freeze --exclude spacejax >\"$local_copy\"" \
      "gcloud storage cp --no-clobber \"$local_copy\" $frozen"); fi"
  install="gcloud storage cp $frozen \"$local_copy\"; $(pip_install "$local_copy")"
fi

steps=('set -euo pipefail' "${prepare[@]}" "$install")
for stage in ${STAGES[@]+"${STAGES[@]}"}; do
  url=$(shell_quote "${stage%%=/*}")
  dir=$(shell_quote "/${stage#*=/}")
  steps+=("sudo mkdir -p $dir" "sudo chown \"\$(id -u):\$(id -g)\" $dir" "gcloud storage rsync --recursive $url $dir")
done
steps+=("echo \"spacejax ready on \$(hostname)\""
  "$pip list 2>/dev/null | grep -iE \"^(spacejax|jax|jaxlib|libtpu|orbax-checkpoint|gcsfs) \" || true")
tpu_ssh all "$(joined "${steps[@]}")"

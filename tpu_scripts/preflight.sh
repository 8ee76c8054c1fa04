#!/usr/bin/env bash
# Run tpu_scripts/preflight.py on every worker of a TPU VM: distributed init, devices, identical
# package versions, the config's mesh and batch sizes against the real device count.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config CONFIG [options] [section.key=value ...]

Runs, on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all), in ~/spacejax with
~/spacejax-venv first on PATH (what setup.sh installed):

  python tpu_scripts/preflight.py --config CONFIG [section.key=value ...]

Each process joins jax.distributed (automatic on TPU VMs), prints its index, host and devices,
and all of them check together that: the package versions (jax, jaxlib, libtpu, flax, optax,
orbax-checkpoint, transformers, spacejax and its source) and the resolved config are identical
on every host; the mesh of the config fits the global device count; train.batch_size /
train.grad_accum_steps and sampler.batch_size divide over the data x fsdp axes; the local paths
of the config (init_from, data.source, data.tokenizer) exist on every host; an all-reduce over
every device gives the right answer. It exits non-zero naming what is wrong. Run it before
launch.sh, with the same config and overrides.

Required:
  --name NAME            TPU VM (node) name
  --zone ZONE            its zone
  --config CONFIG        the config you will launch, relative to the repository root

Options:
  --project PROJECT      Google Cloud project (default: gcloud's core/project)
  --dry-run              print the commands (one per line, prefixed with '+ ') instead of running them
  -h, --help             this help
EOF
}

NAME='' ZONE='' PROJECT='' CONFIG=''
OVERRIDES=()
preflight_flag() {
  TAKEN=2
  case $1 in
    --config) need_value "$@"; CONFIG=$2 ;;
    *) override_arg "$@" ;;
  esac
}
parse_flags preflight_flag "$@"

require --name "$NAME"
require --zone "$ZONE"
require_repo_config
set_gcloud_flags

check=$(shell_join python tpu_scripts/preflight.py --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
tpu_ssh all "$(remote_prelude); $check"

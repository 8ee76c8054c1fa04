#!/usr/bin/env bash
# Run tpu_scripts/preflight.py on every worker of a TPU VM: distributed init (as spacejax train does it),
# devices, identical package versions, the config's mesh and batch sizes against the real device count,
# and a checkpoint written from every host in the run's workdir.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config CONFIG [options] [section.key=value ...]

Runs, on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all), in ~/spacejax with
~/spacejax-venv first on PATH (what setup.sh installed):

  python tpu_scripts/preflight.py --config CONFIG [--workdir WORKDIR] [section.key=value ...]

Each process joins jax.distributed through spacejax.sharding.initialize, the call spacejax train
makes (automatic on a TPU VM slice), prints its index, host and devices, and all of them check
together that: the package versions (jax, jaxlib, libtpu, flax, optax, orbax-checkpoint,
transformers, spacejax and its source) and the resolved config are identical on every host; the
mesh of the config fits the global device count; train.batch_size / train.grad_accum_steps and
sampler.batch_size divide over the data x fsdp axes; the local paths of the config (init_from,
data.source, data.tokenizer) exist on every host; an all-reduce over every device gives the right
answer; with --workdir, an asynchronous Orbax checkpoint written by every host into
WORKDIR/tpu_scripts/preflight restores (the folder is deleted afterwards). It exits non-zero
naming what is wrong. Run it before launch.sh, with the same config, workdir and overrides.

Required:
  --name NAME            TPU VM (node) name
  --zone ZONE            its zone
  --config CONFIG        the config you will launch, relative to the repository root

Options:
  --workdir WORKDIR      the run's workdir (gs://BUCKET/PATH or an NFS path): check a checkpoint there
  --project PROJECT      Google Cloud project (default: gcloud's core/project)
  --internal-ip          ssh to the workers' internal IPs (VMs created with --internal-ips)
  --tunnel-through-iap   ssh through Identity-Aware Proxy (VMs without external IPs)
  --dry-run              print the commands (one per line, prefixed with '+ ') instead of running them
  -h, --help             this help
EOF
}

NAME='' ZONE='' PROJECT='' CONFIG='' WORKDIR=''
OVERRIDES=()
preflight_flag() {
  if ssh_flag "$@"; then return; fi
  TAKEN=2
  case $1 in
    --config) need_value "$@"; CONFIG=$2 ;;
    --workdir) need_value "$@"; WORKDIR=$2 ;;
    *) override_arg "$@" ;;
  esac
}
parse_flags preflight_flag "$@"

require --name "$NAME"
require --zone "$ZONE"
require_repo_config
set_gcloud_flags

command=(python tpu_scripts/preflight.py --config "$CONFIG")
if [[ -n $WORKDIR ]]; then command+=(--workdir "$WORKDIR"); fi
tpu_ssh all "$(remote_prelude); $(shell_join "${command[@]}" ${OVERRIDES[@]+"${OVERRIDES[@]}"})"

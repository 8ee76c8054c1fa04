#!/usr/bin/env bash
# Delete a Cloud TPU VM (or the queued resource that holds it). The bucket (the run) is untouched.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options]

Delete the TPU VM NAME, or with --mode queued its queued resource and the VM in it. The workdir
in the bucket (checkpoints, metrics.jsonl) is not touched: re-creating the VM and re-launching the
same command resumes the run.

Required:
  --name NAME          TPU VM (node) name
  --zone ZONE          its zone

Options:
  --project PROJECT    Google Cloud project (default: gcloud's core/project)
  --mode MODE          on-demand | spot (both delete the TPU VM; the default) | queued
  --queued-id ID       with --mode queued: the queued resource id (default: NAME)
  --yes                do not ask for confirmation (gcloud --quiet)
  --dry-run            print the commands (one per line, prefixed with '+ ') instead of running them
  -h, --help           this help
EOF
}

NAME='' ZONE='' PROJECT='' MODE=on-demand QUEUED_ID='' YES=0
delete_flag() {
  TAKEN=2
  case $1 in
    --mode) need_value "$@"; MODE=$2 ;;
    --queued-id) need_value "$@"; QUEUED_ID=$2 ;;
    --yes | --quiet) YES=1; TAKEN=1 ;;
    *) die "unknown argument $1" ;;
  esac
}
parse_flags delete_flag "$@"

require --name "$NAME"
require --zone "$ZONE"
require_mode
QUEUED_ID=${QUEUED_ID:-$NAME}
set_gcloud_flags
quiet=()
if ((YES)); then quiet=(--quiet); fi

if [[ $MODE == queued ]]; then
  # --force also deletes the TPU VM the queued resource holds.
  run gcloud compute tpus queued-resources delete "$QUEUED_ID" "${GCLOUD_FLAGS[@]}" --force ${quiet[@]+"${quiet[@]}"}
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" ${quiet[@]+"${quiet[@]}"}
fi

#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice: on demand, as a Spot VM, or through a queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE [options] [-- EXTRA_GCLOUD_FLAGS...]

Create the TPU VM (all its hosts) that setup.sh, preflight.sh and launch.sh then use.

Required:
  --name NAME               TPU VM (node) name, e.g. spacejax-v5p-64
  --zone ZONE               e.g. us-east5-a (v5p), us-central2-b (v4)
  --accelerator-type TYPE   e.g. v5p-64 (32 chips, 8 hosts), v4-32 (16 chips, 4 hosts)

Options:
  --version VERSION         TPU runtime (software) version; default from the type:
                            v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
                            v6e v2-alpha-tpuv6e
  --project PROJECT         Google Cloud project (default: gcloud's core/project)
  --mode MODE               on-demand (default) | spot | queued
                              on-demand: gcloud compute tpus tpu-vm create
                              spot:      the same with --spot (cheap, preemptible at any time)
                              queued:    gcloud compute tpus queued-resources create, then wait
                                         until the request is ACTIVE (add --spot or --reserved)
  --spot                    with --mode queued: a queued Spot request
  --reserved                use your project's reservation (on-demand or queued mode)
  --queued-id ID            queued resource id (default: NAME)
  --valid-until-duration D  with --mode queued: give up a request not filled within D (e.g. 6h)
  --no-wait                 with --mode queued: return once the request is queued
  --poll-interval SECONDS   with --mode queued: seconds between state checks (default 60)
  --dry-run                 print the commands (one per line, prefixed with '+ ') instead of running them
  -h, --help                this help

Anything after -- is appended to the gcloud create command (e.g. --service-account=SA,
--scopes=cloud-platform, --network=NET, --subnetwork=SUBNET, --internal-ips, --boot-disk=...).

Example:
  $PROG --name spacejax-v5p-64 --zone us-east5-a --accelerator-type v5p-64 --mode spot
EOF
}

NAME='' ZONE='' ACCELERATOR_TYPE='' VERSION='' PROJECT='' MODE=on-demand SPOT=0 RESERVED=0 QUEUED_ID=''
VALID_UNTIL='' WAIT=1 POLL_INTERVAL=60
EXTRA=()
create_script_flag() {
  if create_flag "$@"; then return; fi
  TAKEN=2
  case $1 in
    --no-wait) WAIT=0; TAKEN=1 ;;
    --poll-interval) need_value "$@"; POLL_INTERVAL=$2 ;;
    --) shift; EXTRA+=("$@"); TAKEN=$(($# + 1)) ;;
    *) die "unknown argument $1" ;;
  esac
}
parse_flags create_script_flag "$@"

require --name "$NAME"
require --zone "$ZONE"
require --accelerator-type "$ACCELERATOR_TYPE"
if [[ -z $VERSION ]]; then
  VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
    die "no default --version for accelerator type $ACCELERATOR_TYPE; pass --version (see 'gcloud compute tpus tpu-vm versions list')"
fi
require_mode
if ((SPOT)) && [[ $MODE == on-demand ]]; then
  die "--spot needs --mode spot (a Spot VM) or --mode queued (a queued Spot request)"
fi
if ((RESERVED)) && { ((SPOT)) || [[ $MODE == spot ]]; }; then
  die "--reserved and --spot exclude each other"
fi
if [[ -n $VALID_UNTIL && $MODE != queued ]]; then
  die "--valid-until-duration needs --mode queued"
fi
if ! [[ $POLL_INTERVAL =~ ^[0-9]+$ ]] || ((POLL_INTERVAL < 5 || POLL_INTERVAL > 3600)); then
  die "--poll-interval must be between 5 and 3600 seconds, got '$POLL_INTERVAL'"
fi
QUEUED_ID=${QUEUED_ID:-$NAME}
set_gcloud_flags

if [[ $MODE != queued ]]; then
  command=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
  if [[ $MODE == spot ]]; then command+=(--spot); fi
  if ((RESERVED)); then command+=(--reserved); fi
  run "${command[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
  exit 0
fi

command=(gcloud compute tpus queued-resources create "$QUEUED_ID" --node-id="$NAME" "${GCLOUD_FLAGS[@]}"
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION")
if ((SPOT)); then command+=(--spot); fi
if ((RESERVED)); then command+=(--reserved); fi
if [[ -n $VALID_UNTIL ]]; then command+=(--valid-until-duration="$VALID_UNTIL"); fi
run "${command[@]}" ${EXTRA[@]+"${EXTRA[@]}"}

if ((!WAIT)); then
  exit 0
fi
# A queued request waits (WAITING_FOR_RESOURCES, PROVISIONING) until capacity frees up: hours or days.
while true; do
  state=$(describe_state queued ACTIVE)
  case $state in
    ACTIVE) log "queued resource $QUEUED_ID is ACTIVE: TPU VM $NAME is ready"; exit 0 ;;
    FAILED | SUSPENDED | SUSPENDING | DELETING | MISSING)
      log "queued resource $QUEUED_ID is $state; see: gcloud compute tpus queued-resources describe $QUEUED_ID --zone=$ZONE"
      exit 1 ;;
    *) log "queued resource $QUEUED_ID is $state; checking again in ${POLL_INTERVAL}s" ;;
  esac
  sleep "$POLL_INTERVAL"
done

#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), or a queued resource that provisions one.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
QUEUED=${QUEUED:-0}
QR_NAME=${QR_NAME:-}
SPOT=${SPOT:-0}
WAIT=${WAIT:-1}
QR_TIMEOUT=${QR_TIMEOUT:-3600}
QR_POLL=${QR_POLL:-30}

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [options] [-- EXTRA_GCLOUD_ARGS...]

Create a TPU VM with 'gcloud compute tpus tpu-vm create', or with --queued a queued resource
('gcloud compute tpus queued-resources create --node-id NAME') and wait until it is ACTIVE.
Either way the VM is then reached as NAME by setup.sh, run.sh and copy_checkpoint.sh.

Options (flag, else environment variable):
  -a, --accelerator-type T  v5litepod-N (v5e), v5p-N or v6e-N
                                                 [ACCELERATOR_TYPE, default: v5litepod-8]
      --version V           TPU software version [RUNTIME_VERSION, default from the type:
                            v5litepod -> v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5,
                            v6e -> v2-alpha-tpuv6e]
      --spot                Spot VMs: cheaper, can be preempted                    [SPOT=1]
      --internal-ip         no external IPs (gcloud --internal-ips)         [INTERNAL_IP=1]
      --queued              create a queued resource instead                     [QUEUED=1]
      --qr-name ID          queued resource id              [QR_NAME, default: NAME-qr]
      --timeout SECONDS     how long to wait for ACTIVE     [QR_TIMEOUT, default: 3600]
      --poll SECONDS        time between state checks           [QR_POLL, default: 30]
      --no-wait             return once the queued request is accepted           [WAIT=0]
  EXTRA_GCLOUD_ARGS         appended to the gcloud create command (e.g. --reserved,
                            --network=NET, --subnetwork=SUBNET)

$COMMON_OPTIONS_HELP

Examples:
  $SCRIPT_NAME --name qwen-v5e --zone ZONE --accelerator-type v5litepod-8
  $SCRIPT_NAME --name qwen-v5p --zone ZONE --accelerator-type v5p-64 --queued --spot
EOF
}

EXTRA_ARGS=()
while (($#)); do
  if parse_common_opt "$@"; then
    shift "$OPTSHIFT"
    continue
  fi
  case "$1" in
    -a | --accelerator-type | --accelerator-type=* | --type | --type=*)
      take_opt "$@"
      ACCELERATOR_TYPE=$OPTVAL
      ;;
    --version | --version=* | --runtime-version | --runtime-version=*)
      take_opt "$@"
      RUNTIME_VERSION=$OPTVAL
      ;;
    --qr-name | --qr-name=*)
      take_opt "$@"
      QR_NAME=$OPTVAL
      ;;
    --timeout | --timeout=*)
      take_opt "$@"
      QR_TIMEOUT=$OPTVAL
      ;;
    --poll | --poll=*)
      take_opt "$@"
      QR_POLL=$OPTVAL
      ;;
    --queued) QUEUED=1 OPTSHIFT=1 ;;
    --spot) SPOT=1 OPTSHIFT=1 ;;
    --internal-ip) INTERNAL_IP=1 OPTSHIFT=1 ;;
    --no-wait) WAIT=0 OPTSHIFT=1 ;;
    --)
      shift
      EXTRA_ARGS=("$@")
      break
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  shift "$OPTSHIFT"
done

require_name
[[ -n $ACCELERATOR_TYPE ]] || usage_error "no accelerator type: pass --accelerator-type T"
check_accelerator_type "$ACCELERATOR_TYPE"
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION=$(runtime_version_for "$ACCELERATOR_TYPE")
fi
[[ $QR_TIMEOUT =~ ^[0-9]+$ ]] || usage_error "--timeout must be a whole number of seconds, got '$QR_TIMEOUT'"
[[ $QR_POLL =~ ^[0-9]+$ ]] || usage_error "--poll must be a whole number of seconds, got '$QR_POLL'"
QR_NAME=${QR_NAME:-$TPU_NAME-qr}

scope_flags
FLAGS=(${SCOPE_FLAGS[@]+"${SCOPE_FLAGS[@]}"} "--accelerator-type=$ACCELERATOR_TYPE")
if is_true "$SPOT"; then FLAGS+=(--spot); fi
if is_true "$INTERNAL_IP"; then FLAGS+=(--internal-ips); fi
FLAGS+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})

if ! is_true "$QUEUED"; then
  info "creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION)"
  run "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "--version=$RUNTIME_VERSION" "${FLAGS[@]}"
  info "TPU VM $TPU_NAME created; next: setup.sh --name $TPU_NAME"
  exit 0
fi

info "requesting queued resource $QR_NAME (node $TPU_NAME, $ACCELERATOR_TYPE, $RUNTIME_VERSION)"
run "$GCLOUD" compute tpus queued-resources create "$QR_NAME" "--node-id=$TPU_NAME" \
  "--runtime-version=$RUNTIME_VERSION" "${FLAGS[@]}"

DESCRIBE=("$GCLOUD" compute tpus queued-resources describe "$QR_NAME" ${SCOPE_FLAGS[@]+"${SCOPE_FLAGS[@]}"}
  "--format=value(state.state)")
if ! is_true "$WAIT"; then
  info "not waiting; check the state with: $(quote_cmd "${DESCRIBE[@]}")"
  exit 0
fi
if is_dry_run; then
  run "${DESCRIBE[@]}"
  info "(would repeat the describe every ${QR_POLL}s, for at most ${QR_TIMEOUT}s, until ACTIVE)"
  exit 0
fi

deadline=$((SECONDS + QR_TIMEOUT))
last=""
while :; do
  if ! state=$("${DESCRIBE[@]}"); then
    state="(describe failed)"
  fi
  state=${state//[[:space:]]/}
  if [[ $state != "$last" ]]; then
    info "queued resource $QR_NAME: ${state:-(no state yet)}"
    last=$state
  fi
  case "$state" in
    ACTIVE)
      info "TPU VM $TPU_NAME is ready; next: setup.sh --name $TPU_NAME"
      exit 0
      ;;
    FAILED | SUSPENDING | SUSPENDED | DELETING)
      die "queued resource $QR_NAME is $state; see: $(quote_cmd "$GCLOUD" compute tpus queued-resources describe "$QR_NAME" ${SCOPE_FLAGS[@]+"${SCOPE_FLAGS[@]}"})"
      ;;
  esac
  if ((SECONDS >= deadline)); then
    die "queued resource $QR_NAME not ACTIVE after ${QR_TIMEOUT}s (state: ${state:-unknown}); it stays queued: wait, or delete it with teardown.sh --queued --qr-name $QR_NAME"
  fi
  sleep "$QR_POLL"
done

#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource together with its TPU VM.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=${QUEUED:-0}
QR_NAME=${QR_NAME:-}
QUIET=${QUIET:-0}
ASYNC=${ASYNC:-0}

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [options]

Delete the TPU VM NAME ('gcloud compute tpus tpu-vm delete'), or with --queued the queued
resource that made it ('gcloud compute tpus queued-resources delete --force', which deletes
its TPU VM first). Asks for confirmation unless --quiet; without a terminal to ask on, it
refuses to delete unless --quiet is given.

Options (flag, else environment variable):
      --queued              delete the queued resource                           [QUEUED=1]
      --qr-name ID          queued resource id              [QR_NAME, default: NAME-qr]
  -q, --quiet               do not ask for confirmation                           [QUIET=1]
      --async               return without waiting for the deletion to finish     [ASYNC=1]

$COMMON_OPTIONS_HELP

Examples:
  $SCRIPT_NAME --name qwen-v5e --zone ZONE
  $SCRIPT_NAME --name qwen-v5p --zone ZONE --queued --quiet
EOF
}

while (($#)); do
  if parse_common_opt "$@"; then
    shift "$OPTSHIFT"
    continue
  fi
  case "$1" in
    --qr-name | --qr-name=*)
      take_opt "$@"
      QR_NAME=$OPTVAL
      ;;
    --queued) QUEUED=1 OPTSHIFT=1 ;;
    -q | --quiet) QUIET=1 OPTSHIFT=1 ;;
    --async) ASYNC=1 OPTSHIFT=1 ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  shift "$OPTSHIFT"
done

require_name
QR_NAME=${QR_NAME:-$TPU_NAME-qr}
scope_flags

if is_true "$QUEUED"; then
  what="queued resource $QR_NAME (and its TPU VM $TPU_NAME)"
  CMD=("$GCLOUD" compute tpus queued-resources delete "$QR_NAME" --force)
else
  what="TPU VM $TPU_NAME"
  CMD=("$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME")
fi
CMD+=(${SCOPE_FLAGS[@]+"${SCOPE_FLAGS[@]}"})
if is_true "$ASYNC"; then CMD+=(--async); fi
# We ask here (or were told not to), so gcloud must not ask again.
CMD+=(--quiet)

if ! is_true "$QUIET" && ! is_dry_run; then
  [[ -t 0 ]] || die "not deleting $what: no terminal to confirm on; pass --quiet"
  read -r -p "Delete $what${ZONE:+ in $ZONE}? [y/N] " answer
  case "$answer" in
    y | Y | yes | YES) ;;
    *) die "not deleted" ;;
  esac
fi

info "deleting $what"
run "${CMD[@]}"

#!/usr/bin/env bash
# Copy a Hugging Face checkpoint directory from GCS to every worker (or to this machine).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CKPT_DIR=${CKPT_DIR:-"~/ckpt"}
LOCAL=${LOCAL:-0}

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [options] gs://BUCKET/PATH/CHECKPOINT

Copy the checkpoint directory gs://BUCKET/PATH/CHECKPOINT to DEST/CHECKPOINT with
'gcloud storage cp -r' (gsutil -m cp -r where gcloud storage is missing), on every worker at
once (each host reads the weights from its own disk), then check that DEST/CHECKPOINT/config.json
exists; a worker without it fails the command.

Options (flag, else environment variable):
      --dest DIR            parent directory of the copy        [CKPT_DIR, default: ~/ckpt]
      --local               copy to DIR on this machine instead of the workers    [LOCAL=1]

$SSH_OPTIONS_HELP

$COMMON_OPTIONS_HELP

Examples:
  $SCRIPT_NAME --name qwen-v5e gs://YOUR_BUCKET/Qwen2.5-VL-7B-Instruct
      -> ~/ckpt/Qwen2.5-VL-7B-Instruct on every worker
  $SCRIPT_NAME --local --dest ./ckpt gs://YOUR_BUCKET/Qwen2.5-VL-7B-Instruct
EOF
}

SRC=""
while (($#)); do
  if parse_common_opt "$@" || parse_ssh_opt "$@"; then
    shift "$OPTSHIFT"
    continue
  fi
  case "$1" in
    --dest | --dest=*)
      take_opt "$@"
      CKPT_DIR=$OPTVAL
      ;;
    --local) LOCAL=1 OPTSHIFT=1 ;;
    -*) usage_error "unknown option: $1" ;;
    *)
      [[ -z $SRC ]] || usage_error "more than one source given: '$SRC' and '$1'"
      SRC=$1
      OPTSHIFT=1
      ;;
  esac
  shift "$OPTSHIFT"
done

[[ -n $SRC ]] || usage_error "no source given: pass gs://BUCKET/PATH/CHECKPOINT"
[[ $SRC == gs://* ]] || die "source must be a gs:// URL, got '$SRC'"
while [[ $SRC == */ ]]; do SRC=${SRC%/}; done
NAME=${SRC##*/}
[[ $SRC == gs://*/* && -n $NAME && $NAME != *[*?]* ]] ||
  die "source must name a checkpoint directory inside a bucket (gs://BUCKET/.../CHECKPOINT), got '$SRC'"
[[ -n $CKPT_DIR ]] || usage_error "--dest needs a value"

if is_true "$LOCAL"; then
  dest=$CKPT_DIR
  # shellcheck disable=SC2088  # the literal ~ of the default
  if [[ $dest == "~" || $dest == "~/"* ]]; then dest=$HOME${dest#"~"}; fi
  info "copying $SRC to $dest/$NAME"
  run mkdir -p "$dest"
  if command -v "$GCLOUD" >/dev/null 2>&1 || is_dry_run; then
    run "$GCLOUD" storage cp -r "$SRC" "$dest/"
  else
    run gsutil -m cp -r "$SRC" "$dest/"
  fi
  is_dry_run && exit 0
  [[ -f $dest/$NAME/config.json ]] ||
    die "$dest/$NAME/config.json is missing after the copy: is $SRC a Hugging Face checkpoint directory?"
  info "checkpoint ready at $dest/$NAME"
  exit 0
fi

require_name
DEST=$(remote_path "$CKPT_DIR")
CKPT=$(remote_path "${CKPT_DIR%/}/$NAME")
QSRC=$(shell_quote "$SRC")
info "copying $SRC to $CKPT_DIR/$NAME on worker(s) $WORKER of $TPU_NAME"
tpu_ssh "set -eu
mkdir -p $DEST
if gcloud storage --help >/dev/null 2>&1; then gcloud storage cp -r $QSRC $DEST/; else gsutil -m cp -r $QSRC $DEST/; fi
if [ ! -f $CKPT/config.json ]; then echo \"[\$(hostname)] error: $CKPT/config.json is missing after the copy\" >&2; exit 1; fi
echo \"[\$(hostname)] checkpoint ready: $CKPT\""

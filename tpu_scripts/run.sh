#!/usr/bin/env bash
# Run one command on every worker of a TPU VM at once, inside the project and its venv.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USE_VENV=${USE_VENV:-1}

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [options] [--] COMMAND...

Run COMMAND on the workers (default: all of them, at the same time) with
'gcloud compute tpus tpu-vm ssh --worker=all --command=...'. On each worker the command runs
in REMOTE_DIR with REMOTE_DIR/.venv activated (both made by setup.sh). The words of COMMAND
are joined with spaces and run by the worker's shell, so quote the whole command once, in
single quotes, to keep ~, \$VARS and globs for the worker.

Every worker runs the same command, so one JAX program becomes one process per host. On TPU
VMs jax.distributed.initialize() needs no arguments: each process finds the coordinator,
the process count and its own index from the TPU environment. Output of all workers is
interleaved here; the command ends when every worker's command has ended, and closing this
session ends them (for long jobs use nohup/tmux in COMMAND).

Options (flag, else environment variable):
      --no-venv             do not activate REMOTE_DIR/.venv                   [USE_VENV=0]

$SSH_OPTIONS_HELP

$COMMON_OPTIONS_HELP

Examples:
  $SCRIPT_NAME --name qwen-v5e 'python -c "import jax; print(jax.devices())"'
  $SCRIPT_NAME --name qwen-v5p -- 'python -m qwenvl_jax.train --config configs/train/sft.yaml --distributed ...'
EOF
}

while (($#)); do
  if parse_common_opt "$@" || parse_ssh_opt "$@"; then
    shift "$OPTSHIFT"
    continue
  fi
  case "$1" in
    --no-venv) USE_VENV=0 ;;
    --)
      shift
      break
      ;;
    -*) usage_error "unknown option: $1 (put the command after --)" ;;
    *) break ;;
  esac
  shift
done

require_name
(($#)) || usage_error "no command given"
COMMAND="$*"
[[ -n ${COMMAND//[[:space:]]/} ]] || usage_error "the command is empty"

DIR=$(remote_path "$REMOTE_DIR")
PRELUDE="cd $DIR || exit 1;"
if is_true "$USE_VENV"; then PRELUDE+=" . .venv/bin/activate || exit 1;"; fi

info "running on worker(s) $WORKER of $TPU_NAME: $COMMAND"
tpu_ssh "$PRELUDE $COMMAND"

# shellcheck shell=bash
# The scripts that source this file read the variables it sets (SC2034 cannot see that).
# shellcheck disable=SC2034
# Helpers shared by tpu_scripts/*.sh. Source this file; it does nothing when run on its own.
#
# Every script reads the same settings, from flags or else from the environment:
#   TPU_NAME      TPU VM name (for a queued resource: its node id)          --name
#   ZONE          zone; empty means gcloud's compute/zone property          --zone
#   PROJECT       project; empty means gcloud's core/project property       --project
#   WORKER        which workers ssh/scp reach (default: all)                --worker
#   INTERNAL_IP   1 = reach the workers by internal IP                      --internal-ip
#   REMOTE_DIR    project directory on each worker (default: ~/qwenvl_jax)  --remote-dir
#   DRY_RUN       1 = print each command instead of running it              --dry-run
#   GCLOUD        the gcloud binary (default: gcloud)

SCRIPT_NAME=$(basename "$0")
TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TPU_SCRIPTS_DIR/.." && pwd)

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
WORKER=${WORKER:-all}
INTERNAL_IP=${INTERNAL_IP:-0}
REMOTE_DIR=${REMOTE_DIR:-"~/qwenvl_jax"}
DRY_RUN=${DRY_RUN:-0}
GCLOUD=${GCLOUD:-gcloud}

# Options every script accepts; each script's usage() prints this block.
COMMON_OPTIONS_HELP='Common options (flag, else environment variable):
  -n, --name NAME        TPU VM name / queued-resource node id   [TPU_NAME, required]
  -z, --zone ZONE        zone                    [ZONE, default: gcloud compute/zone]
  -p, --project ID       project                 [PROJECT, default: gcloud core/project]
      --dry-run          print every command instead of running it          [DRY_RUN=1]
  -h, --help             show this help'

# Options of the scripts that ssh/scp into the workers.
SSH_OPTIONS_HELP='Worker options:
      --worker W         worker index, or "all"                     [WORKER, default: all]
      --internal-ip      connect to the workers by internal IP           [INTERNAL_IP=1]
      --remote-dir DIR   project directory on the workers [REMOTE_DIR, default: ~/qwenvl_jax]'

# ---------------------------------------------------------------------------------------------
# Messages and exits

die() {  # one error line on stderr, exit 1
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

usage_error() {  # bad command line: the error, then the usage text, on stderr; exit 2
  printf '%s: error: %s\n\n' "$SCRIPT_NAME" "$*" >&2
  usage >&2
  exit 2
}

info() {
  printf '==> %s\n' "$*" >&2
}

is_true() {
  case "${1:-0}" in
    1 | true | TRUE | True | yes | YES | on) return 0 ;;
    *) return 1 ;;
  esac
}

is_dry_run() {
  is_true "$DRY_RUN"
}

# ---------------------------------------------------------------------------------------------
# Quoting and running

# Quote one word for a POSIX shell; plain words stay as they are.
shell_quote() {
  local s=$1 q="'\\''"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# Quote a whole command line, words separated by spaces.
quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Run a command, or under --dry-run print it (quoted so it can be pasted) and return 0.
run() {
  if is_dry_run; then
    printf '[dry-run] %s\n' "$(quote_cmd "$@")"
    return 0
  fi
  "$@"
}

# A path for use inside a remote command: a leading ~ becomes "$HOME" so it expands on the
# worker; the rest is quoted.
remote_path() {
  local p=$1
  # shellcheck disable=SC2088,SC2016  # a literal ~ is wanted; $HOME is for the worker's shell
  if [[ $p == "~" ]]; then
    printf '"$HOME"'
  elif [[ $p == "~/"* ]]; then
    printf '"$HOME"/%s' "$(shell_quote "${p#"~/"}")"
  else
    shell_quote "$p"
  fi
}

# ---------------------------------------------------------------------------------------------
# Option parsing

# take_opt "$@": read the value of the option in $1, given as "--opt VALUE" or "--opt=VALUE".
# Sets OPTVAL and OPTSHIFT (how many words to shift).
OPTVAL=""
OPTSHIFT=1
take_opt() {
  if [[ $1 == --*=* ]]; then
    OPTVAL=${1#*=}
    OPTSHIFT=1
  elif (($# >= 2)); then
    OPTVAL=$2
    OPTSHIFT=2
  else
    usage_error "option $1 needs a value"
  fi
  return 0
}

# parse_common_opt "$@": handle one option every script shares. Returns 1 when $1 is not one
# of them; otherwise sets OPTSHIFT.
parse_common_opt() {
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    -n | --name | --name=*)
      take_opt "$@"
      TPU_NAME=$OPTVAL
      ;;
    -z | --zone | --zone=*)
      take_opt "$@"
      ZONE=$OPTVAL
      ;;
    -p | --project | --project=*)
      take_opt "$@"
      PROJECT=$OPTVAL
      ;;
    --dry-run)
      DRY_RUN=1
      OPTSHIFT=1
      ;;
    *) return 1 ;;
  esac
  return 0
}

# parse_ssh_opt "$@": the options of the scripts that reach the workers over ssh/scp.
parse_ssh_opt() {
  case "$1" in
    --worker | --worker=*)
      take_opt "$@"
      WORKER=$OPTVAL
      ;;
    --internal-ip)
      INTERNAL_IP=1
      OPTSHIFT=1
      ;;
    --remote-dir | --remote-dir=*)
      take_opt "$@"
      REMOTE_DIR=$OPTVAL
      ;;
    *) return 1 ;;
  esac
  return 0
}

require_name() {
  [[ -n $TPU_NAME ]] || usage_error "no TPU name: pass --name NAME or set TPU_NAME"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "bad TPU name '$TPU_NAME': use lowercase letters, digits and '-', starting with a letter"
  [[ -n $WORKER ]] || usage_error "--worker needs a value"
  [[ -n $REMOTE_DIR ]] || usage_error "--remote-dir needs a value"
}

# ---------------------------------------------------------------------------------------------
# gcloud command lines

# --zone/--project flags (left out when empty, so gcloud's configured defaults apply).
scope_flags() {
  SCOPE_FLAGS=()
  if [[ -n $ZONE ]]; then SCOPE_FLAGS+=("--zone=$ZONE"); fi
  if [[ -n $PROJECT ]]; then SCOPE_FLAGS+=("--project=$PROJECT"); fi
  return 0
}

# Run COMMAND (one string, executed by the login shell) on $WORKER of the TPU VM.
tpu_ssh() {
  local remote_cmd=$1
  local -a flags
  scope_flags
  flags=(${SCOPE_FLAGS[@]+"${SCOPE_FLAGS[@]}"} "--worker=$WORKER")
  if is_true "$INTERNAL_IP"; then flags+=(--internal-ip); fi
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" "--command=$remote_cmd"
}

# Copy local files to DEST (a path on the workers, relative to the home directory).
tpu_scp_to() {
  local dest=$1
  shift
  local -a flags
  scope_flags
  flags=(${SCOPE_FLAGS[@]+"${SCOPE_FLAGS[@]}"} "--worker=$WORKER")
  if is_true "$INTERNAL_IP"; then flags+=(--internal-ip); fi
  run "$GCLOUD" compute tpus tpu-vm scp "$@" "$TPU_NAME:$dest" "${flags[@]}"
}

# ---------------------------------------------------------------------------------------------
# Accelerator types

# runtime_version_for TYPE: the TPU software version for JAX on that accelerator family.
# Fails (status 1, nothing printed) for a family these scripts do not know.
runtime_version_for() {
  case "$1" in
    v5litepod-[0-9]*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-[0-9]*) printf 'v2-alpha-tpuv5' ;;
    v6e-[0-9]*) printf 'v2-alpha-tpuv6e' ;;
    *) return 1 ;;
  esac
}

# check_accelerator_type TYPE: die with one line unless TYPE is v5litepod-N, v5p-N or v6e-N.
check_accelerator_type() {
  local t=$1
  local known="expected v5litepod-N (v5e), v5p-N or v6e-N"
  if [[ $t == v5e-* ]]; then
    die "unsupported accelerator type '$t': v5e slices are named v5litepod-N (e.g. v5litepod-8)"
  fi
  if ! [[ $t =~ ^(v5litepod|v5p|v6e)-([1-9][0-9]*)$ ]]; then
    die "unsupported accelerator type '$t': $known"
  fi
}

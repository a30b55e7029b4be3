#!/usr/bin/env bash
# Put the project on every worker of a TPU VM, install it into a venv, and check JAX sees the TPUs.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SOURCE=${SOURCE:-local}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-main}
REMOTE_PYTHON=${REMOTE_PYTHON:-}
EXTRAS=${EXTRAS:-tpu,video}
EXCLUDES=()
INCLUDES=()

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [options]

On every worker (--worker=all): put the project in REMOTE_DIR, create REMOTE_DIR/.venv with a
Python >= 3.11 (installing python3.11 with apt if the image has none), run
pip install -e ".[tpu,video]" (the tpu extra is jax[tpu]), then print each worker's
jax.device_count().

Options (flag, else environment variable):
      --source local|git    where the code comes from                [SOURCE, default: local]
                            local: a tarball of the files git would commit here (tracked
                            and untracked, minus .gitignore'd ones such as data/ and runs/;
                            the whole tree minus .venv, .git and caches outside a git
                            checkout), copied with tpu-vm scp. A file an earlier setup.sh
                            shipped and that is gone here is deleted on the workers too;
                            files made on the workers (runs/, checkpoints) are kept
                            git: git clone/fetch on each worker
      --repo URL            repository to clone (--source git)                     [REPO_URL]
      --ref REF             branch, tag or commit (--source git)    [REPO_REF, default: main]
      --exclude PATTERN     leave PATTERN out of the local tarball too (repeatable)
      --include PATH        add PATH (a file or directory, relative to the repository root)
                            to the local tarball even if git ignores it, e.g. data/demo
                            (repeatable)
      --python PATH         Python on the workers        [REMOTE_PYTHON, default: the newest
                            of python3.13/3.12/3.11/python3 that is >= 3.11]
      --extras LIST         pip extras to install            [EXTRAS, default: tpu,video]

$SSH_OPTIONS_HELP

$COMMON_OPTIONS_HELP

Examples:
  $SCRIPT_NAME --name qwen-v5e --zone ZONE
  $SCRIPT_NAME --name qwen-v5p --zone ZONE --source git --repo https://github.com/ORG/qwenvl_jax.git --ref main
EOF
}

while (($#)); do
  if parse_common_opt "$@" || parse_ssh_opt "$@"; then
    shift "$OPTSHIFT"
    continue
  fi
  case "$1" in
    --source | --source=*)
      take_opt "$@"
      SOURCE=$OPTVAL
      ;;
    --repo | --repo=*)
      take_opt "$@"
      REPO_URL=$OPTVAL
      ;;
    --ref | --ref=*)
      take_opt "$@"
      REPO_REF=$OPTVAL
      ;;
    --exclude | --exclude=*)
      take_opt "$@"
      EXCLUDES+=("--exclude=$OPTVAL")
      ;;
    --include | --include=*)
      take_opt "$@"
      INCLUDES+=("$OPTVAL")
      ;;
    --python | --python=*)
      take_opt "$@"
      REMOTE_PYTHON=$OPTVAL
      ;;
    --extras | --extras=*)
      take_opt "$@"
      EXTRAS=$OPTVAL
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  shift "$OPTSHIFT"
done

require_name
case "$SOURCE" in
  local) ;;
  git)
    [[ -n $REPO_URL ]] || usage_error "--source git needs --repo URL (or REPO_URL)"
    [[ -n $REPO_REF ]] || usage_error "--ref needs a value"
    ((${#INCLUDES[@]} == 0)) || usage_error "--include needs --source local"
    ;;
  *) usage_error "--source must be 'local' or 'git', got '$SOURCE'" ;;
esac
# shellcheck disable=SC2088  # literal ~ paths, as REMOTE_DIR is written
case "$REMOTE_DIR" in
  "~" | "~/" | / | . | ./ | "$HOME" | "$HOME/")
    die "refusing --remote-dir '$REMOTE_DIR': setup.sh unpacks the project into that directory" ;;
esac
[[ $EXTRAS =~ ^[A-Za-z0-9_,.-]*$ ]] || die "bad --extras '$EXTRAS': a comma-separated list of extras"

DIR=$(remote_path "$REMOTE_DIR")
TARBALL=qwenvl_jax_src.tar.gz # lands in the home directory of each worker

# ---- 1. the code -----------------------------------------------------------------------------
if [[ $SOURCE == local ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # The NUL-separated list of what to pack: what git would commit (tracked files still present,
  # untracked ones not ignored) plus --include; generated data and runs stay here.
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    while IFS= read -r -d '' f; do
      if [[ -e $REPO_ROOT/$f || -L $REPO_ROOT/$f ]]; then printf '%s\0' "$f"; fi
    done < <(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard) >"$tmp/files"
  else
    printf '.\0' >"$tmp/files"
  fi
  for path in ${INCLUDES[@]+"${INCLUDES[@]}"}; do
    [[ $path != /* && /$path/ != */../* ]] || die "bad --include '$path': give a path inside $REPO_ROOT"
    [[ -e $REPO_ROOT/$path ]] || die "--include '$path': no such file or directory in $REPO_ROOT"
    printf '%s\0' "$path" >>"$tmp/files"
  done
  info "packing $REPO_ROOT"
  # COPYFILE_DISABLE keeps macOS tar from adding ._* files.
  run env COPYFILE_DISABLE=1 tar -czf "$tmp/$TARBALL" -C "$REPO_ROOT" \
    --exclude=.venv --exclude=.git --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude='*.egg-info' ${EXCLUDES[@]+"${EXCLUDES[@]}"} --null -T "$tmp/files"
  info "copying it to worker(s) $WORKER of $TPU_NAME"
  tpu_scp_to "$TARBALL" "$tmp/$TARBALL"
  # MANIFEST lists the files the last setup.sh unpacked; the ones this tarball no longer has are
  # deleted, and nothing else is (outputs written on the workers survive).
  MANIFEST=.qwenvl_jax_setup_files
  FETCH="mkdir -p $DIR
tar -tzf \"\$HOME\"/$TARBALL | sed -e 's|^\./||' -e '/\/\$/d' -e '/^\.\$/d' | sort -u >\"\$HOME\"/$MANIFEST.new
if [ -f $DIR/$MANIFEST ]; then
  sort -u $DIR/$MANIFEST | comm -23 - \"\$HOME\"/$MANIFEST.new | while IFS= read -r f; do rm -f -- $DIR/\"\$f\"; done
fi
tar -xzf \"\$HOME\"/$TARBALL -C $DIR --warning=no-unknown-keyword
mv \"\$HOME\"/$MANIFEST.new $DIR/$MANIFEST
rm -f \"\$HOME\"/$TARBALL"
else
  FETCH="if [ ! -d $DIR/.git ]; then git clone $(shell_quote "$REPO_URL") $DIR; fi
git -C $DIR remote set-url origin $(shell_quote "$REPO_URL")
git -C $DIR fetch --tags origin $(shell_quote "$REPO_REF")
git -C $DIR checkout --force FETCH_HEAD"
fi

# ---- 2. venv, install, device check (runs on each worker; POSIX sh) -------------------------
INSTALL="cd $DIR
PY=$(shell_quote "$REMOTE_PYTHON")
if [ -z \"\$PY\" ]; then
  for c in python3.13 python3.12 python3.11 python3; do
    if command -v \"\$c\" >/dev/null 2>&1 && \"\$c\" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=\$c; break; fi
  done
fi
if [ -z \"\$PY\" ]; then
  echo \"[\$(hostname)] no Python >= 3.11 on this image; installing python3.11 with apt\" >&2
  sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.11 python3.11-venv
  PY=python3.11
fi
if [ ! -x .venv/bin/python ]; then
  rm -rf .venv
  if ! \"\$PY\" -m venv .venv; then
    rm -rf .venv
    sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \"\$(basename \"\$PY\")-venv\"
    \"\$PY\" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e $(shell_quote ".[$EXTRAS]")
echo \"[\$(hostname)] \$(.venv/bin/python --version) jax.device_count() = \$(.venv/bin/python -c 'import jax; print(jax.device_count())')\""

info "installing on worker(s) $WORKER of $TPU_NAME (source: $SOURCE)"
tpu_ssh "set -eu
$FETCH
$INSTALL"
info "done; next: copy_checkpoint.sh, then run.sh"

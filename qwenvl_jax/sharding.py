"""Device mesh, logical axis names, and the rules that map one onto the other.

Every parameter carries logical axis names as Variable metadata (`axes=("embed", "mlp")`, with
"layers" in front for scanned stacks); activations are constrained with the same vocabulary.
A `Layout` (mesh + rules) turns names into `NamedSharding`s:

    layout = Layout.create(MeshConfig.parse("data=1,fsdp=2,tensor=4"))
    layout.sharding(("embed", "mlp"), (3584, 18944))   # NamedSharding(mesh, P("fsdp", "tensor"))

A dimension whose size does not divide by its mesh axes is sharded over the longest prefix of them
that does divide, else replicated; so GQA with fewer kv heads than `tensor` replicates the kv heads
and a batch of 1 on a data axis of 8 is replicated. The rules are ordered (name, mesh axes) pairs;
`Layout.create(..., overrides={"vocab": None})` or the `sharding_rules` of a training recipe change them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (tuple) or None (replicated). Names not listed are replicated.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),  # the model width of weights (FSDP); activations use act_embed
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vision_embed", ("fsdp",)),
    ("vision_heads", ("tensor",)),
    ("vision_mlp", ("tensor",)),
    ("act_embed", None),
    ("length", None),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("patch", None),
    ("vision_qkv", None),  # q|k|v rows of the fused ViT projection: split would cut across q, k, v
)


class MeshError(ValueError):
    """A mesh description that does not fit the devices or is malformed."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the named mesh axes; one size may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """'data=1,fsdp=2,tensor=4' (missing axes keep their defaults: data=1, fsdp=-1, tensor=1)."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = part.partition("=")
            name = name.strip()
            if not eq or name not in MESH_AXES:
                raise MeshError(f"mesh: expected NAME=SIZE with NAME in {list(MESH_AXES)}, got {part!r}")
            if name in sizes:
                raise MeshError(f"mesh: axis {name!r} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh: size of {name!r} must be an integer, got {value.strip()!r}") from None
        if sizes and "fsdp" not in sizes and -1 not in sizes.values():
            sizes["fsdp"] = -1
        return cls(**sizes)

    def __str__(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in MESH_AXES)

    def resolve(self, num_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        bad = [f"{a}={s}" for a, s in sizes.items() if s == 0 or s < -1]
        if bad:
            raise MeshError(f"mesh {self}: sizes must be positive or -1, got {', '.join(bad)}")
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise MeshError(f"mesh {self}: only one axis may be -1, got {', '.join(free)}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if num_devices % fixed:
                raise MeshError(f"mesh {self}: {num_devices} devices do not divide by {fixed}, the product "
                                "of the fixed sizes")
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise MeshError(f"mesh {self}: needs {math.prod(sizes.values())} devices, but {num_devices} "
                            "are available")
        return sizes

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        devices = list(jax.devices() if devices is None else devices)
        sizes = self.resolve(len(devices))
        shape = tuple(sizes[a] for a in MESH_AXES)
        try:  # physical-topology-aware order on TPU (ICI rings along the inner axes)
            arr = mesh_utils.create_device_mesh(shape, devices=devices,
                                                                 allow_split_physical_axes=True)
        except Exception:  # CPU / GPU / unusual topologies: plain process-major order
            arr = np.asarray(devices).reshape(shape)
        return Mesh(arr, MESH_AXES)


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _normalize_rules(rules) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for name, axes in items:
        if axes is None or axes == ():
            out.append((name, None))
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise MeshError(f"sharding rule {name!r}: unknown mesh axis {unknown[0]!r} (mesh axes are "
                            f"{list(MESH_AXES)})")
        out.append((name, axes))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the logical->mesh rules: everything that decides where arrays live. Hashable."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...] | None], ...] = DEFAULT_RULES

    @classmethod
    def create(cls, mesh: MeshConfig | Mesh | str | None = None, overrides=None,
               devices: Sequence[jax.Device] | None = None) -> Layout:
        """mesh: a Mesh, a MeshConfig, 'data=..,fsdp=..,tensor=..', or None (one device; with several
        processes, every device on fsdp: a mesh on process 0's device alone leaves the others nothing)."""
        if mesh is None:
            if devices is None:
                devices = jax.devices() if jax.process_count() > 1 else [jax.devices()[0]]
            mesh = MeshConfig(1, -1, 1).make_mesh(devices)
        elif isinstance(mesh, str):
            mesh = MeshConfig.parse(mesh).make_mesh(devices)
        elif isinstance(mesh, MeshConfig):
            mesh = mesh.make_mesh(devices)
        rules = dict(DEFAULT_RULES)
        rules.update(dict(_normalize_rules(overrides or ())))
        return cls(mesh, _normalize_rules(rules))

    def for_model(self, config) -> Layout:
        """Replicates head axes whose head count does not divide over their mesh axes.

        A fused heads*head_dim dimension may divide even when the head count does not; sharding it
        would split heads across devices, so the check is on the head count.
        """
        rules = dict(self.rules)
        counts = {"heads": config.text.num_attention_heads, "kv_heads": config.text.num_key_value_heads,
                  "vision_heads": config.vision.num_heads}
        for name, count in counts.items():
            axes = rules.get(name)
            if axes:
                rules[name] = self._divisible_prefix(axes, count) or None
        return dataclasses.replace(self, rules=tuple(rules.items()))

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def platform(self) -> str | None:
        """Platform of the devices the mesh holds ('tpu' for a deviceless TPU topology too);
        None for an AbstractMesh."""
        if isinstance(self.mesh, AbstractMesh):
            return None
        return self.mesh.devices.flat[0].platform

    def _divisible_prefix(self, axes, dim: int) -> tuple[str, ...]:
        best = ()
        for i in range(1, len(axes) + 1):
            if dim % math.prod(self.mesh.shape[a] for a in axes[:i]) == 0:
                best = tuple(axes[:i])
            else:
                break
        return best

    def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        if len(names) != len(shape):
            raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
        rules = dict(self.rules)
        used: set[str] = set()
        parts = []
        for name, dim in zip(names, shape):
            axes = tuple(a for a in (rules.get(name) or ()) if a not in used and self.mesh.shape[a] > 1)
            axes = self._divisible_prefix(axes, dim)
            used.update(axes)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*parts)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def put(self, x, names: Sequence[str | None] | None = None) -> jax.Array:
        """Host array (identical on every process) -> global array laid out by `names`
        (None: replicated). Each process only transfers the shards its devices hold."""
        x = np.asarray(x)
        sharding = self.replicated if names is None else self.sharding(names, x.shape)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def param_axes(state) -> object:
    """The logical axis names of every parameter in an nnx.State (a tree of tuples)."""
    from flax import nnx

    def axes(var):
        names = var.get_metadata().get("axes")
        if names is None or len(names) != len(var.value.shape):
            raise ValueError(f"parameter of shape {var.value.shape} has no matching logical axes: {names}")
        return tuple(names)

    return jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, layout: Layout):
    """A tree like `state` (Variables kept, so nnx.merge accepts it) of NamedShardings."""
    from flax import nnx

    def sharding(var):
        return var.replace(layout.sharding(var.get_metadata()["axes"], var.value.shape))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# The layout active while a model function is traced; `constrain` reads it.
_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("qwenvl_layout", default=None)


@contextlib.contextmanager
def active(layout: Layout | None):
    token = _ACTIVE.set(layout)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_layout() -> Layout | None:
    """The layout of the model function being traced, or None outside one."""
    return _ACTIVE.get()


def constrain(x, *names: str | None):
    """Sharding constraint by logical names under the active layout; identity when none is active."""
    layout = _ACTIVE.get()
    if layout is None or layout.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(names, x.shape))


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

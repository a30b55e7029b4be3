"""The on-disk tier of CompiledCache (qwenvl_jax/compiled.py): a fresh cache (a new process's)
loads a program compiled before instead of tracing and compiling it, gets the same results, and
never loads a program compiled for different arguments or from an unreadable file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwenvl_jax import compiled
from qwenvl_jax.compiled import CompiledCache


def _step(scale, state, x):
    """A static argument, a donated state and an input: the shapes generation's programs have."""
    return {"total": state["total"] + scale * jnp.tanh(x).sum(0), "count": state["count"] + 1}


@pytest.fixture
def disk(tmp_path):
    compiled.set_directory(tmp_path / "executables")
    yield tmp_path / "executables"
    compiled.set_directory(None)


def _args(rows=4):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(rows, 8)).astype(np.float32))
    return {"total": jnp.zeros(8, jnp.float32), "count": jnp.zeros((), jnp.int32)}, x


def _run(cache, scale, rows=4, mesh=None):
    state, x = _args(rows)
    if mesh is not None:  # rows of x split over the mesh, the state replicated on it
        state = jax.device_put(state, NamedSharding(mesh, P()))
        x = jax.device_put(x, NamedSharding(mesh, P("d", None)))
    out = cache(scale, state, x, out_shardings=jax.tree.map(lambda a: a.sharding, state))
    return jax.tree.map(np.asarray, out)


def test_a_fresh_cache_loads_the_program_and_matches(disk):
    first = CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,))
    expected = _run(first, 2.0)
    assert (first.compiles, first.loads) == (1, 0)
    assert len(list(disk.glob("*.jaxexe"))) == 1

    fresh = CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,))  # as in a new process
    got = _run(fresh, 2.0)
    assert (fresh.compiles, fresh.loads) == (0, 1)
    np.testing.assert_array_equal(got["total"], expected["total"])
    assert got["count"] == 1
    # the reference: the same function jitted directly
    state, x = _args()
    np.testing.assert_allclose(got["total"], np.asarray(_step(2.0, state, x)["total"]), rtol=1e-6)


def test_other_arguments_never_load_a_stored_program(disk):
    _run(CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,)), 2.0)
    fresh = CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,))
    want = {"other static value": (3.0, 4, None), "other shape": (2.0, 6, None),
            "other devices and sharding": (2.0, 4, jax.make_mesh((2,), ("d",), devices=jax.devices()[:2]))}
    for i, (scale, rows, mesh) in enumerate(want.values()):
        got = _run(fresh, scale, rows, mesh)
        assert (fresh.compiles, fresh.loads) == (i + 1, 0)
        s, x = _args(rows)
        np.testing.assert_allclose(got["total"], np.asarray(_step(scale, s, x)["total"]), rtol=1e-6)
    assert len(list(disk.glob("*.jaxexe"))) == 4


def test_an_unreadable_file_is_compiled_again_and_replaced(disk, capsys):
    expected = _run(CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,)), 2.0)
    (path,) = disk.glob("*.jaxexe")
    path.write_bytes(b"not an executable")
    fresh = CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,))
    got = _run(fresh, 2.0)
    assert (fresh.compiles, fresh.loads) == (1, 0)
    assert "could not be loaded" in capsys.readouterr().err
    np.testing.assert_array_equal(got["total"], expected["total"])
    again = CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,))
    _run(again, 2.0)
    assert (again.compiles, again.loads) == (0, 1)  # the file was rewritten


def test_without_a_directory_nothing_is_stored(tmp_path):
    compiled.set_directory(None)
    cache = CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,))
    _run(cache, 2.0)
    _run(CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,)), 2.0)
    assert cache.compiles == 1 and not list(tmp_path.iterdir())


def test_a_program_on_a_mesh_loads_onto_the_same_devices_in_order(disk):
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array([devices[3], devices[1]]), ("d",))  # not in id order
    expected = _run(CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,)), 2.0, mesh=mesh)
    fresh = CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,))
    state, x = _args()
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x = jax.device_put(x, NamedSharding(mesh, P("d", None)))
    out = fresh(2.0, state, x, out_shardings=jax.tree.map(lambda a: a.sharding, state))
    assert (fresh.compiles, fresh.loads) == (0, 1)
    assert out["total"].sharding.mesh.devices.tolist() == [devices[3], devices[1]]
    np.testing.assert_array_equal(np.asarray(out["total"]), expected["total"])


def test_auto_layout_arguments_are_keyed_by_sharding_and_placed_once():
    """Arguments whose layouts the program chooses: compiled from their shapes (ShapeDtypeStructs
    before they exist), placed in the chosen formats, then called with no second compile."""
    from jax.experimental.layout import Format, Layout

    cache = CompiledCache(_step, static_argnums=(0,), donate_argnums=(1,), auto_layouts=(1, 2))
    state, x = _args()
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (state, x))
    out = jax.tree.map(lambda a: Format(Layout.AUTO, a.sharding), state)
    program = cache.program(2.0, *spec, out_shardings=out)
    state_formats, x_format = program.input_formats[0]
    placed = jax.device_put(state, state_formats), jax.device_put(x, x_format)
    got = cache(2.0, *placed, out_shardings=out)
    assert cache.compiles == 1
    np.testing.assert_allclose(np.asarray(got["total"]), np.asarray(_step(2.0, *_args())["total"]), rtol=1e-6)


def test_placement_keeps_only_the_sharding_of_prng_keys():
    """A key's format describes its uint32 words (rank + 1): as an out_sharding it is rejected."""
    from jax.experimental.layout import Format, Layout

    from qwenvl_jax.compiled import placement

    like = {"key": jax.random.key(0), "x": jnp.zeros((2, 3))}
    formats = {"key": Format(Layout(major_to_minor=(0,)), like["key"].sharding), "x": like["x"].format}
    got = placement(formats, like)
    assert got["key"] == like["key"].sharding and got["x"] == formats["x"]
    out = jax.jit(lambda: {"key": jax.random.key(1), "x": jnp.ones((2, 3))}, out_shardings=got)()
    assert out["x"].format == formats["x"]


class _Scale:
    """A static argument that counts its hashes (an nnx GraphDef's hash walks the whole graph)."""

    hashes = 0

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        _Scale.hashes += 1
        return hash(self.value)

    def __eq__(self, other):
        return isinstance(other, _Scale) and other.value == self.value


def _scaled_step(scale, state, x):
    return _step(scale.value, state, x)


def test_a_static_argument_is_hashed_once_and_equal_values_share_a_program():
    cache = CompiledCache(_scaled_step, static_argnums=(0,), donate_argnums=(1,))
    two = _Scale(2.0)
    expected = _run(cache, two)
    hashes = _Scale.hashes
    for _ in range(3):
        np.testing.assert_array_equal(_run(cache, two)["total"], expected["total"])
    assert _Scale.hashes == hashes  # the same object: found by identity, per call
    np.testing.assert_array_equal(_run(cache, _Scale(2.0))["total"], expected["total"])  # equal, not identical
    assert cache.compiles == 1
    three = _run(cache, _Scale(3.0))  # a different value: its own program
    assert cache.compiles == 2
    state, x = _args()
    np.testing.assert_allclose(three["total"], np.asarray(_step(3.0, state, x)["total"]), rtol=1e-6)


def test_an_argument_changed_in_place_is_keyed_anew():
    """Arguments are recognised between calls by their leaves, not by the container: a dict (or
    nnx State) whose array is replaced in place gets the program for its new shapes, and its new
    values."""
    def total(state, x):
        return (state["w"] * x.sum()).sum()

    cache = CompiledCache(total)
    state, x = {"w": jnp.ones(4)}, jnp.ones(3)
    assert float(cache(state, x, out_shardings=None)) == 12.0
    state["w"] = jnp.full(4, 2.0)  # same shape: same program, new values
    assert float(cache(state, x, out_shardings=None)) == 24.0
    assert cache.compiles == 1
    state["w"] = jnp.ones(6)  # new shape: its own program
    assert float(cache(state, x, out_shardings=None)) == 18.0
    assert cache.compiles == 2

"""One process of a multi-process run (launched by test_multihost.py; not a test itself).

    python multihost_worker.py PORT PROCESS_ID NUM_PROCESSES CHECKPOINT OUT_DIR MESH

Loads CHECKPOINT sharded over MESH spanning every process's devices, reports this process's host
memory growth while loading, then the logits and greedy tokens of `batch.npz` in OUT_DIR, then
exports the sharded model to OUT_DIR/export (process 0 writes) and reports the memory that took.
"""

import json
import sys
from pathlib import Path


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main():
    port, pid, nproc, ckpt, out, mesh = sys.argv[1:7]
    pid, nproc, out = int(pid), int(nproc), Path(out)
    from qwenvl_jax import distributed

    distributed.initialize(f"127.0.0.1:{port}", int(nproc), pid)
    import jax
    import numpy as np

    from qwenvl_jax.generation.decode import generate
    from qwenvl_jax.pretrained import load_pretrained
    from qwenvl_jax.sharding import to_host

    assert jax.process_count() == nproc and jax.local_device_count() * nproc == jax.device_count()
    # Start the runtime first (compiler, thread pools, collectives), so what follows is the load.
    from qwenvl_jax.sharding import Layout

    warm = Layout.create(mesh)
    jax.block_until_ready(jax.jit(lambda x: x * 2)(warm.put(np.ones((8, 8), np.float32), ("embed", "mlp"))))
    try:  # reset the peak-RSS counter so VmHWM measures the load alone
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = rss_bytes("VmRSS")
    model = load_pretrained(ckpt, dtype="float32", mesh=mesh)
    jax.block_until_ready(model.params)
    peak = rss_bytes("VmHWM")
    local = sum(s.data.nbytes for x in jax.tree.leaves(model.params) for s in x.addressable_shards)
    batch = dict(np.load(out / "batch.npz"))
    logits = to_host(model(**batch))
    tokens = generate(model, model.prepare(**batch), max_new_tokens=5, eos_token_ids=[], pad_token_id=0).token_ids
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before_export = rss_bytes("VmRSS")
    model.save_pretrained(out / "export", max_shard_bytes=32 * 2**20, gather_bytes=4 * 2**20)
    export_growth = rss_bytes("VmHWM") - before_export
    (out / f"memory_{pid}.json").write_text(json.dumps({"load_growth": peak - before, "local_param_bytes": local,
                                                        "export_growth": export_growth}))
    if distributed.is_main_process():
        np.save(out / "logits.npy", logits)
        (out / "tokens.json").write_text(json.dumps(tokens))


if __name__ == "__main__":
    main()

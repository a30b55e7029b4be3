import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Multi-device code is tested on 8 simulated CPU devices; set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# CLIs run by the tests share one persistent compilation cache for the session, never the user's.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="qwenvl_jax_test_cc_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ["QWENVL_JAX_COMPILATION_CACHE"] = _COMPILATION_CACHE
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from hf_reference import SHAPES, build_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: shape name -> (checkpoint dir written by transformers, the HF model)."""
    cache = {}

    def make(shape: str):
        if shape not in cache:
            model = build_hf_model(shape)
            path = tmp_path_factory.mktemp(f"hf_{shape}")
            model.save_pretrained(path)
            cache[shape] = (path, model)
        return cache[shape]

    return make


@pytest.fixture(params=sorted(SHAPES))
def shape(request):
    return request.param


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory):
    """A complete tiny checkpoint (weights, config, tokenizer, chat template, preprocessor config)
    as a user would download it; returns (path, HF model, special token ids)."""
    from tiny_tokenizer import make_tiny_tokenizer, write_preprocessor_config

    path = tmp_path_factory.mktemp("chat_ckpt")
    ids = make_tiny_tokenizer(path)
    write_preprocessor_config(path, min_pixels=3136, max_pixels=60_000)
    tokens = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id")}
    model = build_hf_model("untied_w112", tokens=tokens)
    model.save_pretrained(path)
    return path, model, ids


@pytest.fixture(autouse=True)
def _executables_in_memory_only():
    """An in-process CLI run turns the on-disk executable cache on (compiled.py); a later test in
    the same process must not load programs that test compiled (one that patches a function inside
    a program would not see its patch)."""
    yield
    from qwenvl_jax import compiled

    compiled.set_directory(None)

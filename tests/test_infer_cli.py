"""python -m qwenvl_jax.infer: greedy output equals the reference; user errors are one line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hf_reference import hf_greedy
from PIL import Image

from qwenvl_jax import Processor, get_rope_index
from qwenvl_jax.infer import main


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "pic.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 220, 3), dtype=np.uint8)).save(path)
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("mesh", [None, "data=2,fsdp=2,tensor=2"])
def test_greedy_json_matches_reference(chat_checkpoint, picture, capsys, mesh):
    path, hf, ids = chat_checkpoint
    code, out, err = _run(capsys, "--checkpoint", path, "--prompt", "What is this?", "--image", picture,
                          "--max-new-tokens", 8, "--temperature", 0, "--dtype", "float32", "--json",
                          *(["--mesh", mesh] if mesh else []))
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) >= {"text", "token_ids", "prompt_tokens", "boxes", "prefill_s", "decode_tokens_per_s",
                           "compile_s"}
    # Reference: the same prompt through the processor, greedy-decoded by transformers.
    processor = Processor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    batch = processor(text=processor.apply_chat_template(msgs), images=[Image.open(picture)])
    pos, _ = get_rope_index(batch["input_ids"], image_token_id=ids["image_token_id"],
                            video_token_id=ids["video_token_id"], image_grid_thw=batch["image_grid_thw"])
    ref = hf_greedy(hf, 8, input_ids=batch["input_ids"], position_ids=pos, pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"])
    assert result["token_ids"] == ref[0].tolist()
    assert result["prompt_tokens"] == batch["input_ids"].shape[1]
    assert result["text"] == processor.decode(ref[0])
    assert "loading" in err
    assert result["mesh"] == ({"data": 2, "fsdp": 2, "tensor": 2} if mesh else {"data": 1, "fsdp": 1, "tensor": 1})


def test_stream_prints_the_same_text(chat_checkpoint, picture, capsys):
    path = chat_checkpoint[0]
    args = ["--checkpoint", path, "--prompt", "Hi", "--max-new-tokens", 6, "--temperature", 0, "--dtype", "float32"]
    code, plain, _ = _run(capsys, *args)
    code2, streamed, _ = _run(capsys, *args, "--stream")
    assert code == code2 == 0 and plain == streamed


def test_draw_writes_png(chat_checkpoint, picture, tmp_path, capsys):
    out = tmp_path / "boxes.png"
    code, _, err = _run(capsys, "--checkpoint", chat_checkpoint[0], "--prompt", "Locate it.", "--image", picture,
                        "--max-new-tokens", 4, "--draw", out)
    assert code == 0, err
    assert Image.open(out).size == (220, 150)  # the original image, not the resized one


@pytest.mark.parametrize("extra,needle", [
    (["--image", "{tmp}/missing.png"], "missing.png"),
    (["--image", "{tmp}/corrupt.png"], "corrupt.png"),
    (["--image", "{tmp}/notes.txt"], "notes.txt"),
    (["--video", "{tmp}/missing.mp4"], "missing.mp4"),
    (["--video", "{tmp}/notes.txt"], "notes.txt"),
    (["--max-new-tokens", "5000"], "exceeds the context length (2048)"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (["--image", "{tmp}/missing.png", "--draw", "{tmp}/no/such/dir/out.png"], "/no/such/dir does not exist"),
    (["--image", "{tmp}/missing.png", "--draw", "{tmp}"], "cannot write a file there"),
    (["--top-p", "nan"], "top_p must be a finite number"),
    (["--repetition-penalty", "inf"], "repetition_penalty must be a finite number"),
    (["--fps", "0"], "--fps must be a positive number, got 0.0"),
    (["--fps", "nan"], "--fps must be a positive number, got nan"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**32)"),
    (["--seed", "-3"], "--seed must be in [0, 2**32)"),
    (["--min-pixels", "0"], "--min-pixels must be >= 1"),
    (["--min-pixels", "9000", "--max-pixels", "4000"], "--min-pixels (9000) must not exceed --max-pixels (4000)"),
    (["--mesh", "data=3"], "mesh data=3,fsdp=-1,tensor=1: 8 devices do not divide by 3"),
    (["--mesh", "data=2,fsdp=2,tensor=4"], "needs 16 devices, but 8 are available"),
    (["--mesh", "fsdp=two"], "size of 'fsdp' must be an integer"),
    (["--mesh", "pipeline=2"], "expected NAME=SIZE"),
    (["--num-processes", "2"], "--num-processes and --process-id go together"),
    (["--nframes", "4"], "--nframes / --video-start / --video-end need a --video"),
    (["--video", "{tmp}/clip.gif", "--nframes", "-2"], "--nframes must be a positive number"),
    (["--video", "{tmp}/clip.gif", "--video-start", "2", "--video-end", "1"],
     "--video-start (2.0) must be before --video-end (1.0)"),
    (["--video", "{tmp}/clip.gif", "--video-end", "nan"], "--video-end must be a number of seconds >= 0"),
    (["--video", "{tmp}/clip.gif", "--video-start", "50"],
     "clip.gif: video_start=50.0 .. video_end=None s holds fewer"),
])
def test_user_errors_are_one_line(chat_checkpoint, tmp_path, capsys, extra, needle):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "notes.txt").write_text("hello")
    frames = [Image.new("RGB", (56, 56), (40 * i, 0, 0)) for i in range(6)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    argv = ["--checkpoint", str(chat_checkpoint[0]), "--prompt", "Hi", "--max-new-tokens", "2"]
    argv += [a.format(tmp=tmp_path) for a in extra]
    code, out, err = _run(capsys, *argv)
    assert code == 1
    assert err.strip().startswith("error:") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("content, needle", [
    ("{", "not valid JSON"), ("[1, 2]", "expected a JSON object"), ('{"do_sample": "yes"}', "do_sample"),
    ('{"do_sample": true, "temperature": "hot"}', "temperature"), ('{"top_p": NaN}', "top_p"),
    ('{"top_k": 1e999}', "top_k"), ('{"repetition_penalty": null, "eos_token_id": "2"}', "eos_token_id"),
    ('{"eos_token_id": [2, -1]}', "eos_token_id"), ('{"eos_token_id": []}', "eos_token_id"),
    ('{"eos_token_id": true}', "eos_token_id")])
def test_bad_generation_config_is_one_line_naming_it(chat_checkpoint, tmp_path, capsys, content, needle):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(chat_checkpoint[0], ckpt)
    (ckpt / "generation_config.json").write_text(content)
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--prompt", "Hi", "--max-new-tokens", 2)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and "generation_config.json" in err and needle in err, err


def test_module_entry_point(chat_checkpoint, tmp_path):
    """The real command, as a user runs it: a missing checkpoint is one line and exit code 1."""
    r = subprocess.run([sys.executable, "-m", "qwenvl_jax.infer", "--checkpoint", str(tmp_path / "nope"),
                        "--prompt", "Hi"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_second_run_loads_every_program_from_the_compilation_cache(chat_checkpoint, picture, tmp_path):
    """Two identical runs as separate processes: the first writes its programs to the persistent
    cache, the second finds every one there (writes none) and reports much less compile time;
    `--compilation-cache off` writes nothing."""
    cache = tmp_path / "cache"

    def run(*extra, env_cache=None):
        env = dict(os.environ, QWENVL_JAX_COMPILATION_CACHE=str(env_cache or tmp_path / "unused"))
        r = subprocess.run([sys.executable, "-m", "qwenvl_jax.infer", "--checkpoint", str(chat_checkpoint[0]),
                            "--prompt", "What is this?", "--image", str(picture), "--max-new-tokens", "4",
                            "--temperature", "0", "--dtype", "float32", "--json", *extra],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = run(env_cache=cache)  # the environment variable names the directory
    entries = sorted(p.name for p in cache.iterdir() if not p.name.endswith("-atime"))
    assert entries
    executables = sorted(p.name for p in (cache / "executables").iterdir())
    assert len(executables) == 2  # generate's prefill and decode, stored whole (compiled.py)
    second = run("--compilation-cache", str(cache))  # and so does the flag
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith("-atime")) == entries
    assert sorted(p.name for p in (cache / "executables").iterdir()) == executables
    assert second["token_ids"] == first["token_ids"]
    assert second["compile_s"] < first["compile_s"] / 2, (first["compile_s"], second["compile_s"])
    # Executables JAX reads back from its own cache are not stored again (on XLA:CPU such a copy
    # lacks some of its functions and failed when a later run called it).
    shutil.rmtree(cache / "executables")
    third = run("--compilation-cache", str(cache))
    assert not list((cache / "executables").iterdir())
    assert run("--compilation-cache", str(cache))["token_ids"] == third["token_ids"] == first["token_ids"]
    assert {"load_s", "compile_s"} <= set(second)
    off = tmp_path / "off"
    run("--compilation-cache", "off", env_cache=off)  # the flag wins over the environment
    assert not off.exists()


@pytest.mark.parametrize("options", [{}, dict(nframes=4, video_start=0.6, video_end=2.6, max_pixels=28 * 28 * 12)])
def test_video_greedy_matches_reference(chat_checkpoint, tmp_path, capsys, options):
    """An animated GIF through the CLI: frames sampled at 2 fps (or a clip's frames under a pixel
    budget, sized once as qwen-vl-utils sizes them), MRoPE time from the real rate."""
    from qwenvl_jax.processing.image import smart_resize
    from qwenvl_jax.processing.video_io import frame_pixel_limits, read_video

    path, hf, ids = chat_checkpoint
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 256, (112, 140, 3), dtype=np.uint8)) for _ in range(12)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=250, loop=0)  # 4 fps, 3 s
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    code, out, err = _run(capsys, "--checkpoint", path, "--prompt", "What happens?", "--video", gif, *flags,
                          "--max-new-tokens", 6, "--temperature", 0, "--dtype", "float32", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])

    video, sample_fps = read_video(gif, fps=2.0, **options)
    # qwen-vl-utils: frames ceil(0.6*4)=3 .. floor(2.6*4)=10 of the clip, 4 of its 8 -> 4/8*4 fps
    n, fps = (4, 2.0) if options else (6, 2.0)
    assert len(video) == n and sample_fps == pytest.approx(fps)
    processor = Processor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    batch = processor(text=processor.apply_chat_template(msgs), videos=[video], fps=sample_fps)
    if options:  # under the checkpoint's video limits: the frames keep qwen-vl-utils' size (one resize)
        size = smart_resize(112, 140, 28, *frame_pixel_limits(n, max_pixels=options["max_pixels"]),
                            variant="qwen_vl_utils")
        assert video.shape[1:3] == size and size[0] * size[1] <= processor.video_max_pixels
        assert batch["video_grid_thw"].tolist() == [[n // 2, size[0] // 14, size[1] // 14]]
    pos, _ = get_rope_index(batch["input_ids"], image_token_id=ids["image_token_id"],
                            video_token_id=ids["video_token_id"], video_grid_thw=batch["video_grid_thw"],
                            second_per_grid_ts=batch["second_per_grid_ts"])
    ref = hf_greedy(hf, 6, input_ids=batch["input_ids"], position_ids=pos,
                    pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"])
    assert result["prompt_tokens"] == batch["input_ids"].shape[1]
    assert result["token_ids"] == ref[0].tolist()


def test_no_arguments_without_the_bundled_model(capsys, monkeypatch, tmp_path):
    """With no arguments infer uses the bundled demo model; an install that lost its files gets one
    clear error line, not a traceback."""
    import qwenvl_jax.infer as infer

    monkeypatch.setattr(infer, "DEMO_MODEL", tmp_path / "model")
    code, _, err = _run(capsys)
    assert code == 1 and "bundled demo model is missing" in err and "--checkpoint" in err
    assert len(err.strip().splitlines()) == 1

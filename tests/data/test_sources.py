"""JSONL / ArrayRecord sources, record payloads, and media loading with DataError reasons."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from qwenvl_jax.data.formats import DataError, MediaBlob, parse_record
from qwenvl_jax.data.sources import (
    ArrayRecordSource,
    JsonlSource,
    decode_record,
    encode_record,
    open_image,
    open_media,
    open_video,
    parse_line,
    resolve_data_root,
    to_conversation,
    write_array_record,
)
from qwenvl_jax.processing.image import load_image


def reason_of(fn, *args, **kwargs):
    with pytest.raises(DataError) as e:
        fn(*args, **kwargs)
    return e.value.reason


def qa(image=None):
    """A LLaVA-form record asking about `image` (or a text-only one)."""
    value = "<image>\nWhat is it?" if image else "What is it?"
    return {**({"image": image} if image else {}),
            "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "A dog."}]}


# ---------------------------------------------------------------------------------------------- JSONL

def test_jsonl_offsets_skip_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \r\n{"b": "\xc3\xa9"}\r\n{not json}\n\n{"c": 3}')  # no final newline
    source = JsonlSource(path)
    assert len(source) == 4
    assert [source[i] for i in range(4)] == [b'{"a": 1}', b'{"b": "\xc3\xa9"}', b"{not json}", b'{"c": 3}']
    assert source[-1] == b'{"c": 3}' and source[np.int64(0)] == b'{"a": 1}'
    with pytest.raises(IndexError):
        source[4]
    assert parse_line(source[1]) == {"b": "é"}
    assert reason_of(parse_line, source[2]) == "malformed_json"  # the source itself never parses
    assert reason_of(parse_line, "[1]") == "bad_format"
    assert reason_of(to_conversation, source[2]) == "malformed_json"
    assert len(JsonlSource(tmp_path / "d.jsonl")) == 4 and "records=4" in repr(source)


def test_jsonl_source_pickles_without_a_file_handle(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(qa()) + "\n" for _ in range(3)))
    source = JsonlSource(path)
    first = source[0]  # opens the file
    state = source.__getstate__()
    assert state["_fd"] is None and set(state) == {"path", "_spans", "_fd"}
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == 3 and clone[0] == first and clone[2] == source[2]
    conv = to_conversation(clone[1], tmp_path)
    assert conv.messages[-1]["content"] == [{"type": "text", "text": "A dog."}]


def test_jsonl_source_closes_its_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(qa()) + "\n")
    source = JsonlSource(path)
    first = source[0]
    fd = source._fd
    source.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert source[0] == first  # reopens
    fd = source._fd
    del source  # garbage collection closes it too
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("held", ["local", "until_module_teardown"])
def test_jsonl_source_exits_quietly(tmp_path, held):
    """No "Exception ignored in JsonlSource.__del__" at interpreter exit: a source still alive when
    the interpreter tears modules down (so `sources.os` is already None) must not need them."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(qa()) + "\n")
    script = (f"import os\nimport qwenvl_jax.data.sources as sources\n"
              f"source = sources.JsonlSource({str(path)!r})\nsource[0]\n")
    if held != "local":  # referenced from a module cleared after `sources`: freed mid-teardown
        script += "os._held = (source, sources)\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------- data root

def test_relative_media_resolve_against_the_data_files_directory(tmp_path, monkeypatch):
    """The one data-root rule: a relative media path in a data file resolves against that file's
    directory, wherever the process runs (symlinks to the file followed); an explicit data_root
    (relative: from the current directory) overrides it; absolute paths stay as written."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "img").mkdir(parents=True)
    (elsewhere / "media").mkdir(parents=True)
    Image.new("RGB", (40, 30), (250, 0, 0)).save(data / "img/a.png")
    absolute = str(data / "img/a.png")
    (data / "train.jsonl").write_text(json.dumps(qa("img/a.png")) + "\n" + json.dumps(qa(absolute)) + "\n")
    (elsewhere / "link.jsonl").symlink_to(data / "train.jsonl")
    monkeypatch.chdir(elsewhere)  # holds no img/a.png

    data_dir = os.path.realpath(data)
    for name in ("../data/train.jsonl", "link.jsonl"):
        source = JsonlSource(name)
        root = resolve_data_root(source.path)
        assert root == data_dir
        assert to_conversation(source[0], root).images == [os.path.join(data_dir, "img/a.png")]
        assert open_media(to_conversation(source[0], root)).images[0].size == (40, 30)
    assert resolve_data_root("../data/train.jsonl", "media") == str(elsewhere / "media")
    assert resolve_data_root("../data/train.jsonl", "/mnt/x") == "/mnt/x"
    explicit = to_conversation(source[0], resolve_data_root(source.path, "media"))
    assert explicit.images == [str(elsewhere / "media/img/a.png")]
    assert reason_of(open_media, explicit) == "missing_image"
    assert to_conversation(source[1], resolve_data_root(source.path, "media")).images == [absolute]

    # write_array_record follows the same rule.
    counts = write_array_record("../data/train.jsonl", "default.arrayrecord")
    assert counts == {"records": 2, "images": 2, "videos": 0}
    counts = write_array_record("../data/train.jsonl", "explicit.arrayrecord", data_root="media")
    assert counts == {"records": 2, "images": 1, "videos": 0, "missing_image": 1}


# ---------------------------------------------------------------------------------------------- ArrayRecord

def test_payload_round_trip():
    record = qa("a.jpg")
    blob = encode_record(record, {"a.jpg": b"\x00\x01jpeg", "b.gif": b""}, {"c.jpg": "gone"})
    assert decode_record(blob) == (record, {"a.jpg": b"\x00\x01jpeg", "b.gif": b""})
    assert reason_of(decode_record, b'{"a": 1}') == "bad_format"
    assert reason_of(decode_record, blob + b"x") == "bad_format"


def test_array_record_round_trip(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), (250, 0, 0)).save(root / "img/a.png")
    Image.fromarray(np.arange(48 * 32 * 3, dtype=np.uint8).reshape(32, 48, 3)).save(root / "img/b.jpg")
    lines = [qa("img/a.png"),
             {"image": ["img/b.jpg", "img/a.png"], "conversations": [
                 {"from": "human", "value": "<image><image> Same?"}, {"from": "gpt", "value": "No."}]},
             qa("img/missing.jpg"),
             qa(),
             {"video": "img", "conversations": [{"from": "human", "value": "<video>"},  # a frame directory
                                                {"from": "gpt", "value": "Frames."}]}]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join([json.dumps(r) for r in lines] + ["{broken", json.dumps({"x": 1})]) + "\n")

    out = tmp_path / "train.arrayrecord"
    counts = write_array_record(jsonl, out, root)
    assert counts == {"records": 5, "images": 3, "videos": 0, "missing_image": 1, "missing_video": 1,
                      "malformed_json": 1, "bad_format": 1}
    assert out.is_file() and not (tmp_path / "train.arrayrecord.tmp").exists()

    source = pickle.loads(pickle.dumps(ArrayRecordSource(out)))
    assert len(source) == 5
    assert "group_size:1" in ArrayRecordReader(str(out)).writer_options_string()
    record, media = decode_record(source[1])
    assert record == lines[1]
    assert media == {"img/b.jpg": (root / "img/b.jpg").read_bytes(), "img/a.png": (root / "img/a.png").read_bytes()}

    conv = to_conversation(source[1])
    assert conv.images == [MediaBlob("img/b.jpg", media["img/b.jpg"]), MediaBlob("img/a.png", media["img/a.png"])]
    loaded = open_media(conv)
    assert loaded.videos == [] and loaded.fps == []
    for image, name in zip(loaded.images, ["b.jpg", "a.png"]):
        assert np.array_equal(np.asarray(image), np.asarray(load_image(root / "img" / name)))

    assert reason_of(to_conversation, source[2]) == "missing_image"
    assert to_conversation(source[3]).images == []
    assert reason_of(to_conversation, source[4]) == "missing_video"
    assert decode_record(source[4])[1] == {}
    assert [len(b) for b in source.__getitems__([0, 3])] == [len(source[0]), len(source[3])]


# ---------------------------------------------------------------------------------------------- media

def test_open_image_reasons(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert open_image(str(tmp_path / "ok.png")).size == (8, 8)
    assert open_image(MediaBlob("ok.png", (tmp_path / "ok.png").read_bytes())).mode == "RGB"
    assert reason_of(open_image, str(tmp_path / "nope.png")) == "missing_image"
    assert reason_of(open_image, str(tmp_path / "bad.jpg")) == "corrupt_image"
    with pytest.raises(DataError, match="cannot read image x/bad.jpg") as e:
        open_image(MediaBlob("x/bad.jpg", b"not an image"))
    assert e.value.reason == "corrupt_image"
    truncated = (tmp_path / "ok.png").read_bytes()[:40]
    assert reason_of(open_image, MediaBlob("t.png", truncated)) == "corrupt_image"


def test_open_video_from_path_and_blob(tmp_path):
    frames = [Image.new("RGB", (56, 56), (30 * i, 0, 0)) for i in range(8)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (tmp_path / "bad.gif").write_bytes(b"GIF89a garbage")
    record = {"video": "clip.gif", "conversations": [{"from": "human", "value": "<video>Describe."},
                                                    {"from": "gpt", "value": "A red fade."}]}
    from_path = open_media(parse_record(record, tmp_path))
    from_blob = open_media(parse_record(record, media={"clip.gif": (tmp_path / "clip.gif").read_bytes()}))
    assert from_path.images == [] and from_path.fps == from_blob.fps
    assert from_path.videos[0].shape[0] == 4 and np.array_equal(from_path.videos[0], from_blob.videos[0])
    assert reason_of(open_video, str(tmp_path / "none.gif")) == "missing_video"
    assert reason_of(open_video, str(tmp_path / "bad.gif")) == "corrupt_video"
    with pytest.raises(DataError, match="cannot read video v/bad.gif") as e:
        open_video(MediaBlob("v/bad.gif", b"GIF89a garbage"))
    assert e.value.reason == "corrupt_video"


def test_hostile_lines_are_data_errors_or_records():
    """parse_line on every hostile line: a shallow dict or a DataError with a known reason, never
    another exception (RecursionError, ValueError from long integers, ...)."""
    from hostile_records import hostile_lines

    from qwenvl_jax.data.formats import REASONS, DataError
    from qwenvl_jax.data.sources import MAX_NESTING, _nesting, parse_line

    lines = hostile_lines()
    errors = 0
    for line in lines:
        try:
            record = parse_line(line.encode("utf-8", "surrogateescape"))
        except DataError as e:
            assert e.reason in REASONS
            errors += 1
        else:
            assert isinstance(record, dict) and _nesting(record) <= MAX_NESTING
    assert errors >= 12


def test_array_record_conversion_counts_hostile_lines(tmp_path):
    from hostile_records import GOOD, hostile_lines

    from qwenvl_jax.data.sources import write_array_record

    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    lines = hostile_lines(n_random=50) + [json.dumps(GOOD)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    counts = write_array_record(tmp_path / "d.jsonl", tmp_path / "d.arrayrecord")
    skipped = counts.get("malformed_json", 0) + counts.get("bad_format", 0)
    assert counts["records"] >= 1 and skipped >= 12 and counts["records"] + skipped == len(lines)

"""The packed pipeline: packed rows give each sample's own logits; resume; sharding; bad data."""

import json
import os

import numpy as np
import pytest
from hf_reference import rel_err
from PIL import Image

from qwenvl_jax.batch import ModelInputs
from qwenvl_jax.data.formats import REASONS
from qwenvl_jax.data.pipeline import DataConfig, SampleEncoder, batch_vision, make_dataset, open_source, skip_report
from qwenvl_jax.model.vision_layout import stack_rows, vision_inputs
from qwenvl_jax.pretrained import load_pretrained
from qwenvl_jax.processing.processor import Processor


def _picture(path, size, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _gif(path, frames, size, seed):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=250, loop=0)


def _qa(q, a, image=None):
    value = ("<image>\n" if image else "") + q
    return {**({"image": image} if image else {}), "conversations": [{"from": "human", "value": value},
                                                                      {"from": "gpt", "value": a}]}


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory):
    """A JSONL of 8 good samples (text, images of several sizes, two images, a video, multi-turn)
    and 3 bad ones (missing image, corrupt image, malformed line)."""
    root = tmp_path_factory.mktemp("data")
    _picture(root / "a.png", (60, 90), 0)
    _picture(root / "b.png", (120, 50), 1)
    _picture(root / "c.png", (200, 170), 2)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    _gif(root / "clip.gif", 6, (56, 84), 3)
    records = [
        _qa("Hello there, how are you?", "Fine, thank you."),
        _qa("What is in the picture?", "A pattern of noise.", "a.png"),
        _qa("Describe it.", "Tall and narrow.", "b.png"),
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                   {"type": "image", "image": "c.png"},
                                                   {"type": "text", "text": "Compare them."}]},
                      {"role": "assistant", "content": "The second is larger."}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.gif"},
                                                   {"type": "text", "text": "What happens?"}]},
                      {"role": "assistant", "content": "Noise flickers."}]},
        _qa("Missing?", "Yes.", "nothere.png"),
        _qa("Count to three.", "One, two, three."),
        _qa("Corrupt?", "Yes.", "broken.png"),
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
        _qa("Large one?", "Yes.", "c.png"),
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "{this is not json")
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, root


DATA = DataConfig(seq_len=384, patch_budget=768, max_items=8, batch_size=2, shuffle=False, packing_bins=2)


def _batches(chat_checkpoint, files, data=DATA, **kw):
    path, root = files
    processor = Processor.from_pretrained(chat_checkpoint[0])
    model = load_pretrained(chat_checkpoint[0], dtype="float32")
    encoder = SampleEncoder(processor, model.config, data, data_root=root)
    return model, encoder, make_dataset(open_source(path), encoder, model.config, data, **kw)


def _inputs(batch, model, data):
    return ModelInputs(input_ids=batch["input_ids"], position_ids=batch["position_ids"].transpose(1, 0, 2),
                       segment_ids=batch["segment_ids"], rope_deltas=np.zeros(len(batch["input_ids"]), np.int32),
                       vision=batch_vision(batch, model.config, data), vision_token_index=batch["vision_token_index"])


def test_packed_rows_give_each_sample_its_own_logits(chat_checkpoint, dataset_files):
    """The key property: a packed row's logits at a sample's tokens equal that sample run alone."""
    model, encoder, ds = _batches(chat_checkpoint, dataset_files)
    batches = list(ds)
    source = open_source(dataset_files[0])
    alone = {}
    for i in range(len(source)):
        s = encoder(source[i])
        if not len(s["skips"]):
            alone[tuple(s["input_ids"].tolist())] = s
    seen, with_vision = set(), 0
    for batch in batches:
        logits = np.asarray(model.forward(_inputs(batch, model, DATA)))
        for r in range(len(batch["input_ids"])):
            seg = batch["segment_ids"][r]
            for sid in sorted(set(seg[seg > 0].tolist())):
                where = np.flatnonzero(seg == sid)
                key = tuple(batch["input_ids"][r, where].tolist())
                s = alone[key]
                assert where[-1] - where[0] + 1 == len(where)  # contiguous
                np.testing.assert_array_equal(batch["labels"][r, where], s["labels"])
                vision = index = None
                if len(s["grids"]):
                    with_vision += 1
                    vision = stack_rows([vision_inputs(s["patches"], s["grids"], model.config.vision)])
                    index = s["vision_token_index"][None]
                ids = s["input_ids"][None]
                ref = np.asarray(model.forward(ModelInputs(
                    input_ids=ids, position_ids=s["positions"].T[:, None], segment_ids=np.ones_like(ids),
                    rope_deltas=np.zeros(1, np.int32), vision=vision, vision_token_index=index)))[0]
                assert rel_err(logits[r, where], ref) <= 1e-5, key[:8]
                seen.add(key)
    assert seen == set(alone) and len(alone) == 8 and with_vision == 5
    assert sum(int(b["num_samples"].sum()) for b in batches) == 8
    skipped = skip_report(batches)
    assert skipped == {"missing_image": 1, "corrupt_image": 1, "malformed_json": 1}
    # Several samples share rows (packing happened), and the labels cover only assistant text.
    assert max(int(n) for b in batches for n in b["num_samples"]) >= 2
    assert all(((b["labels"] != -100) <= (b["segment_ids"] > 0)).all() for b in batches)


def test_resume_gives_the_same_batches(chat_checkpoint, dataset_files, tmp_path):
    """Stop after k batches, save the iterator with orbax, restore into a fresh pipeline: the next
    batches equal those of an uninterrupted run."""
    import grain
    import orbax.checkpoint as ocp

    data = DataConfig(seq_len=256, patch_budget=512, max_items=8, batch_size=1, shuffle=True, seed=3,
                      packing_bins=2, epochs=3)
    _, _, ds = _batches(chat_checkpoint, dataset_files, data)
    full = [b["input_ids"] for b in iter(ds)]
    k = 3
    it = iter(ds)
    for _ in range(k):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    _, _, ds2 = _batches(chat_checkpoint, dataset_files, data)
    it2 = iter(ds2)
    mngr.restore(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    rest = [b["input_ids"] for b in it2]
    mngr.close()
    assert len(full) > k + 2 and len(rest) == len(full) - k
    for a, b in zip(rest, full[k:]):
        np.testing.assert_array_equal(a, b)


def test_processes_read_disjoint_shards_covering_the_data(chat_checkpoint, dataset_files):
    data = DataConfig(seq_len=384, patch_budget=768, max_items=8, batch_size=1, shuffle=True, seed=1)
    seen = []
    for pid in range(2):
        _, _, ds = _batches(chat_checkpoint, dataset_files, data, process_index=pid, process_count=2)
        rows = list(ds)
        samples = {tuple(b["input_ids"][0][b["segment_ids"][0] == s].tolist())
                   for b in rows for s in set(b["segment_ids"][0].tolist()) - {0}}
        skips = sum(sum(skip_report([b]).values()) for b in rows)
        seen.append((samples, skips))
    (a, skips_a), (b, skips_b) = seen
    assert not a & b
    assert len(a) + len(b) == 8 and skips_a + skips_b == 3


def test_bad_sample_can_be_fatal(chat_checkpoint, dataset_files):
    from qwenvl_jax.data.formats import DataError

    data = DataConfig(seq_len=384, patch_budget=768, shuffle=False, on_bad_sample="raise")
    _, _, ds = _batches(chat_checkpoint, dataset_files, data)
    with pytest.raises(DataError):
        list(ds)


def test_too_long_samples_are_skipped(chat_checkpoint, dataset_files):
    data = DataConfig(seq_len=40, patch_budget=64, shuffle=False)
    _, _, ds = _batches(chat_checkpoint, dataset_files, data)
    report = skip_report(list(ds))
    assert report["too_long"] >= 5 and set(report) <= set(REASONS)


def test_stats_cli(chat_checkpoint, dataset_files, capsys):
    from qwenvl_jax.data.__main__ import main

    path, root = dataset_files
    assert main(["--checkpoint", str(chat_checkpoint[0]), "--data", str(path), "--seq-len", "384",
                 "--patch-budget", "768", "--stats"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["samples"] == 8 and stats["records"] == 11
    assert stats["skipped"] == {"missing_image": 1, "corrupt_image": 1, "malformed_json": 1}
    assert 0 < stats["packing_efficiency"] <= 1 and stats["batches"] == stats["rows"] >= 2
    assert stats["samples_per_s"] > 0
    assert main(["--checkpoint", str(chat_checkpoint[0]), "--data", str(root / "nope.jsonl")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def _samples(batches):
    return sorted(tuple(b["input_ids"][r][b["segment_ids"][r] == sid].tolist())
                  for b in batches for r in range(len(b["input_ids"]))
                  for sid in set(b["segment_ids"][r].tolist()) - {0})


def test_worker_processes_see_every_sample_once(chat_checkpoint, dataset_files):
    """Two grain worker processes (each packs its own slice of the data, so rows differ from the
    in-process run): every sample exactly once and the same skip counts."""
    import dataclasses

    base = dataclasses.replace(DATA, shuffle=True, seed=5)
    _, _, ds0 = _batches(chat_checkpoint, dataset_files, base)
    _, _, ds2 = _batches(chat_checkpoint, dataset_files, dataclasses.replace(base, workers=2))
    a, b = list(ds0), list(ds2)
    assert _samples(a) == _samples(b) and len(_samples(a)) == 8
    assert skip_report(a) == skip_report(b)


def test_make_dataset_resolves_media_against_the_data_files_directory(tmp_path, monkeypatch):
    """The data-root rule through the library reader: with no data_root, make_dataset resolves a
    JSONL's relative media paths against the file's directory, not the current one; an explicit
    data_root overrides it (and the caller's encoder is left as it was)."""
    from qwenvl_jax.train.loop import preset_config
    from qwenvl_jax.train.synthetic import write_synthetic_dataset

    tok = write_synthetic_dataset(tmp_path / "tok", samples=1)  # a tiny tokenizer + processor config
    processor = Processor.from_pretrained(tok)
    config = preset_config("tiny", processor)
    data_dir, elsewhere, other_root = tmp_path / "data", tmp_path / "elsewhere", tmp_path / "other"
    for d in (data_dir / "img", elsewhere, other_root):
        d.mkdir(parents=True)
    _picture(data_dir / "img/a.png", (60, 90), 0)
    (data_dir / "train.jsonl").write_text(json.dumps(_qa("What is it?", "Noise.", "img/a.png")) + "\n")
    monkeypatch.chdir(elsewhere)  # no img/ here
    data = DataConfig(seq_len=256, patch_budget=512, max_items=4, batch_size=1, shuffle=False, packing_bins=1)

    def read(data_root):
        encoder = SampleEncoder(processor, config, data, data_root=data_root)
        batches = list(make_dataset(open_source("../data/train.jsonl"), encoder, config, data))
        assert encoder.data_root == (None if data_root is None else os.path.abspath(data_root))
        return sum(int(b["num_samples"].sum()) for b in batches), dict(skip_report(batches))

    assert read(None) == (1, {})  # ../data/img/a.png
    assert read("../other") == (0, {"missing_image": 1})  # ../other/img/a.png: not there
    assert read(str(data_dir)) == (1, {})


def test_hostile_records_are_counted_skips(chat_checkpoint, tmp_path, capsys):
    """Every hostile line (tests/data/hostile_records.py) through the whole pipeline (--stats): a
    counted skip, and the good record still trains; exit status 0."""
    from hostile_records import GOOD, hostile_lines

    from qwenvl_jax.data.__main__ import main

    _picture(tmp_path / "a.png", (60, 90), 0)
    lines = hostile_lines(n_random=100) + [json.dumps(GOOD)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["--checkpoint", str(chat_checkpoint[0]), "--data", str(tmp_path / "d.jsonl"), "--seq-len", "384",
                 "--patch-budget", "768", "--stats"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["records"] == len(lines) and stats["samples"] >= 1
    assert stats["samples"] + sum(stats["skipped"].values()) == len(lines)
    assert set(stats["skipped"]) <= set(REASONS)

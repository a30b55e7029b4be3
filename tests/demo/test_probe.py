"""qwenvl_jax.demo.probe: the teacher-forced answer NLL equals transformers' on the same tokens, a
picture that is already white scores the same as its blank twin, and the embedding statistics are
those of the HF model's image features."""

import json

import numpy as np
import pytest
import torch
from hf_reference import hf_logits
from PIL import Image
from transformers import AutoTokenizer

from qwenvl_jax.demo import probe
from qwenvl_jax.pretrained import load_pretrained
from qwenvl_jax.processing.processor import Processor


@pytest.fixture(scope="module")
def loaded(chat_checkpoint):
    path = chat_checkpoint[0]
    return load_pretrained(path, dtype="float32"), Processor.from_pretrained(path)


def _messages(question):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _noise(seed, size=(70, 90)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def test_answer_logprobs_match_transformers(chat_checkpoint, loaded):
    path, hf_model, ids = chat_checkpoint
    model, processor = loaded
    answer, image = "A pattern of noise.", _noise(0)
    ours = -np.mean(probe.answer_logprobs(model, processor, _messages("What is it?"), answer, [image])[1])
    # Reference: HF logits on the full conversation; the answer is located by HF's own tokenizer as
    # the tokens before the template's closing "<|im_end|>\n".
    full = processor.apply_chat_template(_messages("What is it?") + [
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}], add_generation_prompt=False)
    batch = processor(text=[full], images=[image])
    tokens = np.asarray(batch["input_ids"][0])
    target = AutoTokenizer.from_pretrained(path)(answer)["input_ids"] + [ids["eos_token_id"]]
    start = len(tokens) - 1 - len(target)
    assert tokens[start:start + len(target)].tolist() == target
    logits = hf_logits(hf_model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])[0]
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()
    want = -np.mean([logp[p - 1, tokens[p]] for p in range(start, start + len(target))])
    assert ours == pytest.approx(want, rel=1e-4)


def test_white_picture_scores_like_its_blank_twin(loaded, tmp_path):
    model, processor = loaded
    for k, image in enumerate([Image.new("RGB", (84, 56), (255, 255, 255)), _noise(1, (56, 84))]):
        image.save(tmp_path / f"{k}.png")
    records = [{"image": f"{k}.png", "conversations": [{"from": "human", "value": "<image>How many?"},
                                                         {"from": "gpt", "value": "2"}],
                "meta": {"task": task, "answer": "2"}} for k, task in enumerate(["count", "attribute"])]
    out = probe.picture_reliance(probe.score_first_answers(model, processor, records, tmp_path))
    assert out["count"]["real"] == out["count"]["blank"] and out["count"]["n"] == 1
    assert out["attribute"]["real"] != out["attribute"]["blank"]  # noise is not white: the tiny model notices


def test_embedding_stats_are_the_image_features(chat_checkpoint, loaded):
    _, hf_model, _ = chat_checkpoint
    model, processor = loaded
    image = _noise(2)
    batch = processor(text=[processor.apply_chat_template(_messages("Hi"), add_generation_prompt=True)],
                      images=[image])
    stats = probe.embedding_stats(model, batch, processor.image_token_id)
    with torch.no_grad():
        feats = hf_model.model.get_image_features(torch.as_tensor(np.asarray(batch["pixel_values"])),
                                                  torch.as_tensor(np.asarray(batch["image_grid_thw"])))
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    f = torch.cat(list(feats)).double().numpy() if isinstance(feats, (list, tuple)) else feats.double().numpy()
    assert stats["image_tokens"] == len(f)
    assert stats["image_rms"] == pytest.approx(np.sqrt(np.mean(f * f)), rel=1e-4)
    varying = f - f.mean(0)
    assert stats["image_varying_rms"] == pytest.approx(np.sqrt(np.mean(varying * varying)), rel=1e-4)


def test_cli_reports_json_and_user_errors(chat_checkpoint, tmp_path, capsys):
    _noise(3).save(tmp_path / "a.png")
    rec = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>Color?"},
                                               {"from": "gpt", "value": "red"}], "meta": {"task": "attribute"}}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    assert probe.main(["--checkpoint", str(chat_checkpoint[0]), "--data", str(tmp_path / "d.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["nll"]) == {"attribute"} and out["embeddings"]["image_tokens"] > 0
    assert probe.main(["--checkpoint", str(tmp_path), "--data", str(tmp_path / "d.jsonl")]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_coordinate_nll_matches_transformers_by_digit_place(chat_checkpoint, loaded, tmp_path):
    path, hf_model, ids = chat_checkpoint
    model, processor = loaded
    _noise(4).save(tmp_path / "a.png")
    answer = '[{"bbox_2d":[152,8,77,310],"label":"red circle"}]'
    rec = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>Locate the red circle."},
                                               {"from": "gpt", "value": answer}],
           "meta": {"task": "ground", "answer": answer}}
    ours = probe.coordinate_nll(processor.tokenizer, probe.score_first_answers(model, processor, [rec], tmp_path))
    # Every digit is one token in this tokenizer (as in Qwen's): the places follow from the numbers.
    assert {c: set(p) for c, p in ours.items()} == {
        "x1": {"hundreds", "tens", "units"}, "y1": {"units"}, "x2": {"tens", "units"},
        "y2": {"hundreds", "tens", "units"}}
    # Reference: HF log-probs of the answer tokens; each digit found by the HF tokenizer's offsets.
    messages = _messages("Locate the red circle.")
    full = processor.apply_chat_template(messages + [
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}], add_generation_prompt=False)
    batch = processor(text=[full], images=[Image.open(tmp_path / "a.png")])
    tokens = np.asarray(batch["input_ids"][0])
    enc = AutoTokenizer.from_pretrained(path)(answer, return_offsets_mapping=True)
    start = len(tokens) - 2 - len(enc["input_ids"])  # answer, <|im_end|>, "\n"
    assert tokens[start:start + len(enc["input_ids"])].tolist() == enc["input_ids"]
    logits = hf_logits(hf_model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])[0]
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()
    at_char = {a: start + i for i, (a, b) in enumerate(enc["offset_mapping"]) if b == a + 1}
    nll = lambda s: -logp[at_char[s] - 1, tokens[at_char[s]]]  # noqa: E731
    box = answer.index("152")
    assert ours["x1"]["hundreds"] == pytest.approx(nll(box), rel=1e-4)
    assert ours["x1"]["units"] == pytest.approx(nll(box + 2), rel=1e-4)
    assert ours["y1"]["units"] == pytest.approx(nll(answer.index(",8,") + 1), rel=1e-4)
    assert ours["y2"]["tens"] == pytest.approx(nll(answer.index("310") + 1), rel=1e-4)


def test_coordinate_tokens_name_every_place():
    answer = '[{"bbox_2d":[12345,7,80,9],"label":"x"}]'
    spans = [(k, k + 1) for k in range(len(answer))]  # one character per token
    places = [(c, p) for _, c, p in probe.coordinate_tokens(answer, spans)]
    assert places[:5] == [("x1", "10^4"), ("x1", "thousands"), ("x1", "hundreds"), ("x1", "tens"), ("x1", "units")]
    assert places[5:] == [("y1", "units"), ("x2", "tens"), ("x2", "units"), ("y2", "units")]
    two = [(0, 2)] + [(k, k + 1) for k in range(2, len(answer))]  # "[{" as one token: nothing inside a number
    assert [(i + 1, c, p) for i, c, p in probe.coordinate_tokens(answer, two)] == probe.coordinate_tokens(answer, spans)
    merged = [(k, k + 1) for k in range(13)] + [(13, 15)] + [(k, k + 1) for k in range(15, len(answer))]
    assert ("x1", "number") in [(c, p) for _, c, p in probe.coordinate_tokens(answer, merged)]

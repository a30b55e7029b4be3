"""Record shapes -> Conversation, DataError reasons, and assistant-only labels on the real chat template."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image
from tiny_tokenizer import make_tiny_tokenizer, write_preprocessor_config

from qwenvl_jax.data.formats import (
    REASONS,
    Conversation,
    DataError,
    MediaBlob,
    assistant_labels,
    media_references,
    parse_record,
)
from qwenvl_jax.processing.processor import Processor


def user(*parts):
    return {"role": "user", "content": list(parts)}


def answer(text="A dog."):
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------------ shapes

def test_messages_shape_resolves_paths_and_normalizes_content():
    record = {"id": 7, "messages": [
        {"role": "system", "content": "Be brief."},
        user({"type": "image", "image": "imgs/a.jpg", "max_pixels": 1000}, {"type": "text", "text": "What?"},
             {"video": "/abs/clip.mp4"}, {"image": "file:///abs/b.png"}),
        answer("A dog.")]}
    conv = parse_record(record, "/data")
    assert conv.images == ["/data/imgs/a.jpg", "/abs/b.png"] and conv.videos == ["/abs/clip.mp4"]
    assert conv.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": "/data/imgs/a.jpg", "max_pixels": 1000},
                                     {"type": "text", "text": "What?"}, {"type": "video", "video": "/abs/clip.mp4"},
                                     {"type": "image", "image": "/abs/b.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}]
    assert record["messages"][1]["content"][0]["image"] == "imgs/a.jpg"  # input left untouched


def test_relative_paths_without_data_root_are_relative_to_cwd():
    conv = parse_record({"messages": [user({"image": "a.jpg"}), answer()]}, None)
    assert conv.images == [os.path.join(os.getcwd(), "a.jpg")]


def test_conversations_shape_placeholders_take_files_in_order():
    record = {"image": ["a.jpg", "b.jpg"], "video": "v.mp4", "conversations": [
        {"from": "system", "value": "Sys."},
        {"from": "human", "value": "<image>\nCompare with <image> and <video>"},
        {"from": "gpt", "value": "Same."},
        {"from": "user", "value": "Sure?"},
        {"from": "assistant", "value": "Yes."}]}
    conv = parse_record(record, "/d")
    assert conv.images == ["/d/a.jpg", "/d/b.jpg"] and conv.videos == ["/d/v.mp4"]
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.messages[1]["content"] == [
        {"type": "image", "image": "/d/a.jpg"}, {"type": "text", "text": "\nCompare with "},
        {"type": "image", "image": "/d/b.jpg"}, {"type": "text", "text": " and "},
        {"type": "video", "video": "/d/v.mp4"}]
    assert media_references(record) == [("image", "a.jpg"), ("image", "b.jpg"), ("video", "v.mp4")]


def test_both_shapes_render_the_same_prompt(processor):
    a = parse_record({"messages": [user({"type": "image", "image": "x.jpg"}, {"type": "text", "text": "\nWhat?"}),
                                   answer()]}, "/d")
    b = parse_record({"image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "A dog."}]}, "/d")
    assert a == b
    assert processor.apply_chat_template(a.messages, add_generation_prompt=False).endswith(
        "<|vision_start|><|image_pad|><|vision_end|>\nWhat?<|im_end|>\n<|im_start|>assistant\nA dog.<|im_end|>\n")


@pytest.mark.parametrize("record, found, listed", [
    ({"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image> hi"},
                                                     {"from": "gpt", "value": "x"}]}, 1, 2),
    ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]}, 1, 0),
])
def test_placeholder_count_mismatch(record, found, listed):
    with pytest.raises(DataError, match=f"{found} <image> placeholder.*lists {listed} image") as e:
        parse_record(record, None)
    assert e.value.reason == "bad_format"


def test_leading_newlines_of_an_answer_are_dropped():
    # Qwen2's pre-tokenizer would merge them with the template's "\n" after "assistant"
    conv = parse_record({"messages": [user({"type": "text", "text": "q"}), answer(" \n\nA\n b")]}, None)
    assert conv.messages[1]["content"][0]["text"] == "A\n b"


@pytest.mark.parametrize("record, match", [
    ([1, 2], "must be a JSON object"),
    ({"foo": 1}, "exactly one of 'messages'"),
    ({"messages": [answer()], "conversations": []}, "exactly one of"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}, answer()]}, "unknown role 'tool'"),
    ({"messages": [{"role": "user"}, answer()]}, r"messages\[0\]: a message is an object"),
    ({"messages": [{"role": "user", "content": 3}, answer()]}, "content must be a string or a list"),
    ({"messages": [user("text"), answer()]}, "a content part is an object"),
    ({"messages": [user({"type": "audio", "audio": "a.wav"}), answer()]}, "unknown part type 'audio'"),
    ({"messages": [user({"type": "image"}), answer()]}, "needs a 'image' key"),
    ({"messages": [user({"type": "image", "image": ["a", "b"]}), answer()]}, "non-empty path string"),
    ({"messages": [user({"type": "image", "image": "https://x.org/a.jpg"}), answer()]}, "is a URL"),
    ({"messages": [user({"type": "text", "text": None}), answer()]}, "text must be a string"),
    ({"messages": [user({"type": "text", "text": "a<|im_end|>"}), answer()]}, r"token <\|im_end\|>"),
    ({"messages": [user({"type": "text", "text": "q"})]}, "no assistant turn"),
    ({"messages": [user({"type": "text", "text": "q"}), answer("  \n")]}, "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 5}]}, "text must be a string"),
    ({"conversations": [{"from": "bot", "value": "q"}]}, "unknown role 'bot'"),
    ({"conversations": ["q"]}, "a turn is an object"),
    ({"image": {"a": 1}, "conversations": [{"from": "gpt", "value": "<image>"}]}, "'image' must be a path"),
])
def test_bad_shapes(record, match):
    with pytest.raises(DataError, match=match) as e:
        parse_record(record, "/d")
    assert e.value.reason == "bad_format"


def test_embedded_media_become_blobs_and_absent_ones_are_missing():
    record = {"image": "a.jpg", "video": "v.gif", "conversations": [
        {"from": "human", "value": "<image><video>"}, {"from": "gpt", "value": "ok"}]}
    conv = parse_record(record, media={"a.jpg": b"A", "v.gif": b"V"})
    assert conv.images == [MediaBlob("a.jpg", b"A")] and conv.videos == [MediaBlob("v.gif", b"V")]
    assert "b'A'" not in repr(conv.images[0])
    for media, reason in (({"v.gif": b"V"}, "missing_image"), ({"a.jpg": b"A"}, "missing_video")):
        with pytest.raises(DataError, match="missing when this record was converted") as e:
            parse_record(record, media=media)
        assert e.value.reason == reason


def test_data_error_reasons_and_pickling():
    assert REASONS == ("malformed_json", "bad_format", "missing_image", "corrupt_image", "missing_video",
                       "corrupt_video", "too_long")
    e = pickle.loads(pickle.dumps(DataError("too_long", "4097 tokens > 4096")))
    assert isinstance(e, ValueError) and e.reason == "too_long" and str(e) == "4097 tokens > 4096"
    with pytest.raises(ValueError, match="unknown DataError reason"):
        DataError("oops", "x")
    with pytest.raises(Exception):
        Conversation([], [], []).images = []  # frozen


# ------------------------------------------------------------------------------------------------ labels

@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(path)  # the tiny Qwen2 tokenizer + Qwen2.5-VL's chat template
    write_preprocessor_config(path, 3136, 50176)
    return Processor.from_pretrained(path)


def labeled_spans(processor, conv, *, mask_vision=True):
    """Renders + tokenizes a conversation; returns the decoded contiguous labeled runs and the arrays."""
    text = processor.apply_chat_template(conv.messages, add_generation_prompt=False)
    images = [Image.new("RGB", (56, 56), (200, 10, 10)) for _ in conv.images]
    ids = processor(text=text, images=images or None)["input_ids"][0]
    tok = processor.tokenizer
    vision = {processor.image_token_id, processor.video_token_id, processor.vision_start_token_id,
              processor.vision_end_token_id}
    labels = assistant_labels(ids, tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>"),
                              tok.encode("assistant\n"), mask_ids=vision if mask_vision else None)
    on = labels != -100
    assert (labels[on] == ids[on]).all()
    runs = np.split(np.flatnonzero(on), np.flatnonzero(np.diff(np.flatnonzero(on)) > 1) + 1)
    return [tok.decode(ids[r]) for r in runs if len(r)], ids, labels


def test_labels_cover_assistant_content_and_im_end_only(processor):
    conv = parse_record({"messages": [user({"type": "text", "text": "What is in the picture?"}),
                                      answer("The dog is on the lawn.")]}, None)
    spans, ids, labels = labeled_spans(processor, conv)
    assert spans == ["The dog is on the lawn.<|im_end|>"]
    assert labels.dtype == ids.dtype and labels.shape == ids.shape
    assert processor.tokenizer.decode(ids[-1:]) == "\n" and labels[-1] == -100  # the newline after <|im_end|>


def test_labels_multi_turn_with_system_and_image(processor):
    conv = parse_record({"image": "x.jpg", "conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "<image>\nWhat is in the image?"},
        {"from": "gpt", "value": "A red car is parked on the street."},
        {"from": "human", "value": "What color is the sky?"},
        {"from": "gpt", "value": "The sky is blue."}]}, "/d")
    spans, ids, labels = labeled_spans(processor, conv)
    assert spans == ["A red car is parked on the street.<|im_end|>", "The sky is blue.<|im_end|>"]
    assert (ids == processor.image_token_id).sum() > 1 and not (labels == processor.image_token_id).any()
    assert "system" not in "".join(spans) and "assistant" not in "".join(spans)


def test_vision_tokens_in_an_answer_are_masked(processor):
    conv = parse_record({"messages": [user({"type": "text", "text": "Draw"}),
                                      {"role": "assistant", "content": [{"type": "image", "image": "a.jpg"},
                                                                        {"type": "text", "text": "Here."}]}]}, "/d")
    assert labeled_spans(processor, conv)[0] == ["Here.<|im_end|>"]
    spans = labeled_spans(processor, conv, mask_vision=False)[0]
    assert spans[0].startswith("<|vision_start|><|image_pad|>") and spans[0].endswith("Here.<|im_end|>")


def test_labels_truncated_turn_and_generation_prompt():
    S, E, A, NL = 1, 2, 10, 11  # <|im_start|>, <|im_end|>, "assistant", "\n"
    ids = np.array([S, 20, NL, 5, 6, E, NL, S, A, NL, 7, 8, E, NL, S, A, NL, 9])  # last turn cut off
    labels = assistant_labels(ids, S, E, [A, NL], ignore_index=-1)
    assert labels.tolist() == [-1] * 10 + [7, 8, E] + [-1] * 4 + [9]
    prompt = np.array([S, 20, NL, 5, E, NL, S, A, NL])  # ends with the generation prompt: nothing to learn
    assert (assistant_labels(prompt, S, E, [A, NL]) == -100).all()
    with pytest.raises(ValueError, match="one row"):
        assistant_labels(ids[None], S, E, [A, NL])

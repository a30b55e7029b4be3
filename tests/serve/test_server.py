"""python -m qwenvl_jax.serve as a client sees it: a subprocess on a tiny checkpoint, spoken to with
the official `openai` client. Greedy answers equal generate's; streamed equals plain; concurrent
requests each get their one-at-a-time answer; a client that goes away frees its slot; bad input
gets a 400 in OpenAI's error shape and the server keeps serving; auth is enforced."""

import base64
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from qwenvl_jax.generation.decode import generate  # noqa: E402
from qwenvl_jax.pretrained import load_pretrained  # noqa: E402
from qwenvl_jax.processing.processor import Processor  # noqa: E402
from qwenvl_jax.processing.video_io import read_video  # noqa: E402

KEY = "test-key"
MAX_SEQ_LEN = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (90, 120)), ("b.png", (140, 70))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name)
    frames = [Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)) for _ in range(8)]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    return root


@pytest.fixture(scope="module")
def server(chat_checkpoint, media, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    cmd = [sys.executable, "-m", "qwenvl_jax.serve", "--checkpoint", str(chat_checkpoint[0]), "--port", str(port),
           "--max-batch", "4", "--max-seq-len", str(MAX_SEQ_LEN), "--dtype", "float32", "--api-key", KEY,
           "--allowed-media-dir", str(media), "--served-model-name", "tiny", "--steps-per-call", "2",
           "--warm-up-prompt-tokens", "64"]
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's machine
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield base, proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _data_url(path, mime):
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _cases(media):
    """(OpenAI content parts, the same as template parts, images, video path or None)."""
    a, b, clip = media / "a.png", media / "b.png", media / "clip.gif"
    text = {"type": "text", "text": "What is in it?"}
    return {
        "text": ([text], [text], [], None),
        "image": ([{"type": "image_url", "image_url": {"url": _data_url(a, "image/png")}}, text],
                  [{"type": "image"}, text], [a], None),
        "two_images": ([{"type": "image_url", "image_url": {"url": f"file://{a}"}},
                        {"type": "image_url", "image_url": {"url": _data_url(b, "image/png")}}, text],
                       [{"type": "image"}, {"type": "image"}, text], [a, b], None),
        "video": ([{"type": "video_url", "video_url": {"url": _data_url(clip, "image/gif")}}, text],
                  [{"type": "video"}, text], [], clip),
    }


@pytest.fixture(scope="module")
def references(chat_checkpoint, media):
    """generate's greedy answer (text, token count) per case, 8 new tokens."""
    path = chat_checkpoint[0]
    processor, model = Processor.from_pretrained(path), load_pretrained(path, dtype="float32")
    out = {}
    for name, (_, parts, images, video) in _cases(media).items():
        prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        videos, fps = [], 2.0
        if video is not None:
            frames, fps = read_video(video, fps=2.0)
            videos = [frames]
        batch = processor(text=prompt, images=[Image.open(p) for p in images] or None, videos=videos or None,
                          fps=fps)
        ids = generate(model, model.prepare(**batch), max_new_tokens=8, eos_token_ids=processor.eos_token_ids,
                       pad_token_id=processor.pad_token_id).token_ids[0]
        out[name] = (processor.decode(ids), len(ids), int(batch["attention_mask"].sum()))
    return out


@pytest.mark.parametrize("case", ["text", "image", "two_images", "video"])
def test_greedy_answers_equal_generate_plain_and_streamed(client, media, references, case):
    content = _cases(media)[case][0]
    messages = [{"role": "user", "content": content}]
    text, n_tokens, prompt_tokens = references[case]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].message.content == text
    assert plain.usage.completion_tokens == n_tokens and plain.usage.prompt_tokens == prompt_tokens
    assert plain.choices[0].finish_reason == ("length" if n_tokens == 8 else "stop")
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens


def test_concurrent_requests_each_get_their_one_at_a_time_answer(client):
    words = "the cat sat on a mat and then it ran far away to see the big red sun".split()
    requests = [(" ".join(words[: 2 + i]), 3 + (i * 5) % 17) for i in range(16)]

    def ask(request):
        prompt, max_tokens = request
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [ask(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    assert all(n <= m for (_, n), (_, m) in zip(alone, requests))


def _health(base):
    with urllib.request.urlopen(base + "/health", timeout=5) as r:
        return json.loads(r.read())


def test_a_client_that_goes_away_frees_its_slot(server, client):
    base = server[0]
    before = _health(base)["decode_steps"]
    streams = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell a story."}],
                                              max_tokens=MAX_SEQ_LEN - 100, temperature=0.9, seed=i, stream=True)
               for i in range(4)]  # every slot busy for hundreds of steps
    for s in streams:
        next(iter(s))
        s.close()  # the client disconnects mid-stream
    deadline = time.time() + 60
    while _health(base)["busy_slots"] and time.time() < deadline:
        time.sleep(0.2)
    assert _health(base)["busy_slots"] == 0
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       temperature=0)
    assert r.usage.completion_tokens <= 2
    assert _health(base)["decode_steps"] - before < (MAX_SEQ_LEN - 100) // 2  # the long ones were cut short


def _post(base, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + "/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


TEXT = {"type": "text", "text": "Hi"}


@pytest.mark.parametrize("body,status,param", [
    (None, 400, None),  # not JSON
    ({"model": "tiny"}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages[0].role"),
    ({"messages": _user({"type": "input_audio", "input_audio": {}})}, 400, "messages[0].content[0].type"),
    ({"messages": _user({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}, TEXT)}, 400,
     "messages[0].content[0]"),
    ({"messages": _user({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                            + base64.b64encode(b"not an image").decode()}}, TEXT)},
     400, "messages[0].content[0]"),
    ({"messages": _user({"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}, TEXT)}, 400,
     "messages[0].content[0]"),
    ({"messages": _user({"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}, TEXT)}, 400,
     "messages[0].content[0]"),
    ({"messages": _user(TEXT), "temperature": -1}, 400, "temperature"),
    ({"messages": _user(TEXT), "temperature": "hot"}, 400, "temperature"),
    ({"messages": _user(TEXT), "top_p": 0}, 400, "top_p"),
    ({"messages": _user(TEXT), "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"messages": _user(TEXT), "n": 2}, 400, "n"),
    ({"messages": _user(TEXT), "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),
    ({"messages": _user(TEXT), "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": _user(TEXT), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": _user(TEXT), "model": "gpt-4o"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "Hi " * 2000}]}, 400, "messages"),
])
def test_bad_input_is_a_400_in_openai_shape_and_the_server_keeps_serving(server, body, status, param):
    base = server[0]
    code, answer = _post(base, body, raw=b"{not json" if body is None else None)
    assert code == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    ok, answer = _post(base, {"messages": _user(TEXT), "max_tokens": 1})
    assert ok == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def test_auth_and_models(server):
    base = server[0]
    for key in (None, "wrong"):
        code, answer = _post(base, {"messages": _user(TEXT)}, key=key)
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    models = openai.OpenAI(base_url=base + "/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert _health(base)["status"] == "ok"  # health needs no key


def test_stop_strings_end_the_answer(client, references):
    text = references["text"][0]
    assert len(text) >= 5, text  # the seeded tiny model's answer is long enough to cut
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in it?"}]}]
    stop = text[3:5]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"

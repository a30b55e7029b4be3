"""Media URLs of chat requests, against a local HTTP server: data: and http(s) images and videos load
as the files do; oversized, slow, missing, non-media and out-of-directory URLs are one MediaError."""

import base64
import http.server
import threading
import time

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.processing.image import load_image as load_file
from qwenvl_jax.processing.video_io import read_video
from qwenvl_jax.serve import media
from qwenvl_jax.serve.media import MediaError, load_image, load_video


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / "a.png")
    frames = [Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)) for _ in range(6)]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    (root / "big.bin").write_bytes(b"\0" * 4096)
    (root / "notes.txt").write_text("not a picture")
    return root


@pytest.fixture(scope="module")
def web(files):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(files), **kw)

        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(2)
            return super().do_GET()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a client that timed out on /slow.png: expected
            pass

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _data(path, mime):
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_urls_load_as_the_files_do(files, web):
    picture = np.asarray(load_file(files / "a.png"))
    for url in (_data(files / "a.png", "image/png"), f"{web}/a.png", f"file://{files / 'a.png'}"):
        np.testing.assert_array_equal(np.asarray(load_image(url, files)), picture)
    frames, fps = read_video(files / "clip.gif", fps=2.0)
    for url in (_data(files / "clip.gif", "image/gif"), f"{web}/clip.gif"):
        got, got_fps = load_video(url, files, fps=2.0)
        np.testing.assert_array_equal(got, frames)
        assert got_fps == fps


@pytest.mark.parametrize("url,needle", [
    ("{web}/missing.png", "cannot fetch image"),
    ("{web}/notes.txt", "cannot read image"),
    ("{web}/slow.png", "cannot fetch image"),
    ("{web}/big.bin", "larger than 1024 bytes"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png,abc", "data:<mime>;base64"),
    ("file:///etc/hostname", "outside --allowed-media-dir"),
    ("gopher://x/a.png", "scheme 'gopher' is not supported"),
    ("", "non-empty string"),
])
def test_bad_urls_are_one_media_error(files, web, monkeypatch, url, needle):
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 1024 if "big" in url else media.MAX_MEDIA_BYTES)
    monkeypatch.setattr(media, "FETCH_TIMEOUT_S", 0.5)
    with pytest.raises(MediaError, match=needle):
        load_image(url.format(web=web), files)


def test_file_urls_need_an_allowed_directory(files):
    with pytest.raises(MediaError, match="without --allowed-media-dir"):
        load_image(f"file://{files / 'a.png'}", None)

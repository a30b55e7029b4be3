"""Images and videos named in chat requests: `data:` base64 URLs, `http(s)` URLs (fetched with a
timeout and a size cap) and `file://` paths inside an allowed directory, as PIL images and video
frames. Every failure is a MediaError whose message names the part; the server answers it with 400."""

from __future__ import annotations

import base64
import binascii
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from qwenvl_jax.data.formats import DataError, MediaBlob
from qwenvl_jax.data.sources import open_image, open_video

MAX_MEDIA_BYTES = 64 * 2**20  # one fetched or inlined file
FETCH_TIMEOUT_S = 10.0


class MediaError(ValueError):
    """A media part that cannot be used; the message names it."""


def _suffix(mime: str, kind: str) -> str:
    guessed = mimetypes.guess_extension(mime or "") or ""
    return guessed if guessed else (".png" if kind == "image" else ".mp4")


def _data_url(url: str, kind: str) -> tuple[str, bytes]:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise MediaError(f"{kind} data URL must be data:<mime>;base64,<data>")
    if len(payload) > MAX_MEDIA_BYTES * 4 // 3 + 4:
        raise MediaError(f"{kind} data URL is larger than {MAX_MEDIA_BYTES} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{kind} data URL is not valid base64") from None
    mime = header[5:].split(";")[0]
    return f"inline{_suffix(mime, kind)}", data


def _http(url: str, kind: str) -> tuple[str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            data = response.read(MAX_MEDIA_BYTES + 1)
            mime = response.headers.get_content_type()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise MediaError(f"cannot fetch {kind} {url[:200]}: {getattr(e, 'reason', e)}") from None
    if len(data) > MAX_MEDIA_BYTES:
        raise MediaError(f"{kind} {url[:200]} is larger than {MAX_MEDIA_BYTES} bytes")
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    return (name if Path(name).suffix else name + _suffix(mime, kind)), data


def _local(url: str, kind: str, allowed_dir: Path | None) -> str:
    if allowed_dir is None:
        raise MediaError(f"{kind} file:// URLs are refused: the server was started without --allowed-media-dir")
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).resolve()
    if not path.is_relative_to(allowed_dir):
        raise MediaError(f"{kind} {path} is outside --allowed-media-dir")
    if not path.exists():
        raise MediaError(f"{kind} {path} does not exist")
    return str(path)


def fetch(url, kind: str, allowed_dir: Path | None):
    """A media URL -> a local path (file://) or a MediaBlob (data:, http(s))."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{kind}_url.url must be a non-empty string")
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme == "data":
        return MediaBlob(*_data_url(url, kind))
    if scheme in ("http", "https"):
        return MediaBlob(*_http(url, kind))
    if scheme == "file":
        return _local(url, kind, allowed_dir)
    raise MediaError(f"{kind} URL scheme {scheme or '(none)'!r} is not supported; use data:, http(s) or file://")


def load_image(url, allowed_dir: Path | None = None):
    try:
        return open_image(fetch(url, "image", allowed_dir))
    except DataError as e:
        raise MediaError(str(e)) from None


def load_video(url, allowed_dir: Path | None = None, **read_options):
    """-> (frames uint8 [F, H, W, 3], sample fps), sampled as read_video samples."""
    source = fetch(url, "video", allowed_dir)
    try:
        return open_video(source, **read_options)
    except DataError as e:
        raise MediaError(str(e)) from None


def allowed_media_dir(path) -> Path | None:
    if path is None:
        return None
    resolved = Path(path).resolve()
    if not resolved.is_dir():
        raise ValueError(f"--allowed-media-dir {path} is not a directory")
    return resolved

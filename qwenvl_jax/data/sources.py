"""Random-access record sources for grain (JSONL, ArrayRecord) and media loading with skip reasons.

Sources return raw bytes and never parse: a malformed record must become a counted DataError in
the transform, not an exception inside grain's reader. `to_conversation` turns either source's
bytes into a Conversation, and `open_media` loads its images and videos.

    source = JsonlSource("data/train.jsonl")             # or ArrayRecordSource("train.arrayrecord")
    conversation = to_conversation(source[i], resolve_data_root(source.path))  # media under data/
    media = open_media(conversation)
    batch = processor(text=..., images=media.images or None, videos=media.videos or None, fps=media.fps)
"""

from __future__ import annotations

import io
import json
import operator
import os
import struct
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from qwenvl_jax.data.formats import (
    BAD_FORMAT,
    CORRUPT_IMAGE,
    CORRUPT_VIDEO,
    MALFORMED_JSON,
    MISSING_IMAGE,
    MISSING_VIDEO,
    Conversation,
    DataError,
    MediaBlob,
    media_references,
    parse_record,
)
from qwenvl_jax.processing.image import ImageLoadError, check_decoded_size, load_image
from qwenvl_jax.processing.video_io import VideoLoadError, VideoOptionError, check_read_options, read_video

# ArrayRecord payload: MAGIC, uint32 little-endian header length, JSON header, the media blobs back
# to back. The leading NUL can never start a JSON line, so raw bytes tell their format apart.
MAGIC = b"\x00QVL1"
_LEN = struct.Struct("<I")


class JsonlSource:
    """A JSONL file as a grain random-access source: item i is the i-th non-blank line, as bytes.

    Line byte offsets are found by one scan at construction; pickling (for grain worker processes)
    carries only the path and the offsets, and each process opens the file on first read. The
    file descriptor is closed by `close()`, or by a weakref.finalize when the source is garbage
    collected or, at the latest, when the interpreter exits (before modules are torn down, so no
    "Exception ignored in __del__" at exit). Relative media paths in the file resolve against
    `resolve_data_root(source.path)`: the file's directory.
    """

    _open_lock = threading.Lock()  # one descriptor per source even if threads race to the first read

    def __init__(self, path):
        self.path = os.fspath(path)
        starts, ends, pos = [], [], 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    starts.append(pos)
                    ends.append(pos + len(line.rstrip(b"\r\n")))
                pos += len(line)
        self._spans = np.stack([np.asarray(starts, np.int64), np.asarray(ends, np.int64)], axis=1)  # [N, 2]
        self._fd = None
        self._closer = None

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index) -> bytes:
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records in {self.path}")
        start, end = self._spans[i].tolist()
        return os.pread(self._descriptor(), end - start, start)  # positionless read: safe across threads

    def _descriptor(self) -> int:
        if self._fd is None:
            with self._open_lock:
                if self._fd is None:
                    fd = os.open(self.path, os.O_RDONLY)
                    # The finalizer holds os.close itself, not this module's globals.
                    self._closer = weakref.finalize(self, os.close, fd)
                    self._fd = fd
        return self._fd

    def close(self) -> None:
        """Closes the file now (a later read reopens it)."""
        closer, self._fd, self._closer = self._closer, None, None
        if closer is not None:
            closer()

    def __getstate__(self):
        return {"path": self.path, "_spans": self._spans, "_fd": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _fd=None, _closer=None)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, records={len(self)})"


def resolve_data_root(data_path, data_root=None) -> str:
    """The directory that relative image/video paths inside the data file `data_path` resolve against.

    The one rule, used by the pipeline, write_array_record and every CLI: `data_root` when given
    (made absolute against the current directory), else the directory holding the data file
    (symlinks followed). Absolute media paths are used as written either way.
    """
    if data_root is not None:
        return os.path.abspath(os.fspath(data_root))
    return os.path.dirname(os.path.realpath(os.fspath(data_path)))


MAX_NESTING = 32  # a conversation record nests about 5 deep


def _nesting(value) -> int:
    """Depth of nested lists/dicts, iteratively (a hostile record must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_NESTING:
                break
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def check_record(record) -> dict:
    """A parsed record: a JSON object nested at most MAX_NESTING deep (so every later step, which
    may recurse, is safe), else DataError(bad_format)."""
    if not isinstance(record, dict):
        raise DataError(BAD_FORMAT, f"a record must be a JSON object, got {type(record).__name__}")
    if _nesting(record) > MAX_NESTING:
        raise DataError(BAD_FORMAT, f"a record nested deeper than {MAX_NESTING} levels")
    return record


def parse_line(line: bytes | str) -> dict:
    """One JSONL line -> record dict; DataError(malformed_json) if it is not JSON (or nested past
    the parser's stack, or holds an integer too long to convert), bad_format if not a shallow object."""
    try:
        record = json.loads(line)
    except RecursionError:
        raise DataError(MALFORMED_JSON, "not valid JSON: nested too deeply to parse") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past the digit limit
        raise DataError(MALFORMED_JSON, f"not valid JSON: {e}") from None
    return check_record(record)


# ------------------------------------------------------------------------------------------ ArrayRecord

def encode_record(record: dict, media: dict[str, bytes], missing: dict[str, str] | None = None) -> bytes:
    """Record + media bytes by reference (+ references absent at conversion, with why) -> one payload."""
    header = {"record": record, "media": [[ref, len(data)] for ref, data in media.items()],
              "missing": missing or {}}
    head = json.dumps(header, ensure_ascii=False).encode()
    return b"".join([MAGIC, _LEN.pack(len(head)), head, *media.values()])


def decode_record(blob: bytes) -> tuple[dict, dict[str, bytes]]:
    """An ArrayRecord payload -> (record, media bytes by reference). Missing media are simply absent."""
    blob = memoryview(blob)
    n = len(MAGIC) + _LEN.size
    if len(blob) < n or bytes(blob[:len(MAGIC)]) != MAGIC:
        raise DataError(BAD_FORMAT, "not a qwenvl_jax ArrayRecord payload (bad magic)")
    (size,) = _LEN.unpack(blob[len(MAGIC):n])
    try:
        header = json.loads(bytes(blob[n:n + size]))
    except (ValueError, RecursionError) as e:
        raise DataError(MALFORMED_JSON, f"ArrayRecord header is not valid JSON: {e}") from None
    media, at = {}, n + size
    try:
        for ref, length in header["media"]:
            if not isinstance(ref, str) or not isinstance(length, int) or length < 0:
                raise TypeError(f"media entry {[ref, length]!r}")
            media[ref] = bytes(blob[at:at + length])
            at += length
        record = header["record"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(BAD_FORMAT, f"ArrayRecord header is not ours ({type(e).__name__}: {e})") from None
    if at != len(blob):
        raise DataError(BAD_FORMAT, f"ArrayRecord payload holds {len(blob)} bytes, its header describes {at}")
    return check_record(record), media


def write_array_record(jsonl_path, out_path, data_root=None) -> dict[str, int]:
    """JSONL -> ArrayRecord file whose records embed every referenced image/video file's bytes.

    Relative media paths resolve against `resolve_data_root(jsonl_path, data_root)`: data_root when
    given, else the JSONL file's directory. Training then reads one file sequence instead of many
    small media files, and needs no data root. Nothing aborts the conversion: a missing file (or a
    frame directory, which is not one file) is noted in its record, which then fails with
    missing_image/missing_video when read; records that do not parse are left out. Returns counts:
    records, images, videos, and one per skip reason met.
    The file is written to out_path + ".tmp" and renamed, so a crash leaves no partial output.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    counts = {"records": 0, "images": 0, "videos": 0}
    source, out = JsonlSource(jsonl_path), os.fspath(out_path)
    root = resolve_data_root(jsonl_path, data_root)
    writer = ArrayRecordWriter(out + ".tmp", "group_size:1")  # one record per chunk: cheap random access
    try:
        for i in range(len(source)):
            try:
                record = parse_line(source[i])
                refs = media_references(record)
            except DataError as e:
                counts[e.reason] = counts.get(e.reason, 0) + 1
                continue
            media, missing = {}, {}
            for kind, ref in refs:
                if ref in media or ref in missing:
                    continue
                path = Path(root, ref)  # an absolute ref stays as it is
                if path.is_file():
                    media[ref] = path.read_bytes()
                    counts[kind + "s"] += 1
                else:
                    missing[ref] = f"{path}: " + ("a directory, not a file" if path.is_dir() else "no such file")
                    reason = MISSING_IMAGE if kind == "image" else MISSING_VIDEO
                    counts[reason] = counts.get(reason, 0) + 1
            writer.write(encode_record(record, media, missing))
            counts["records"] += 1
    except BaseException:
        writer.close()
        os.unlink(out + ".tmp")
        raise
    finally:
        source.close()
    writer.close()
    os.replace(out + ".tmp", out)
    return counts


class ArrayRecordSource:
    """ArrayRecord file(s) written by write_array_record as a grain source of raw payload bytes.

    A thin wrapper over grain's ArrayRecordDataSource, which already pickles and reopens per process.
    """

    def __init__(self, paths):
        import grain

        self.paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> bytes:
        return self._source[index]

    def __getitems__(self, indices) -> list[bytes]:
        return list(self._source.__getitems__(indices))

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.paths!r}, records={len(self)})"


def to_conversation(raw: bytes | str, data_root=None) -> Conversation:
    """A source item (JSONL line or ArrayRecord payload) -> Conversation; raises DataError.

    A line knows nothing of its file: pass `resolve_data_root(path, ...)` of the file it came from
    as data_root (None joins relative media paths to the current directory). ArrayRecord payloads
    carry their media, so data_root is unused for them.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)) and bytes(raw[:len(MAGIC)]) == MAGIC:
        record, media = decode_record(raw)
        return parse_record(record, media=media)
    return parse_record(parse_line(raw), data_root)


# ------------------------------------------------------------------------------------------------ media

class Media(NamedTuple):
    """A conversation's media, ready for Processor(images=..., videos=..., fps=...)."""

    images: list  # RGB PIL images
    videos: list  # uint8 [F, H, W, 3] frames per video
    fps: list  # sample fps per video
    image_limits: list  # (min_pixels, max_pixels) per image, None where the image sets none: Processor(image_limits=)


def open_image(value) -> Image.Image:
    """Path string or MediaBlob -> RGB PIL image; DataError missing_image / corrupt_image."""
    if isinstance(value, MediaBlob):
        try:
            with warnings.catch_warnings():  # PIL's bomb warning: the size check below makes it an error
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(value.data))
            with image:
                check_decoded_size(image, value.name)
                image.load()  # decode now so truncated data fails here (as load_image does for files)
                return load_image(ImageOps.exif_transpose(image))
        except ImageLoadError as e:
            raise DataError(CORRUPT_IMAGE, str(e)) from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL's decoders raise many types on damaged data
            raise DataError(CORRUPT_IMAGE, f"cannot read image {value.name}: {e}") from None
    if not os.path.isfile(value):
        raise DataError(MISSING_IMAGE, f"image {value} does not exist")
    try:
        return load_image(value)
    except ImageLoadError as e:
        raise DataError(CORRUPT_IMAGE, str(e)) from None


def open_video(value, **read_options) -> tuple[np.ndarray, float]:
    """Path string or MediaBlob -> (frames uint8 [F, H, W, 3], sample fps) via read_video.

    Raises DataError missing_video / corrupt_video (bad_format: options the file cannot meet, such as
    a clip past its end). read_video picks its reader by file suffix and
    needs a path, so a blob is written to a temporary file named with the original suffix.
    """
    if isinstance(value, MediaBlob):
        with tempfile.NamedTemporaryFile(suffix=Path(value.name).suffix) as f:
            f.write(value.data)
            f.flush()
            try:
                return read_video(f.name, **read_options)
            except VideoOptionError as e:  # the record's keys ask what the file does not have
                raise DataError(BAD_FORMAT, str(e).replace(f.name, value.name)) from None
            except VideoLoadError as e:
                raise DataError(CORRUPT_VIDEO, str(e).replace(f.name, value.name)) from None
    if not os.path.exists(value):
        raise DataError(MISSING_VIDEO, f"video {value} does not exist")
    try:
        return read_video(value, **read_options)
    except VideoOptionError as e:
        raise DataError(BAD_FORMAT, str(e)) from None
    except VideoLoadError as e:
        raise DataError(CORRUPT_VIDEO, str(e)) from None


def open_media(conversation: Conversation, **read_options) -> Media:
    """Loads all of a conversation's images and videos.

    read_options go to read_video (None values are left out), each video's own keys over them;
    DataError bad_format when the two together are inconsistent (e.g. its min_pixels above max_pixels).
    """
    defaults = {k: v for k, v in read_options.items() if v is not None}
    video_options = conversation.video_options or [{}] * len(conversation.videos)
    videos = []
    for value, own in zip(conversation.videos, video_options):
        options = {**defaults, **own}  # a video's nframes then wins over the default fps (read_video)
        try:
            check_read_options(**options)
        except ValueError as e:
            raise DataError(BAD_FORMAT, f"video {getattr(value, 'name', value)}: {e}") from None
        videos.append(open_video(value, **options))
    image_options = conversation.image_options or [{}] * len(conversation.images)
    limits = [(o.get("min_pixels"), o.get("max_pixels")) if o else None for o in image_options]
    return Media([open_image(v) for v in conversation.images], [f for f, _ in videos], [s for _, s in videos],
                 limits)

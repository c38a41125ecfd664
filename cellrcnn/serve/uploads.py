"""Reading an upload safely: size checked while the body streams in, the image type sniffed from
its first bytes, the pixel count checked from the header before the pixels are decoded.

Nothing here trusts the client: the body is read in chunks with a byte counter (a lying or
missing ``Content-Length`` cannot get past the limit), the client's file name is used only for
the download names (reduced to a safe stem), and the uploaded bytes are written only into the
per-request temporary folder the caller owns.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from cellrcnn.io import TIFF_MAGIC


class UploadError(Exception):
    """A client error: ``status`` (HTTP 4xx) and a message that says what is wrong."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Upload:
    """The parsed multipart form: the ``file`` part's bytes and name, and the text fields."""

    data: bytes = b""
    filename: str = ""
    fields: dict[str, str] = field(default_factory=dict)


# first bytes of the formats read_image understands -> the suffix it dispatches on
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    *((magic, ".tif") for magic in TIFF_MAGIC),
    (b"\xff\xd8\xff", ".jpg"),
    (b"BM", ".bmp"),
)
MAX_FIELD_BYTES = 1024  # text fields (model, diameter, pixel_size) are short


def sniff_suffix(data: bytes) -> str | None:
    """The image suffix (``.png``, ``.tif``, ``.jpg``, ``.bmp``) from the first bytes; None when not an image."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    return None


def safe_stem(filename: str, default: str = "image") -> str:
    """A file stem safe in a ``Content-Disposition`` header and on any file system: the last path
    component of the client's name without its suffix, reduced to letters, digits, ``-_.``."""
    name = re.split(r"[\\/]", filename or "")[-1]
    stem = Path(name).stem if "." in name else name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._")[:100]
    return stem or default


def safe_name(filename: str, default: str = "the upload") -> str:
    """The client's file name for messages and tables: :func:`safe_stem` plus its (short) suffix."""
    name = re.split(r"[\\/]", filename or "")[-1]
    suffix = re.sub(r"[^A-Za-z0-9.]", "", Path(name).suffix)[:8] if "." in name else ""
    return f"{safe_stem(filename, '')}{suffix}" if safe_stem(filename, "") else default


async def read_multipart(content_type: str, content_length: str | None, chunks: AsyncIterator[bytes],
                         max_bytes: int, idle_timeout: float | None = None) -> Upload:
    """Parse a ``multipart/form-data`` body as it streams in, stopping at ``max_bytes``.

    Raises :class:`UploadError` 413 when the body (declared or actual) exceeds ``max_bytes``,
    415 when it is not multipart, 422 when it has no ``file`` part, 408 when no byte arrived for
    ``idle_timeout`` seconds (a stalled client must not hold its place in the queue for ever).
    """
    mime, params = parse_options_header(content_type or "")
    if mime != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, "send the image as multipart/form-data with a 'file' field "
                               "(e.g. curl -F file=@image.png)")
    limit_mb = max_bytes / 2**20
    if content_length and content_length.isdigit() and int(content_length) > max_bytes:
        raise UploadError(413, f"upload of {int(content_length) / 2**20:.1f} MB exceeds the limit of {limit_mb:g} MB")

    upload = Upload()
    parts: list[dict] = []
    header: dict[str, bytes] = {}

    def on_part_begin():
        parts.append({"headers": {}, "chunks": [], "size": 0})

    def on_header_field(data, start, end):
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data, start, end):
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end():
        parts[-1]["headers"][header.pop("field", b"").lower()] = header.pop("value", b"")

    def on_part_data(data, start, end):
        parts[-1]["chunks"].append(bytes(data[start:end]))

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data,
    })
    received = 0
    stream = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise UploadError(408, f"the upload stalled: no data for {idle_timeout:g} s") from None
        received += len(chunk)
        if received > max_bytes:  # a body without (or with a false) Content-Length stops here
            raise UploadError(413, f"upload exceeds the limit of {limit_mb:g} MB")
        try:
            parser.write(chunk)
        except Exception as exc:  # the parser's own error types; all mean a malformed body
            raise UploadError(422, f"malformed multipart body ({exc})") from exc
    parser.finalize()

    names: set[str] = set()
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        names.add(name)
        data = b"".join(part["chunks"])
        if name == "file":  # with or without a file name (curl -F file=<image.png sends none)
            upload.data, upload.filename = data, disposition.get(b"filename", b"").decode("utf-8", "replace")
        elif name:
            if len(data) > MAX_FIELD_BYTES:
                raise UploadError(422, f"form field {name!r} is longer than {MAX_FIELD_BYTES} bytes")
            upload.fields[name] = data.decode("utf-8", "replace").strip()
    if "file" not in names:
        raise UploadError(422, "no 'file' field in the form; send the image as -F file=@image.png")
    if not upload.data:
        raise UploadError(422, f"{upload.filename or 'the upload'}: empty file")
    return upload


def image_pixels(path: Path) -> tuple[int, int] | None:
    """(height, width) of an image file from its header, without decoding the pixels; None when
    the header cannot be read (the full reader then reports what is wrong)."""
    try:
        if path.suffix == ".tif":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
                axes = tif.pages[0].axes
            yx = [n for n, a in zip(shape, axes, strict=False) if a in "YX"]
            return (int(yx[0]), int(yx[1])) if len(yx) == 2 else None
        from PIL import Image

        with Image.open(path) as im:  # lazy: reads the header only
            return int(im.size[1]), int(im.size[0])
    except Exception:
        return None

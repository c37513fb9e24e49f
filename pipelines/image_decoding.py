"""Decoding encoded images under our rules: our pixel limit rather than PIL's, and no truncated image.

**The limit.** PIL guards against decompression bombs with one process-wide setting (`Image.MAX_IMAGE_PIXELS`:
it warns above ~89 Mpx and refuses at twice that, ~179 Mpx), checked as an image is opened and again as some
formats load. Our `max_image_pixels` must be the limit that applies, above PIL's as well as below it, and the
one an error names; and changing PIL's setting, even for the duration of one call, would change it for every
other thread and library in the process. So PIL's check (`Image._decompression_bomb_check`, which its
plugins call by that name) is wrapped, once, to read a context variable first: inside
`pixel_limit(n)` it enforces `n` (and never warns); everywhere else it is PIL's own check, unchanged. Context
variables are per thread (and per asyncio task), so a limit never reaches code running beside ours.

**Truncation.** PIL refuses most truncated files but accepts some, filling the missing pixels in: a PNG whose
zlib stream ends before the rows its header declares (PIL's zip decoder stops at the end of the stream by
design), a PNG cut before its IEND chunk, a JPEG whose scan data stops early and is followed by an end marker
(libjpeg only warns, and fills in grey), a GIF cut after its first frame or missing its trailer.
`truncation(data, format)` says why such a file is incomplete, from its bytes, before its pixels are decoded
(checking first also spares allocating a huge image for a header that lies). libwebp refuses every truncated
WebP by itself, already as PIL opens it, with a message that does not say so: `declared_size_truncation`
names a file shorter than its RIFF header declares, for a file PIL could not open.
"""

from __future__ import annotations

import contextlib
import contextvars
import struct
import threading
import zlib
from collections.abc import Iterator

_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "vlm_embed_max_image_pixels", default=None
)
_INSTALL_LOCK = threading.Lock()
_CHUNK_OUT = 1 << 20  # bytes of inflated PNG data held at a time while counting


class PixelLimitExceeded(Exception):
    """An image's declared size is over the `pixel_limit` in force."""

    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"{width}x{height} is over {limit} pixels")
        self.width, self.height, self.limit = width, height, limit


@contextlib.contextmanager
def pixel_limit(limit: int) -> Iterator[None]:
    """PIL's decompression-bomb check enforces `limit` (and only it) for the images opened and loaded inside."""
    _install_guard()
    token = _LIMIT.set(limit)
    try:
        yield
    finally:
        _LIMIT.reset(token)


def _install_guard() -> None:
    """Wrap PIL's check once, so that it reads `_LIMIT` first; outside `pixel_limit` it is PIL's own."""
    from PIL import Image

    with _INSTALL_LOCK:
        original = getattr(Image, "_decompression_bomb_check", None)
        if original is None:
            raise RuntimeError(
                "this Pillow has no Image._decompression_bomb_check: pipelines/image_decoding.py must follow "
                "its decompression-bomb check to keep max_image_pixels in force"
            )
        if getattr(original, "_vlm_embed_guard", False):
            return

        def checked(size, *args, **kwargs):
            limit = _LIMIT.get()
            if limit is None:
                return original(size, *args, **kwargs)
            width, height = size
            if max(1, width) * max(1, height) > limit:
                raise PixelLimitExceeded(width, height, limit)
            return None

        checked._vlm_embed_guard = True
        Image._decompression_bomb_check = checked


def truncation(data: bytes, image_format: str | None) -> str | None:
    """Why an encoded image is incomplete (its format as PIL names it), or None when it is not (or when its
    format is not one checked here: PIL's decoder then has the last word)."""
    check = {
        "PNG": _png_truncation,
        "JPEG": _jpeg_truncation,
        "MPO": _jpeg_truncation,
        "GIF": _gif_truncation,
    }
    return check[image_format](memoryview(data)) if image_format in check else None


# PNG: the chunks up to IEND, and the rows the IHDR declares inflated from the IDAT chunks (without keeping them)

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_truncation(data: memoryview) -> str | None:
    pos, header, inflated = 8, None, 0
    inflater = zlib.decompressobj()
    while True:
        if pos + 8 > len(data):
            return "the file ends before its IEND chunk"
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if body + length + 4 > len(data):
            return f"the file ends inside its {kind.decode('latin-1')} chunk"
        if kind == b"IHDR" and length >= 13:
            header = struct.unpack_from(">IIBBBBB", data, body)
        elif kind == b"IDAT":
            try:
                inflated += _inflated_size(inflater, data[body : body + length])
            except zlib.error:
                return None  # corrupt rather than short: PIL's decoder says so
        elif kind == b"IEND":
            break
        pos = body + length + 4
    if header is None or header[3] not in _PNG_CHANNELS:
        return None
    width, height, depth, color_type, _, _, interlace = header
    bits = _PNG_CHANNELS[color_type] * depth
    expected = _png_data_size(width, height, bits, interlace == 1)
    if inflated >= expected:
        return None if inflater.eof else "its compressed pixel data stops before the end of its zlib stream"
    if interlace != 1:
        rows = inflated // (1 + (width * bits + 7) // 8)
        return f"its header says {width}x{height} but its pixel data holds {rows} of {height} rows"
    return f"its header says {width}x{height} but its pixel data holds {inflated:,} of {expected:,} bytes"


def _inflated_size(inflater, compressed) -> int:
    size = 0
    while compressed:
        size += len(inflater.decompress(compressed, _CHUNK_OUT))
        compressed = inflater.unconsumed_tail
    return size


def _png_data_size(width: int, height: int, bits: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines (a filter byte + the row) the image needs, Adam7 passes included."""
    if not interlaced:
        return height * (1 + (width * bits + 7) // 8)
    size = 0
    for x0, y0, dx, dy in _ADAM7:
        pass_width, pass_height = -(-max(0, width - x0) // dx), -(-max(0, height - y0) // dy)
        if pass_width and pass_height:
            size += pass_height * (1 + (pass_width * bits + 7) // 8)
    return size


# JPEG: libjpeg-turbo with its warnings as errors (simplejpeg's strict mode), at 1/8 scale: entropy decoding
# runs over every coefficient, which is where a short scan shows, while the inverse DCT and colour work stay small

_JPEG_SHORT = ("premature end",)  # "Premature end of JPEG file", "... premature end of data segment"


def _jpeg_truncation(data: memoryview) -> str | None:
    import simplejpeg

    raw = bytes(data)
    try:
        colorspace = simplejpeg.decode_jpeg_header(raw)[2]
        simplejpeg.decode_jpeg(
            raw,
            colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY",
            min_height=1,
            min_width=1,
            strict=True,
        )
    except ValueError as exc:
        message = str(exc)
        if any(words in message.lower() for words in _JPEG_SHORT):
            return f"its scan data ends before the image does ({message})"
        return (
            None  # another warning or a kind of JPEG libjpeg-turbo declines: PIL's decoder has the last word
        )
    return None


# GIF: the blocks up to the trailer (the first frame's pixels are PIL's to check; later frames are not decoded)


def _gif_truncation(data: memoryview) -> str | None:
    if len(data) < 13:
        return None
    pos = 13 + _colour_table_size(data[10])
    while pos < len(data):
        tag = data[pos]
        if tag == 0x3B:
            return None
        if tag == 0x21:  # an extension: its label, then data sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif tag == 0x2C:  # an image: descriptor, local colour table, LZW code size, data sub-blocks
            if pos + 10 > len(data):
                break
            pos = _skip_sub_blocks(data, pos + 10 + _colour_table_size(data[pos + 9]) + 1)
        else:
            return None  # not a block GIF defines: corrupt rather than short, PIL decides
        if pos is None:
            break
    return "the file ends before its trailer"


def _colour_table_size(flags: int) -> int:
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _skip_sub_blocks(data: memoryview, pos: int) -> int | None:
    """The position after a run of sub-blocks and its empty terminator, or None when the data ends first."""
    while pos < len(data):
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos
    return None


def declared_size_truncation(data: bytes) -> str | None:
    """Why a file is shorter than its container's header declares (RIFF: WebP), or None. Reads a header only,
    so it is safe on any file, also one that PIL could not open (and so has not checked for size)."""
    if len(data) >= 12 and data[:4] == b"RIFF":
        declared = 8 + struct.unpack_from("<I", data, 4)[0]
        if declared > len(data):
            return f"the file holds {len(data):,} of the {declared:,} bytes its RIFF header declares"
    return None

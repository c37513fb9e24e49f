"""Decoding encoded images: our `max_image_pixels` is the limit that applies (not PIL's own guard), and a
truncated image is an `ImageDecodeError` in every format and every way it can be cut short."""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.items import ImageDecodeError, ImageTooLargeError, load_image
from tests.conftest import image_bytes, make_image

LIMIT = 100_000_000


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_rows(width: int, height: int, rows: int, color_type: int = 0) -> bytes:
    """An 8-bit PNG whose header says `width` x `height` and whose (valid, complete) zlib stream holds only
    `rows` rows: what a writer that stopped early, or a hostile client, produces."""
    channels = {0: 1, 2: 3}[color_type]
    raw = b"".join(b"\x00" + bytes([90 + y % 100]) * (width * channels) for y in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def encoded(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg_with_height(data: bytes, height: int) -> bytes:
    """A baseline JPEG whose frame header (SOF0) claims `height` rows; its scan still holds the old ones."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">H", height) + data[at + 7 :]


def animated(fmt: str) -> bytes:
    frames = [make_image(seed, (64, 48)) for seed in range(3)]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def png_cut_before_iend(data: bytes) -> bytes:
    return data[: data.rindex(b"IEND") - 4]


JPEG = image_bytes(1, (128, 96), "JPEG")
PROGRESSIVE = encoded(make_image(2, (128, 96)), "JPEG", progressive=True)
GIF = image_bytes(3, (64, 48), "GIF")

TRUNCATED = {
    # a header that promises more than the data holds, each piece of the file well formed
    "png: 4096x4096 header, one row of pixels": png_with_rows(4096, 4096, 1, color_type=2),
    "png: 64x64 header, 63 rows": png_with_rows(64, 64, 63),
    "jpeg: 4096-row frame header, 96 rows of scan": jpeg_with_height(JPEG, 4096),
    "jpeg: cut in half, end marker appended": JPEG[: len(JPEG) // 2] + b"\xff\xd9",
    "progressive jpeg: cut in half, end marker appended": PROGRESSIVE[: len(PROGRESSIVE) // 2] + b"\xff\xd9",
    # a file cut short (some cuts PIL refuses by itself, some it does not)
    "png: cut in half": image_bytes(4, (128, 96))[:1500],
    "png: cut before its IEND chunk": png_cut_before_iend(image_bytes(4, (128, 96))),
    "interlaced png: cut in half": (lambda d: d[: len(d) // 2])(
        encoded(make_image(5, (64, 48)), "PNG", interlace=1)
    ),
    "jpeg: cut in half": JPEG[: len(JPEG) // 2],
    "jpeg: without its end marker": JPEG[:-2],
    "gif: cut in half": GIF[: len(GIF) // 2],
    "gif: without its trailer": GIF[:-1],
    "animated gif: cut in its last frame": (lambda d: d[: len(d) - 200])(animated("GIF")),
    "webp: cut in half": (lambda d: d[: len(d) // 2])(image_bytes(6, (128, 96), "WEBP")),
    "lossless webp: last byte missing": encoded(make_image(7, (64, 48)), "WEBP", lossless=True)[:-1],
    "animated webp: cut in its last frame": (lambda d: d[: len(d) - 200])(animated("WEBP")),
}


@pytest.mark.parametrize("data", list(TRUNCATED.values()), ids=list(TRUNCATED))
def test_a_truncated_image_is_a_decode_error(data):
    with pytest.raises(ImageDecodeError, match="is truncated: ") as caught:
        load_image(data, LIMIT, 3)
    assert caught.value.kind == "image_decode"
    assert str(caught.value).startswith("item 3: ")


def test_a_truncated_image_is_refused_from_a_file_path_too(tmp_path):
    path = tmp_path / "short.png"
    path.write_bytes(png_with_rows(512, 512, 1))
    with pytest.raises(ImageDecodeError, match=r"short.png is truncated: .*1 of 512 rows"):
        load_image(str(path), LIMIT)


COMPLETE = {
    "png": image_bytes(10, (96, 64)),
    "png: one row exactly": png_with_rows(50, 1, 1),
    "png: grey, hand-made": png_with_rows(40, 30, 30),
    "png: interlaced": encoded(make_image(11, (61, 37)), "PNG", interlace=1),
    "png: 16-bit grey": encoded(make_image(12, (33, 21)).convert("I;16"), "PNG"),
    "png: 1-bit": encoded(make_image(13, (45, 9)).convert("1"), "PNG"),
    "png: palette": encoded(make_image(14, (30, 20)).convert("P"), "PNG"),
    "png: RGBA": encoded(make_image(15, (30, 20)).convert("RGBA"), "PNG"),
    "png: bytes after IEND": image_bytes(16, (40, 30)) + b"trailing bytes",
    "apng": animated("PNG"),
    "jpeg": JPEG,
    "jpeg: progressive": PROGRESSIVE,
    "jpeg: grey": encoded(make_image(17, (40, 30)).convert("L"), "JPEG"),
    "jpeg: CMYK": encoded(make_image(18, (40, 30)).convert("CMYK"), "JPEG"),
    "jpeg: bytes after its end marker": JPEG + b"\x00" * 16,
    "gif": GIF,
    "gif: animated": animated("GIF"),
    "webp": image_bytes(19, (96, 64), "WEBP"),
    "webp: lossless": encoded(make_image(20, (64, 48)), "WEBP", lossless=True),
    "webp: animated": animated("WEBP"),
    "bmp": image_bytes(21, (30, 20), "BMP"),
    "tiff": image_bytes(22, (30, 20), "TIFF"),
}


@pytest.mark.parametrize("data", list(COMPLETE.values()), ids=list(COMPLETE))
def test_a_complete_image_of_every_kind_still_decodes(data):
    image = load_image(data, LIMIT)
    assert image.mode == "RGB" and image.width > 0 and image.height > 0


def png_header_only(width: int, height: int) -> bytes:
    """A PNG of `width` x `height` grey pixels with one row of data: tiny, and never decoded in full."""
    return png_with_rows(width, height, 1)


def test_max_image_pixels_above_pils_own_guard_is_the_limit_that_applies():
    huge = png_header_only(15_000, 15_000)  # 225 Mpx: past PIL's decompression-bomb error (~179 Mpx)
    # under our limit: decoding proceeds (and finds the image truncated) instead of PIL refusing it
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(huge, 300_000_000)
    # over our limit: our error, naming our limit
    with pytest.raises(ImageTooLargeError, match=r"15000x15000 = 225,000,000 pixels.*200,000,000"):
        load_image(huge, 200_000_000)
    # and far below PIL's guard, the same
    with pytest.raises(
        ImageTooLargeError, match=r"50x50 = 2,500 pixels, over the limit of 1,000 \(max_image_pixels\)"
    ):
        load_image(image_bytes(0, (50, 50)), 1_000)


def test_our_limit_leaves_pils_guard_and_the_warning_filters_as_they_were():
    from PIL import Image

    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError):
            load_image(png_header_only(12_000, 10_000), 300_000_000)  # 120 Mpx: over PIL's warning level
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
    # PIL's own guard still holds for code that opens images itself
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png_header_only(15_000, 15_000)))


def test_our_limit_does_not_reach_other_threads_opening_images_meanwhile():
    """One thread decodes under a raised limit while another opens a bomb with plain PIL: PIL's guard must
    still refuse the other thread's image every time (a process-wide switch would let some through)."""
    from PIL import Image

    bomb = png_header_only(15_000, 15_000)
    stop = threading.Event()
    failures: list[str] = []

    def ours():
        while not stop.is_set():
            try:
                load_image(bomb, 300_000_000)
            except ImageDecodeError:
                pass
            except Exception as exc:  # noqa: BLE001 (reported by the test below)
                failures.append(f"our decode under a raised limit failed: {exc}")
                return

    def theirs():
        for _ in range(200):
            try:
                Image.open(io.BytesIO(bomb))
                failures.append("PIL opened a 225 Mpx image while our limit was raised elsewhere")
            except Image.DecompressionBombError:
                pass

    worker = threading.Thread(target=ours)
    worker.start()
    try:
        theirs()
    finally:
        stop.set()
        worker.join()
    assert not failures, failures[:1]


def test_the_embedder_refuses_a_truncated_image_and_keeps_the_good_items(embedder):
    with pytest.raises(ImageDecodeError, match="1 of 4096 rows"):
        embedder.embed_image(png_with_rows(4096, 4096, 1, color_type=2))
    result = embedder.try_embed_batch(
        ["fine", {"image": TRUNCATED["jpeg: cut in half, end marker appended"]}]
    )
    assert list(result.indices) == [0]
    assert [error.kind for error in result.errors] == ["image_decode"]


SAMPLES = [data for data in COMPLETE.values() if len(data) < 20_000]


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.sampled_from(SAMPLES).flatmap(
        lambda data: st.one_of(
            st.integers(0, len(data)).map(lambda n: data[:n]),  # cut anywhere
            st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)).map(  # one byte changed
                lambda change: data[: change[0]] + bytes([change[1]]) + data[change[0] + 1 :]
            ),
        )
    )
    | st.binary(max_size=64)
)
def test_any_bytes_decode_to_an_rgb_image_or_an_item_error(data):
    from pipelines.items import ItemError

    try:
        image = load_image(data, 1_000_000)
    except ItemError as exc:
        assert exc.kind in ("image_decode", "image_too_large") and exc.reason
        return
    assert image.mode == "RGB" and image.width * image.height <= 1_000_000

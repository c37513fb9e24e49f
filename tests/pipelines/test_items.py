"""Every kind of bad item gets its own clear, typed error that names the item."""

import io

import pytest

from pipelines.items import (
    EmptyTextError,
    ImageDecodeError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidItemError,
    ItemError,
    TooLongError,
    UnknownKeysError,
)
from tests.conftest import image_bytes, make_image


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_or_whitespace_text_is_an_empty_text_error(embedder, text):
    with pytest.raises(EmptyTextError, match="item 0: text is empty or only whitespace"):
        embedder.embed_batch([text])
    with pytest.raises(EmptyTextError):
        embedder.embed_batch([{"text": text, "image": make_image()}])


def test_unknown_keys_are_named(embedder):
    with pytest.raises(UnknownKeysError, match=r"item 1: unknown keys \['caption'\]"):
        embedder.embed_batch(["fine", {"caption": "x", "image": make_image()}])


def test_an_item_without_text_or_image_is_invalid(embedder):
    for bad in ({}, {"text": None, "image": None}, 42, None, ["a list"]):
        with pytest.raises(InvalidItemError, match="item 0"):
            embedder.embed_batch([bad])


def test_zero_byte_image_is_a_decode_error(embedder, tmp_path):
    with pytest.raises(ImageDecodeError, match=r"0 bytes"):
        embedder.embed_image(b"")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.png is empty"):
        embedder.embed_image(str(empty))


def test_undecodable_and_truncated_images_are_decode_errors(embedder, tmp_path):
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        embedder.embed_image(b"this is plain text, not a PNG")
    fake = tmp_path / "notes.jpg"
    fake.write_text("definitely not a jpeg")
    with pytest.raises(ImageDecodeError, match="notes.jpg is not a readable image"):
        embedder.embed_image(fake)
    data = image_bytes(1, (200, 200), "JPEG")
    with pytest.raises(ImageDecodeError, match="is truncated"):
        embedder.embed_image(data[: len(data) // 2])


def test_a_missing_image_file_is_named(embedder, tmp_path):
    with pytest.raises(ImageNotFoundError, match="does-not-exist.png does not exist"):
        embedder.embed_image(tmp_path / "does-not-exist.png")
    with pytest.raises(ImageNotFoundError, match="is a directory"):
        embedder.embed_image(tmp_path)


def test_an_enormous_image_is_refused_before_it_is_decoded(embedder):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # 400 Mpx, a few kB on disk
    with pytest.raises(ImageTooLargeError, match=r"20000x20000 = 400,000,000 pixels, over the limit"):
        embedder.embed_image(buffer.getvalue())


def test_an_image_of_absurd_aspect_ratio_is_a_clear_error(embedder):
    with pytest.raises(ImageDecodeError, match="cannot process image 4000x4"):
        embedder.embed_image(make_image(0, (4000, 4)))


def test_large_images_are_bounded_by_max_pixels(embedder):
    prepared = embedder.prepare({"image": make_image(0, (1600, 1200))})
    tokens = int(prepared.image_grid_thw.prod()) // 4
    assert tokens * 32 * 32 <= embedder.config.resolved_max_pixels
    small = embedder.prepare({"image": make_image(0, (8, 8))})
    assert int(small.image_grid_thw.prod()) * 16 * 16 >= embedder.config.resolved_min_pixels


def test_too_long_text_is_truncated_and_flagged(tiny_model_dir):
    from pipelines.embedder import Embedder

    short = Embedder.load(
        str(tiny_model_dir), device="cpu", max_length=48, recipe="qwen3-vl-embedding", instruction="Go"
    )
    prepared = short.prepare("word " * 200)
    assert prepared.truncated and prepared.num_tokens == 48
    head, tail = (
        "<|im_start|>system\nGo.<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    )
    decoded = short.tokenizer.decode(prepared.input_ids)
    assert decoded.startswith(head) and decoded.endswith(tail)  # the template and the final token survive
    kept = decoded[len(head) : -len(tail)]
    assert len(kept) > 20 and ("word " * 200).startswith(kept)  # the text lost its end, token by token
    with pytest.raises(TooLongError, match="max_length=16"):
        Embedder.load(str(tiny_model_dir), device="cpu", max_length=16).prepare(
            {"text": "x", "image": make_image(0, (256, 256))}
        )


def test_try_embed_batch_returns_errors_and_keeps_the_good_items(embedder):
    items = ["good one", "", {"image": b""}, {"text": "good two", "image": make_image(5)}, {"foo": 1}]
    result = embedder.try_embed_batch(items)
    assert result.indices == [0, 3]
    assert result.vectors.shape == (2, embedder.get_embedding_dimension())
    assert [(e.index, e.kind) for e in result.errors] == [
        (1, "empty_text"),
        (2, "image_decode"),
        (4, "unknown_keys"),
    ]
    assert all(isinstance(e, ItemError) and str(e).startswith(f"item {e.index}:") for e in result.errors)
    import numpy as np

    np.testing.assert_allclose(
        result.vectors[1], embedder.embed_multimodal("good two", make_image(5)), atol=1e-5
    )


def test_exif_orientation_is_applied(embedder):
    from PIL import Image

    image = make_image(7, (120, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    prepared = embedder.prepare({"image": buffer.getvalue()})
    upright = embedder.prepare({"image": image.transpose(Image.Transpose.ROTATE_270)})
    assert prepared.image_grid_thw.tolist() == upright.image_grid_thw.tolist()
    assert prepared.image_grid_thw[1] > prepared.image_grid_thw[2]  # taller than wide after rotation

"""Items: what a user asks to embed, checked and decoded, with a typed error for every way it can be bad.

An item is a string (a text), or a dict with `text` and/or `image` (and, for recipes that take one, an
`instruction`). An image is a PIL image, encoded bytes, or a file path. Every error names the item, and the
item's key it is about (`ItemError.key`). `parse_item` is the one item validator: the backfill, the Python
API and Serve (`serve.inputs`, which adds only what HTTP needs: length limits and inline base64 images, and
reports `key` as the field, `input[2].text`) all check items with it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

ITEM_KEYS = frozenset({"text", "image", "instruction"})


class ItemError(ValueError):
    """An item that cannot be embedded. `kind` is a stable, machine-readable reason; `key` the item's key the
    error is about (`text`, `image`, `instruction`, an unknown key), None for the item as a whole (a string
    item's error is about the item: it has no keys)."""

    kind = "invalid_item"
    default_key: str | None = None

    def __init__(self, message: str, index: int | None = None, key: str | None = None):
        self.index = index
        self.reason = message
        self.key = key if key is not None else self.default_key
        super().__init__(f"item {index}: {message}" if index is not None else message)

    def at(self, index: int) -> ItemError:
        """The same error, naming the item's position."""
        return type(self)(self.reason, index, self.key)


class InvalidItemError(ItemError):
    kind = "invalid_item"


class UnknownKeysError(ItemError):
    kind = "unknown_keys"


class EmptyTextError(ItemError):
    kind = "empty_text"
    default_key = "text"


class ImageDecodeError(ItemError):
    kind = "image_decode"
    default_key = "image"


class ImageNotFoundError(ItemError):
    kind = "image_unreadable"
    default_key = "image"


class ImageTooLargeError(ItemError):
    kind = "image_too_large"
    default_key = "image"


class TooLongError(ItemError):
    kind = "too_long"
    default_key = "text"


class ForwardError(ItemError):
    """The model could not embed a prepared item: its forward pass failed, or gave a non-finite vector."""

    kind = "forward_failed"


@dataclass
class BatchResult:
    """Vectors for the items that worked (`indices` says which) and an error for each item that did not
    (what `Embedder.try_embed_batch` and `try_embed_prepared` give back)."""

    vectors: np.ndarray
    indices: list[int]
    errors: list[ItemError] = field(default_factory=list)

    def per_item(self, count: int) -> list[Any]:
        """A row per item in input order: its row of `vectors`, or `"kind: reason"` for one that has none."""
        out: list[Any] = [None] * count
        for i, row in zip(self.indices, self.vectors, strict=True):
            out[i] = row
        for error in self.errors:
            out[error.index] = f"{error.kind}: {error.reason}"
        return out


@dataclass(frozen=True)
class Item:
    """A checked item; `image` is still undecoded (decoding is part of `prepare`)."""

    text: str | None = None
    image: Any = None
    instruction: str | None = None

    @property
    def modality(self) -> str:
        if self.image is not None and self.text is not None:
            return "text+image"
        return "image" if self.image is not None else "text"


def parse_item(obj: Any, index: int | None = None) -> Item:
    """Check the shape of one item: a non-blank string, or a dict with known keys and text and/or image."""
    if isinstance(obj, Item):
        return obj
    if isinstance(obj, str):
        return Item(text=_check_text(obj, index, None))
    if not isinstance(obj, dict):
        raise InvalidItemError(
            f"expected a string or an object with 'text' and/or 'image', got {type_name(obj)}", index
        )
    unknown = sorted(set(obj) - ITEM_KEYS, key=str)
    if unknown:
        raise UnknownKeysError(
            f"unknown keys {unknown}; an item may have {sorted(ITEM_KEYS)}", index, str(unknown[0])
        )
    text, image, instruction = obj.get("text"), obj.get("image"), obj.get("instruction")
    if text is None and image is None:
        raise InvalidItemError("needs 'text' or 'image' (both are missing or null)", index)
    if text is not None:
        if not isinstance(text, str):
            raise InvalidItemError(f"'text' must be a string, got {type_name(text)}", index, "text")
        text = _check_text(text, index, "text")
    if image is not None and not _is_image_source(image):
        raise InvalidItemError(
            f"'image' must be a PIL image, encoded bytes or a file path, got {type_name(image)}",
            index,
            "image",
        )
    if instruction is not None:
        if not isinstance(instruction, str):
            raise InvalidItemError(
                f"'instruction' must be a string, got {type_name(instruction)}", index, "instruction"
            )
        _check_text(instruction, index, "instruction")
    return Item(text=text, image=image, instruction=instruction)


def _check_text(text: str, index: int | None, key: str | None) -> str:
    what = key or "text"
    if not text.strip():
        raise EmptyTextError(f"{what} is empty or only whitespace", index, key)
    if "\x00" in text:
        raise InvalidItemError(f"{what} contains a NUL character", index, key)
    return text


def type_name(value: Any) -> str:
    """A value's type in words, by its JSON name where it has one (items often come from JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_image_source(image: Any) -> bool:
    from PIL import Image

    return isinstance(image, Image.Image | bytes | bytearray | memoryview | str | Path)


def describe_image_source(image: Any) -> str:
    if isinstance(image, str | Path):
        return str(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return f"<{len(image)} bytes>"
    return f"<{type(image).__name__}>"


def load_image(image: Any, max_image_pixels: int, index: int | None = None):
    """Decode an image source into an RGB PIL image with EXIF orientation applied (transparency composited
    on white, see `to_rgb`).

    Images whose header declares more than `max_image_pixels` pixels are refused before their pixels are
    decoded, so a decompression bomb costs neither memory nor time; that limit is the one in force, above
    PIL's own guard as well as below it (`pipelines.image_decoding.pixel_limit`). A truncated file is an
    `ImageDecodeError` in every format, also where PIL would fill the missing pixels in
    (`pipelines.image_decoding.truncation`). A PIL image is taken as it is (its pixels already decoded).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from pipelines.image_decoding import PixelLimitExceeded, declared_size_truncation, pixel_limit, truncation

    if isinstance(image, Image.Image):
        img = image
        if img.width * img.height > max_image_pixels:
            raise ImageTooLargeError(_too_large(img.width, img.height, max_image_pixels), index)
    else:
        data = _read_bytes(image, index)
        if not data:
            raise ImageDecodeError(f"image {describe_image_source(image)} is empty (0 bytes)", index)
        try:
            with pixel_limit(max_image_pixels):
                img = Image.open(io.BytesIO(data))
                short = truncation(data, img.format)
                if short is not None:
                    raise ImageDecodeError(
                        f"image {describe_image_source(image)} is truncated: {short}", index
                    )
                img.load()
        except PixelLimitExceeded as exc:
            raise ImageTooLargeError(_too_large(exc.width, exc.height, max_image_pixels), index) from exc
        except ImageDecodeError:
            raise
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(f"{describe_image_source(image)} is not a readable image", index) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            short = declared_size_truncation(data)
            if short is not None:
                raise ImageDecodeError(
                    f"image {describe_image_source(image)} is truncated: {short}", index
                ) from exc
            raise ImageDecodeError(
                f"cannot decode image {describe_image_source(image)}: {exc}", index
            ) from exc
    try:
        img = to_rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(
            f"cannot convert image {describe_image_source(image)} to RGB: {exc}", index
        ) from exc
    if img.width < 1 or img.height < 1:
        raise ImageDecodeError(f"image has no pixels ({img.width}x{img.height})", index)
    return img


def to_rgb(img):
    """RGB pixels. An RGBA image is composited on white, exactly as the official Qwen3-VL-Embedding
    preprocessing does (`qwen_vl_utils.fetch_image`): its transparent pixels become white instead of whatever
    colour lies under them. Other modes convert as PIL converts them (also as the official code does)."""
    from PIL import Image

    if img.mode == "RGBA":
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.getchannel("A"))
        return white
    return img if img.mode == "RGB" else img.convert("RGB")


def _too_large(width: int, height: int, limit: int) -> str:
    return f"image is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} (max_image_pixels)"


def _read_bytes(image: Any, index: int | None) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    path = Path(image)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageNotFoundError(f"image file {path} does not exist", index) from exc
    except IsADirectoryError as exc:
        raise ImageNotFoundError(f"image path {path} is a directory", index) from exc
    except OSError as exc:
        raise ImageNotFoundError(f"cannot read image file {path}: {exc.strerror or exc}", index) from exc

"""Random prepared items at given shapes: for warming an embedder up and for benchmarks.

Speed does not depend on token or pixel values, so these skip the tokenizer and the image processor: text is
random ids (never a special token), an image is random normalised patches with its grid. Both carry the M-RoPE
positions `prepare` would give them, so they run through the model exactly like real items.
"""

from __future__ import annotations

import numpy as np

from pipelines.prepare import PreparedItem, mrope_position_ids


def vision_token_ids(model_config) -> np.ndarray:
    """The ids that mean something to the vision path (image, video, vision start and end)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return np.array(
        [getattr(model_config, name) for name in names if getattr(model_config, name, None) is not None]
    )


def random_token_ids(rng: np.random.Generator, n: int, model_config) -> np.ndarray:
    """`n` random ids of the model's vocabulary, none of them a vision token (those are replaced by 0)."""
    ids = rng.integers(0, model_config.text_config.vocab_size, n, dtype=np.int64)
    ids[np.isin(ids, vision_token_ids(model_config))] = 0
    return ids


def text_item(rng: np.random.Generator, n: int, model_config) -> PreparedItem:
    ids = random_token_ids(rng, n, model_config)
    return PreparedItem(input_ids=ids, position_ids=np.broadcast_to(np.arange(n), (3, n)).copy())


def image_item(rng: np.random.Generator, model_config, side: int, text_tokens: int = 20) -> PreparedItem:
    """One `side`x`side` image (rounded down to whole merged patches) followed by `text_tokens` random ids:
    `<|vision_start|> <|image_pad|> x (side/32)^2 <|vision_end|> text`."""
    vision = model_config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    cells = max(1, side // (patch * merge)) * merge
    grid = np.array([1, cells, cells], np.int64)
    width = vision.in_channels * temporal * patch * patch
    pixels = rng.uniform(-1.0, 1.0, (cells * cells, width)).astype(np.float32)
    image_token = model_config.image_token_id
    ids = np.concatenate(
        [
            [model_config.vision_start_token_id],
            np.full(cells * cells // merge**2, image_token),
            [model_config.vision_end_token_id],
            random_token_ids(rng, text_tokens, model_config),
        ]
    ).astype(np.int64)
    positions = mrope_position_ids(ids, image_token, grid, merge)
    return PreparedItem(ids, positions, pixels, grid, modality="image")


def lognormal_lengths(
    rng: np.random.Generator, n: int, median: float = 110, sigma: float = 0.8, low: int = 8, high: int = 512
) -> np.ndarray:
    """Token lengths drawn log-normally around `median`, clipped to `low..high` (BENCHMARK.md's text set)."""
    lengths = np.exp(rng.normal(np.log(median), sigma, n))
    return np.clip(np.rint(lengths), low, high).astype(np.int64)

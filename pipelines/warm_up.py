"""Warming an engine up before it takes work: the costs a Serve replica or backfill actor should pay at start.

The first steps of new sizes compile (with `compile`), load their kernels and pick their algorithms, and the
first steps of a run pin host memory for their pixels. Measured on an H200: 2B images timed in their first pass
ran at 122 items/s, at 324 after one pass (benchmarks/NOTES.md, "A pitfall, then a fix"). So `warm_up` runs
representative steps (two token counts, for dynamic shapes; images with `image_side`) and, on a GPU with a
token budget, one full step of texts and two of images through `forward_steps`, as a run would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

LENGTHS = (64, 512, 7, 300)


def warm_up(
    engine,
    lengths: Sequence[int] = LENGTHS,
    image_side: int | None = None,
    step_tokens: int | None = None,
) -> float:
    """Run representative steps through `engine` once; returns the seconds it took."""
    from pipelines import synthetic

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    config = engine.model.config
    items = [synthetic.text_item(rng, n, config) for n in lengths]
    for group in (items[: len(items) // 2], items[len(items) // 2 :]):  # two token counts: dynamic shapes
        engine.forward(group)
    if image_side:
        engine.forward([synthetic.image_item(rng, config, image_side) for _ in range(2)])
    if step_tokens and engine.device.type == "cuda":
        run_full_steps(engine, step_tokens, image_side)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - start


def run_full_steps(engine, step_tokens: int, image_side: int | None = None) -> int:
    """`warm_up`'s GPU part: one full step of texts, then (with `image_side`) three of images and a half one,
    through `forward_steps` as a run would. Pinned host blocks come in power-of-two sizes and are slow to
    allocate once (~0.5 GB for a 2B image step): a run holds one being packed, one being copied and, while the
    host runs ahead of the GPU, the one before; and a run's last step is usually partial, another size. Two
    image steps (the earlier warm-up) still left 2B images' first pass at 211 items/s against 363 (NOTES,
    second lease); the bench's per-pass costs (`host_allocs`, `device_segments`) say whether this is enough.
    Returns the steps run."""
    steps = full_steps(engine.model.config, step_tokens, image_side)
    if image_side:
        images = steps[-1]
        steps += [images, images, images[: max(1, len(images) // 2)]]
    for _ in engine.forward_steps(steps):
        pass
    return len(steps)


def full_steps(config, step_tokens: int, image_side: int | None = None) -> list[list]:
    """A step of texts and (with `image_side`) one of images, each filling `step_tokens`: the same synthetic
    item repeated, since only the sizes matter for warming up."""
    from pipelines import synthetic

    rng = np.random.default_rng(1)
    items = [synthetic.text_item(rng, 256, config)]
    if image_side:
        items.append(synthetic.image_item(rng, config, image_side))
    return [[item] * max(1, step_tokens // item.num_tokens) for item in items]

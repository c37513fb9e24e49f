"""Token-budget batching: group items of similar length so that padding wastes little.

Pure Python over lengths; nothing here knows about models or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_tokens: int, max_items: int) -> list[list[int]]:
    """Split item indices into batches, longest first, so that `len(batch) * longest item <= max_tokens`.

    An item longer than `max_tokens` gets a batch of its own. Every index appears in exactly one batch.
    """
    if max_tokens < 1 or max_items < 1:
        raise ValueError("max_tokens and max_items must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        length = lengths[index]
        width = max(longest, length)
        if current and (len(current) >= max_items or width * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, width = [], length
        current.append(index)
        longest = width
    if current:
        batches.append(current)
    return batches


def padding_efficiency(lengths: Sequence[int], batches: list[list[int]]) -> float:
    """Real tokens over padded tokens for a batch plan (1.0: no padding at all)."""
    real = sum(lengths)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return real / padded if padded else 1.0

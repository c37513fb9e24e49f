"""Token-budget batching: group items so that a forward pass holds a bounded number of tokens.

Pure Python over lengths; nothing here knows about models or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.config import AttentionLayout as Layout


def plan_batches(
    lengths: Sequence[int], max_tokens: int, max_items: int, layout: Layout = "padded"
) -> list[list[int]]:
    """Split item indices into batches of at most `max_items` items and `max_tokens` tokens, longest first.

    `padded` counts what a padded batch holds, `len(batch) * longest item`, so items of similar length end up
    together and padding wastes little; `packed` counts real tokens only (items laid end to end). Longest first
    puts the largest batches first, so memory peaks early. An item longer than `max_tokens` gets a batch of its
    own. Every index appears in exactly one batch.
    """
    if max_tokens < 1 or max_items < 1:
        raise ValueError("max_tokens and max_items must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for index in order:
        length = lengths[index]
        cost = max(longest, length) * (len(current) + 1) if layout == "padded" else total + length
        if current and (len(current) >= max_items or cost > max_tokens):
            batches.append(current)
            current, longest, total = [], 0, 0
        current.append(index)
        longest, total = max(longest, length), total + length
    if current:
        batches.append(current)
    return batches


def padding_efficiency(lengths: Sequence[int], batches: list[list[int]]) -> float:
    """Real tokens over padded tokens for a batch plan (1.0: no padding at all)."""
    real = sum(lengths)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return real / padded if padded else 1.0

"""Every embedder option is accounted for: it either changes the vectors (recorded with every table and
checked) or only where, how fast and what is accepted (a query may use its own)."""

from __future__ import annotations

from pipelines.config import EmbedderConfig
from pipelines.table import RUNTIME_OPTIONS


def test_every_embedder_option_is_in_the_signature_or_declared_runtime_only():
    fields = set(EmbedderConfig.model_fields)
    recorded = set(EmbedderConfig().signature())
    unaccounted = fields - recorded - set(RUNTIME_OPTIONS)
    assert not unaccounted, (
        f"{sorted(unaccounted)}: add each to EmbedderConfig.signature() if it changes the vectors, else to "
        "pipelines.table.RUNTIME_OPTIONS"
    )


def test_no_option_is_both_recorded_and_runtime_only():
    assert not set(EmbedderConfig().signature()) & set(RUNTIME_OPTIONS)


def test_runtime_options_and_signature_keys_are_all_fields():
    fields = set(EmbedderConfig.model_fields)
    assert set(RUNTIME_OPTIONS) <= fields
    assert set(EmbedderConfig().signature()) <= fields

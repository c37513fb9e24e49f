"""Which class computes the vectors for an `EmbedderConfig`: the one place that reads `config.backend`.

Every entry point (the backfill's actors, Serve's embedding replicas, search, the `embed` and `demo` commands)
loads its embedder through `load_embedder`, so a backend added here is usable everywhere at once. Each backend
class offers the same contract as `pipelines.embedder.Embedder`: `prepare`, `forward`, `finish`,
`embed_prepared`, `try_embed_prepared`, `embed_queries`, `get_embedding_dimension`, `warm_up`.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import EmbedderConfig


def load_embedder(config: EmbedderConfig) -> Any:
    """The embedder `config` names, loaded (heavy imports happen here, not at import time)."""
    if config.backend == "transformers":
        from pipelines.embedder import Embedder

        return Embedder.from_config(config)
    if config.backend == "sentence-transformers":
        from pipelines.sentence_embedder import SentenceEmbedder

        return SentenceEmbedder.from_config(config)
    if config.backend == "stand-in":
        from pipelines.stand_in import StandInEmbedder

        return StandInEmbedder.from_config(config)
    raise ValueError(f"unknown backend {config.backend!r}")

"""Which class computes the vectors for an `EmbedderConfig`: the one place that reads `config.backend`.

Every entry point (the backfill's actors, Serve's embedding replicas, search, the `embed` and `demo` commands)
loads its embedder through `load_embedder`, so a backend added here is usable everywhere at once. Each backend
class offers the same contract as `pipelines.embedder.Embedder`: `prepare`, `forward`, `finish`,
`embed_prepared`, `try_embed_prepared`, `embed_queries`, `get_embedding_dimension`, `warm_up`.
The CPU step without the weights (`load_preparer`: the backfill's CPU stage, Serve's ingress) and the vector size
without loading the model (`embedding_dimension`: the backfill's driver, Serve's ingress) are picked here too.
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


def load_preparer(config: EmbedderConfig) -> Any:
    """The CPU step of `config`'s backend (`prepare(item, index, query=)` -> a `PreparedItem`) without the
    embedder: the checkpoint's tokenizer and image processor (transformers, stand-in), or the
    sentence-transformers model's own preprocessing on the CPU."""
    if config.backend == "sentence-transformers":
        from pipelines.sentence_model import SentencePreparer

        return SentencePreparer.load(config)
    from pipelines.prepare import Preparer

    return Preparer.load(config)


def embedding_dimension(config: EmbedderConfig) -> int:
    """The vector size of `config` from the model's config files where they say it (no weights, no torch)."""
    if config.backend == "sentence-transformers":
        from pipelines.sentence_model import sentence_embedding_dimension

        return sentence_embedding_dimension(config)
    from pipelines.loading import embedding_dimension as checkpoint_dimension

    return checkpoint_dimension(config)

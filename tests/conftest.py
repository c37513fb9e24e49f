"""Shared fixtures: one tiny offline checkpoint and one embedder per test session; small images made here."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Keep the built-in 'tiny' checkpoint cache out of the user's home."""
    home = tmp_path_factory.mktemp("vlm-embed-home")
    old = os.environ.get("VLM_EMBED_HOME")
    os.environ["VLM_EMBED_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("VLM_EMBED_HOME", None)
    else:
        os.environ["VLM_EMBED_HOME"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from pipelines.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl")


@pytest.fixture(scope="session")
def tiny_embedding_dir(tmp_path_factory):
    """The embedding flavour: its tokenizer appends <|endoftext|>, like Qwen3-VL-Embedding's."""
    from pipelines.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl-embedding", flavour="embedding")


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory):
    """The reranker flavour: an LM head of its own, "yes" and "no" tokens, like Qwen3-VL-Reranker's."""
    from pipelines.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-reranker", seed=7, flavour="reranker")


POISON = "a text with the poisoned character \u00a4 in it"


@pytest.fixture(scope="session")
def poisoned_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny checkpoint with NaN token embeddings for the byte-level token of 0xA4 ('\u00a4' in UTF-8 ends
    in it): a real model whose forward pass gives a non-finite vector for `POISON` and the exact tiny vectors
    for every other text (its other weights are untouched)."""
    import torch
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    poisoned = tokenizer.convert_tokens_to_ids("\u00a4")
    assert poisoned in tokenizer(POISON, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[poisoned] = float("nan")
    directory = tmp_path_factory.mktemp("models") / "tiny-poisoned"
    model.save_pretrained(directory)
    for path in tiny_model_dir.iterdir():  # the tokenizer and processor files as they are
        if not (directory / path.name).exists():
            (directory / path.name).write_bytes(path.read_bytes())
    return directory


@pytest.fixture(scope="session")
def embedder(tiny_model_dir):
    from pipelines.embedder import Embedder

    return Embedder.load(str(tiny_model_dir), device="cpu", dtype="float32")


def on_the_same_weights(embedder, **options):
    """Another `Embedder` on `embedder`'s loaded model, tokenizer and image processor, with `options`."""
    from pipelines.embedder import Embedder

    return Embedder(embedder.model, embedder.tokenizer, image_processor=embedder.image_processor, **options)


def make_image(seed: int = 0, size: tuple[int, int] = (96, 64)):
    """A deterministic RGB noise image (width, height)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def image_bytes(seed: int = 0, size: tuple[int, int] = (96, 64), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    make_image(seed, size).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting Ray costs several seconds here).

    `address="local"` always starts a fresh instance, never attaching to some other cluster on the machine.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def quick_start(tmp_path_factory):
    """The README quick start's main job, run once (tests/quick_start.py): its output and its sample table."""
    import shutil

    from tests.quick_start import run_main_job

    ray_tmp = f"/tmp/rq{os.getpid()}"
    try:
        yield run_main_job(tmp_path_factory.mktemp("quick-start"), Path(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

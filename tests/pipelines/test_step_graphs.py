"""Small text steps padded to buckets (for CUDA graphs) give the vectors of the unpadded step: the bucket choice,
the dummy sequences, the vectors on the CPU (the padded function a graph holds, run eagerly), and on a GPU the
captured graphs themselves (skipped without CUDA)."""

import numpy as np
import pytest
import torch

from pipelines.config import EmbedderConfig
from pipelines.embedder import Embedder
from pipelines.engine import PaddedForward
from pipelines.packed import PackedForward, pack
from pipelines.step_graphs import (
    MAX_MEMORY_BYTES,
    Bucket,
    StepGraphs,
    bucket_for,
    dummy_lengths,
    pad_step,
)
from pipelines.synthetic import image_item, text_item
from tests.conftest import on_the_same_weights

TEXTS = [
    "short",
    "A much longer sentence about the old ship that carries three apples near the sea, again and again.",
    "Number 42 and 294: xxB",
    "a picture of a quiet garden",
]


def _texts(config, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [text_item(rng, n, config) for n in lengths]


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [
        ([40], Bucket(64, 2)),  # one item and one dummy sequence of 24 tokens
        ([63], Bucket(64, 2)),  # one dummy token is room enough
        ([64], Bucket(128, 2)),  # no room for a dummy: the next token count
        ([10, 10, 10], Bucket(64, 4)),  # 3 items: 4 sequences
        ([10, 10, 10, 10], Bucket(64, 8)),  # 4 items: the next segment count, 4 dummies of >= 1 token
        ([1] * 63, Bucket(64, 64)),  # 63 one-token items and one dummy token
        ([1] * 60 + [2], Bucket(128, 64)),  # 62 tokens + 3 dummies do not fit 64
        ([2047], Bucket(2048, 2)),
        ([2048], None),  # too long for every bucket: runs as it is
        ([1] * 64, None),  # too many items for every bucket
        ([], None),
    ],
)
def test_the_bucket_is_the_smallest_segment_count_above_the_items_then_the_smallest_token_count_with_room(
    lengths, expected
):
    assert bucket_for(lengths) == expected


def test_dummy_sequences_fill_the_bucket_one_token_each_and_the_last_the_rest():
    assert dummy_lengths(Bucket(64, 4), [10, 10]) == [1, 43]
    assert dummy_lengths(Bucket(64, 8), [10] * 4) == [1, 1, 1, 21]
    assert dummy_lengths(Bucket(128, 2), [64]) == [64]
    with pytest.raises(ValueError, match="does not fit"):
        dummy_lengths(Bucket(64, 2), [64])  # no token left for the dummy
    with pytest.raises(ValueError, match="does not fit"):
        dummy_lengths(Bucket(64, 2), [10, 10])  # no sequence left for it


def test_a_padded_step_keeps_its_items_first_and_fills_the_bucket_with_dummies(embedder):
    config = embedder.model.config
    batch = pack(_texts(config, [5, 9, 3]), config.image_token_id)
    padded = pad_step(batch, Bucket(64, 8))
    assert padded.lengths == [5, 9, 3, 1, 1, 1, 1, 43]
    assert padded.input_ids.shape == (64,) and padded.position_ids.shape == (3, 64)
    assert torch.equal(padded.input_ids[:17], batch.input_ids)
    assert torch.equal(padded.position_ids[:, :17], batch.position_ids)
    assert (padded.input_ids[17:] == 0).all()
    # each dummy counts its positions from 0, the same in the three M-RoPE rows
    assert padded.position_ids[:, 17:21].eq(0).all()
    assert torch.equal(padded.position_ids[0, 21:], torch.arange(43))
    assert torch.equal(padded.position_ids[0], padded.position_ids[2])
    images = pack([image_item(np.random.default_rng(0), config, 64)], config.image_token_id)
    with pytest.raises(ValueError, match="only text steps"):
        pad_step(images, Bucket(64, 2))


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "last"])
@pytest.mark.parametrize("layer", [-1, 2])
def test_a_step_padded_to_its_bucket_gives_the_vectors_of_the_unpadded_and_the_padded_layout(
    embedder, pooling, layer
):
    packed = on_the_same_weights(embedder, attention_layout="packed", pooling=pooling, layer=layer)
    padded_layout = on_the_same_weights(embedder, attention_layout="padded", pooling=pooling, layer=layer)
    engine = packed.engine
    assert isinstance(engine, PackedForward) and isinstance(padded_layout.engine, PaddedForward)
    graphs = StepGraphs(engine)
    items = [packed.prepare(text) for text in TEXTS]
    batch = engine._pack(items)
    bucket = graphs.bucket(batch)
    assert bucket is not None and bucket.segments == 8  # 4 items, 4 dummies
    in_bucket = graphs.run(batch, bucket)
    assert in_bucket.shape == (len(TEXTS), engine.model.config.text_config.hidden_size)  # no dummy rows
    unpadded = engine.forward_packed(batch.to(engine.device))
    torch.testing.assert_close(in_bucket, unpadded, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_bucket, padded_layout.engine.forward(items), atol=1e-5, rtol=0)
    assert graphs.report.uncaptured == 1 and graphs.report.replays == 0  # a CPU: nothing captured


def test_the_engine_sends_text_steps_that_fit_a_bucket_through_the_graphs_and_the_rest_as_before(embedder):
    packed = on_the_same_weights(embedder, attention_layout="packed")
    plain = packed.embed_batch(TEXTS + [{"text": "an image", "image": _image()}])
    packed.engine.step_graphs = graphs = StepGraphs(packed.engine)
    # one step of 4 texts (in a bucket), then one text alone, then an image step and a step too long
    steps = [TEXTS, TEXTS[:1]]
    for texts in steps:
        vectors = packed.embed_batch(texts)
        assert vectors.shape == (len(texts), plain.shape[1])  # the dummies never come out
        np.testing.assert_allclose(vectors, plain[: len(texts)], atol=1e-5, rtol=0)
    assert (graphs.report.uncaptured, graphs.report.unbucketed) == (2, 0)
    both = packed.embed_batch(TEXTS + [{"text": "an image", "image": _image()}])
    np.testing.assert_allclose(both, plain, atol=1e-5, rtol=0)
    assert graphs.report.unbucketed == 1  # the step with an image ran as it is
    config = packed.model.config
    long = _texts(config, [2100])
    torch.testing.assert_close(packed.engine.forward(long), packed.engine.forward_packed(pack(long, 0)))
    assert graphs.report.unbucketed == 2  # longer than the largest bucket (2,048)


def _image():
    from tests.conftest import make_image

    return make_image(3, (64, 64))


def test_cuda_graphs_are_refused_where_they_cannot_run(embedder):
    assert EmbedderConfig().cuda_graphs is False  # off until a GPU shows they help
    assert EmbedderConfig(cuda_graphs="auto").resolved_cuda_graphs("cuda") is True
    assert EmbedderConfig(cuda_graphs="auto").resolved_cuda_graphs("cpu") is False
    assert EmbedderConfig(cuda_graphs="auto", attention_layout="padded").resolved_cuda_graphs("cuda") is False
    with pytest.raises(ValueError, match="cuda_graphs=True needs attention_layout='packed'"):
        EmbedderConfig(cuda_graphs=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        on_the_same_weights(embedder, attention_layout="packed", cuda_graphs=True)
    auto = on_the_same_weights(
        embedder, attention_layout="packed", cuda_graphs="auto"
    )  # a CPU: no graphs, no error
    auto.warm_up()
    assert auto.engine.step_graphs is None
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        StepGraphs(auto.engine).capture()


# -- on a GPU: the captured graphs ------------------------------------------------------------------------


@pytest.mark.gpu
def test_on_a_gpu_replayed_graphs_give_the_eager_packed_vectors_in_bf16_within_their_memory_bound(
    cuda, tiny_model_dir
):
    eager = Embedder.load(str(tiny_model_dir), device="cuda", dtype="bfloat16", attention_layout="packed")
    graphed = on_the_same_weights(eager, attention_layout="packed", cuda_graphs=True)
    assert graphed.engine.backend == "flash"
    graphed.warm_up()
    report = graphed.engine.step_graphs.report
    print(
        f"tiny bf16 graphs: {len(report.buckets)} buckets captured in {report.seconds:.2f} s, "
        f"{report.memory_bytes / 2**20:.1f} MiB, dropped {report.dropped}"
    )
    assert len(report.buckets) == len(graphed.engine.step_graphs.buckets()) and not report.dropped
    assert 0 < report.memory_bytes <= MAX_MEMORY_BYTES
    config = eager.model.config
    steps = [
        _texts(config, lengths, seed) for seed, lengths in enumerate([[40], [5, 9, 3], [200, 7] * 4, [63]])
    ]
    order = [3, 0, 2, 1, 0, 3]  # buckets replayed out of their capture order, one twice
    replays = report.replays
    for index in order:
        got = graphed.engine.forward(steps[index]).float()
        want = eager.engine.forward(steps[index]).float()
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
        assert got.shape == want.shape and cosine.min() >= 0.9999, (index, cosine.min())
    assert report.replays - replays == len(order)
    # a step too large for every bucket, and a step with an image, run as before
    big = _texts(config, [3000])
    torch.testing.assert_close(graphed.engine.forward(big), eager.engine.forward(big))
    assert report.unbucketed >= 1


@pytest.mark.gpu
def test_on_a_gpu_in_float32_a_padded_step_equals_the_unpadded_one_and_capture_needs_flash(
    cuda, tiny_model_dir
):
    packed = Embedder.load(str(tiny_model_dir), device="cuda", dtype="float32", attention_layout="packed")
    engine = packed.engine
    graphs = StepGraphs(engine)
    batch = engine._pack(_texts(packed.model.config, [40, 17, 90]))
    bucket = graphs.bucket(batch)
    torch.testing.assert_close(
        graphs.run(batch, bucket), engine.forward_packed(batch.to(engine.device)), atol=1e-5, rtol=0
    )
    assert (
        engine.backend != "flash"
    )  # float32: no flash kernel, so no graphs (sdpa reads lengths on the host)
    with pytest.raises(RuntimeError, match="flash varlen backend"):
        graphs.capture()

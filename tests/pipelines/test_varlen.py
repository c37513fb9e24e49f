"""Varlen attention: each packed sequence attends only to itself, the same under every backend."""

import pytest
import torch
import torch.nn.functional as F

from pipelines.varlen import Segments, attention, backend_problem, resolve_backend

LENGTHS = [3, 17, 1, 40]


def _qkv(heads=4, kv_heads=2, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    return (torch.randn(total, h, dim, generator=generator) for h in (heads, kv_heads, kv_heads))


def _one_by_one(q, k, v, causal):
    """Each sequence on its own, with the key/value heads repeated by hand (no GQA shortcut)."""
    out, start = [], 0
    repeat = q.shape[1] // k.shape[1]
    for n in LENGTHS:
        rows = slice(start, start + n)
        qs, ks, vs = (t[rows].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(repeat, 0), vs.repeat_interleave(repeat, 0)
        scores = (qs @ ks.transpose(1, 2)) / qs.shape[-1] ** 0.5
        if causal:
            scores = scores.masked_fill(
                torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1), float("-inf")
            )
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("causal", [True, False])
def test_each_sequence_attends_only_to_itself(backend, causal):
    q, k, v = _qkv()
    segments = Segments.from_lengths(LENGTHS, "cpu")
    got = attention(q, k, v, segments, causal=causal, scale=16**-0.5, backend=backend)
    torch.testing.assert_close(got, _one_by_one(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_changing_one_sequence_leaves_the_others_alone():
    q, k, v = _qkv()
    segments = Segments.from_lengths(LENGTHS, "cpu")
    before = attention(q, k, v, segments, causal=True, scale=0.25, backend="sdpa")
    k2 = k.clone()
    k2[3:20] += 5.0  # the second sequence's keys
    after = attention(q, k2, v, segments, causal=True, scale=0.25, backend="sdpa")
    assert not torch.allclose(before[3:20], after[3:20])
    torch.testing.assert_close(before[:3], after[:3])
    torch.testing.assert_close(before[20:], after[20:])


def test_segments_know_their_offsets_and_documents():
    segments = Segments.from_lengths([2, 3], "cpu")
    assert segments.cu_seqlens.tolist() == [0, 2, 5] and segments.cu_seqlens.dtype == torch.int32
    assert segments.max_seqlen == 3 and segments.total == 5
    assert segments.doc_ids().tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="at least one token"):
        Segments.from_lengths([2, 0], "cpu")


def test_auto_picks_sdpa_on_the_cpu_and_flash_is_refused_there():
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert "CUDA" in backend_problem("flash", "cpu", torch.bfloat16)
    assert backend_problem("flex", "cpu", torch.float32) is None


def test_the_sdpa_backend_matches_torch_on_one_sequence():
    q, k, v = (t[:40] for t in _qkv())
    segments = Segments.from_lengths([40], "cpu")
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    got = attention(q, k, v, segments, causal=True, scale=16**-0.5, backend="sdpa")
    torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_flash_kernel_matches_sdpa_on_a_gpu(cuda, dtype):
    assert backend_problem("flash", "cuda", dtype) is None
    q, k, v = (t.to(cuda, dtype) for t in _qkv(heads=16, kv_heads=8, dim=128))
    segments = Segments.from_lengths(LENGTHS, cuda)
    got = attention(q, k, v, segments, causal=True, scale=128**-0.5, backend="flash")
    want = _one_by_one(q.float(), k.float(), v.float(), True)
    assert float((got.float() - want).norm() / want.norm()) < 2e-2


def test_the_attention_interface_function_is_the_same_attention_in_transformers_layout():
    from pipelines.varlen import attention_forward

    q, k, v = _qkv()
    segments = Segments.from_lengths(LENGTHS, "cpu")
    want = attention(q, k, v, segments, causal=True, scale=0.25, backend="sdpa")
    as_transformers = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # [1, heads, tokens, dim]
    got, weights = attention_forward(
        None, *as_transformers, None, scaling=0.25, cu_seq_lens_q=segments.cu_seqlens, max_length_q=40
    )
    assert weights is None and got.shape == (1, sum(LENGTHS), 4, 16)
    torch.testing.assert_close(got[0], want)
    not_causal, _ = attention_forward(
        None, *as_transformers, None, scaling=0.25, is_causal=False, segments=segments
    )
    torch.testing.assert_close(
        not_causal[0], attention(q, k, v, segments, causal=False, scale=0.25, backend="sdpa")
    )

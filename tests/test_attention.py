"""Attention backends (longctx.attention): the block-wise fast path against the eager reference, and its dispatch."""

import pytest
import torch
from conftest import left_padded, tiny_model

from longctx import attention
from longctx.attention import AttentionMask, blocked_attention, eager_attention, prefer_blocked, sdpa_attention


def qkv(batch, heads, kv_heads, q_len, kv_len, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, kv_len, 16, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("case", ["causal", "cache", "left-padded"])
def test_blocked_attention_equals_the_eager_reference(monkeypatch, case):
    monkeypatch.setattr(attention, "BLOCKED_SCORE_ELEMENTS", 1)  # the smallest blocks: 64 rows, 3 of them
    q_len, kv_len = 150, 150 if case != "cache" else 190  # with a cache: 40 keys before the first query
    padding = None
    if case == "left-padded":
        padding = left_padded([150, 97], 150)[1].bool()
    mask = AttentionMask(q_len, kv_len, padding)
    q, k, v = qkv(2, 4, 2, q_len, kv_len)  # grouped-query heads: 2 query heads per key head
    expected = eager_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(blocked_attention(q, k, v, mask, 0.25), expected, atol=1e-5, rtol=1e-5)


def test_sdpa_runs_blocked_only_for_cpu_bfloat16_prefill_without_autograd():
    mask = AttentionMask(300, 300)
    q, k, _ = qkv(1, 2, 2, 300, 300, dtype=torch.bfloat16)
    assert prefer_blocked(q, k, mask)
    assert not prefer_blocked(q.float(), k.float(), mask)  # float32: torch's kernel is faster
    assert not prefer_blocked(q, k, AttentionMask(1, 300))  # decoding
    assert not prefer_blocked(q, k, AttentionMask(300, 20000))  # beyond 16k keys torch's kernel is as fast
    with torch.enable_grad():
        assert not prefer_blocked(q.requires_grad_(), k, mask)  # training keeps SDPA's memory-lean backward


def test_bfloat16_blocked_attention_is_as_close_to_float32_as_torch_sdpa():
    mask = AttentionMask(1024, 1024)
    q, k, v = (x * 2 for x in qkv(1, 4, 4, 1024, 1024, seed=3))
    exact = eager_attention(q.double(), k.double(), v.double(), mask, 0.25)
    low = [x.bfloat16() for x in (q, k, v)]
    with torch.no_grad():
        blocked = sdpa_attention(*low, mask, 0.25)  # dispatches to blocked_attention
        torch_sdpa = torch.nn.functional.scaled_dot_product_attention(*low, is_causal=True, scale=0.25).transpose(1, 2)
    error_blocked = (blocked.double() - exact).abs().mean()
    error_sdpa = (torch_sdpa.double() - exact).abs().mean()
    assert error_blocked < 3 * error_sdpa, (error_blocked, error_sdpa)  # scores rounded to bf16: ~2x SDPA's error


def test_bfloat16_model_logits_stay_close_to_float32():
    model = tiny_model(max_position_embeddings=512)
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits.float()
    assert (low - exact).abs().max() < 0.05 * exact.abs().max()

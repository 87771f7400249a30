"""The CPU-only attention path: `blocked_attention`, for bfloat16 prefills without autograd (`prefer_blocked`).

On CPU, bf16 matmuls run ~4× faster than float32 while torch's fused SDPA kernel runs no faster in bf16, so two
matmuls per block of query rows, the softmax in place between them, beat it 1.5–1.8× (BENCHMARKS.md, "Attention").
Same signature as every path of `longctx.attention` (`choose_attention` picks it for `sdpa`).
"""

import torch

from .attention_common import (AttentionMask, AttentionSettings, active_attention_settings, blockwise_attention,
                               grouped_scores, row_spans)


def prefer_blocked(query, key, mask: AttentionMask, settings: AttentionSettings | None = None) -> bool:
    """Whether `sdpa` runs `blocked_attention`: on CPU, bfloat16, no autograd, a prefill within
    `settings.blocked_queries` (256–16384 queries by default; beyond 16k keys its score blocks no longer stay in cache
    and torch's kernel is as fast, 0.9–1.1×). Training keeps torch's kernel and its memory-lean backward."""
    fewest, most = (settings or active_attention_settings()).blocked_queries
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and mask.query_start is None
            and fewest <= mask.q_len and mask.kv_len <= most
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)))


def blocked_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *,
                      settings: AttentionSettings | None = None, pre_rope=None):
    """softmax(q kᵀ · scaling + mask) v as two matmuls per block of 64–512 query rows
    (`settings.blocked_score_elements` scores per block), the softmax in place between them. Scores are rounded to
    the input dtype before the float32 softmax. One custom op (`torch.ops.longctx.blocked_attention`, no autograd),
    which `torch.compile` keeps whole in its graph. `pre_rope` is unused: q and k arrive rotated."""
    batch, heads = query.shape[:2]
    rows = (settings or active_attention_settings()).blocked_block_rows(batch, heads, mask.kv_len)
    out = _blocked_attention_op(query, key, value, mask.padding_mask, mask.kv_len, float(scaling), float(dropout),
                                rows)
    return out.transpose(1, 2)  # (batch, q_len, heads, head_dim)


@torch.library.custom_op("longctx::blocked_attention", mutates_args=())
def _blocked_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          padding_mask: torch.Tensor | None, kv_len: int, scaling: float, dropout: float,
                          block_rows: int) -> torch.Tensor:
    """`blocked_attention`'s work, (batch, heads, q_len, head_dim)."""
    mask = AttentionMask(query.shape[2], kv_len, padding_mask)
    query = query * scaling

    def score_block(start, end, key_end):
        return grouped_scores(query[:, :, start:end], key[:, :, :key_end])

    return blockwise_attention(score_block, value, mask, row_spans(mask.q_len, block_rows), dropout).transpose(1, 2)


@_blocked_attention_op.register_fake
def _(query, key, value, padding_mask, kv_len, scaling, dropout, block_rows):
    return query.new_empty(*query.shape[:3], value.shape[-1])

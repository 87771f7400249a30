"""Self-attention: q/k/v projections, RoPE, log-n scaling, the KV cache and three backends behind one dispatch.

Backends share one signature `(query, key, value, mask, scaling, dropout) -> (batch, q_len, heads, head_dim)`:
`eager` (the reference: explicit scores and softmax), `sdpa` (PyTorch's fused kernels, causal without a mask
where it can), `flash_attention_2` (the flash-attn package, CUDA only, imported lazily).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cache import update_keys_after_rope, update_keys_before_rope
from .configuration_longctx import original_max_positions
from .rope import (KEYS_BEFORE_ROPE, apply_rotary, compute_inv_freq, dynamic_inv_freq, rope_scheme, rotary_cos_sin,
                   rotate_half)

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class AttentionMask:
    """Which keys each query sees: causal over the cache plus an optional padding mask.

    `padding_mask` (batch, kv_len) bool, True for real tokens, or None when nothing is padded. The dense
    (batch, 1, q_len, kv_len) form is built at most once per forward, and only for backends that need it.
    The queries are the last q_len of the kv_len keys, unless `query_start` says where they begin: a static cache
    under torch.compile (`cache.static_slots`), whose keys are its whole buffer and whose filled length is a
    tensor (an int would break the graph) that nothing may change during the forward; its unfilled slots are
    padding. The block-wise paths (`rows`, `hide_`) serve only the usual alignment (`query_start` None).
    """

    q_len: int
    kv_len: int
    padding_mask: torch.Tensor | None = None
    query_start: torch.Tensor | int | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _spans: object = field(default=False, repr=False)  # `real_spans`, found once per forward (False: not yet)

    @property
    def is_plain_causal(self) -> bool:
        return self.padding_mask is None

    @property
    def past(self):
        """Keys before the first query: an int, or a 0-d tensor (`query_start`)."""
        return self.kv_len - self.q_len if self.query_start is None else self.query_start

    def query_slots(self, device) -> torch.Tensor:
        """Each query's index among the keys, (q_len,)."""
        return torch.arange(self.q_len, device=device) + self.past

    def query_padding(self):
        """The queries' own column of `padding_mask`, (batch, q_len), or None."""
        if self.padding_mask is None:
            return None
        if self.query_start is None:
            return self.padding_mask[:, self.past:]
        return self.padding_mask.index_select(1, self.query_slots(self.padding_mask.device))

    def dense(self, device) -> torch.Tensor:
        """Boolean mask (batch or 1, 1, q_len, kv_len), True = may attend: `rows` over every query, built once."""
        if self._dense is None:
            self._dense = self._build(0, self.q_len, device)
        return self._dense

    def rows(self, start, end, device) -> torch.Tensor:
        """Mask of query rows [start, end) over the keys they can reach: (batch or 1, 1, end - start, past + end)."""
        return self.dense(device) if (start, end) == (0, self.q_len) else self._build(start, end, device)

    def hide_(self, scores, start, end) -> torch.Tensor:
        """Set the scores (b, h, end − start, past + end) of query rows [start, end) that the mask hides to the
        dtype's minimum, in place; without padding only the causal triangle over keys [past + start, past + end)."""
        low, past, rows = torch.finfo(scores.dtype).min, self.past, end - start
        if self.padding_mask is None:
            ahead = torch.ones(rows, rows, dtype=torch.bool, device=scores.device).triu(1)  # key after its query
            scores[..., past + start:].masked_fill_(ahead, low)
        else:
            scores.masked_fill_(~self.rows(start, end, scores.device), low)
        return scores

    def _build(self, start, end, device):
        """Causal by index, padding keys hidden. A row with no visible key (a left-padding query) sees its causal
        keys instead: that keeps softmax finite, and its output is never used."""
        query_index = torch.arange(start, end, device=device) + self.past
        keys = self.kv_len if self.query_start is not None else self.past + end
        key_index = torch.arange(keys, device=device)
        causal = (key_index[None, :] <= query_index[:, None])[None, None]  # (1, 1, rows, keys)
        if self.padding_mask is None:
            return causal
        mask = causal & self.padding_mask[:, None, None, :keys].to(device)
        return mask | (causal & ~mask.any(dim=-1, keepdim=True))

    def real_spans(self):
        """[(start, end)] per batch row when every row's real tokens are one run (left or right padding) in a
        prefill (no cache), else None: then each row is plain causal attention over its run. Found once per mask
        (one device sync), shared by every layer."""
        if self._spans is False:
            self._spans = self._find_spans()
        return self._spans

    def _find_spans(self):
        if self.padding_mask is None or self.q_len != self.kv_len:
            return None
        real = self.padding_mask
        counts = real.sum(-1)
        starts = real.int().argmax(-1)
        index = torch.arange(real.shape[-1], device=real.device)
        run = (index >= starts[:, None]) & (index < (starts + counts)[:, None])
        if not bool((run == real).all()):
            return None
        return [(s, s + n) for s, n in zip(starts.tolist(), counts.tolist())]

    def visible_keys(self, device) -> torch.Tensor:
        """Number of keys each query sees, (batch or 1, q_len): what `logn_scaling="trained"` counts."""
        if self.padding_mask is None:
            return self.query_slots(device)[None] + 1
        counts = self.padding_mask.to(device).long().cumsum(-1)
        if self.query_start is not None:
            return counts.index_select(1, self.query_slots(device)).clamp(min=1)
        return counts[:, self.past:].clamp(min=1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, d) -> (batch, kv_heads * n_rep, seq, d) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


# --- Block-wise attention: explicit scores for a block of query rows at a time, memory O(rows × keys) -----------
def grouped_scores(query, key):
    """q kᵀ for grouped-query heads without repeating keys: (b, h, rows, d), (b, kv, keys, d) -> (b, h, rows, keys)."""
    b, h, rows, d = query.shape
    scores = torch.matmul(query.reshape(b, key.shape[1], -1, d), key.transpose(2, 3))
    return scores.reshape(b, h, rows, key.shape[2])


def softmax_values(scores, value, dropout):
    """softmax over the keys (accumulated in float32; in place without autograd), then the weighted values:
    (b, h, rows, keys) -> (b, h, rows, d). `scores` is consumed; masked scores hold the dtype's minimum."""
    b, h, rows, keys = scores.shape
    if not scores.requires_grad:
        probs = torch.softmax(scores, dim=-1, out=scores)
    else:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    # (reshape: the scores of a per-row rotation, dynamic NTK past L_train, need not be contiguous)
    return torch.matmul(probs.reshape(b, value.shape[1], -1, keys), value).reshape(b, h, rows, value.shape[-1])


def blockwise_attention(score_block, value, mask: AttentionMask, spans, dropout):
    """softmax(scores) v for each span [start, end) of query rows; `score_block(start, end, key_end)` returns the
    scaled scores (b, h, rows, key_end) of those rows against the keys they can reach (causal: past + end)."""
    past, out = mask.past, None
    for start, end in spans:
        scores = mask.hide_(score_block(start, end, past + end), start, end)
        part = softmax_values(scores, value[:, :, : past + end], dropout)
        if out is None:
            out = part.new_empty(part.shape[0], part.shape[1], mask.q_len, part.shape[3])
        out[:, :, start:end] = part
    return out.transpose(1, 2)  # (batch, q_len, heads, head_dim)


def row_spans(q_len, rows):
    return [(start, min(start + rows, q_len)) for start in range(0, q_len, max(1, rows))]


BLOCKED_SCORE_ELEMENTS = 2**24  # scores per block of `blocked_attention` (batch × heads × rows × keys)


def blocked_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0):
    """softmax(q kᵀ · scaling + mask) v as two matmuls per block of 64–512 query rows, the softmax in place between
    them. The fast CPU path for bfloat16 without gradients (`prefer_blocked`): there bf16 matmuls run ~4× faster
    than float32 while torch's fused SDPA kernel runs no faster, so this beats it 1.5–1.8× (BENCHMARKS.md,
    "Attention"). Scores are rounded to the input dtype before the float32 softmax. One custom op
    (`torch.ops.longctx.blocked_attention`, no autograd), which `torch.compile` keeps whole in its graph."""
    out = _blocked_attention_op(query, key, value, mask.padding_mask, mask.kv_len, float(scaling), float(dropout))
    return out.transpose(1, 2)  # (batch, q_len, heads, head_dim)


@torch.library.custom_op("longctx::blocked_attention", mutates_args=())
def _blocked_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          padding_mask: torch.Tensor | None, kv_len: int, scaling: float,
                          dropout: float) -> torch.Tensor:
    """`blocked_attention`'s work, (batch, heads, q_len, head_dim)."""
    b, h, q_len, _ = query.shape
    mask = AttentionMask(q_len, kv_len, padding_mask)
    rows = max(64, min(512, BLOCKED_SCORE_ELEMENTS // (b * h * kv_len)))
    query = query * scaling

    def score_block(start, end, key_end):
        return grouped_scores(query[:, :, start:end], key[:, :, :key_end])

    return blockwise_attention(score_block, value, mask, row_spans(q_len, rows), dropout).transpose(1, 2)


@_blocked_attention_op.register_fake
def _(query, key, value, padding_mask, kv_len, scaling, dropout):
    return query.new_empty(*query.shape[:3], value.shape[-1])


BLOCKED_QUERIES = (256, 16384)  # prefill lengths where `blocked_attention` beat torch's kernel (BENCHMARKS.md)


def prefer_blocked(query, key, mask: AttentionMask) -> bool:
    """Whether `sdpa` runs `blocked_attention`: on CPU, bfloat16, no autograd, a prefill of 256–16384 queries.
    Beyond 16k keys its score blocks no longer stay in cache and torch's kernel is as fast (0.9–1.1×)."""
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and mask.query_start is None
            and BLOCKED_QUERIES[0] <= mask.q_len and mask.kv_len <= BLOCKED_QUERIES[1]
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)))


def eager_weights(query, key, mask: AttentionMask, scaling, dropout=0.0):
    """The attention weights softmax(q kᵀ · scaling + mask) (batch, heads, q_len, kv_len), softmax in float32,
    then dropout: what `output_attentions=True` returns, as transformers' eager attention does."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~mask.dense(query.device), torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return F.dropout(probs, p=dropout, training=dropout > 0)


def eager_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0, weights=None):
    """Reference: softmax(q kᵀ · scaling + mask) v, softmax in float32 (`weights`: from `eager_weights`)."""
    weights = eager_weights(query, key, mask, scaling, dropout) if weights is None else weights
    return torch.matmul(weights, repeat_kv(value, query.shape[1] // value.shape[1])).transpose(1, 2)


PER_ROW_QUERIES = 256  # padded prefills from this length run row by row (BENCHMARKS.md, "Padded batches")
MASK_BLOCK_ELEMENTS = 2**22  # mask entries (rows × keys) per SDPA call of a masked prefill (BENCHMARKS.md)


def masked_row_blocks(query, key, value, mask: AttentionMask, scaling, dropout, rows):
    """A prefill that needs a mask — chunked against a cache (queries are the last q_len of kv_len positions), or
    padding with holes — as one SDPA call per block of query rows: each block's (rows × reachable keys) mask, not
    the whole (q_len × kv_len) one, and no keys after its last row. Each block is the same problem one size down:
    its rows are the last of the keys it sees."""
    past = mask.past
    out = query.new_empty(query.shape[0], mask.q_len, query.shape[1], value.shape[-1])
    for start, end in row_spans(mask.q_len, rows):
        padding = None if mask.padding_mask is None else mask.padding_mask[:, : past + end]
        out[:, start:end] = sdpa_attention(query[:, :, start:end], key[:, :, : past + end],
                                           value[:, :, : past + end], AttentionMask(end - start, past + end, padding),
                                           scaling, dropout)
    return out


def sdpa_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0):
    """torch's scaled_dot_product_attention: `is_causal` without any mask when nothing is padded, and row by row
    over each row's real run for a padded prefill (`real_spans`); on CPU in bfloat16 without autograd,
    `blocked_attention` where it is faster (`prefer_blocked`)."""
    if prefer_blocked(query, key, mask):
        return blocked_attention(query, key, value, mask, scaling, dropout)
    spans = None
    if mask.q_len >= PER_ROW_QUERIES and not torch.compiler.is_compiling():
        spans = mask.real_spans()
    if spans is not None:  # a padded prefill: each row causal over its run, no (q_len × kv_len) mask
        out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
        for row, (start, end) in enumerate(spans):
            if end > start:
                rows = slice(row, row + 1), slice(None), slice(start, end)
                out[row, start:end] = sdpa_attention(query[rows], key[rows], value[rows],
                                                     AttentionMask(end - start, end - start), scaling, dropout)[0]
        return out  # padding queries: zeros (their outputs are never used)
    attn_mask, is_causal = None, False
    if not mask.is_plain_causal or 1 < mask.q_len < mask.kv_len:
        rows = max(64, MASK_BLOCK_ELEMENTS // mask.kv_len)
        if rows < mask.q_len and not torch.compiler.is_compiling():
            return masked_row_blocks(query, key, value, mask, scaling, dropout, rows)
        attn_mask = mask.dense(query.device)
    elif mask.q_len > 1:
        is_causal = True  # q_len == kv_len: top-left and bottom-right causal alignments agree
    n_rep = query.shape[1] // key.shape[1]
    gqa = n_rep > 1 and _SDPA_HAS_GQA and attn_mask is None
    if n_rep > 1 and not gqa:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        **({"enable_gqa": True} if gqa else {}),
    )
    return out.transpose(1, 2)


def flash_attention_2(query, key, value, mask: AttentionMask, scaling, dropout=0.0):
    """flash-attn 2 through transformers' wrapper (unpads left/right padding, bottom-right causal)."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    padding = None if mask.padding_mask is None else mask.padding_mask.to(torch.int32)
    return _flash_attention_forward(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), padding, query_length=mask.q_len,
        is_causal=True, dropout=dropout, softmax_scale=scaling, attn_implementation="flash_attention_2",
        target_dtype=torch.bfloat16 if query.dtype == torch.float32 else None,
    )


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attention_2": flash_attention_2}


# --- Keys before RoPE: ReRoPE / Leaky ReRoPE (methods.md §8) and dynamic NTK (§10) --------------------------------
# Both rotate the keys per query (ReRoPE by the clipped distance, dynamic NTK by the query's own table), so neither
# fits a fused kernel, flash-attn's included: they run as explicit scores, a block of query rows at a time, so memory
# grows as block × keys, never L × L. `eager` computes ReRoPE's two score matrices densely, as Su's patch does: the
# reference the block-wise path is tested against.

SCORE_BLOCK_ELEMENTS = 2**22  # scores per query block (batch × heads × rows × keys); see benchmarks/bench_rerope.py
ROTATED_KEY_ELEMENTS = 2**24  # dynamic NTK beyond L_train: per-row rotated keys (batch × kv heads × rows × keys × d)


def rotate(x, positions, inv_freq):
    """x (batch, heads, seq, d) rotated to `positions` (batch, seq) by inv_freq (d/2) or per row (b, seq, d/2)."""
    cos, sin = rotary_cos_sin(positions, inv_freq, x.dtype)
    return apply_rotary(x, cos, sin)


def rerope_operands(query, key, q_pos, k_pos, inv_freq, rope):
    """(q1, k1) plain RoPE; (q2, k2) ReRoPE's (R^w q, k) or Leaky's (R^{(i−w)/k+w} q, R^{j/k} k) (methods.md §8)."""
    window = rope["rerope_window"]
    q1, k1 = rotate(query, q_pos, inv_freq), rotate(key, k_pos, inv_freq)
    if rope["rope_type"] == "rerope":
        return q1, k1, rotate(query, torch.full_like(q_pos, window), inv_freq), key
    factor = rope["factor"]
    return q1, k1, rotate(query, (q_pos - window) / factor + window, inv_freq), rotate(key, k_pos / factor, inv_freq)


def rerope_attention(query, key, value, q_pos, k_pos, mask, scaling, dropout, inv_freq, rope, block_rows):
    """ReRoPE / Leaky ReRoPE: a_ij = a1_ij where i − j < w, else a2_ij (methods.md §8), `block_rows` rows at a time.

    i, j are positions (so padding and the cache work); with q_len = 1 this is Su's decoding from pre-RoPE keys."""
    q1, k1, q2, k2 = rerope_operands(query * scaling, key, q_pos, k_pos, inv_freq, rope)
    window = rope["rerope_window"]

    def score_block(start, end, key_end):
        near = (q_pos[:, None, start:end, None] - k_pos[:, None, None, :key_end]) < window  # (b, 1, rows, keys)
        a1 = grouped_scores(q1[:, :, start:end], k1[:, :, :key_end])
        a2 = grouped_scores(q2[:, :, start:end], k2[:, :, :key_end])
        return torch.where(near, a1, a2, out=None if a1.requires_grad else a1)  # in place unless training

    return blockwise_attention(score_block, value, mask, row_spans(mask.q_len, block_rows), dropout)


def positions_follow_indices(k_pos, padding_mask):
    """True when every real key's position is its index minus one offset per batch row (arange, left padding, a cache
    of those): then i − j of positions is i − j of indices, and ReRoPE's window is a band of the score matrix."""
    offsets = k_pos - torch.arange(k_pos.shape[-1], device=k_pos.device)
    if padding_mask is None:
        return bool((offsets == offsets[:, :1]).all())
    real = padding_mask.to(k_pos.device)
    high = offsets.masked_fill(~real, torch.iinfo(offsets.dtype).min).amax(-1)
    low = offsets.masked_fill(~real, torch.iinfo(offsets.dtype).max).amin(-1)
    return bool(((high == low) | ~real.any(-1)).all())


def rerope_band_attention(query, key, value, q_pos, k_pos, mask, scaling, dropout, inv_freq, rope, block_rows):
    """Block-wise ReRoPE / Leaky ReRoPE when positions follow the indices (`positions_follow_indices`). For a block of
    query rows the keys [0, lo) lie beyond every row's window, so one matrix of a2 scores against all reachable keys
    serves them, and only the band [lo, past + end) — the window, a strip of width < rows where a2 takes over, and
    the causal diagonal — needs a1 scores: one score matrix plus a band, memory O(rows × keys) (methods.md §8)."""
    q1, k1, q2, k2 = rerope_operands(query * scaling, key, q_pos, k_pos, inv_freq, rope)
    window, past, q_len = rope["rerope_window"], mask.past, mask.q_len
    real_keys = None if mask.padding_mask is None else mask.padding_mask.to(query.device)
    if real_keys is not None:  # a query with no real key at or before it sees its causal keys, as in `mask.rows`
        sighted = (real_keys.cumsum(-1) > 0)[:, past:]
    out = None
    for start, end in row_spans(q_len, block_rows):
        first, key_end, rows = past + start, past + end, end - start  # the block's first query; keys it reaches
        lo = max(0, first - window + 1)
        strip = max(lo, key_end - window) - lo  # keys [lo, lo + strip): beyond the window for some rows
        scores = grouped_scores(q2[:, :, start:end], k2[:, :, :key_end])  # a2: (b, h, rows, key_end)
        band = grouped_scores(q1[:, :, start:end], k1[:, :, lo:key_end])  # a1 on the band
        if strip:  # key lo + c is beyond the window of row r when (first + r) − (lo + c) ≥ w
            beyond = torch.ones(rows, strip, dtype=torch.bool, device=query.device).tril(first - lo - window)
            band[..., :strip] = torch.where(beyond, scores[..., lo:lo + strip], band[..., :strip])
        causal = torch.ones(rows, rows, dtype=torch.bool, device=query.device).tril()  # keys [first, key_end)
        band[..., -rows:].masked_fill_(~causal, torch.finfo(band.dtype).min)
        scores[..., lo:] = band
        if real_keys is not None:
            hidden = ~real_keys[:, None, None, :key_end]  # padding keys, (b, 1, 1 or rows, keys)
            if not bool(sighted[:, start:end].all()):
                hidden = hidden & sighted[:, None, start:end, None]
            scores.masked_fill_(hidden, torch.finfo(scores.dtype).min)
        part = softmax_values(scores, value[:, :, :key_end], dropout)
        if out is None:
            out = part.new_empty(part.shape[0], part.shape[1], q_len, part.shape[3])
        out[:, :, start:end] = part
    return out.transpose(1, 2)  # (batch, q_len, heads, head_dim)


def dynamic_spans(fixed, score_rows, table_rows):
    """Spans of query rows: runs where every batch row is within L_train (`fixed`), up to `score_rows` long; others
    (each row its own table) up to `table_rows` long."""
    spans, start, fixed = [], 0, fixed.tolist()
    while start < len(fixed):
        limit, end = (score_rows if fixed[start] else table_rows), start + 1
        while end < len(fixed) and end - start < limit and fixed[end] == fixed[start]:
            end += 1
        spans.append((start, end))
        start = end
    return spans


def dynamic_attention(config, query, key, value, q_pos, k_pos, mask, scaling, dropout, inv_freq, implementation):
    """Dynamic NTK, causal: the query at position p uses the table of length p + 1 for itself and every key it sees
    (methods.md §10, Su's s(p) = max(L, p+1)/L), so a cached step equals recomputing the sequence — in every layer.

    Within L_train that is the base table and any backend runs; beyond it, keys are rotated per query row."""
    train_len = original_max_positions(config)
    if int(q_pos.max()) < train_len:
        q, k = rotate(query, q_pos, inv_freq), rotate(key, k_pos, inv_freq)
        return ATTENTION_FUNCTIONS[implementation](q, k, value, mask, scaling, dropout)
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    q_fixed, k_fixed = rotate(query, q_pos, inv_freq) * scaling, rotate(key, k_pos, inv_freq)
    key_half = rotate_half(key)

    def score_block(start, end, key_end):
        rows = slice(start, end)
        if bool((q_pos[:, rows] < train_len).all()):
            return grouped_scores(q_fixed[:, :, rows], k_fixed[:, :, :key_end])
        tables = dynamic_inv_freq(config, q_pos[:, rows] + 1)  # (b, rows, d/2): one table per query
        q = rotate(query[:, :, rows], q_pos[:, rows], tables) * scaling
        cos, sin = rotary_cos_sin(k_pos[:, None, :key_end], tables[:, :, None], key.dtype)  # (b, rows, keys, d)
        k = key[:, :, None, :key_end] * cos[:, None] + key_half[:, :, None, :key_end] * sin[:, None]
        scores = torch.einsum("bgnrd,bgrkd->bgnrk", q.view(batch, kv_heads, -1, end - start, head_dim), k)
        return scores.reshape(batch, heads, end - start, key_end)

    spans = dynamic_spans((q_pos < train_len).all(0),
                          SCORE_BLOCK_ELEMENTS // (batch * heads * kv_len),
                          ROTATED_KEY_ELEMENTS // (batch * kv_heads * kv_len * head_dim))
    return blockwise_attention(score_block, value, mask, spans, dropout)


def attention_before_rope(config, implementation, query, key, value, q_pos, k_pos, mask, scaling, dropout, inv_freq):
    """Attention for the rope_types that keep keys before RoPE: query and keys still un-rotated."""
    rope = config.rope_parameters
    if rope["rope_type"] == "dynamic":
        return dynamic_attention(config, query, key, value, q_pos, k_pos, mask, scaling, dropout, inv_freq,
                                 implementation)
    batch, heads, q_len, _ = query.shape
    if implementation == "eager":  # the reference: Su's two dense score matrices
        return rerope_attention(query, key, value, q_pos, k_pos, mask, scaling, dropout, inv_freq, rope, q_len)
    block_rows = SCORE_BLOCK_ELEMENTS // (batch * heads * key.shape[2])
    # compiled: the general path, as choosing the band would read the positions' values (a graph break)
    band = not torch.compiler.is_compiling() and positions_follow_indices(k_pos, mask.padding_mask)
    return (rerope_band_attention if band else rerope_attention)(query, key, value, q_pos, k_pos, mask, scaling,
                                                                 dropout, inv_freq, rope, block_rows)


def check_attn_implementation(name, device=None):
    """Raise a clear error for an unknown backend, or flash-attn where it cannot run."""
    if name not in ATTENTION_FUNCTIONS:
        raise ValueError(f'Specified `attn_implementation="{name}"` is not supported by longctx; '  # (HF's wording)
                         f"choose one of {', '.join(ATTENTION_FUNCTIONS)}.")
    if name == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed. "
                "Install it on a CUDA machine with `pip install longctx[flash]`, or use 'sdpa' (the default; it runs "
                "FlashAttention kernels on CUDA too)."
            ) from err
        if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
            raise ValueError("attn_implementation='flash_attention_2' runs only on CUDA GPUs; "
                             "use 'sdpa' on this device.")


def logn_query_scale(config, position_ids, mask: AttentionMask):
    """Per-query factor (batch, q_len) for log-n scaling (methods.md §6), or None when off.

    "trained": log(max(visible keys, 16)) / log(L_train); "posthoc" (Su's logn†): max(1, log(p+1) / log(L_train)).
    Scaling q by it equals scaling that query's row of scores, so every backend supports it.
    """
    if config.logn_scaling == "off":
        return None
    log_train = math.log(original_max_positions(config))
    if config.logn_scaling == "trained":
        visible = mask.visible_keys(position_ids.device).float()
        return torch.log(visible.clamp(min=16)) / log_train
    return (torch.log(position_ids.float() + 1) / log_train).clamp(min=1)


class LongCtxAttention(nn.Module):
    """Multi-head self-attention with grouped-query heads and RoPE, Llama's parameter names."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        qk_bias = config.attention_bias or config.qk_bias  # RoPE + Bias: q and k only (methods.md §11)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qk_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qk_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, hidden_states, position_embeddings, mask: AttentionMask, query_scale=None,
                cache=None, position_ids=None, rotary=None, output_attentions=False):
        """(output (batch, q_len, hidden), the attention weights or None). `position_embeddings` (cos, sin) of the
        query positions; `position_ids` (batch, q_len) and `rotary` (the model's `LongCtxRotaryEmbedding`) are needed
        by the rope_types that keep keys before RoPE. `output_attentions` needs the eager backend."""
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        if query_scale is not None:  # a scalar per query row: commutes with its rotation
            query = query * query_scale[:, None, :, None].to(query.dtype)
        implementation = self.config._attn_implementation or "sdpa"
        dropout = self.config.attention_dropout if self.training else 0.0
        rope_type = self.config.rope_parameters["rope_type"]
        weights = None
        if rope_type in KEYS_BEFORE_ROPE:
            if position_ids is None:
                raise ValueError(f"rope_type={rope_type!r} needs `position_ids`.")
            key, value, key_positions = update_keys_before_rope(cache, self.layer_idx, key, value,
                                                                position_ids)
            inv_freq = rotary.inv_freq(query.device)[0] if rotary is not None else compute_inv_freq(self.config)[0]
            out = attention_before_rope(self.config, implementation, query, key, value, position_ids, key_positions,
                                        mask, self.scaling, dropout, inv_freq.to(query.device))
        else:
            cos, sin = position_embeddings
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)  # (batch, heads, q_len, head_dim)
            if cache is not None:
                scheme = None if torch.compiler.is_compiling() else (  # (json: not traceable)
                    rotary.scheme() if rotary is not None else rope_scheme(self.config))
                key, value = update_keys_after_rope(cache, self.layer_idx, key, value, mask.kv_len, scheme)
            if output_attentions:
                weights = eager_weights(query, key, mask, self.scaling, dropout)
                out = eager_attention(query, key, value, mask, self.scaling, weights=weights)
            else:
                out = ATTENTION_FUNCTIONS[implementation](query, key, value, mask, self.scaling, dropout)
        return self.o_proj(out.reshape(batch, q_len, -1)), weights  # out: (batch, q_len, heads, head_dim)

"""Self-attention: q/k/v projections, RoPE, log-n scaling, the KV cache, and the attention paths behind one chooser.

Every path has one signature, `path(query, key, value, mask, scaling, dropout=0.0, *, settings=None, pre_rope=None)
-> (batch, q_len, heads, head_dim)`: query (batch, heads, q_len, d), key and value (batch, kv_heads, kv_len, d),
`mask` an `AttentionMask`, `settings` the `AttentionSettings` (None: the active ones), `pre_rope` the positions and
table of keys kept before RoPE (`PreRope`; None where q and k arrive rotated). `choose_attention` picks the path of
a call from the backend — `eager` (the reference: explicit scores and softmax), `sdpa` (PyTorch's fused kernels),
`flash_attention_2` (the flash-attn package, CUDA only, imported lazily) — the rope_type's attention
(`RopeSpec.attention`), the mask and the tensors: every path is named in that one function.
"""

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention_common import (AttentionMask, AttentionSettings, active_attention_settings, blockwise_attention,
                               grouped_scores, repeat_kv, row_spans)
from .attention_common import DEFAULT_ATTENTION_SETTINGS, attention_settings  # noqa: F401 (public here too)
from .attention_cpu import blocked_attention, prefer_blocked
from .cache import update_keys_after_rope, update_keys_before_rope
from .configuration_longctx import original_max_positions
from .rerope_fused import fused_rerope_supported, positions_follow_indices, rerope_fused_path, rerope_rotations
from .rerope_fused import rerope_operands as fused_operands
from .rope import (ROPE_SPECS, apply_rotary, compute_inv_freq, dynamic_inv_freq, rope_scheme, rotary_cos_sin, rotate,
                   rotate_half)

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class PreRope(NamedTuple):
    """What the paths of the rope_types that keep keys before RoPE read besides q, k, v."""

    q_pos: torch.Tensor  # (batch, q_len) the queries' positions
    k_pos: torch.Tensor  # (batch, kv_len) the keys' positions (cached with them)
    inv_freq: torch.Tensor  # (head_dim // 2,) the base table
    config: object  # rope_parameters, L_train


def choose_attention(implementation: str, attention: str, query, key, mask: AttentionMask, *,
                     settings: AttentionSettings, pre_rope: PreRope | None = None, dropout: float = 0.0):
    """The path of one attention call; all of longctx's paths are here. `implementation`: the backend
    (`attn_implementation`); `attention`: the rope_type's `RopeSpec.attention` — "after_rope" (q and k rotated),
    "rerope" or "dynamic" (keys before RoPE, at `pre_rope`'s positions). Unknown names raise ValueError."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise _unknown_backend(implementation)
    compiling = torch.compiler.is_compiling()
    if attention == "rerope":  # two score matrices (methods.md §8), or two fused passes merged by their LSE
        if implementation == "eager":
            return rerope_dense_attention
        fused = settings.prefer_fused_rerope(mask.q_len, mask.kv_len)  # (kernels: fused_rerope_supported)
        if fused and fused_rerope_supported(query, key, mask, pre_rope, dropout):
            return rerope_fused_path
        # compiled: the general path, as choosing the band would read the positions' values (a graph break)
        if not compiling and positions_follow_indices(pre_rope.k_pos, mask.padding_mask):
            return rerope_band_attention
        return rerope_attention
    if attention == "dynamic":  # the query at p uses the table of length p + 1 (methods.md §10)
        q_pos, train_len = pre_rope.q_pos, original_max_positions(pre_rope.config)
        if int(q_pos.max()) < train_len:  # every query within L_train: the base table, then any backend's path
            after_rope = choose_attention(implementation, "after_rope", query, key, mask, settings=settings)
            return functools.partial(dynamic_base_table, after_rope=after_rope)
        return dynamic_attention
    if attention != "after_rope":
        raise ValueError(f"RopeSpec.attention={attention!r} names no attention path; longctx has 'after_rope', "
                         "'rerope' and 'dynamic' (longctx.attention.choose_attention).")
    if implementation == "eager":
        return eager_attention
    if implementation == "flash_attention_2":
        return flash_attention_2
    if implementation != "sdpa":
        raise ValueError(f"attn_implementation={implementation!r} has no keys-after-RoPE path in choose_attention")
    if prefer_blocked(query, key, mask, settings):  # CPU, bfloat16, no autograd
        return blocked_attention
    if mask.q_len >= settings.per_row_queries and not compiling and mask.real_spans() is not None:
        return sdpa_per_row
    if not mask.is_plain_causal or 1 < mask.q_len < mask.kv_len:
        if settings.mask_block_rows(mask.kv_len) < mask.q_len and not compiling:
            return masked_row_blocks
        return sdpa_dense_mask
    if mask.q_len > 1:
        return sdpa_causal  # q_len == kv_len: top-left and bottom-right causal alignments agree
    return sdpa_unmasked


# --- Keys after RoPE: eager; torch's SDPA (no mask, causal, dense mask, row blocks, row by row); flash-attn ------
def eager_weights(query, key, mask: AttentionMask, scaling, dropout=0.0):
    """The attention weights softmax(q kᵀ · scaling + mask) (batch, heads, q_len, kv_len), softmax in float32,
    then dropout: what `output_attentions=True` returns, as transformers' eager attention does."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~mask.dense(query.device), torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return F.dropout(probs, p=dropout, training=dropout > 0)


def eager_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None, pre_rope=None,
                    weights=None):
    """Reference: softmax(q kᵀ · scaling + mask) v, softmax in float32 (`weights`: from `eager_weights`)."""
    weights = eager_weights(query, key, mask, scaling, dropout) if weights is None else weights
    return torch.matmul(weights, repeat_kv(value, query.shape[1] // value.shape[1])).transpose(1, 2)


def sdpa_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None, pre_rope=None):
    """The `sdpa` backend: the path `choose_attention` picks for it (torch's fused kernel, or `blocked_attention`)."""
    settings = settings or active_attention_settings()
    path = choose_attention("sdpa", "after_rope", query, key, mask, settings=settings)
    return path(query, key, value, mask, scaling, dropout, settings=settings)


def _sdpa(query, key, value, scaling, dropout, attn_mask=None, is_causal=False, settings=None):
    """One call of torch's scaled_dot_product_attention, grouped-query heads in the kernel where it can (and
    `AttentionSettings.sdpa_gqa` allows)."""
    n_rep = query.shape[1] // key.shape[1]
    allowed = (settings or active_attention_settings()).sdpa_gqa
    gqa = n_rep > 1 and _SDPA_HAS_GQA and attn_mask is None and allowed
    if n_rep > 1 and not gqa:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        **({"enable_gqa": True} if gqa else {}),
    )
    return out.transpose(1, 2)


def sdpa_unmasked(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None, pre_rope=None):
    """One query seeing every key (a decoding step, nothing padded): no mask."""
    return _sdpa(query, key, value, scaling, dropout, settings=settings)


def sdpa_causal(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None, pre_rope=None):
    """A prefill without padding or cache: `is_causal`, no mask (under context parallelism, torch's ring attention)."""
    return _sdpa(query, key, value, scaling, dropout, is_causal=True, settings=settings)


def sdpa_dense_mask(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None, pre_rope=None):
    """Padding, or queries after a cache (the last q_len of kv_len keys): the dense (q_len × kv_len) mask."""
    return _sdpa(query, key, value, scaling, dropout, attn_mask=mask.dense(query.device))


def sdpa_per_row(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None, pre_rope=None):
    """A padded prefill whose rows each hold one run of real tokens (`AttentionMask.real_spans`): each row causal
    over its run, no (q_len × kv_len) mask. Padding queries get zeros (their outputs are never used)."""
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
    for row, (start, end) in enumerate(mask.real_spans()):
        if end > start:
            rows = slice(row, row + 1), slice(None), slice(start, end)
            out[row, start:end] = sdpa_attention(query[rows], key[rows], value[rows],
                                                 AttentionMask(end - start, end - start), scaling, dropout,
                                                 settings=settings)[0]
    return out


def masked_row_blocks(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None,
                      pre_rope=None):
    """A prefill that needs a mask — chunked against a cache (queries are the last q_len of kv_len positions), or
    padding with holes — as one SDPA call per block of query rows (`AttentionSettings.mask_block_rows`): each
    block's (rows × reachable keys) mask, not the whole (q_len × kv_len) one, and no keys after its last row. Each
    block is the same problem one size down: its rows are the last of the keys it sees."""
    settings = settings or active_attention_settings()
    past = mask.past
    out = query.new_empty(query.shape[0], mask.q_len, query.shape[1], value.shape[-1])
    for start, end in row_spans(mask.q_len, settings.mask_block_rows(mask.kv_len)):
        padding = None if mask.padding_mask is None else mask.padding_mask[:, : past + end]
        out[:, start:end] = sdpa_attention(query[:, :, start:end], key[:, :, : past + end],
                                           value[:, :, : past + end], AttentionMask(end - start, past + end, padding),
                                           scaling, dropout, settings=settings)
    return out


def flash_attention_2(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None,
                      pre_rope=None):
    """flash-attn 2 through transformers' wrapper (unpads left/right padding, bottom-right causal)."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    padding = None if mask.padding_mask is None else mask.padding_mask.to(torch.int32)
    return _flash_attention_forward(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), padding, query_length=mask.q_len,
        is_causal=True, dropout=dropout, softmax_scale=scaling, attn_implementation="flash_attention_2",
        target_dtype=torch.bfloat16 if query.dtype == torch.float32 else None,
    )


# --- Keys before RoPE: ReRoPE / Leaky ReRoPE (methods.md §8) and dynamic NTK (§10) --------------------------------
# Both rotate the keys per query (ReRoPE by the clipped distance, dynamic NTK by the query's own table), so neither
# fits one call of a fused kernel. In inference ReRoPE runs as two fused passes merged by their log-sum-exps
# (`rerope_fused`, where `fused_rerope_supported`); otherwise, and dynamic NTK always, they run as explicit scores, a
# block of query rows at a time (`blockwise_attention`), so memory grows as block × keys, never L × L. `eager`
# computes ReRoPE's two score matrices densely, as Su's patch does: the reference the other paths are tested against.

def rerope_operands(query, key, pre_rope: PreRope):
    """(q1, k1) plain RoPE; (q2, k2) ReRoPE's (R^w q, k) or Leaky's (R^{(i−w)/k+w} q, R^{j/k} k) (methods.md §8)."""
    return fused_operands(query, key, *rerope_rotations(pre_rope))


def _rerope_blocks(query, key, value, mask, *, scaling, dropout, pre_rope, block_rows):
    """ReRoPE / Leaky ReRoPE: a_ij = a1_ij where i − j < w, else a2_ij (methods.md §8), `block_rows` rows at a time.

    i, j are positions (so padding and the cache work); with q_len = 1 this is Su's decoding from pre-RoPE keys."""
    q1, k1, q2, k2 = rerope_operands(query * scaling, key, pre_rope)
    window, q_pos, k_pos = pre_rope.config.rope_parameters["rerope_window"], pre_rope.q_pos, pre_rope.k_pos

    def score_block(start, end, key_end):
        near = (q_pos[:, None, start:end, None] - k_pos[:, None, None, :key_end]) < window  # (b, 1, rows, keys)
        a1 = grouped_scores(q1[:, :, start:end], k1[:, :, :key_end])
        a2 = grouped_scores(q2[:, :, start:end], k2[:, :, :key_end])
        return torch.where(near, a1, a2, out=None if a1.requires_grad else a1)  # in place unless training

    return blockwise_attention(score_block, value, mask, row_spans(mask.q_len, block_rows), dropout)


def rerope_dense_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None,
                           pre_rope: PreRope = None):
    """The reference (`eager`): Su's two dense score matrices, every query row in one block."""
    return _rerope_blocks(query, key, value, mask, scaling=scaling, dropout=dropout, pre_rope=pre_rope,
                          block_rows=mask.q_len)


def rerope_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None,
                     pre_rope: PreRope = None):
    """Block-wise ReRoPE / Leaky ReRoPE at any positions (`settings.score_block_elements` scores per block)."""
    rows = (settings or active_attention_settings()).score_block_rows(query.shape[0], query.shape[1], key.shape[2])
    return _rerope_blocks(query, key, value, mask, scaling=scaling, dropout=dropout, pre_rope=pre_rope,
                          block_rows=rows)


def rerope_band_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None,
                          pre_rope: PreRope = None):
    """Block-wise ReRoPE / Leaky ReRoPE when positions follow the indices (`positions_follow_indices`). For a block of
    query rows the keys [0, lo) lie beyond every row's window, so one matrix of a2 scores against all reachable keys
    serves them, and only the band [lo, past + end) — the window, a strip of width < rows where a2 takes over, and
    the causal diagonal — needs a1 scores: one score matrix plus a band, memory O(rows × keys) (methods.md §8)."""
    q1, k1, q2, k2 = rerope_operands(query * scaling, key, pre_rope)
    window, past = pre_rope.config.rope_parameters["rerope_window"], mask.past

    def score_block(start, end, key_end):
        first, rows = past + start, end - start  # the block's first query; keys it reaches: [0, key_end)
        lo = max(0, first - window + 1)
        strip = max(lo, key_end - window) - lo  # keys [lo, lo + strip): beyond the window for some rows
        scores = grouped_scores(q2[:, :, start:end], k2[:, :, :key_end])  # a2: (b, h, rows, key_end)
        band = grouped_scores(q1[:, :, start:end], k1[:, :, lo:key_end])  # a1 on the band
        if strip:  # key lo + c is beyond the window of row r when (first + r) − (lo + c) ≥ w
            beyond = torch.ones(rows, strip, dtype=torch.bool, device=query.device).tril(first - lo - window)
            band[..., :strip] = torch.where(beyond, scores[..., lo:lo + strip], band[..., :strip])
        scores[..., lo:] = band
        return scores  # (keys after their query, and padding: hidden by `blockwise_attention`)

    rows = (settings or active_attention_settings()).score_block_rows(query.shape[0], query.shape[1], key.shape[2])
    return blockwise_attention(score_block, value, mask, row_spans(mask.q_len, rows), dropout)


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


def dynamic_base_table(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None,
                       pre_rope: PreRope = None, after_rope):
    """Dynamic NTK while every query is within L_train: the base table for all of them, so q and k are rotated once
    and `after_rope` runs — the keys-after-RoPE path `choose_attention` picked for this backend."""
    q, k = rotate(query, pre_rope.q_pos, pre_rope.inv_freq), rotate(key, pre_rope.k_pos, pre_rope.inv_freq)
    return after_rope(q, k, value, mask, scaling, dropout, settings=settings)


def dynamic_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0, *, settings=None,
                      pre_rope: PreRope = None):
    """Dynamic NTK past L_train, causal: the query at position p uses the table of length p + 1 for itself and every
    key it sees (methods.md §10, Su's s(p) = max(L, p+1)/L), so a cached step equals recomputing the sequence — in
    every layer. Blocks of rows within L_train share the base table; beyond it, keys are rotated per query row."""
    settings = settings or active_attention_settings()
    config, q_pos, k_pos, inv_freq = pre_rope.config, pre_rope.q_pos, pre_rope.k_pos, pre_rope.inv_freq
    train_len = original_max_positions(config)
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

    spans = dynamic_spans((q_pos < train_len).all(0), settings.score_block_rows(batch, heads, kv_len),
                          settings.rotated_key_rows(batch, kv_heads, kv_len, head_dim))
    return blockwise_attention(score_block, value, mask, spans, dropout)


def _unknown_backend(name) -> ValueError:
    return ValueError(f'Specified `attn_implementation="{name}"` is not supported by longctx; '  # (HF's wording)
                      f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}.")


def check_attn_implementation(name, device=None):
    """Raise a clear error for an unknown backend, or flash-attn where it cannot run."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise _unknown_backend(name)
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
        spec = ROPE_SPECS[self.config.rope_parameters["rope_type"]]
        pre_rope = None
        if spec.keys_before_rope:
            key, value, pre_rope = self._cache_before_rope(spec.name, key, value, cache, position_ids, rotary)
        else:
            cos, sin = position_embeddings
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)  # (batch, heads, q_len, head_dim)
            if cache is not None:
                scheme = None if torch.compiler.is_compiling() else (  # (json: not traceable)
                    rotary.scheme() if rotary is not None else rope_scheme(self.config))
                key, value = update_keys_after_rope(cache, self.layer_idx, key, value, mask.kv_len, scheme)
        dropout = self.config.attention_dropout if self.training else 0.0
        weights = None
        if output_attentions and pre_rope is None:
            weights = eager_weights(query, key, mask, self.scaling, dropout)
            out = eager_attention(query, key, value, mask, self.scaling, weights=weights)
        else:
            settings = active_attention_settings()
            path = choose_attention(self.config._attn_implementation or "sdpa", spec.attention, query, key, mask,
                                    settings=settings, pre_rope=pre_rope, dropout=dropout)
            out = path(query, key, value, mask, self.scaling, dropout, settings=settings, pre_rope=pre_rope)
        return self.o_proj(out.reshape(batch, q_len, -1)), weights  # out: (batch, q_len, heads, head_dim)

    def _cache_before_rope(self, rope_type, key, value, cache, position_ids, rotary):
        """Keys kept before RoPE: all keys and values so far (through the cache), and their `PreRope`."""
        if position_ids is None:
            raise ValueError(f"rope_type={rope_type!r} needs `position_ids`.")
        key, value, key_positions = update_keys_before_rope(cache, self.layer_idx, key, value, position_ids)
        inv_freq = rotary.inv_freq(key.device)[0] if rotary is not None else compute_inv_freq(self.config)[0]
        return key, value, PreRope(position_ids, key_positions, inv_freq.to(key.device), self.config)

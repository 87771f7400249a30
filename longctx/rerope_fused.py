"""ReRoPE / Leaky ReRoPE on fused attention kernels (issue 17; methods.md §8): no score matrix in memory.

ReRoPE's score is a1_ij = (R^i q_i)ᵀ(R^j k_j) (plain RoPE) where i − j < w, else a2_ij: ReRoPE (R^w q_i)ᵀ k_j, Leaky
(R^{(i−w)/k + w} q_i)ᵀ(R^{j/k} k_j). i, j are positions; which keys a query sees (causal, padding) goes by index, as in
`attention.py`. A fused kernel computes one softmax per call, so the two parts are either

- two passes, merged: attention of (q1, k1) over the band 0 ≤ i − j < w and of (q2, k2) over i − j ≥ w (a causal
  mask shifted by w), merged exactly by their log-sum-exps (`merge_by_lse`). Needs a kernel that returns the LSE:
  flex attention eagerly or compiled on CUDA (`two_pass`), torch's CPU flash kernel (`cpu_flash_two_pass`),
  flash-attn (`flash_two_pass`, `window_size`);
- or one pass over the keys laid out twice, [k1, 0] then [0, k2], against the query [q1, q2] (head dim 2d): for
  compiled flex attention on CPU, whose kernel returns no LSE (torch 2.13: "torch.compile on CPU only supports
  inference and `return_lse` is not supported yet"), at about 1.5× the attention's work (`one_pass`).

Flex attention takes any positions and padding: its masks (`FlexMasks`) read them, and its `BlockMask` comes from the
positions' per-block minimum and maximum (`block_states`, O((L/128)²) memory, never L²). The CPU flash kernel and
flash-attn count the window in indices, so they serve rows whose positions follow the indices (left padding or none:
prefills and cached steps). Keys stay cached before RoPE (`cache.PreRopeLayer`): a decoding step is the same call
with q_len ≥ 1. Inference only (no dropout, no gradient). `rerope_fused_attention` is the entry point;
`fused_rerope_supported` says when to take it.
"""

import warnings

import torch
import torch.nn.functional as F

from .rope import rotate

BLOCK_SIZE = 128  # flex attention's sparse block (query rows × keys): the kernels' default
BAND_ROWS = 128  # query rows per band block on the CPU flash kernel (at 8k: 128 rows 0.2×, 512 rows 0.4× of SDPA)
_COMPILE = {"fn": None, "failed": None}  # the compiled flex_attention, and why compiling it failed (then: eager)


def band_operands(query, key, q_pos, k_pos, inv_freq, window=None, leaky_factor=None):
    """(q1, k1): plain RoPE, the scores within the window (methods.md §8)."""
    return rotate(query, q_pos, inv_freq), rotate(key, k_pos, inv_freq)


def far_operands(query, key, q_pos, k_pos, inv_freq, window, leaky_factor=None):
    """(q2, k2): ReRoPE's (R^w q, k), or Leaky's (R^{(i−w)/k+w} q, R^{j/k} k), the scores beyond the window (§8)."""
    if leaky_factor is None:
        return rotate(query, torch.full_like(q_pos, window), inv_freq), key
    k = float(leaky_factor)
    return rotate(query, (q_pos - window) / k + window, inv_freq), rotate(key, k_pos / k, inv_freq)


def rerope_operands(query, key, q_pos, k_pos, inv_freq, window, leaky_factor=None):
    """(q1, k1, q2, k2): `band_operands`, then `far_operands`."""
    rotations = q_pos, k_pos, inv_freq, window, leaky_factor
    return (*band_operands(query, key, *rotations), *far_operands(query, key, *rotations))


def merge_by_lse(out1, lse1, out2, lse2):
    """One softmax over two disjoint key sets from each one's output (…, q, d) and log-sum-exp (…, q): returns
    ((e^{lse1} o1 + e^{lse2} o2) / (e^{lse1} + e^{lse2}), the union's LSE), in float32, the output in o1's dtype
    (into o1 itself when it is float32 and no gradient flows: callers pass a kernel's fresh output). An empty part has
    lse −∞ and weighs 0; a row empty in both (a padding query) gets 0 and lse −∞."""
    lse1, lse2 = lse1.float(), lse2.float()
    top = torch.maximum(lse1, lse2)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w1, w2 = (lse1 - top).exp(), (lse2 - top).exp()
    total = w1 + w2
    share1, share2 = (w1 / total.clamp_min(1e-30))[..., None], (w2 / total.clamp_min(1e-30))[..., None]
    grad = torch.is_grad_enabled() and (out1.requires_grad or out2.requires_grad)
    if out1.dtype == torch.float32 and not grad:
        out = out1.mul_(share1).addcmul_(out2.float(), share2)
    else:
        out = (out1.float() * share1 + out2.float() * share2).to(out1.dtype)
    return out, top + total.log()


# --- flex attention: any positions and padding --------------------------------------------------------------------
EMPTY, PARTIAL, FULL = 0, 1, 2


def _padded(x, length, fill):
    return F.pad(x, (0, length - x.shape[-1]), value=fill)


def _block_range(values, real, block):
    """Per block of `block` columns: (min, max) of `values` over its real entries and their count, (batch, blocks)."""
    big = 2**40  # a block without real entries is empty whatever its range; this keeps differences from overflowing
    v, r = values.unflatten(-1, (-1, block)), real.unflatten(-1, (-1, block))
    return v.masked_fill(~r, big).amin(-1), v.masked_fill(~r, -big).amax(-1), r.sum(-1)


def block_states(q_pos, k_pos, q_real, k_real, past, window, far, block):
    """EMPTY / PARTIAL / FULL (batch, q blocks, k blocks) int8 of the mask "key j ≤ query i + past (index), both real,
    and p_i − p_j < w" (`far`: ≥ w). Inputs padded to whole blocks (padding not real). A block is FULL only when every
    pair passes — the kernels skip the mask there — and EMPTY only when none does; PARTIAL is safe either way."""
    n_q, n_k = q_pos.shape[-1] // block, k_pos.shape[-1] // block
    q_lo, q_hi, q_count = _block_range(q_pos, q_real, block)
    k_lo, k_hi, k_count = _block_range(k_pos, k_real, block)
    first_query = torch.arange(n_q, device=q_pos.device)[:, None] * block + past  # index of each block's first query
    first_key = torch.arange(n_k, device=q_pos.device)[None, :] * block
    causal_full = first_key + block - 1 <= first_query  # (q blocks, k blocks)
    causal_empty = first_key > first_query + block - 1
    real_full = (q_count == block)[:, :, None] & (k_count == block)[:, None, :]
    real_empty = (q_count == 0)[:, :, None] | (k_count == 0)[:, None, :]
    low, high = q_lo[:, :, None] - k_hi[:, None, :], q_hi[:, :, None] - k_lo[:, None, :]  # range of p_i − p_j
    inside_full, inside_empty = (low >= window, high < window) if far else (high < window, low >= window)
    full = causal_full & real_full & inside_full
    empty = causal_empty | real_empty | inside_empty
    return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)


def _ordered(selected):
    """(batch, q blocks, k blocks) bool -> BlockMask's (count (batch, 1, q blocks), indices (…, k blocks)) int32."""
    order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
    return selected.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]


def _block_mask(states, mask_mod, q_len, kv_len, block):
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = _ordered(states == PARTIAL), _ordered(states == FULL)
    return BlockMask.from_kv_blocks(partial[0], partial[1], full[0], full[1], BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


class FlexMasks:
    """What the mask_mods read, padded to whole blocks: positions, real tokens, each query's index among the keys
    (tensors, not ints, so that a compiled kernel is not recompiled for each decoding step)."""

    def __init__(self, q_pos, k_pos, key_padding, window, block=None):
        batch, q_len = q_pos.shape
        kv_len = k_pos.shape[-1]
        block = block or BLOCK_SIZE
        self.q_len, self.kv_len, self.window, self.block = q_len, kv_len, window, block
        self.past = kv_len - q_len  # the queries are the last q_len keys
        self.q_padded, self.k_padded = -(-q_len // block) * block, -(-kv_len // block) * block
        device = q_pos.device
        if key_padding is None:
            key_padding = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
        key_padding = key_padding.to(device=device, dtype=torch.bool)
        self.q_pos, self.k_pos = _padded(q_pos.long(), self.q_padded, 0), _padded(k_pos.long(), self.k_padded, 0)
        self.q_real = _padded(key_padding[:, self.past:], self.q_padded, False)
        self.k_real = _padded(key_padding, self.k_padded, False)
        self.q_slot = torch.arange(self.q_padded, device=device) + self.past

    def states(self, far):
        return block_states(self.q_pos, self.k_pos, self.q_real, self.k_real, self.past, self.window, far,
                            self.block)

    def part(self, far):
        """The BlockMask of the band (`far` False) or of the keys beyond the window, over the kv_len keys."""
        q_pos, k_pos, q_real, k_real, q_slot, window = (self.q_pos, self.k_pos, self.q_real, self.k_real,
                                                        self.q_slot, self.window)

        def mask_mod(b, h, i, j):
            beyond = q_pos[b, i] - k_pos[b, j] >= window
            return q_real[b, i] & k_real[b, j] & (j <= q_slot[i]) & (beyond if far else ~beyond)

        return _block_mask(self.states(far), mask_mod, self.q_len, self.kv_len, self.block)

    def both(self):
        """The BlockMask of one softmax over the keys twice: [0, K) the band, [K, 2K) beyond (K = k_padded)."""
        q_pos, k_pos, q_real, k_real, q_slot, window = (self.q_pos, self.k_pos, self.q_real, self.k_real,
                                                        self.q_slot, self.window)
        n = torch.arange(2 * self.k_padded, device=q_pos.device)
        key_of, far_of = n % self.k_padded, n >= self.k_padded

        def mask_mod(b, h, i, n):
            j = key_of[n]
            beyond = q_pos[b, i] - k_pos[b, j] >= window
            return q_real[b, i] & k_real[b, j] & (j <= q_slot[i]) & (beyond == far_of[n])

        states = torch.cat((self.states(False), self.states(True)), dim=-1)
        return _block_mask(states, mask_mod, self.q_len, 2 * self.k_padded, self.block)


def _flex(compiled):
    """flex_attention itself under an outer torch.compile or when eager is asked for; else compiled once."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled or torch.compiler.is_compiling() or _COMPILE["failed"] is not None:
        return flex_attention
    if _COMPILE["fn"] is None:
        _COMPILE["fn"] = torch.compile(flex_attention)
    return _COMPILE["fn"]


def _call_flex(compiled, *args, **kwargs):
    """Compiled flex attention, falling back (with a warning, for the rest of the process) to eager flex — which
    materialises the scores — if compiling fails; an error that eager flex raises too is the inputs' and propagates."""
    try:
        return _flex(compiled)(*args, **kwargs)
    except Exception as err:  # inductor raises many types
        if not compiled or torch.compiler.is_compiling() or _COMPILE["failed"] is not None:
            raise
        out = _flex(False)(*args, **kwargs)
        _COMPILE["failed"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        warnings.warn(f"torch.compile(flex_attention) failed ({_COMPILE['failed']}); ReRoPE's fused path runs flex "
                      "attention eagerly from now on, which builds the full score matrix.", stacklevel=3)
        return out


def two_pass(q1, k1, q2, k2, value, masks: FlexMasks, scaling, compiled=False):
    """Band with (q1, k1), beyond the window with (q2, k2), merged by their LSEs: (batch, heads, q_len, d_v)."""
    from torch.nn.attention.flex_attention import AuxRequest

    gqa = q1.shape[1] != k1.shape[1]
    (out1, aux1), (out2, aux2) = (
        _call_flex(compiled, q, k, value, block_mask=masks.part(far), scale=scaling, enable_gqa=gqa,
                   return_aux=AuxRequest(lse=True)) for q, k, far in ((q1, k1, False), (q2, k2, True)))
    return merge_by_lse(out1, aux1.lse, out2, aux2.lse)[0]


def one_pass(q1, k1, q2, k2, value, masks: FlexMasks, scaling, compiled=True):
    """One softmax over the keys twice, [k1, 0] (band) and [0, k2] (beyond), for the query [q1, q2] (head dim 2d):
    exactly ReRoPE's scores, no LSE needed. (batch, heads, q_len, d_v)."""
    kv_len, width = masks.kv_len, masks.k_padded
    batch, kv_heads, _, d = k1.shape
    keys = k1.new_zeros(batch, kv_heads, 2 * width, 2 * d)
    keys[:, :, :kv_len, :d], keys[:, :, width:width + kv_len, d:] = k1, k2
    values = value.new_zeros(batch, kv_heads, 2 * width, value.shape[-1])
    values[:, :, :kv_len], values[:, :, width:width + kv_len] = value, value
    return _call_flex(compiled, torch.cat((q1, q2), dim=-1), keys, values, block_mask=masks.both(), scale=scaling,
                      enable_gqa=q1.shape[1] != kv_heads)


# --- The window as a band of indices: torch's CPU flash kernel, flash-attn ----------------------------------------
def left_padded_starts(q_pos, k_pos, key_padding):
    """Each row's first real key (batch,) when every row's real keys are one run ending at the last key (left padding
    or none) whose positions follow the indices — then i − j of positions is i − j of indices — else None."""
    batch, kv_len = k_pos.shape
    index = torch.arange(kv_len, device=k_pos.device)
    if key_padding is None:
        starts = torch.zeros(batch, dtype=torch.long, device=k_pos.device)
    else:
        real = key_padding.to(k_pos.device, torch.bool)
        starts = kv_len - real.sum(-1)
        if not bool((real == (index >= starts[:, None])).all()):
            return None
    if not positions_follow_indices(k_pos, key_padding) or not torch.equal(q_pos, k_pos[:, kv_len - q_pos.shape[1]:]):
        return None
    return starts


def positions_follow_indices(k_pos, padding_mask):
    """True when every real key's position is its index minus one offset per batch row (arange, left padding, a cache
    of those): then i − j of positions is i − j of indices, and ReRoPE's window is a band of the score matrix."""
    offsets = k_pos - torch.arange(k_pos.shape[-1], device=k_pos.device)
    if padding_mask is None:
        return bool((offsets == offsets[:, :1]).all())
    real = padding_mask.to(k_pos.device, torch.bool)
    high = offsets.masked_fill(~real, torch.iinfo(offsets.dtype).min).amax(-1)
    low = offsets.masked_fill(~real, torch.iinfo(offsets.dtype).max).amin(-1)
    return bool(((high == low) | ~real.any(-1)).all())


def _cpu_flash(query, key, value, scaling, causal=False, mask=None):
    """torch's CPU flash-attention kernel (what SDPA runs on CPU), which also returns the LSE: (out, lse)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, attn_mask=mask,
                                                                      scale=scaling)


def _band(q1, k1, value, starts, window, scaling, rows):
    """The band 0 ≤ i − j < w by index: blocks of `rows` queries, each against its rows + w − 1 keys — overlapping
    windows of the keys, a strided view the kernel reads in place (no copy), with one additive mask for every block
    (the band), and per-block masks only where a window reaches before its row's first real key. Blocks of padding
    queries only are skipped. (out, lse) (batch, heads, q_len, …)."""
    batch, heads, q_len, d = q1.shape
    kv_len = k1.shape[2]
    past, rows = kv_len - q_len, min(rows, q_len)
    blocks, width = -(-q_len // rows), rows + window - 1
    tail = blocks * rows - q_len

    def windows(x):  # (b, h, s, d) -> (b, h, blocks, width, d): block r's keys start at index past + r·rows − (w − 1)
        first = past - (window - 1)  # (only the keys from there are copied into the padded view: a decoding step
        x = F.pad(x[:, :, max(0, first):], (0, 0, max(0, -first), tail))  # copies w keys, not the cache)
        return x.unfold(2, width, rows).transpose(-1, -2)

    keys, values = windows(k1), windows(value)
    queries = F.pad(q1, (0, 0, 0, tail)).unflatten(2, (blocks, rows))  # (b, h, blocks, rows, d)
    r, c = torch.arange(rows, device=q1.device)[:, None], torch.arange(width, device=q1.device)[None, :]
    inside = (c >= r) & (c < r + window)  # (rows, width): key c of a block is in query r's window

    def additive(visible):
        return torch.zeros(visible.shape, dtype=q1.dtype, device=q1.device).masked_fill_(~visible, float("-inf"))

    band = additive(inside)[None, None]
    out = q1.new_zeros(batch, heads, blocks, rows, value.shape[-1])
    lse = q1.new_full((batch, heads, blocks, rows), float("-inf"), dtype=torch.float32)
    for row, start in enumerate(starts.tolist()):
        first = min(blocks, max(0, (start - past) // rows))  # blocks before it hold padding queries only
        plain = min(blocks, max(first, -(-(start + window - 1 - past) // rows)))  # from it: no key before `start`
        for lo, hi in ((first, plain), (plain, blocks)):
            if lo == hi:
                continue
            if lo == plain:
                mask = band.expand(hi - lo, 1, rows, width)
            else:  # a padding query sees its whole window: no row is empty (this kernel gives an empty row lse 0)
                query_at = past + torch.arange(lo, hi, device=q1.device)[:, None, None] * rows + r
                key_at = query_at - r + c - (window - 1)
                mask = additive(inside & ((key_at >= start) | (query_at < start)))[:, None]
            o, l = _cpu_flash(queries[row, :, lo:hi].transpose(0, 1), keys[row, :, lo:hi].transpose(0, 1),
                              values[row, :, lo:hi].transpose(0, 1), scaling, mask=mask)
            out[row, :, lo:hi], lse[row, :, lo:hi] = o.transpose(0, 1), l.transpose(0, 1)
    return out.flatten(2, 3)[:, :, :q_len], lse.flatten(2, 3)[:, :, :q_len]


def _grouped_flash(query, key, value, scaling):
    """`_cpu_flash` of grouped-query heads (heads a multiple of key heads) with no mask: each key head's queries
    folded into its rows, so the keys are not repeated. (out, lse) (batch, heads, q, …)."""
    batch, heads, n, d = query.shape
    kv_heads = key.shape[1]
    out, lse = _cpu_flash(query.reshape(batch, kv_heads, heads // kv_heads * n, d), key, value, scaling)
    return out.reshape(batch, heads, n, -1), lse.reshape(batch, heads, n)


def _repeat_heads(x, n_rep):
    return x.repeat_interleave(n_rep, dim=1) if n_rep > 1 else x


def _beyond(q2, k2, value, starts, window, scaling):
    """The keys i − j ≥ w by index: per row start s, the queries t ≥ s + w see keys [s, t − w], a causal square after
    the keys every such query sees (bottom-right alignment; this kernel's causal mask is top-left). Grouped-query key
    heads are repeated for the causal square only. Rows with no such key get lse −∞. (out, lse) (batch, heads, q_len,
    …)."""
    batch, heads, q_len, _ = q2.shape
    kv_len, n_rep = k2.shape[2], heads // k2.shape[1]
    past = kv_len - q_len
    out = q2.new_zeros(batch, heads, q_len, value.shape[-1])
    lse = q2.new_full((batch, heads, q_len), float("-inf"), dtype=torch.float32)
    groups = [(slice(None), int(starts[0]))] if bool((starts == starts[0]).all()) else [
        (slice(row, row + 1), s) for row, s in enumerate(starts.tolist())]
    for rows, start in groups:
        first = max(past, start + window)  # the first query (index) with a key beyond its window
        n_q, n_k = kv_len - first, kv_len - window - start
        if n_q <= 0:
            continue
        q = q2[rows, :, first - past:]
        seen = n_k if n_q == 1 else n_k - n_q  # keys [start, start + seen): seen by every such query
        parts = []
        if seen:
            parts.append(_grouped_flash(q, k2[rows, :, start:start + seen], value[rows, :, start:start + seen],
                                        scaling))
        if seen < n_k:
            keys = slice(start + seen, kv_len - window)
            square = _repeat_heads(k2[rows, :, keys], n_rep), _repeat_heads(value[rows, :, keys], n_rep)
            parts.append(_cpu_flash(q, *square, scaling, causal=True))
        o, l = parts[0] if len(parts) == 1 else merge_by_lse(*parts[0], *parts[1])
        out[rows, :, first - past:], lse[rows, :, first - past:] = o, l
    return out, lse


def cpu_flash_two_pass(query, key, value, starts, scaling, *rotations, rows=None):
    """The two passes on torch's CPU flash kernel (its LSE): the band in blocks of `rows` queries, beyond the window
    one causal call per distinct row start, merged. Un-rotated query and key, `rotations` = (q_pos, k_pos, inv_freq,
    window, leaky_factor): each pass rotates its own operands — the band only the keys some query's window reaches
    (a decoding step: w keys, not the cache) — so only one pair is alive at a time. Rows left-padded from `starts`,
    positions following the indices (`left_padded_starts`). (batch, heads, q_len, d_v); padding queries 0."""
    q_pos, k_pos, inv_freq, window, leaky_factor = rotations
    n_rep, (q_len, kv_len) = query.shape[1] // key.shape[1], (query.shape[2], key.shape[2])
    lo = max(0, kv_len - q_len - (window - 1))  # the band's first key: the first query's window
    q1, k1 = band_operands(query, key[:, :, lo:], q_pos, k_pos[:, lo:], inv_freq)
    band = _band(q1, _repeat_heads(k1, n_rep), _repeat_heads(value[:, :, lo:], n_rep), starts - lo, window, scaling,
                 rows or BAND_ROWS)
    del q1, k1
    q2, k2 = far_operands(query, key, *rotations)
    beyond = _beyond(q2, k2, value, starts, window, scaling)
    del q2, k2
    out, _ = merge_by_lse(*band, *beyond)
    query_real = torch.arange(kv_len - q_len, kv_len, device=query.device) >= starts[:, None]
    return out.masked_fill_(~query_real[:, None, :, None], 0)


def flash_two_pass(q1, k1, q2, k2, value, starts, window, scaling):
    """The two passes on flash-attn 2 (CUDA, fp16 / bf16; written to its documented API, not run here: no GPU). Rows
    unpadded to varlen; the band `causal=True, window_size=(w − 1, 0)`, beyond the window causal against each row's
    keys but its last w (both bottom-right aligned). flash-attn gives an empty row output 0 and lse +∞, so the far
    part's empty rows (each sequence's first w) get lse −∞ here, from their indices. (batch, heads, q_len, d_v)."""
    try:  # (in a try: transformers' remote-code check then does not require flash-attn of a checkpoint's users)
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError("ReRoPE's flash-attn path needs the flash-attn package (CUDA).") from err

    batch, heads, q_len, _ = q1.shape
    kv_len = k1.shape[2]
    index = torch.arange(kv_len, device=q1.device)
    keys_real = index >= starts[:, None]  # (batch, kv_len)
    queries_real = keys_real[:, kv_len - q_len:]
    far_real = keys_real & (index < kv_len - window)  # each row's keys but its last w

    def packed(x, real):  # (b, h, s, d) -> (total, h, d), the real rows in order
        return x.transpose(1, 2)[real]

    def cu_seqlens(real):
        lengths = real.sum(-1, dtype=torch.int32)
        return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), int(lengths.max())

    (cu_q, max_q), (cu_k, max_k), (cu_far, max_far) = (cu_seqlens(r) for r in (queries_real, keys_real, far_real))
    out1, lse1, _ = flash_attn_varlen_func(packed(q1, queries_real), packed(k1, keys_real), packed(value, keys_real),
                                           cu_q, cu_k, max_q, max_k, softmax_scale=scaling, causal=True,
                                           window_size=(window - 1, 0), return_attn_probs=True)
    out1, lse1 = out1.transpose(0, 1), lse1  # (heads, total_q, d), (heads, total_q)
    out2, lse2 = torch.zeros_like(out1), torch.full_like(lse1, float("-inf"))
    if max_far > 0:
        far, far_lse, _ = flash_attn_varlen_func(packed(q2, queries_real), packed(k2, far_real),
                                                 packed(value, far_real), cu_q, cu_far, max_q, max_far,
                                                 softmax_scale=scaling, causal=True, return_attn_probs=True)
        query_index = (index[kv_len - q_len:] - starts[:, None])[queries_real]  # each real query's index in its row
        out2, lse2 = far.transpose(0, 1), far_lse.masked_fill(query_index[None] < window, float("-inf"))
    merged = merge_by_lse(out1, lse1, out2, lse2)[0].transpose(0, 1)  # (total_q, heads, d)
    out = merged.new_zeros(batch, q_len, heads, value.shape[-1])
    out[queries_real] = merged
    return out.transpose(1, 2)


# --- Entry point --------------------------------------------------------------------------------------------------
BACKENDS = ("auto", "flex", "flex-eager", "cpu-flash", "flash-attn")


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_flash_available(query) -> bool:
    return query.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def flash_attn_available(query) -> bool:
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def fused_rerope_supported(query, key, mask=None, pre_rope=None, dropout=0.0) -> bool:
    """Whether the dispatch should send this call to `rerope_fused_path` rather than the block-wise paths: inference
    (no dropout, no gradient — the CPU kernels and flash-attn's LSE have none), queries that are the last of the keys
    (`mask`, an `AttentionMask`: no `query_start`), and a fused kernel that beats the block-wise paths there:

    - CPU: torch's flash kernel, so rows whose positions follow the indices (`left_padded_starts` of `pre_rope`'s
      positions and `mask`'s padding; not under torch.compile, as that reads values). Compiled flex attention on CPU
      (any positions) runs ~1.7× default RoPE, no faster than the block-wise paths, after ~20 s of compiling.
    - CUDA: flash-attn (fp16 / bf16). Compiled flex attention is not chosen there by default: it has not been run on
      a GPU here, and if compiling failed its eager fallback would build the whole score matrix; ask for it with
      `rerope_fused_attention(..., backend="flex")`."""
    if dropout or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)):
        return False
    if getattr(mask, "query_start", None) is not None:
        return False
    if query.device.type == "cpu":
        return (cpu_flash_available(query) and pre_rope is not None and not torch.compiler.is_compiling()
                and left_padded_starts(pre_rope.q_pos, pre_rope.k_pos, getattr(mask, "padding_mask", None)) is not None)
    return flash_attn_available(query) and pre_rope is not None and not torch.compiler.is_compiling() and (
        left_padded_starts(pre_rope.q_pos, pre_rope.k_pos, getattr(mask, "padding_mask", None)) is not None)


def rerope_fused_attention(query, key, value, q_pos, k_pos, *, inv_freq, window, leaky_factor=None,
                           key_padding=None, scaling=None, backend="auto"):
    """ReRoPE (`leaky_factor` None) or Leaky ReRoPE (factor k) attention on a fused kernel (methods.md §8).

    query (batch, heads, q_len, d) and key (batch, kv_heads, kv_len, d) **before RoPE** (grouped-query heads: heads a
    multiple of kv_heads), value (batch, kv_heads, kv_len, d_v); q_pos (batch, q_len), k_pos (batch, kv_len) positions
    (the queries are the last q_len of the kv_len keys: a prefill, or a step over the pre-RoPE cache); inv_freq
    (d/2,); window w; key_padding (batch, kv_len) bool, True for real tokens, or None; scaling (default d^-1/2).
    backend: "flex" (compiled; eager if compiling fails), "flex-eager" (builds the score matrix: a reference),
    "cpu-flash" (torch's CPU flash kernel), "flash-attn" (CUDA) — the last two need left padding (or none) and
    positions that follow the indices — or "auto": flash-attn on CUDA, the CPU flash kernel on CPU, where they
    apply, else flex. Returns (batch, q_len, heads, d_v) like attention.py's backends; padding queries get 0."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(map(repr, BACKENDS))}.")
    if leaky_factor is not None and not leaky_factor > 0:
        raise ValueError(f"leaky_factor={leaky_factor}: Leaky ReRoPE's k must be > 0 (None: ReRoPE).")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    rotations = q_pos, k_pos, inv_freq.to(query.device), window, leaky_factor
    index_kernel = {"flash-attn": flash_attn_available(query), "cpu-flash": cpu_flash_available(query)}
    chosen = backend
    if backend == "auto":  # under torch.compile: flex (finding the row spans reads values, a graph break)
        usable = [name for name, ok in index_kernel.items() if ok and not torch.compiler.is_compiling()]
        chosen = usable[0] if usable else "flex"
    if chosen in index_kernel:
        starts = left_padded_starts(q_pos, k_pos, key_padding) if index_kernel[chosen] else None
        if starts is not None and chosen == "cpu-flash":
            return cpu_flash_two_pass(query, key, value, starts, scaling, *rotations).transpose(1, 2)
        if starts is not None:
            return flash_two_pass(*rerope_operands(query, key, *rotations), value, starts, window,
                                  scaling).transpose(1, 2)
        if backend != "auto":
            needs = "CUDA, fp16/bf16 and flash-attn" if chosen == "flash-attn" else "a CPU tensor"
            raise ValueError(f"backend={backend!r} needs {needs}, left padding (or none) and positions that follow "
                             "the indices; backend='flex' takes any.")
        chosen = "flex"
    compiled = chosen != "flex-eager"
    masks = FlexMasks(q_pos, k_pos, key_padding, window)
    lse_free = compiled and query.device.type == "cpu"  # the compiled CPU kernel returns no LSE
    out = (one_pass if lse_free else two_pass)(*rerope_operands(query, key, *rotations), value, masks, scaling,
                                               compiled=compiled)
    return out.transpose(1, 2)  # (batch, q_len, heads, d_v)


def rerope_rotations(pre_rope):
    """(q_pos, k_pos, inv_freq, window, leaky_factor) of an `attention.PreRope` of rope_type rerope or leaky-rerope:
    the arguments `rerope_operands` rotates by."""
    rope = pre_rope.config.rope_parameters
    if rope["rope_type"] not in ("rerope", "leaky-rerope"):
        raise ValueError(f"rope_type={rope['rope_type']!r} has no ReRoPE operands (rerope, leaky-rerope)")
    leaky_factor = rope["factor"] if rope["rope_type"] == "leaky-rerope" else None
    return pre_rope.q_pos, pre_rope.k_pos, pre_rope.inv_freq, rope["rerope_window"], leaky_factor


def rerope_fused_path(query, key, value, mask, scaling, dropout=0.0, *, settings=None, pre_rope=None, backend="auto"):
    """`rerope_fused_attention` as one of `attention.choose_attention`'s paths (their signature): positions, table,
    window and Leaky factor from `pre_rope` (`rerope_rotations`), padding from the `AttentionMask`.
    (batch, q_len, heads, d_v)."""
    if dropout:
        raise ValueError(f"dropout={dropout}: the fused ReRoPE kernels have none; `fused_rerope_supported` says when "
                         "this path applies.")
    q_pos, k_pos, inv_freq, window, leaky_factor = rerope_rotations(pre_rope)
    return rerope_fused_attention(query, key, value, q_pos, k_pos, inv_freq=inv_freq, window=window,
                                  leaky_factor=leaky_factor, key_padding=mask.padding_mask, scaling=scaling,
                                  backend=backend)

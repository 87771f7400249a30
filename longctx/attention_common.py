"""What every attention path shares: which keys each query sees (`AttentionMask`, with the padding rule), the size
thresholds that choose between the paths (`AttentionSettings`), and explicit scores a block of query rows at a time
(`blockwise_attention`, the one block loop of the paths that do not call a fused kernel).
"""

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionSettings:
    """Size thresholds that choose between the attention paths and size their blocks (measured in BENCHMARKS.md;
    read by `longctx.attention.choose_attention` and the paths). The model runs under `DEFAULT_ATTENTION_SETTINGS`,
    or under others inside `attention_settings(...)`; the paths also take them as an argument."""

    # `blocked_attention` (CPU, bfloat16, no autograd): prefills of at least [0] queries and at most [1] keys
    blocked_queries: tuple[int, int] = (256, 16384)
    blocked_score_elements: int = 2**24  # scores per block of `blocked_attention` (batch × heads × rows × keys)
    per_row_queries: int = 256  # padded prefills from this length run row by row (BENCHMARKS.md, "Padded batches")
    mask_block_elements: int = 2**22  # mask entries (rows × keys) per SDPA call of a masked prefill
    score_block_elements: int = 2**22  # keys before RoPE: scores per query block (batch × heads × rows × keys)
    # dynamic NTK past L_train: keys rotated per query row, per block (batch × kv heads × rows × keys × head_dim)
    rotated_key_elements: int = 2**24
    # ReRoPE / Leaky ReRoPE inference on fused kernels where `rerope_fused.fused_rerope_supported` (False: block-wise),
    # for calls of at least [0] queries or over at least [1] keys (below both, the block-wise paths are faster)
    fused_rerope: bool = True
    fused_rerope_from: tuple[int, int] = (384, 4096)
    # grouped-query heads inside SDPA (`enable_gqa`); False repeats the key/value heads first, as context-parallel
    # training does (torch's ring attention dispatches SDPA's kernels, which take equal head counts)
    sdpa_gqa: bool = True

    def prefer_fused_rerope(self, q_len: int, kv_len: int) -> bool:
        queries, keys = self.fused_rerope_from
        return self.fused_rerope and (q_len >= queries or kv_len >= keys)

    # Query rows per block of each block-wise path, from the budgets above.
    def blocked_block_rows(self, batch: int, heads: int, kv_len: int) -> int:
        return max(64, min(512, self.blocked_score_elements // (batch * heads * kv_len)))

    def mask_block_rows(self, kv_len: int) -> int:
        return max(64, self.mask_block_elements // kv_len)

    def score_block_rows(self, batch: int, heads: int, kv_len: int) -> int:
        return self.score_block_elements // (batch * heads * kv_len)  # (0: one row, `row_spans`)

    def rotated_key_rows(self, batch: int, kv_heads: int, kv_len: int, head_dim: int) -> int:
        return self.rotated_key_elements // (batch * kv_heads * kv_len * head_dim)


DEFAULT_ATTENTION_SETTINGS = AttentionSettings()
_active = DEFAULT_ATTENTION_SETTINGS  # the settings in force: the default, or the innermost `attention_settings`


def active_attention_settings() -> AttentionSettings:
    """The settings the attention runs under now (`DEFAULT_ATTENTION_SETTINGS` outside `attention_settings`)."""
    return _active


@contextlib.contextmanager
def attention_settings(settings: AttentionSettings | None = None, **changes):
    """Run the attention under `settings`, or under the active ones with `changes` (field names of
    `AttentionSettings`), e.g. `with attention_settings(per_row_queries=10**9): model(ids, attention_mask=mask)`
    (padded prefills keep one masked call). Process-wide while the block runs, as torch's backend flags are; yields
    the settings in force."""
    global _active
    previous = _active
    _active = dataclasses.replace(settings or previous, **changes)
    try:
        yield _active
    finally:
        _active = previous


@dataclass
class AttentionMask:
    """Which keys each query sees: causal over the cache plus an optional padding mask.

    `padding_mask` (batch, kv_len) bool, True for real tokens, or None when nothing is padded. The dense
    (batch, 1, q_len, kv_len) form is built at most once per forward, and only for paths that need it.
    The queries are the last q_len of the kv_len keys, unless `query_start` says where they begin: a static cache
    under torch.compile (`cache.static_slots`), whose keys are its whole buffer and whose filled length is a
    tensor (an int would break the graph) that nothing may change during the forward; its unfilled slots are
    padding. The block-wise paths (`hide_`) serve only the usual alignment (`query_start` None).
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
        """Boolean mask (batch or 1, 1, q_len, kv_len), True = may attend, built once."""
        if self._dense is None:
            self._dense = self._build(0, self.q_len, device)
        return self._dense

    def hidden_padding(self, start, end, keys, device) -> torch.Tensor:
        """The padding keys [0, keys) that query rows [start, end) do not see, (batch, 1, end − start, keys): every
        one, except from a query with no real key at or before it (a left-padding query), which sees its causal
        keys instead — that keeps softmax finite, and its output is never used."""
        real = self.padding_mask.to(device)
        sighted = (real.cumsum(-1) > 0).index_select(1, torch.arange(start, end, device=device) + self.past)
        return ~real[:, None, None, :keys] & sighted[:, None, :, None]

    def hide_(self, scores, start, end) -> torch.Tensor:
        """Set the scores (b, h, end − start, past + end) of query rows [start, end) that the mask hides to the
        dtype's minimum, in place: keys after their query (the causal triangle over keys [past + start, past + end)),
        and padding keys (`hidden_padding`)."""
        low, past, rows = torch.finfo(scores.dtype).min, self.past, end - start
        ahead = torch.ones(rows, rows, dtype=torch.bool, device=scores.device).triu(1)  # key after its query
        scores[..., past + start:].masked_fill_(ahead, low)
        if self.padding_mask is not None:
            scores.masked_fill_(self.hidden_padding(start, end, scores.shape[-1], scores.device), low)
        return scores

    def _build(self, start, end, device):
        """Mask of query rows [start, end) over the keys they can reach: causal by index, padding keys hidden
        (`hidden_padding`)."""
        query_index = torch.arange(start, end, device=device) + self.past
        keys = self.kv_len if self.query_start is not None else self.past + end
        key_index = torch.arange(keys, device=device)
        causal = (key_index[None, :] <= query_index[:, None])[None, None]  # (1, 1, rows, keys)
        if self.padding_mask is None:
            return causal
        return causal & ~self.hidden_padding(start, end, keys, device)

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


def row_spans(q_len, rows):
    """[(start, end)] blocks of `rows` query rows (at least one) covering [0, q_len)."""
    return [(start, min(start + rows, q_len)) for start in range(0, q_len, max(1, rows))]


def blockwise_attention(score_block, value, mask: AttentionMask, spans, dropout):
    """softmax(scores) v for each span [start, end) of query rows; `score_block(start, end, key_end)` returns the
    scaled scores (b, h, rows, key_end) of those rows against the keys they can reach (causal: past + end), and the
    mask hides what they must not see (`AttentionMask.hide_`). Returns (batch, q_len, heads, head_dim)."""
    past, out = mask.past, None
    for start, end in spans:
        scores = mask.hide_(score_block(start, end, past + end), start, end)
        part = softmax_values(scores, value[:, :, : past + end], dropout)
        if out is None:
            out = part.new_empty(part.shape[0], part.shape[1], mask.q_len, part.shape[3])
        out[:, :, start:end] = part
    return out.transpose(1, 2)  # (batch, q_len, heads, head_dim)

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

from .configuration_longctx import original_max_positions
from .rope import apply_rotary

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class AttentionMask:
    """Which keys each query sees: causal over the cache plus an optional padding mask.

    `padding_mask` (batch, kv_len) bool, True for real tokens, or None when nothing is padded. The dense
    (batch, 1, q_len, kv_len) form is built at most once per forward, and only for backends that need it.
    """

    q_len: int
    kv_len: int
    padding_mask: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @property
    def is_plain_causal(self) -> bool:
        return self.padding_mask is None

    def dense(self, device) -> torch.Tensor:
        """Boolean mask (batch or 1, 1, q_len, kv_len), True = may attend. Rows with no visible key see all keys
        (they are padding queries; this keeps softmax finite, their outputs are never used)."""
        if self._dense is None:
            query_index = torch.arange(self.kv_len - self.q_len, self.kv_len, device=device)
            key_index = torch.arange(self.kv_len, device=device)
            mask = (key_index[None, :] <= query_index[:, None])[None, None]  # (1, 1, q, kv)
            if self.padding_mask is not None:
                mask = mask & self.padding_mask[:, None, None, :].to(device)
                mask = mask | ~mask.any(dim=-1, keepdim=True)
            self._dense = mask
        return self._dense

    def visible_keys(self, device) -> torch.Tensor:
        """Number of keys each query sees, (batch or 1, q_len): what `logn_scaling="trained"` counts."""
        if self.padding_mask is None:
            return torch.arange(self.kv_len - self.q_len + 1, self.kv_len + 1, device=device)[None]
        return self.padding_mask.to(device).long().cumsum(-1)[:, self.kv_len - self.q_len:].clamp(min=1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, d) -> (batch, kv_heads * n_rep, seq, d) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0):
    """Reference: softmax(q kᵀ · scaling + mask) v, softmax in float32."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (batch, heads, q_len, kv_len)
    scores = scores.masked_fill(~mask.dense(query.device), torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2)


def sdpa_attention(query, key, value, mask: AttentionMask, scaling, dropout=0.0):
    """torch's scaled_dot_product_attention: `is_causal` without any mask when nothing is padded."""
    attn_mask, is_causal = None, False
    if not mask.is_plain_causal or 1 < mask.q_len < mask.kv_len:
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


def check_attn_implementation(name, device=None):
    """Raise a clear error for an unknown backend, or flash-attn where it cannot run."""
    if name not in ATTENTION_FUNCTIONS:
        raise ValueError(f"attn_implementation={name!r} is not supported; choose one of {', '.join(ATTENTION_FUNCTIONS)}.")
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
            raise ValueError("attn_implementation='flash_attention_2' runs only on CUDA GPUs; use 'sdpa' on this device.")


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
                past_key_values=None):
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)  # (batch, heads, q_len, head_dim)
        if query_scale is not None:
            query = query * query_scale[:, None, :, None].to(query.dtype)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = ATTENTION_FUNCTIONS[self.config._attn_implementation or "sdpa"]
        dropout = self.config.attention_dropout if self.training else 0.0
        out = attention(query, key, value, mask, self.scaling, dropout)  # (batch, q_len, heads, head_dim)
        return self.o_proj(out.reshape(batch, q_len, -1))

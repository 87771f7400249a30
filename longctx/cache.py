"""KV-cache layers for transformers' `DynamicCache`: one that appends in place, one that keeps keys before RoPE; and
the LRU's recurrent state in transformers' own slot for it.

transformers' `DynamicLayer` appends by `torch.cat`, copying the whole cache at every decoding step: O(L) per token,
half of a CPU step's time at 16k tokens. `GrowingLayer` writes into a buffer with room to spare and grows it
geometrically (amortised O(1)). Dynamic NTK changes every key's rotation when the length grows, and ReRoPE rotates
each key by its clipped distance to the query, so both need the un-rotated keys and the position of every cached
key (per batch row: left padding shifts them): `PreRopeLayer` also carries those positions through crop, beam
reordering and batch selection. The attention swaps one of them in for an empty `DynamicLayer` on first use, so the
stock `DynamicCache` (and `generate()`) works unchanged.

An LRU layer caches only its state (batch, state_size) complex64, in the `LinearAttentionLayer` that
`DynamicCache(config=...)` builds for `layer_types[i] == "linear_attention"` (`read_lru_state`, `write_lru_state`).
"""

from typing import NamedTuple

import torch
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin, StaticLayer

from .rope import KEYS_BEFORE_ROPE


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends into buffers with spare slots instead of concatenating: 256 after the first
    update (a prompt and a short answer cost 256 slots more than the keys), then an eighth of the length at each
    growth (amortised O(1) per token). `keys` and `values` are views of the filled slots, so every `DynamicLayer`
    method (crop, beam reordering, batch selection, offloading) works unchanged; a slot is written once — after a
    crop or any method that replaced the views, the next update copies into new buffers — so no tensor handed out
    changes afterwards (buffers belong to one layer object: a shallow copy copies them on its next update). With
    gradients enabled, under torch.compile, or when the new keys do not match the held ones (batch, heads, dtype,
    device), it concatenates, as `DynamicLayer` does (and fails or promotes as it does)."""

    GROWTH = 8, 256  # spare slots: 256 at first, then max(needed // 8, 256) where needed = slots after the update

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._buffers = None  # (keys, values, id of the owning layer); keys/values (batch, heads, capacity, d)
        self._filled = 0  # slots written

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if (torch.compiler.is_compiling() or torch.is_grad_enabled()
                or (length and not self._matches(key_states, value_states))):
            self._buffers = None
            return super().update(key_states, value_states)
        if not self._appendable(length + new):
            self._reallocate(key_states, value_states, length, length + new)
        keys, values, _ = self._buffers
        keys[:, :, length:length + new] = key_states
        values[:, :, length:length + new] = value_states
        self._filled = length + new
        self.keys, self.values = keys[:, :, :self._filled], values[:, :, :self._filled]
        return self.keys, self.values

    def _matches(self, key_states, value_states):
        """Whether the new keys and values extend the held ones: same batch, heads, head size, dtype and device."""
        return all(held.shape[:2] + held.shape[3:] == new.shape[:2] + new.shape[3:]
                   and (held.dtype, held.device) == (new.dtype, new.device)
                   for held, new in ((self.keys, key_states), (self.values, value_states)))

    def _appendable(self, needed):
        """Whether the new slots can be written into this layer's buffers: `keys`/`values` are still their views
        of every written slot, there is room, and writing is allowed in this mode."""
        if self._buffers is None or self._buffers[2] != id(self) or self.get_seq_length() != self._filled:
            return False
        keys, values, _ = self._buffers
        return (needed <= keys.shape[2]
                and all(held.data_ptr() == buffer.data_ptr() and held.stride() == buffer.stride()
                        for held, buffer in ((self.keys, keys), (self.values, values)))
                and (torch.is_inference_mode_enabled() or not keys.is_inference()))

    def _reallocate(self, key_states, value_states, length, needed):
        capacity = needed + max(needed // self.GROWTH[0] if length else 0, self.GROWTH[1])
        buffers = []
        for held, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty(*new.shape[:2], capacity, *new.shape[3:])
            if length:
                buffer[:, :, :length] = held
            buffers.append(buffer)
        self._buffers = (*buffers, id(self))

    def reset(self):
        super().reset()
        self._buffers, self._filled = None, 0

    # The methods that move, reorder or shorten `keys`/`values` let go of the buffers (offloading then frees the
    # device memory); the next update copies into new ones.
    def offload(self):
        self._buffers = None
        super().offload()

    def crop(self, tokens_to_remove: int):
        self._buffers = None
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._buffers = None
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        self._buffers = None
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        self._buffers = None
        super().batch_select_indices(indices)


class PreRopeLayer(GrowingLayer):
    """A `DynamicLayer` whose keys are stored before RoPE, plus `positions` (batch, seq) of every cached key."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.positions: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, positions=None, **kwargs):
        if positions is None:
            raise ValueError("PreRopeLayer.update needs the `positions` (batch, seq) of the new keys.")
        keys, values = super().update(key_states, value_states)
        positions = positions.to(keys.device)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=-1)
        return keys, values

    def reset(self):
        super().reset()
        self.positions = None

    def crop(self, tokens_to_remove: int):
        super().crop(tokens_to_remove)
        if tokens_to_remove and self.positions is not None:
            self.positions = self.positions[:, : -abs(tokens_to_remove)]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]


def _cache_layer(cache, layer_idx):
    if getattr(cache, "layer_class_to_replicate", None) is not None:  # a DynamicCache() built without a config
        while len(cache.layers) <= layer_idx:
            cache.layers.append(cache.layer_class_to_replicate())
    return cache.layers[layer_idx]


def update_keys_before_rope(cache, layer_idx, key, value, positions):
    """Append un-rotated keys, values and their positions (batch, q_len); return all keys, values, key positions."""
    if cache is None:
        return key, value, positions
    layer = _cache_layer(cache, layer_idx)
    if not isinstance(layer, PreRopeLayer):
        if type(layer) not in (DynamicLayer, GrowingLayer):
            raise ValueError(
                f"This rope_type keeps keys before RoPE in the KV cache, which a {type(layer).__name__} (layer "
                f"{layer_idx} of the given cache) cannot hold: pass a DynamicCache (or none; in generate(), the "
                "default cache_implementation, not 'static').")
        if _holds_keys(layer):
            raise ValueError(
                f"This rope_type keeps keys before RoPE in the KV cache, but layer {layer_idx} of the given cache "
                f"holds {layer.get_seq_length()} keys after RoPE (filled under another rope_type): pass a fresh "
                "DynamicCache, and start a new cache after `set_rope`.")
        layer = cache.layers[layer_idx] = PreRopeLayer()
    keys, values = cache.update(key, value, layer_idx, positions=positions)
    return keys, values, layer.positions


def update_keys_after_rope(cache, layer_idx, key, value, kv_len, scheme=None):
    """The usual post-RoPE cache update: every cached key and value, the first `kv_len` (a StaticCache returns its
    whole pre-allocated buffer, whose first slots are the filled ones). `scheme` (`rope.rope_scheme`): the position
    scheme the keys were rotated by, kept on the cache layer; keys of another scheme (`set_rope` since) are refused,
    as are keys before RoPE (filled under another rope_type). A compiled forward passes None: not checked."""
    layer = _cache_layer(cache, layer_idx)
    if type(layer) in (DynamicLayer, PreRopeLayer) and not _holds_keys(layer):
        layer = cache.layers[layer_idx] = GrowingLayer()  # appends in place (an emptied PreRopeLayer: plain again)
    if isinstance(layer, PreRopeLayer):
        raise ValueError(
            f"Layer {layer_idx} of the given cache holds keys before RoPE (filled under rope_type "
            f"{'/'.join(KEYS_BEFORE_ROPE)}); this rope_type caches keys after RoPE. Start a new cache after `set_rope`.")
    # A compiled forward passes no scheme and neither reads nor writes the stamp (dynamo would guard on its value and
    # recompile whenever an eager prefill had stamped the layer); its keys stay under the stamp of the eager ones.
    held = getattr(layer, "longctx_scheme", None) if scheme is not None else None
    if held is not None and held != scheme and _holds_keys(layer):
        raise ValueError(
            f"Layer {layer_idx} of the given cache holds keys rotated under rope_parameters {held}, but the model now "
            f"uses {scheme} (`set_rope` switched it): those keys would be wrong. Start a new cache (or "
            "`cache.reset()`).")
    keys, values = cache.update(key, value, layer_idx)
    if scheme is not None:
        cache.layers[layer_idx].longctx_scheme = scheme
    return keys[:, :, :kv_len], values[:, :, :kv_len]


def static_slots(cache):
    """The length of a pre-allocated (`StaticCache`) attention layer's buffer, or None for a growing cache.

    Under torch.compile a static cache is attended as its whole buffer, the unfilled slots masked, so that every
    decoding step has the same shapes: one graph, as CUDA graphs (`mode="reduce-overhead"`) need."""
    for layer in cache.layers:
        if isinstance(layer, StaticLayer):
            return layer.max_cache_len
    return None


class CacheView(NamedTuple):
    """Where one forward's tokens fall in the cache (`cache_view`): `past` tokens before them (an int; a tensor when
    `fixed`), `kv_len` keys they attend to, a static cache's `slots` (else None), and `fixed`: a static cache under
    torch.compile, attended as its whole buffer with its filled length a tensor (no int, no graph break)."""

    past: object
    kv_len: object
    slots: int | None
    fixed: bool


def cache_view(cache, q_len, attn_implementation=None) -> CacheView:
    """The `CacheView` of a forward of `q_len` tokens over `cache` (None: no cache). The compiled static view holds a
    copy of the filled length, as the cache counts on in place when the first layer writes; flash-attn unpads by the
    mask's last columns, so it takes the int path."""
    if cache is None:
        return CacheView(0, q_len, None, False)
    slots = static_slots(cache)
    if slots is not None and torch.compiler.is_compiling() and attn_implementation != "flash_attention_2":
        past = _first_attention_layer(cache).get_seq_length()
        return CacheView(past.clone() if isinstance(past, torch.Tensor) else past, slots, slots, True)
    past = cached_length(cache)
    return CacheView(past, past + q_len, slots, False)


def _holds_keys(layer):
    return bool(getattr(layer, "is_initialized", True)) and int(layer.get_seq_length()) > 0


# --- the LRU's recurrent state ---------------------------------------------------------------------------------------
def _state_layer(cache, layer_idx):
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if not isinstance(layer, LinearAttentionCacheLayerMixin):
        raise ValueError(
            f"LRU layer {layer_idx} needs a recurrent-state slot in the cache, but the cache has "
            f"{type(layer).__name__} there. Build the cache with `DynamicCache(config=model.config)` (what the model "
            "and generate() do by default): config.layer_types marks LRU layers 'linear_attention'.")
    return layer


def read_lru_state(cache, layer_idx):
    """The state (batch, state_size) complex64 after the tokens already seen, or None before the first one. A cache
    recording its past to be cropped (assisted decoding: transformers 5.25 rolls linear layers back by their per-token
    states) is refused: the LRU keeps only its last state."""
    layer = _state_layer(cache, layer_idx)
    if getattr(layer, "record_past", False):
        raise ValueError(f"LRU layer {layer_idx}: this is a stateful model, whose recurrent state cannot be rolled "
                         "back, so the cache cannot be cropped; assisted decoding (assistant_model, prompt lookup) is "
                         "not supported. Generate without an assistant.")
    return layer.recurrent_states[0] if layer.has_previous_state[0] else None


def write_lru_state(cache, layer_idx, state, new_tokens):
    """Store the state after this forward (copied into a fixed buffer: constant memory) and count the tokens: in an
    all-LRU stack (no attention layer counts its keys) as a Python int, and from transformers 5.25 in the layer's own
    tensor count (`cumulative_length_linear`, what `cache.get_seq_length(i)` returns for a linear layer and generate()
    reads for layer 0; 5.24 sent that call to the first attention layer). The tensor is added to in place, so a
    compiled hybrid step is not specialised on the count."""
    layer = _state_layer(cache, layer_idx)
    if all(cache.is_linear):
        layer.lru_seen_tokens = (layer.lru_seen_tokens if layer.has_previous_state[0] else 0) + new_tokens
    count = getattr(layer, "cumulative_length_linear", None)
    if count is not None:
        if not layer.has_previous_state[0]:
            count.zero_()  # (a state restarting after `reset()`, which zeroes it too)
        count.add_(new_tokens)
    cache.update_recurrent_state(state, layer_idx)
    layer.has_previous_state[0] = True  # `cache.reset()` clears it: the state then restarts from zero


def _first_attention_layer(cache):
    return next(layer for layer, linear in zip(cache.layers, cache.is_linear) if not linear)


def cached_length(cache):
    """Tokens the cache has seen: the first attention layer's key count, or in an all-LRU stack the LRU token
    count."""
    if not cache.layers:
        return 0
    if not all(cache.is_linear):
        return int(_first_attention_layer(cache).get_seq_length())  # (a StaticLayer counts in a tensor)
    layer = _state_layer(cache, 0)
    return layer.lru_seen_tokens if layer.has_previous_state[0] else 0


__all__ = ["CacheView", "GrowingLayer", "PreRopeLayer", "cache_view", "cached_length", "read_lru_state", "static_slots",
           "update_keys_after_rope", "update_keys_before_rope", "write_lru_state"]

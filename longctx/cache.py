"""KV-cache layers for transformers' `DynamicCache`: one that appends in place, one that keeps keys before RoPE.

transformers' `DynamicLayer` appends by `torch.cat`, copying the whole cache at every decoding step: O(L) per token,
half of a CPU step's time at 16k tokens. `GrowingLayer` writes into a buffer with room to spare and grows it
geometrically (amortised O(1)). Dynamic NTK changes every key's rotation when the length grows, and ReRoPE rotates
each key by its clipped distance to the query, so both need the un-rotated keys and the position of every cached
key (per batch row: left padding shifts them): `PreRopeLayer` also carries those positions through crop, beam
reordering and batch selection. The attention swaps one of them in for an empty `DynamicLayer` on first use, so the
stock `DynamicCache` (and `generate()`) works unchanged.
"""

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends into buffers with spare slots instead of concatenating: 256 after the first
    update (a prompt and a short answer cost 256 slots more than the keys), then an eighth of the length at each
    growth (amortised O(1) per token). `keys` and `values` are views of the filled slots, so every `DynamicLayer`
    method (crop, beam reordering, batch selection, offloading) works unchanged; a slot is written once — after a
    crop or any method that replaced the views, the next update copies into new buffers — so no tensor handed out
    changes afterwards. Under autograd or torch.compile it concatenates, as `DynamicLayer` does."""

    GROWTH = 8, 256  # spare slots: 256 at first, then max(length // 8, 256)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._buffers = None  # (keys, values) (batch, heads, capacity, head_dim), or None
        self._filled = 0  # slots written

    def update(self, key_states, value_states, *args, **kwargs):
        if (torch.compiler.is_compiling() or key_states.requires_grad or value_states.requires_grad
                or (torch.is_grad_enabled() and self.is_initialized and self.keys.requires_grad)):
            self._buffers = None
            return super().update(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._appendable(key_states, value_states, length + new):
            self._reallocate(key_states, value_states, length, length + new)
        keys, values = self._buffers
        keys[:, :, length:length + new] = key_states
        values[:, :, length:length + new] = value_states
        self._filled = length + new
        self.keys, self.values = keys[:, :, :self._filled], values[:, :, :self._filled]
        return self.keys, self.values

    def _appendable(self, key_states, value_states, needed):
        """Whether the new slots can be written into the current buffers: `keys`/`values` are still their views of
        every written slot, the shapes and dtypes match, there is room, and writing is allowed in this mode."""
        if self._buffers is None or self.get_seq_length() != self._filled:
            return False
        keys, values = self._buffers
        return (needed <= keys.shape[2]
                and all(held.data_ptr() == buffer.data_ptr() and held.stride() == buffer.stride()
                        for held, buffer in ((self.keys, keys), (self.values, values)))
                and keys.shape[:2] + keys.shape[3:] == key_states.shape[:2] + key_states.shape[3:]
                and values.shape[:2] + values.shape[3:] == value_states.shape[:2] + value_states.shape[3:]
                and (keys.dtype, keys.device, values.dtype, values.device)
                == (key_states.dtype, key_states.device, value_states.dtype, value_states.device)
                and (torch.is_inference_mode_enabled() or not keys.is_inference()))

    def _reallocate(self, key_states, value_states, length, needed):
        capacity = needed + max(needed // self.GROWTH[0] if length else 0, self.GROWTH[1])
        buffers = []
        for held, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty(*new.shape[:2], capacity, *new.shape[3:])
            if length:
                buffer[:, :, :length] = held
            buffers.append(buffer)
        self._buffers = tuple(buffers)

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
        if type(layer) not in (DynamicLayer, GrowingLayer) or _holds_keys(layer):
            raise ValueError(
                f"This rope_type keeps keys before RoPE in the KV cache, but layer {layer_idx} of the given cache is a "
                f"{type(layer).__name__} holding {layer.get_seq_length()} keys: pass a fresh DynamicCache (or none; "
                "in generate(), the default cache_implementation), and start a new cache after `set_rope`.")
        layer = cache.layers[layer_idx] = PreRopeLayer()
    keys, values = cache.update(key, value, layer_idx, positions=positions)
    return keys, values, layer.positions


def update_keys_after_rope(cache, layer_idx, key, value, kv_len, scheme=None):
    """The usual post-RoPE cache update: every cached key and value, the first `kv_len` (a StaticCache returns its
    whole pre-allocated buffer, whose first slots are the filled ones). `scheme` (`rope.rope_scheme`): the position
    scheme the keys were rotated by, kept on the cache layer; keys of another scheme (`set_rope` since) are refused,
    as are keys before RoPE (filled under another rope_type). A compiled forward passes None: not checked."""
    layer = _cache_layer(cache, layer_idx)
    if type(layer) in (DynamicLayer, PreRopeLayer) and not _holds_keys(layer) and not torch.compiler.is_compiling():
        layer = cache.layers[layer_idx] = GrowingLayer()  # appends in place (an emptied PreRopeLayer: plain again)
    if isinstance(layer, PreRopeLayer):
        raise ValueError(
            f"Layer {layer_idx} of the given cache holds keys before RoPE (filled under rope_type dynamic/rerope/"
            "leaky-rerope); this rope_type caches keys after RoPE. Start a new cache after `set_rope`.")
    held = getattr(layer, "longctx_scheme", None)
    if (scheme is not None and held is not None and held != scheme and not torch.compiler.is_compiling()
            and _holds_keys(layer)):
        raise ValueError(
            f"Layer {layer_idx} of the given cache holds keys rotated under rope_parameters {held}, but the model now "
            f"uses {scheme} (`set_rope` switched it): those keys would be wrong. Start a new cache (or "
            "`cache.reset()`).")
    keys, values = cache.update(key, value, layer_idx)
    # compiled forwards pass no scheme: their keys are unchecked and leave the layer unstamped (no stale stamp)
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


def _holds_keys(layer):
    return bool(getattr(layer, "is_initialized", True)) and int(layer.get_seq_length()) > 0


__all__ = ["GrowingLayer", "PreRopeLayer", "static_slots", "update_keys_after_rope", "update_keys_before_rope"]

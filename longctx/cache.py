"""A KV-cache layer that keeps keys before RoPE, with their positions (dynamic NTK and ReRoPE, methods.md §8, §10).

transformers' `DynamicCache` stores keys after RoPE. Dynamic NTK changes every key's rotation when the length
grows, and ReRoPE rotates each key by its clipped distance to the query, so both need the un-rotated keys and the
position of every cached key (per batch row: left padding shifts them). `PreRopeLayer` is a `DynamicLayer` that
also carries those positions through crop, beam reordering and batch selection; the attention swaps it in for an
empty `DynamicLayer` on first use, so the stock `DynamicCache` (and `generate()`) works unchanged.
"""

import torch
from transformers.cache_utils import DynamicLayer


class PreRopeLayer(DynamicLayer):
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
        if type(layer) is not DynamicLayer or layer.get_seq_length() > 0:
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
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if isinstance(layer, PreRopeLayer) and not _holds_keys(layer):  # emptied (`cache.reset()`): a plain layer again
        layer = cache.layers[layer_idx] = DynamicLayer()
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


def _holds_keys(layer):
    return bool(getattr(layer, "is_initialized", True)) and int(layer.get_seq_length()) > 0


__all__ = ["PreRopeLayer", "update_keys_after_rope", "update_keys_before_rope"]

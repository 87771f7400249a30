"""The KV-cache layers: `GrowingLayer` (appends in place) against transformers' `DynamicLayer` (torch.cat); the LRU's
recurrent state in transformers' `LinearAttentionLayer`."""

import random

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from conftest import tiny_config_kwargs, tiny_model

from longctx import LongCtxConfig
from longctx.cache import GrowingLayer, cached_length, read_lru_state, write_lru_state
from longctx.modeling_longctx import CACHE_FIELD


def random_operations(seed, steps=60):
    """A random history of what generate(), beam search, assisted decoding and offloading do to a cache layer."""
    rng, batch, ops = random.Random(seed), 3, []
    for _ in range(steps):
        kind = rng.choices(["prefill", "step", "crop", "reorder", "repeat", "offload", "reset"],
                           weights=[1, 12, 2, 2, 1, 1, 0.3])[0]
        if kind in ("prefill", "step"):
            ops.append(("update", rng.randint(2, 300) if kind == "prefill" else 1))
        elif kind == "crop":
            ops.append(("crop", -rng.randint(0, 5)))
        elif kind == "reorder":
            ops.append(("reorder", [rng.randrange(batch) for _ in range(batch)]))
        elif kind == "repeat":
            ops.append(("repeat_then_select", [rng.randrange(2 * batch) for _ in range(batch)]))
        else:
            ops.append((kind, None))
    return ops


def apply(layer, op, arg, generator, batch=3):
    if op == "update":
        keys = torch.randn(batch, 2, arg, 4, generator=generator)
        return layer.update(keys, keys * 2)
    if op == "crop":
        layer.crop(arg)
    elif op == "reorder":
        layer.reorder_cache(torch.tensor(arg))
    elif op == "repeat_then_select":
        layer.batch_repeat_interleave(2)
        layer.batch_select_indices(torch.tensor(arg))
    elif op == "offload":  # (to the CPU, where it already is: the views stay, the buffers are let go)
        layer.offload()
        layer.prefetch()
    elif op == "reset":
        layer.reset()
    return None


@pytest.mark.parametrize("seed", range(6))
@torch.no_grad()  # (with gradients enabled it concatenates)
def test_growing_layer_equals_dynamic_layer_and_never_changes_what_it_returned(seed):
    """Same keys and values as DynamicLayer after every operation; every tensor an update returned keeps its values
    (a slot is written once: crops and reorders reallocate rather than overwrite)."""
    growing, dynamic, handed_out = GrowingLayer(), DynamicLayer(), []
    for op, arg in random_operations(seed):
        out = apply(growing, op, arg, torch.Generator().manual_seed(len(handed_out)))
        expected = apply(dynamic, op, arg, torch.Generator().manual_seed(len(handed_out)))
        if out is not None:
            handed_out.append((out[0], out[0].clone()))
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert growing.get_seq_length() == dynamic.get_seq_length()
        if dynamic.get_seq_length():
            assert torch.equal(growing.keys, dynamic.keys) and torch.equal(growing.values, dynamic.values)
    assert all(torch.equal(tensor, copy) for tensor, copy in handed_out)


@torch.no_grad()
def test_growing_layer_writes_steps_in_place_and_grows_geometrically():
    layer, keys = GrowingLayer(), torch.randn(1, 2, 4000, 4)
    layer.update(keys[:, :, :1000], keys[:, :, :1000])
    assert layer._buffers[0].shape[2] == 1000 + 256  # 256 spare slots after the first update
    pointer = layer._buffers[0].data_ptr()
    for t in range(256):
        layer.update(keys[:, :, t:t + 1], keys[:, :, t:t + 1])
        assert layer.keys.data_ptr() == pointer  # no copy while there is room
    layer.update(keys, keys)  # full: grows by an eighth
    assert layer._buffers[0].shape[2] == 5256 + 5256 // 8 and layer.get_seq_length() == 5256


def test_growing_layer_concatenates_with_gradients_enabled():
    """An in-place append would break a backward through earlier keys (their views are saved by the attention even
    when only the queries need gradients): with gradients enabled it concatenates."""
    layer, keys = GrowingLayer(), torch.randn(1, 2, 5, 4, requires_grad=True)
    layer.update(keys, keys)
    second, _ = layer.update(keys * 2, keys)
    second.sum().backward()
    torch.testing.assert_close(keys.grad, torch.full_like(keys, 3.0))
    assert layer._buffers is None
    query = torch.randn(1, 2, 3, 4, requires_grad=True)
    frozen = GrowingLayer()  # keys without gradients, a query with them
    held, _ = frozen.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    scores = query @ held.transpose(-1, -2)
    frozen.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    scores.sum().backward()  # no "modified by an inplace operation"


@torch.no_grad()
def test_growing_layer_fails_or_promotes_as_dynamic_layer_does_and_copies_own_buffers():
    """New keys that do not extend the held ones (another batch size, dtype) go through DynamicLayer's cat (an error,
    a promotion), not into a buffer that would broadcast or cast the history; a shallow copy writes its own."""
    import copy

    for second in (torch.randn(3, 2, 1, 4), torch.randn(1, 2, 1, 4, dtype=torch.float64)):
        results = []
        for layer in (GrowingLayer(), DynamicLayer()):
            layer.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
            try:
                results.append(layer.update(second, second)[0].dtype)
            except RuntimeError as err:
                results.append(type(err))
        assert results[0] == results[1]
    original = GrowingLayer()
    original.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    twin = copy.copy(original)
    handed_out, _ = original.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    twin.update(torch.full((1, 2, 1, 4), 2.0), torch.full((1, 2, 1, 4), 2.0))
    assert handed_out[:, :, 3].eq(1).all() and twin.keys[:, :, 3].eq(2).all()


@torch.no_grad()
def test_inference_mode_buffers_are_not_written_outside_it():
    layer, keys = GrowingLayer(), torch.randn(1, 2, 5, 4)
    with torch.inference_mode():
        layer.update(keys, keys)
    out, _ = layer.update(keys, keys)  # no "inplace update to inference tensor": copied into new buffers
    assert torch.equal(out, torch.cat([keys, keys], dim=2))


def test_generate_uses_growing_layers_and_equals_recomputation():
    """generate() swaps a GrowingLayer in for each empty DynamicLayer; greedy tokens equal recomputing the whole
    sequence at every step (no cache)."""
    model = tiny_model()
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cache = DynamicCache(config=model.config)
    out = model.generate(ids, **{CACHE_FIELD: cache}, **kwargs)  # `cache` (transformers >= 5.24) or its old name
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    assert torch.equal(out, model.generate(ids, use_cache=False, **kwargs))


def test_lru_state_is_kept_in_a_fixed_buffer_and_counted_only_in_all_lru_stacks():
    """The state after each forward, copied into one buffer per layer (constant memory; the caller's tensor is not
    held); in an all-LRU stack the cache counts the tokens, cleared by `reset()`; a hybrid counts attention keys."""
    config = LongCtxConfig(**tiny_config_kwargs(block_types=["lru", "lru"], lru_state_size=8))
    cache, g = DynamicCache(config=config), torch.Generator().manual_seed(0)
    assert read_lru_state(cache, 0) is None and cached_length(cache) == 0
    states = [torch.randn(2, 8, dtype=torch.complex64, generator=g) for _ in range(2)]
    for new_tokens, state in zip((5, 3), states):
        for layer_idx in (0, 1):
            write_lru_state(cache, layer_idx, state, new_tokens)
        held = read_lru_state(cache, 1)
        assert torch.equal(held, state) and held is not state
    buffer = read_lru_state(cache, 0)
    states[1].zero_()  # the cache holds a copy
    assert cached_length(cache) == 8 and read_lru_state(cache, 0).abs().sum() > 0
    write_lru_state(cache, 0, states[0], 1)
    assert read_lru_state(cache, 0).data_ptr() == buffer.data_ptr()  # the same buffer, rewritten
    cache.reset()
    assert read_lru_state(cache, 0) is None and cached_length(cache) == 0

    hybrid = DynamicCache(config=LongCtxConfig(**tiny_config_kwargs(block_types=["attention", "lru"],
                                                                    lru_state_size=8)))
    write_lru_state(hybrid, 1, states[0], 4)
    assert cached_length(hybrid) == 0 and not hasattr(hybrid.layers[1], "lru_seen_tokens")
    with pytest.raises(ValueError, match=r"LRU layer 0 needs a recurrent-state slot .*DynamicLayer there"):
        read_lru_state(hybrid, 0)
    with pytest.raises(ValueError, match=r"LRU layer 1 needs a recurrent-state slot .*NoneType"):
        read_lru_state(DynamicCache(), 1)

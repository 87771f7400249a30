"""ReRoPE / Leaky ReRoPE (issue 3, methods.md §8): Su's formula, block-wise == dense, cached decoding == prefill,
memory linear in length, and the pre-RoPE cache layer."""

import itertools

import pytest
import torch
from conftest import left_padded, project_qkv, rotate_pairs, tiny_config_kwargs, tiny_model
from formulas import frequency_table

import longctx.attention as attention
from longctx import LongCtxConfig
from longctx.attention import AttentionMask
from longctx.cache import PreRopeLayer
from longctx.modeling_longctx import output_cache

RE_ROPE = {"rope_type": "rerope", "rerope_window": 12}
LEAKY = {"rope_type": "leaky-rerope", "rerope_window": 12, "factor": 8.0}


def remapped_distance(r, rope):
    """Su's r' (methods.md §8): r below the window, else w (ReRoPE) or w + (r − w)/k (Leaky ReRoPE)."""
    w = rope["rerope_window"]
    if r < w:
        return float(r)
    return float(w) if rope["rope_type"] == "rerope" else w + (r - w) / rope["factor"]


def su_reference(layer, config, hidden, positions, mask):
    """Score of query i, key j = (R^{r'(i−j)} q_i)ᵀ k_j, i.e. Su's decoding form q_iᵀ R^{−r'} k_j, pair by pair."""
    batch, length, _ = hidden.shape
    heads, d = config.num_attention_heads, config.head_dim
    theta = frequency_table(config.rope_parameters, d, config.max_position_embeddings)[0].float()  # b^{-2i/d}
    q, k, v = project_qkv(layer, config, hidden)
    out = torch.zeros(batch, length, heads, d)
    for b, i in itertools.product(range(batch), range(length)):
        keys = [j for j in range(i + 1) if mask[b, j]]
        if not mask[b, i]:
            continue
        distances = torch.tensor([remapped_distance(int(positions[b, i] - positions[b, j]), config.rope_parameters)
                                  for j in keys])
        q_rotated = rotate_pairs(q[b, :, i, None, :], distances[:, None] * theta)  # (heads, keys, d)
        scores = (q_rotated * k[b][:, keys]).sum(-1) * d**-0.5
        out[b, i] = (torch.softmax(scores, -1)[:, None, :] @ v[b][:, keys]).squeeze(1)
    return layer.o_proj(out.reshape(batch, length, -1))


@pytest.mark.parametrize("rope", [RE_ROPE, LEAKY], ids=["rerope", "leaky"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_equals_su_formula_with_padding(rope, attn, use_attention_settings):
    use_attention_settings(score_block_elements=2 * 4 * 40 * 7)  # sdpa: blocks of 7 query rows
    model = tiny_model(attn=attn, rope_parameters=rope, num_hidden_layers=1)
    layer, config = model.model.layers[0].self_attn, model.config
    _, mask = left_padded([40, 26], 40)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = torch.randn(2, 40, 64)
    with torch.no_grad():
        expected = su_reference(layer, config, hidden, positions, mask)
        got, _ = layer(hidden, model.model.rotary_emb(hidden, positions), AttentionMask(40, 40, mask.bool()),
                    position_ids=positions, rotary=model.model.rotary_emb)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [RE_ROPE, LEAKY], ids=["rerope", "leaky"])
@pytest.mark.parametrize("block_rows", [1, 5, 64, None], ids=["rows-1", "rows-5", "rows-64", "fused"])
@pytest.mark.parametrize("positions", ["from-mask", "with-gaps"])
def test_blockwise_prefill_equals_dense_reference(rope, block_rows, positions, monkeypatch, use_attention_settings):
    """sdpa's block-wise path (the band path when positions follow the indices, the general one when they jump;
    `fused_rerope=False`) against eager's two dense score matrices; real tokens only (padding queries' outputs are
    never used). `block_rows` None: the fused path (at any length), which takes positions that follow the
    indices."""
    ids, mask = left_padded([150, 120, 61], 150)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    if positions == "with-gaps":  # e.g. packed or edited sequences: distances no longer follow the indices
        position_ids = position_ids + (torch.arange(150) >= 100) * 7
    dense = tiny_model(attn="eager", rope_parameters=rope)
    blocked = tiny_model(attn="sdpa", rope_parameters=rope)
    if block_rows is not None:
        use_attention_settings(score_block_elements=3 * 4 * 150 * block_rows, fused_rerope=False)
    else:
        use_attention_settings(fused_rerope_from=(1, 1))  # (by default from 384 queries)
    paths, choose = [], attention.choose_attention

    def recording(*args, **kwargs):  # the path of each layer's call
        path = choose(*args, **kwargs)
        paths.append(path.__name__)
        return path

    monkeypatch.setattr(attention, "choose_attention", recording)
    with torch.no_grad():
        expected = dense(ids, attention_mask=mask, position_ids=position_ids).logits
        got = blocked(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    band = "rerope_band_attention" if block_rows is not None else "rerope_fused_path"
    assert paths == ["rerope_dense_attention"] * 2 + [band if positions == "from-mask" else "rerope_attention"] * 2


@pytest.mark.parametrize("rope", [RE_ROPE, LEAKY], ids=["rerope", "leaky"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decoding_equals_prefill_logits(rope, attn):
    model = tiny_model(attn=attn, rope_parameters=rope)
    ids, mask = left_padded([100, 73], 100)
    with torch.no_grad():
        prefill = model(ids, attention_mask=mask).logits
        out = model(ids[:, :20], attention_mask=mask[:, :20], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(20, 100):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    assert isinstance(cache.layers[0], PreRopeLayer) and cache.layers[0].keys.shape[2] == 100
    assert torch.equal(cache.layers[1].positions, (mask.cumsum(-1) - 1).clamp(min=0))
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], prefill[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [RE_ROPE, LEAKY], ids=["rerope", "leaky"])
def test_training_gradients_of_the_block_wise_paths_equal_the_dense_reference(rope, use_attention_settings):
    """Fine-tuning under these schemes (e.g. Su's InvLeaky recipe) backpropagates through the block-wise paths:
    the whole model's gradients under sdpa (band path) equal eager's (Su's two dense matrices). Both share
    `rerope_operands`; the formula itself, and dynamic NTK (one path on both backends), are checked against the
    written-out reference in test_references.py (`test_attention_gradients_equal_the_formula`)."""
    use_attention_settings(score_block_elements=2 * 4 * 100 * 9, rotated_key_elements=2 * 2 * 100 * 16 * 9)
    ids, mask = left_padded([100, 80], 100)
    grads = []
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn=attn, rope_parameters=rope).train()
        labels = ids.masked_fill(mask == 0, -100)
        labels[(mask.cumsum(-1) == 1) & (mask == 1)] = -100  # first real tokens: predicted from padding queries
        model(ids, attention_mask=mask, labels=labels, skip_logits=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_generate_with_cache_equals_without():
    model = tiny_model(rope_parameters=LEAKY)
    ids, mask = left_padded([30, 18], 30)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_a_static_cache_is_refused_with_the_reason():
    """Keys before RoPE need a growing cache: a StaticCache is refused saying so, and a cache filled under a scheme
    that caches keys after RoPE is refused saying that."""
    model = tiny_model(rope_parameters=dict(RE_ROPE, rope_theta=10000.0))
    ids = torch.randint(1, 128, (1, 6))
    with pytest.raises(ValueError, match="which a StaticLayer .* cannot hold: pass a DynamicCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")
    plain = tiny_model()
    with torch.no_grad():
        cache = output_cache(plain(ids, use_cache=True))
        with pytest.raises(ValueError, match="holds 6 keys after RoPE"):
            model(ids, cache=cache)


def test_limits_reduce_to_plain_rope():
    """A window beyond every distance is plain RoPE; Leaky ReRoPE with k = 1 is plain RoPE for any window."""
    ids = torch.randint(0, 128, (2, 60))
    with torch.no_grad():
        plain = tiny_model()(ids).logits
        for rope in ({"rope_type": "rerope", "rerope_window": 63},
                     {"rope_type": "leaky-rerope", "rerope_window": 4, "factor": 1.0}):
            torch.testing.assert_close(tiny_model(rope_parameters=rope)(ids).logits, plain, atol=1e-5, rtol=0)
        assert not torch.allclose(tiny_model(rope_parameters=RE_ROPE)(ids).logits, plain, atol=1e-3)


@pytest.mark.parametrize("fused", [False, True], ids=["block-wise", "fused"])
def test_blockwise_prefill_never_builds_a_length_squared_matrix(fused, monkeypatch, use_attention_settings):
    """16k tokens through one ReRoPE attention layer: every score block stays within the budget, far below L²; on
    the fused path (the default in inference) no score block is built at all."""
    use_attention_settings(fused_rerope=fused)
    largest = []
    grouped_scores = attention.grouped_scores

    def recording(query, key):
        scores = grouped_scores(query, key)
        largest.append(scores.numel())
        return scores

    monkeypatch.setattr(attention, "grouped_scores", recording)
    monkeypatch.setattr(AttentionMask, "dense", lambda self, device: pytest.fail("dense L×L mask built"))
    config = LongCtxConfig(**tiny_config_kwargs(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                                rope_parameters=LEAKY, num_hidden_layers=1))
    config._attn_implementation = "sdpa"
    layer = attention.LongCtxAttention(config, 0).eval()
    length = 16384
    positions = torch.arange(length)[None]
    with torch.no_grad():
        out, _ = layer(torch.randn(1, length, 16), None, AttentionMask(length, length), position_ids=positions)
    assert out.shape == (1, length, 16) and torch.isfinite(out).all()
    if fused:
        assert largest == []
    else:
        assert max(largest) <= attention.DEFAULT_ATTENTION_SETTINGS.score_block_elements < length * length // 16


def test_window_at_or_beyond_training_length_is_rejected():
    for rope in ({"rope_type": "rerope", "rerope_window": 64}, dict(LEAKY, rerope_window=65)):
        with pytest.raises(ValueError, match="rerope_window.*L_train=64"):
            LongCtxConfig(**tiny_config_kwargs(rope_parameters=rope))
    with pytest.raises(ValueError, match="rerope_window.*L_train=32"):  # L_train from original_max_position_embeddings
        LongCtxConfig(**tiny_config_kwargs(rope_parameters=dict(RE_ROPE, rerope_window=32,
                                                                original_max_position_embeddings=32)))


def test_pre_rope_layer_keeps_positions_aligned():
    layer = PreRopeLayer()
    keys = torch.arange(3 * 5, dtype=torch.float32).view(3, 1, 5, 1)
    positions = torch.arange(15).view(3, 5)
    layer.update(keys[:, :, :3], keys[:, :, :3], positions=positions[:, :3])
    layer.update(keys[:, :, 3:], keys[:, :, 3:], positions=positions[:, 3:])
    assert torch.equal(layer.positions, positions)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.positions, positions[[2, 0, 1]])
    assert torch.equal(layer.keys[..., 0][:, 0], layer.positions.float())  # keys and positions moved together
    layer.crop(-2)
    assert layer.positions.shape == (3, 3) and layer.keys.shape[2] == 3
    layer.batch_repeat_interleave(2)
    layer.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(layer.keys[..., 0][:, 0], layer.positions.float())
    with pytest.raises(ValueError, match="needs the `positions`"):
        layer.update(keys[:2, :, :1], keys[:2, :, :1])

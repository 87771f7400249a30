"""log-n attention scaling (issue 3, methods.md §6): "trained" (Su's -log n, visible keys counted through the mask)
and "posthoc" (Su's logn†), against an explicit eager computation, on every backend, with the cache."""

import itertools
import math

import pytest
import torch
from conftest import left_padded, project_qkv, rotate_pairs, tiny_config_kwargs, tiny_model

from longctx import LongCtxConfig
from longctx.attention import AttentionMask, logn_query_scale
from longctx.modeling_longctx import output_cache
from longctx.rope import compute_inv_freq

L_TRAIN = 64  # tiny_config_kwargs' max_position_embeddings


def explicit_logn_attention(layer, config, hidden, positions, mask, mode):
    """softmax(λ_i · q_i·k_j / √d) v, λ_i written out per query from the formulas of methods.md §6."""
    batch, length, _ = hidden.shape
    heads, d = config.num_attention_heads, config.head_dim
    theta = compute_inv_freq(config)[0]
    q, k, v = project_qkv(layer, config, hidden)
    out = torch.zeros(batch, length, heads, d)
    for b, i in itertools.product(range(batch), range(length)):
        if not mask[b, i]:
            continue
        keys = [j for j in range(i + 1) if mask[b, j]]  # causal ∧ padding
        if mode == "trained":
            scale = math.log(max(len(keys), 16)) / math.log(L_TRAIN)
        else:
            scale = max(1.0, math.log(int(positions[b, i]) + 1) / math.log(L_TRAIN))
        qi = rotate_pairs(q[b, :, i], positions[b, i] * theta)
        kj = rotate_pairs(k[b][:, keys], positions[b, keys][:, None] * theta)
        probs = torch.softmax(scale * (kj @ qi[..., None]).squeeze(-1) / math.sqrt(d), dim=-1)
        out[b, i] = (probs[:, None, :] @ v[b][:, keys]).squeeze(1)
    return layer.o_proj(out.reshape(batch, length, -1))


@pytest.mark.parametrize("mode", ["trained", "posthoc"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logn_equals_explicit_computation_with_padding(mode, attn):
    model = tiny_model(attn=attn, logn_scaling=mode, num_hidden_layers=1)
    layer = model.model.layers[0].self_attn
    _, mask = left_padded([150, 90, 10], 150)  # visible keys from 1 (floor 16) to 150; positions beyond L_train
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = torch.randn(3, 150, 64)
    attention_mask = AttentionMask(150, 150, mask.bool())
    with torch.no_grad():
        expected = explicit_logn_attention(layer, model.config, hidden, positions, mask, mode)
        rotary = model.model.rotary_emb
        got, _ = layer(hidden, rotary(hidden, positions), attention_mask,
                    logn_query_scale(model.config, positions, attention_mask), position_ids=positions, rotary=rotary)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["trained", "posthoc"])
@pytest.mark.parametrize("rope", [None, {"rope_type": "rerope", "rerope_window": 16}, {"rope_type": "dynamic",
                                  "factor": 4.0}, {"rope_type": "yarn", "factor": 4.0}], ids=["default", "rerope",
                                                                                               "dynamic", "yarn"])
def test_logn_is_identical_across_backends_and_with_the_cache(mode, rope):
    extra = {"rope_parameters": rope} if rope else {}
    eager, sdpa = (tiny_model(attn=a, logn_scaling=mode, **extra) for a in ("eager", "sdpa"))
    ids, mask = left_padded([100, 60], 100)
    real = mask.bool()
    with torch.no_grad():
        full = eager(ids, attention_mask=mask).logits
        torch.testing.assert_close(sdpa(ids, attention_mask=mask).logits[real], full[real], atol=1e-5, rtol=0)
        out = sdpa(ids[:, :40], attention_mask=mask[:, :40], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(40, 100):  # visible keys counted through the cache, positions past L_train
            out = sdpa(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=0)
    with torch.no_grad():  # and it does something: differs from no scaling by far more than the tolerance
        unscaled = tiny_model(attn="eager", **extra)(ids, attention_mask=mask).logits
    assert (unscaled[real] - full[real]).abs().max() > 1e-4


def test_posthoc_changes_nothing_within_training_length():
    ids = torch.randint(0, 128, (2, L_TRAIN))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(logn_scaling="posthoc")(ids).logits, tiny_model()(ids).logits,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", ["on", "log-n", None, True, 1])
def test_invalid_logn_scaling_names_the_field(value):
    with pytest.raises(ValueError, match="`logn_scaling`=.*allowed: off, trained, posthoc"):
        LongCtxConfig(**tiny_config_kwargs(logn_scaling=value))

"""RoPE schemes (issue 3): frequency tables against HF and the seed formulas, dynamic NTK under the KV cache,
`set_rope`, and the validation of every `rope_parameters` key."""

import itertools
import math

import pytest
import torch
from conftest import left_padded, rotate_pairs, tiny_config_kwargs, tiny_model
from formulas import frequency_table
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS as HF_ROPE_INIT_FUNCTIONS

import longctx.attention as attention
from longctx import LongCtxConfig
from longctx.convert import from_llama
from longctx.modeling_longctx import output_cache
from longctx.rope import (ROPE_INIT_FUNCTIONS, apply_rotary, apply_rotary_reference, compute_inv_freq, rotary_cos_sin,
                          set_rope)


def rope_config(head_dim, rope_parameters, max_positions=4096, cls=LongCtxConfig):
    return cls(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, num_hidden_layers=1,
               intermediate_size=8, vocab_size=16, max_position_embeddings=max_positions,
               rope_parameters=dict(rope_parameters))


# --- parity with transformers' own rope functions -----------------------------------------------------------------

HF_CASES = [
    dict(rope_type="linear"),
    dict(rope_type="yarn"),
    dict(rope_type="yarn", beta_fast=16.0, beta_slow=2.0, attention_factor=0.8),
    dict(rope_type="yarn", mscale=0.707, mscale_all_dim=1.0),
    dict(rope_type="yarn", truncate=False, original_max_position_embeddings=256),
    dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256),
    dict(rope_type="dynamic"),
]


@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_inv_freq_and_attention_scaling_equal_transformers(case):
    for head_dim, base, factor in itertools.product([16, 64, 128], [10000.0, 500000.0], [1.0, 2.0, 8.0, 32.0]):
        params = dict(case, rope_theta=base, factor=factor)
        ours_config, hf_config = rope_config(head_dim, params), rope_config(head_dim, params, cls=LlamaConfig)
        lengths = [None, 100, 4096, 4097, 10000, 65536] if case["rope_type"] == "dynamic" else [None]
        for seq_len in lengths:
            ours, ours_scaling = compute_inv_freq(ours_config, seq_len)
            hf, hf_scaling = HF_ROPE_INIT_FUNCTIONS[case["rope_type"]](hf_config, None, seq_len)
            assert torch.equal(ours, hf), (params, seq_len)
            assert ours_scaling == hf_scaling, (params, seq_len)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
])
def test_scaled_model_logits_equal_transformers_llama(rope_parameters):
    """Same weights, same rope config: logits of LongCtx equal HF's LlamaForCausalLM (YaRN's mscale² included)."""
    torch.manual_seed(0)
    config = LlamaConfig(**tiny_config_kwargs(rope_parameters=dict(rope_parameters, rope_theta=10000.0)))
    config._attn_implementation = "eager"
    llama = LlamaForCausalLM(config).eval()
    model = from_llama(llama)
    ids = torch.randint(0, 128, (2, 100))  # beyond max_position_embeddings = 64
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-4, rtol=0)
    if rope_parameters["rope_type"] == "yarn":  # the attention temperature is really in: without it logits differ
        assert compute_inv_freq(model.config)[1] == pytest.approx(0.1 * math.log(4.0) + 1)


# --- NTK family against the formulas of methods.md §3–5 ------------------------------------------------------------

@pytest.mark.parametrize("head_dim,base,k", itertools.product([16, 64, 128], [10000.0, 1e6], [2.0, 8.0, 12.0]))
def test_ntk_family_equals_the_formulas(head_dim, base, k):
    d, i = head_dim, torch.arange(head_dim // 2, dtype=torch.float64)
    ntk = (base * k ** (d / (d - 2))) ** (-2 * i / d)  # bloc97: b' = b·k^{d/(d−2)}
    fixed = (base * k) ** (-2 * i / d) * k ** (-2 / d)  # Su 9706 eq.6: θ_m = n / (λ(βλ)^{m−1}), λ = k^{2/d}
    for exponent in (0.625, 0.75, 0.3):
        a = math.log(k) / (d / 2) ** exponent
        mixed = base ** (-2 * i / d) * torch.exp(-a * (i + 1) ** exponent)  # Su 9706 eq.9/12
        got, scaling = compute_inv_freq(rope_config(d, {"rope_type": "ntk-mixed", "factor": k, "rope_theta": base,
                                                        "mixed_exponent": exponent}))
        torch.testing.assert_close(got.double(), mixed, rtol=2e-6, atol=0)
        assert scaling == 1.0
        torch.testing.assert_close(mixed[-1] * k, torch.tensor(base ** (-(d - 2) / d), dtype=torch.float64))
    for rope_type, expected in (("ntk", ntk), ("ntk-fixed", fixed)):
        got, scaling = compute_inv_freq(rope_config(d, {"rope_type": rope_type, "factor": k, "rope_theta": base}))
        torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=0)
        assert scaling == 1.0
    # NTK-fixed divides the lowest pair by exactly k (PI there) and the highest by k^{2/d}
    default = base ** (-2 * i / d)
    torch.testing.assert_close(default[-1] / fixed[-1], torch.tensor(k, dtype=torch.float64))
    torch.testing.assert_close(default[0] / fixed[0], torch.tensor(k ** (2 / d), dtype=torch.float64))


def test_ntk_mixed_per_pair_divisors_match_su_numbers():
    """methods.md §5 (derived, d=128): divisors exp(a·m^b) at m = 1, 32, 64."""
    expected = {(8.0, 0.625): (1.167, 3.85, 8.0), (8.0, 1.0): (1.033, 2.83, 8.0), (12.0, 0.75): (1.116, 4.38, 12.0)}
    default, _ = compute_inv_freq(rope_config(128, {"rope_type": "default"}))
    for (k, exponent), divisors in expected.items():
        mixed, _ = compute_inv_freq(rope_config(128, {"rope_type": "ntk-mixed", "factor": k,
                                                      "mixed_exponent": exponent}))
        got = (default / mixed)[[0, 31, 63]].tolist()
        assert got == pytest.approx(divisors, rel=2e-3)


@pytest.mark.parametrize("head_dim,k", itertools.product([16, 64, 128], [2.0, 8.0, 12.0]))
def test_ntk_mixed_limits(head_dim, k):
    """Exponent 1 is NTK-RoPE-fixed; exponent → 0 tends to PI (`linear`) (methods.md §5)."""
    def table(rope_type, **extra):
        return compute_inv_freq(rope_config(head_dim, {"rope_type": rope_type, "factor": k, **extra}))[0]

    torch.testing.assert_close(table("ntk-mixed", mixed_exponent=1.0), table("ntk-fixed"), rtol=1e-5, atol=0)
    linear = table("linear")
    errors = [((table("ntk-mixed", mixed_exponent=e) - linear).abs() / linear).max().item()
              for e in (0.1, 1e-2, 1e-4, 1e-6)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2
    assert errors[-1] < 1e-4


def test_compute_inv_freq_api():
    config = rope_config(64, {"rope_type": "dynamic", "factor": 4.0}, max_positions=512)
    inv_freq, scaling = compute_inv_freq(config)
    assert inv_freq.shape == (32,) and inv_freq.dtype == torch.float32 and isinstance(scaling, float)
    assert set(ROPE_INIT_FUNCTIONS) == {"default", "linear", "ntk", "ntk-fixed", "ntk-mixed", "dynamic", "yarn",
                                        "llama3", "rerope", "leaky-rerope"}
    default, _ = compute_inv_freq(rope_config(64, {"rope_type": "default"}))
    assert torch.equal(inv_freq, default) and torch.equal(compute_inv_freq(config, 512)[0], default)
    longer = compute_inv_freq(config, 2048)[0]
    assert longer[0] == default[0] and (longer[1:] < default[1:]).all()  # only the base grows
    yarn = rope_config(64, {"rope_type": "yarn", "factor": 4.0})
    assert torch.equal(compute_inv_freq(yarn)[0], compute_inv_freq(yarn, 100000)[0])  # seq_len: dynamic only


# --- dynamic NTK under the KV cache --------------------------------------------------------------------------------

DYNAMIC = {"rope_type": "dynamic", "factor": 4.0}


def cached_last_logits(model, ids, mask, prefill):
    """Prefill `prefill` tokens, then one token per step; the logits of the newest token at every step."""
    with torch.no_grad():
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        steps, cache = [out.logits[:, -1]], output_cache(out)
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


def recomputed_last_logits(model, ids, mask, prefill):
    with torch.no_grad():
        return torch.stack([model(ids[:, :t], attention_mask=mask[:, :t], use_cache=False).logits[:, -1]
                            for t in range(prefill, ids.shape[1] + 1)], 1)


@pytest.mark.parametrize("attn,padded", [("eager", True), ("sdpa", True), ("sdpa", False)])
def test_dynamic_cached_decoding_equals_full_recomputation_across_train_length(attn, padded):
    model = tiny_model(attn=attn, rope_parameters=DYNAMIC)  # L_train = 64, two layers
    lengths = [84, 70, 40] if padded else [84, 84, 84]
    ids, mask = left_padded(lengths, 84)
    cached = cached_last_logits(model, ids, mask, prefill=50)  # steps cross L_train = 64 for the first two rows
    recomputed = recomputed_last_logits(model, ids, mask, prefill=50)
    torch.testing.assert_close(cached, recomputed, atol=2e-5, rtol=0)
    # the test exercises the scaling: beyond L_train the logits leave plain RoPE's, within it they equal them
    plain = recomputed_last_logits(tiny_model(attn=attn), ids, mask, prefill=50)
    within = [t - 50 for t in range(50, 85) if t <= 64]
    torch.testing.assert_close(recomputed[0, within], plain[0, within], atol=2e-5, rtol=0)
    assert (recomputed[0, -1] - plain[0, -1]).abs().max() > 1e-3


def test_dynamic_one_layer_equals_transformers_recomputation():
    """One layer: the newest token's logits equal HF's dynamic NTK recomputed over the whole prefix at each step
    (HF's cached path keeps post-RoPE keys of older bases, so only its recomputation is the reference)."""
    torch.manual_seed(0)
    config = LlamaConfig(**tiny_config_kwargs(num_hidden_layers=1, rope_parameters=dict(DYNAMIC, rope_theta=1e4)))
    config._attn_implementation = "eager"
    llama = LlamaForCausalLM(config).eval()
    model = from_llama(llama)
    ids = torch.randint(0, 128, (2, 120))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hf = torch.stack([llama(ids[:, :t], use_cache=False).logits[:, -1] for t in range(50, 121)], 1)
    torch.testing.assert_close(cached_last_logits(model, ids, mask, prefill=50), hf, atol=2e-5, rtol=0)


def test_dynamic_attention_uses_each_query_own_table():
    """Explicit reference: query at position p and every key it sees rotated by the table of length p + 1."""
    model = tiny_model(attn="sdpa", rope_parameters=DYNAMIC, num_hidden_layers=1)
    layer, config = model.model.layers[0].self_attn, model.config
    ids, mask = left_padded([150, 100], 150)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = torch.randn(2, 150, 64)
    with torch.no_grad():
        q = layer.q_proj(hidden).view(2, 150, 4, 16).transpose(1, 2)
        k = layer.k_proj(hidden).view(2, 150, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        v = layer.v_proj(hidden).view(2, 150, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        expected = torch.zeros(2, 150, 4, 16)
        for b, i in itertools.product(range(2), range(150)):
            if not mask[b, i]:
                continue
            keys = [j for j in range(i + 1) if mask[b, j]]
            theta = frequency_table(DYNAMIC, 16, 64, int(positions[b, i]) + 1)[0].float()  # not the code's table
            qi = rotate_pairs(q[b, :, i], positions[b, i] * theta)
            kj = rotate_pairs(k[b][:, keys], positions[b, keys][:, None] * theta)
            probs = torch.softmax((kj @ qi[..., None]).squeeze(-1) / 4.0, dim=-1)
            expected[b, i] = (probs[:, None, :] @ v[b][:, keys]).squeeze(1)
        expected = layer.o_proj(expected.reshape(2, 150, 64))
        got, _ = layer(hidden, model.model.rotary_emb(hidden, positions),
                    attention.AttentionMask(150, 150, mask.bool()), position_ids=positions,
                    rotary=model.model.rotary_emb)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_dynamic_block_sizes_do_not_change_results():
    model = tiny_model(rope_parameters=DYNAMIC)
    ids, mask = left_padded([130, 90], 130)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        with attention.attention_settings(rotated_key_elements=2 * 2 * 130 * 16 * 3,  # 3 rows per block
                                          score_block_elements=2 * 4 * 130 * 5):
            small = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(small[mask.bool()], reference[mask.bool()], atol=1e-5, rtol=0)


def test_generate_with_cache_equals_without_for_dynamic():
    model = tiny_model(rope_parameters=DYNAMIC)
    ids, mask = left_padded([50, 30], 50)
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)  # crosses L_train
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


# --- set_rope -------------------------------------------------------------------------------------------------------

def test_set_rope_switches_in_place_and_back_exactly():
    model = tiny_model(attn="sdpa")
    ids = torch.randint(0, 128, (2, 100))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        original = model(ids).logits
        for rope, logn in [({"rope_type": "yarn", "factor": 4.0}, None), ({"rope_type": "ntk-mixed", "factor": 8.0},
                           "posthoc"), ({"rope_type": "rerope", "rerope_window": 16}, "trained"), (DYNAMIC, None)]:
            assert set_rope(model, rope, logn_scaling=logn) is model
            switched = model(ids).logits
            fresh = tiny_model(attn="sdpa", rope_parameters=rope, logn_scaling=logn or "off")  # same seed, weights
            torch.testing.assert_close(switched, fresh(ids).logits, atol=1e-6, rtol=0)
            assert not torch.allclose(switched, original, atol=1e-3)
            set_rope(model, {"rope_type": "default"}, logn_scaling="off")
            assert torch.equal(model(ids).logits, original)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_set_rope_rejects_invalid_values_and_leaves_the_model_unchanged():
    model = tiny_model(rope_parameters={"rope_type": "linear", "factor": 2.0})
    before = dict(model.config.rope_parameters), model.config.logn_scaling
    with pytest.raises(ValueError, match="rerope_window.*64.*L_train=64"):
        set_rope(model, {"rope_type": "rerope", "rerope_window": 64})
    with pytest.raises(ValueError, match="logn_scaling.*'sometimes'"):
        set_rope(model, {"rope_type": "default"}, logn_scaling="sometimes")
    assert (model.config.rope_parameters, model.config.logn_scaling) == before


def test_cache_filled_under_another_rope_type_is_refused():
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
        set_rope(model, {"rope_type": "rerope", "rerope_window": 8})
        with pytest.raises(ValueError, match="keeps keys before RoPE.*start a new cache after `set_rope`"):
            model(ids[:, :1], cache=cache, use_cache=True)
        cache = output_cache(model(ids, use_cache=True))
        set_rope(model, {"rope_type": "yarn", "factor": 2.0})
        with pytest.raises(ValueError, match="holds keys before RoPE"):
            model(ids[:, :1], cache=cache, use_cache=True)


def test_cache_filled_under_another_scheme_after_rope_is_refused_and_the_same_one_is_kept():
    """default -> linear: both cache keys after RoPE, so only the scheme stamped on the cache tells the old keys
    apart. Back to the scheme the keys were rotated by, or after `cache.reset()`, the cache serves again."""
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = output_cache(model(ids[:, :9], use_cache=True))
        set_rope(model, {"rope_type": "linear", "factor": 2.0})
        with pytest.raises(ValueError, match=r"rotated under rope_parameters .*\"default\".* now uses .*\"linear\""):
            model(ids[:, 9:], cache=cache, use_cache=True)
        set_rope(model, {"rope_type": "default", "rope_theta": 10000})  # the keys' own scheme again (an int θ is
        torch.testing.assert_close(model(ids[:, 9:], cache=cache, use_cache=True).logits[:, -1], full[:, -1])  # it)
        set_rope(model, {"rope_type": "yarn", "factor": 2.0})
        cache.reset()
        model(ids, cache=cache, use_cache=True)  # an emptied cache takes the new scheme
        set_rope(model, {"rope_type": "rerope", "rerope_window": 8})
        cache = output_cache(model(ids, use_cache=True))  # keys before RoPE
        cache.reset()
        set_rope(model, {"rope_type": "default"})
        model(ids, cache=cache, use_cache=True)  # emptied, it takes keys after RoPE again


def test_saving_a_longctx_rope_type_validates_without_transformers_warning(tmp_path, monkeypatch):
    """save_pretrained runs the config's validators: longctx's, not transformers' rope check (which warns
    "Missing validation function" for every rope_type it does not know)."""
    import transformers.modeling_rope_utils as hf_rope

    warnings = []
    monkeypatch.setattr(hf_rope.logger, "warning", lambda message, *args, **kwargs: warnings.append(message))
    model = tiny_model(rope_parameters={"rope_type": "ntk-mixed", "factor": 2.0})
    model.save_pretrained(tmp_path / "saved")
    assert warnings == []
    model.config.block_types = ["lru"]  # made invalid after construction: saving refuses it
    with pytest.raises(ValueError, match="`block_types`=\\['lru'\\] is invalid"):
        model.save_pretrained(tmp_path / "invalid")


# --- validation: every rope_parameters key ----------------------------------------------------------------------------

@pytest.mark.parametrize("rope_parameters,field", [
    ("linear", "rope_parameters"),
    ({"rope_type": "nope"}, "rope_parameters.rope_type"),
    ({"rope_type": ["linear"]}, "rope_parameters.rope_type"),
    ({"rope_type": "longrope", "factor": 2.0}, "rope_parameters.rope_type"),
    ({"rope_theta": 1.0}, "rope_parameters.rope_theta"),
    ({"rope_theta": "1e4"}, "rope_parameters.rope_theta"),
    ({"rope_type": "linear"}, "rope_parameters.factor"),
    ({"rope_type": "ntk", "factor": 0.5}, "rope_parameters.factor"),
    ({"rope_type": "dynamic", "factor": float("inf")}, "rope_parameters.factor"),
    ({"rope_type": "ntk-fixed", "factor": 2.0, "original_max_position_embeddings": 0},
     "rope_parameters.original_max_position_embeddings"),
    ({"rope_type": "ntk-mixed", "factor": 2.0, "mixed_exponent": 0.0}, "rope_parameters.mixed_exponent"),
    ({"rope_type": "ntk-mixed", "factor": 2.0, "mixed_exponent": 1.5}, "rope_parameters.mixed_exponent"),
    ({"rope_type": "ntk", "factor": 2.0, "mixed_exponent": 0.5}, "rope_parameters.mixed_exponent"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 0}, "rope_parameters.beta_fast"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_slow": 40.0}, "rope_parameters.beta_slow"),
    ({"rope_type": "yarn", "factor": 2.0, "attention_factor": -1.0}, "rope_parameters.attention_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "mscale": "big"}, "rope_parameters.mscale"),
    ({"rope_type": "yarn", "factor": 2.0, "mscale_all_dim": 0}, "rope_parameters.mscale_all_dim"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "yes"}, "rope_parameters.truncate"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32.0}, "rope_parameters.beta_fast"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "rope_parameters.low_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "1", "high_freq_factor": 4.0},
     "rope_parameters.low_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "rope_parameters.high_freq_factor"),
    ({"rope_type": "rerope"}, "rope_parameters.rerope_window"),
    ({"rope_type": "rerope", "rerope_window": 64}, "rope_parameters.rerope_window"),
    ({"rope_type": "rerope", "rerope_window": 8.5}, "rope_parameters.rerope_window"),
    ({"rope_type": "leaky-rerope", "rerope_window": 16, "factor": 0.5}, "rope_parameters.factor"),
    ({"rope_type": "leaky-rerope", "rerope_window": 100, "factor": 8.0, "original_max_position_embeddings": 100},
     "rope_parameters.rerope_window"),
])
def test_invalid_rope_parameters_name_the_field(rope_parameters, field):
    with pytest.raises(ValueError, match=f"`{field}`="):
        LongCtxConfig(**tiny_config_kwargs(rope_parameters=rope_parameters))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_rotation_equals_the_reference_with_gradients(dtype):
    """`apply_rotary` (two passes, its own backward) against HF's formula x·cos + rotate_half(x)·sin."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 16, dtype=dtype, requires_grad=True)
    positions = torch.arange(11)[None].expand(2, -1) + torch.tensor([[0], [5]])  # per-row offsets
    cos, sin = rotary_cos_sin(positions, compute_inv_freq(LongCtxConfig(**tiny_config_kwargs()))[0][:8], dtype)
    upstream = torch.randn(2, 3, 11, 16, dtype=dtype)
    fast, reference = apply_rotary(x, cos, sin), apply_rotary_reference(x, cos, sin)
    grad_fast, = torch.autograd.grad(fast, x, upstream)
    grad_reference, = torch.autograd.grad(reference, x, upstream)
    tolerance = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast, reference, **tolerance)
    torch.testing.assert_close(grad_fast, grad_reference, **tolerance)
    with torch.no_grad():  # under autocast the projections are bf16 and the table float32: promoted, as the reference
        mixed = apply_rotary(x.detach().bfloat16(), cos.float(), sin.float())
    assert mixed.dtype == torch.float32

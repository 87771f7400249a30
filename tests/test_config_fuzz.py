"""LongCtxConfig under fuzzing (issue 18): every invalid value of every field raises one ValueError naming the field
and the value; random valid configs — every rope_type, grouped-query attention, hybrids, lengths past L_train —
build, run and decode with the cache exactly as they recompute."""

import dataclasses
import math
import random

import pytest
import torch

from longctx import LongCtxConfig, LongCtxForCausalLM

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
NAN, INF, HUGE = float("nan"), float("inf"), 10**30

# Invalid values by kind of field, written here from the field's meaning (not read from the validator).
SIZE = [0, -1, 2.5, 8.0, "8", [8], {}, True, HUGE, NAN]
BOOL = ["no", "true", 0.5, -1, 0, 1, [True], {}]
INVALID = {
    **{name: SIZE + [None] for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "max_position_embeddings", "lru_state_size")},
    "num_key_value_heads": SIZE + [3],  # None is valid (= num_attention_heads); 3 does not divide 4 heads
    "head_dim": SIZE + [7],  # None is valid (derived); an odd head_dim cannot be rotated in pairs
    "chunk_size_feed_forward": [-1, 1.5, "0", None, True, HUGE],
    **{name: BOOL + [None] for name in ("use_cache", "tie_word_embeddings", "attention_bias", "mlp_bias", "qk_bias",
                                        "output_hidden_states", "return_dict")},
    "is_encoder_decoder": BOOL + [True, None],
    "rms_norm_eps": [0, -1e-6, "1e-6", None, NAN, INF, True, [1e-6]],
    "attention_dropout": [-0.1, 1.5, "0", None, NAN, True],
    "initializer_range": [-0.02, "0.02", None, INF, NAN],
    "lru_r_min": [-0.1, 1.5, "0.9", None, NAN, 0.9999],  # 0.9999 >= lru_r_max (0.999)
    "lru_r_max": [-0.1, 1.5, "0.999", None, NAN, 0.5],  # 0.5 <= lru_r_min (0.9)
    "lru_max_phase": [0, -1, "6", None, INF],
    "lru_scan_backend": ["torch", "Native", "", None, 1, True, ["auto"]],  # "auto", "native", "chunked" only
    "hidden_act": ["nope", "", None, 3, ["silu"]],
    "logn_scaling": ["on", "log-n", None, True, 1, ["off"]],
    "tied_embedding_mode": ["swap", None, 0, ["plain"], "half-swap"],  # half-swap needs tie_word_embeddings
    "problem_type": ["classification", 3, True],
    "dtype": ["nope", 3, ["float32"]],
    "pad_token_id": [-1, 64, 10**9, 1.5, "1", True, [0]],
    "bos_token_id": [-1, 64, 1.5, "1", True, [1]],
    "eos_token_id": [-1, 64, 1.5, "2", True, [], [-1], ["2"], [64]],
    "block_types": ["lru", ["lru"], ["attention", "mamba"], [1, 2], {}, ["attention"] * 3],
    "layer_types": [["full_attention"], ["sliding_attention", "full_attention"], "full_attention", [0, 1]],
    "rope_parameters": ["yarn", 3, ["default"], {"rope_type": "nope"}, {"rope_type": [1]},
                        {"rope_type": "yarn"}, {"rope_type": "linear", "factor": 0.5},
                        {"rope_type": "linear", "factor": "2"}, {"rope_type": "default", "rope_theta": -1.0},
                        {"rope_type": "default", "rope_theta": NAN}, {"rope_type": "default", "bogus": 1},
                        {"rope_type": "rerope", "rerope_window": 16}, {"rope_type": "rerope"},
                        {"rope_type": "leaky-rerope", "rerope_window": 4},
                        {"rope_type": "ntk-mixed", "factor": 2.0, "mixed_exponent": 2.0},
                        {"rope_type": "yarn", "factor": 2.0, "beta_fast": 1.0, "beta_slow": 2.0},
                        {"rope_type": "yarn", "factor": 2.0, "truncate": "no"},
                        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
                        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                         "original_max_position_embeddings": 16},
                        {"rope_type": "default", "original_max_position_embeddings": 0}],
}
# transformers' own bookkeeping fields, not model settings
NOT_SETTINGS = {"transformers_version", "architectures", "id2label", "label2id"}


def test_the_table_covers_every_field_of_the_config():
    fields = {f.name for f in dataclasses.fields(LongCtxConfig)} - NOT_SETTINGS
    assert fields == set(INVALID)  # a field added to the config needs its invalid values here


def assert_one_clear_error(overrides, field):
    """One ValueError, naming `field` (for a dict value, a key under it) and the value."""
    try:
        LongCtxConfig(**{**BASE, **overrides})
    except Exception as caught:  # noqa: BLE001 - any other exception type is the failure reported below
        err = caught
    else:
        pytest.fail(f"accepted: {overrides}")
    assert type(err) is ValueError, f"{overrides}: {type(err).__name__}: {err}"
    message = str(err)
    assert field in message and "is invalid" in message, (overrides, message)
    value = overrides[field]
    if not isinstance(value, dict):
        assert repr(value) in message or (isinstance(value, float) and math.isnan(value)), (overrides, message)


@pytest.mark.parametrize("field", sorted(INVALID))
def test_every_invalid_value_of_every_field_is_one_value_error_naming_it(field):
    for value in INVALID[field]:
        assert_one_clear_error({field: value}, field)


def test_seeded_fuzz_of_invalid_values_over_random_valid_configs():
    """400 cases: a random valid configuration with one field made invalid."""
    rng = random.Random(0)
    for _ in range(400):
        config = random_valid_kwargs(rng)
        field = rng.choice(sorted(INVALID))
        value = rng.choice(INVALID[field])
        if field in ("block_types", "layer_types"):  # the invalid lists are wrong for 2 layers
            config.pop("block_types", None)
            config["num_hidden_layers"] = 2
        if field == "tied_embedding_mode" and value == "half-swap":
            config["tie_word_embeddings"] = False
        if field in ("lru_r_min", "lru_r_max"):
            config.update(lru_r_min=0.9, lru_r_max=0.999)
        if field in ("num_key_value_heads", "head_dim"):
            config.update(num_attention_heads=4, hidden_size=32)
        if field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            config["vocab_size"] = 64
        if field == "rope_parameters" or field == "max_position_embeddings":
            config["max_position_embeddings"] = 16
        assert_one_clear_error({**config, field: value}, field)


# --- random valid configurations --------------------------------------------------------------------------------

def random_rope(rng, train_len):
    factor = rng.choice([1.0, 2.0, 4.0])
    return rng.choice([
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": factor},
        {"rope_type": "ntk", "factor": factor},
        {"rope_type": "ntk-fixed", "factor": factor},
        {"rope_type": "ntk-mixed", "factor": factor, "mixed_exponent": rng.choice([0.5, 0.625, 1.0])},
        {"rope_type": "dynamic", "factor": factor},
        {"rope_type": "yarn", "factor": factor},
        {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": train_len},
        {"rope_type": "rerope", "rerope_window": rng.choice([2, train_len // 2])},
        {"rope_type": "leaky-rerope", "rerope_window": train_len // 4, "factor": rng.choice([2.0, 8.0])},
    ])


def random_valid_kwargs(rng):
    heads = rng.choice([2, 4])
    layers = rng.choice([1, 2, 3])
    tie = rng.random() < 0.5
    kwargs = dict(BASE, num_attention_heads=heads, num_key_value_heads=rng.choice([h for h in (1, 2, 4) if h <= heads]),
                  num_hidden_layers=layers, rope_parameters=random_rope(rng, 16),
                  logn_scaling=rng.choice(["off", "trained", "posthoc"]), qk_bias=rng.random() < 0.3,
                  tie_word_embeddings=tie, lru_state_size=8,
                  tied_embedding_mode=(rng.choice(["plain", "small-init", "projection", "half-swap"]) if tie
                                       else "plain"),
                  block_types=[rng.choice(["attention", "attention", "lru"]) for _ in range(layers)])
    return kwargs


def test_construction_leaves_the_callers_rope_dict_alone():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        LongCtxConfig(**BASE, rope_parameters=rope)
    yarn = {"rope_type": "yarn", "factor": 2.0}
    assert LongCtxConfig(**BASE, rope_parameters=yarn).rope_parameters["beta_fast"] == 32.0
    assert rope == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert yarn == {"rope_type": "yarn", "factor": 2.0}


def test_set_rope_refuses_llama3_without_its_original_length_and_changes_nothing():
    from longctx.rope import set_rope

    model = LongCtxForCausalLM(LongCtxConfig(**BASE)).eval()
    before = dict(model.config.rope_parameters)
    with pytest.raises(ValueError, match="rope_parameters.original_max_position_embeddings"):
        set_rope(model, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    assert model.config.rope_parameters == before


@pytest.mark.parametrize("seed", range(24))
def test_random_valid_configs_run_past_l_train_and_decode_as_they_recompute(seed):
    rng = random.Random(1000 + seed)
    kwargs = random_valid_kwargs(rng)
    if seed < 10:  # each rope_type at least once, with grouped-query attention (1 key/value head)
        kwargs["rope_parameters"] = [{"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "ntk", "factor": 2.0}, {"rope_type": "ntk-fixed", "factor": 2.0},
                                     {"rope_type": "ntk-mixed", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                     {"rope_type": "rerope", "rerope_window": 4},
                                     {"rope_type": "leaky-rerope", "rerope_window": 4, "factor": 4.0}][seed]
        kwargs.update(num_attention_heads=2, num_key_value_heads=1,
                      block_types=["attention"] * kwargs["num_hidden_layers"])
    torch.manual_seed(seed)
    config = LongCtxConfig(**kwargs)
    config._attn_implementation = rng.choice(["sdpa", "eager"])
    model = LongCtxForCausalLM(config).eval()
    ids = torch.randint(3, 64, (2, 44), generator=torch.Generator().manual_seed(seed))  # 2.75 x L_train
    with torch.no_grad():
        full = model(ids).logits
        assert torch.isfinite(full).all()
        out = model(ids[:, :40], use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        steps = [out.logits[:, -1]]
        for t in range(40, 43):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 39:43], rtol=1e-4, atol=1e-4, msg=str(kwargs))

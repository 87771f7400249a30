"""The model against references written out from the formulas (issue 16 item 6; `formulas.py`, methods.md §1–10).

The references share nothing with longctx but the weights: each attention layer's output, recorded by a forward
hook during a prefill or a cached decoding (a prompt, a chunk, then one token at a time), is recomputed from the
hidden states that entered it by `formulas.dense_attention`, every score from its own rotation matrix; frequency
tables are checked against the formulas over a grid. The attention weights are drawn large enough that attention
is sharp: with a tiny model's default init every score is ≈ 0 and no position scheme would show. Which wrong
formula each test catches: tests/README.md ("Mutation check")."""

import itertools

import pytest
import torch
from conftest import left_padded, tiny_model
from formulas import dense_attention, frequency_table, train_length

from longctx import LongCtxConfig
from longctx.attention import AttentionMask
from longctx.modeling_longctx import output_cache
from longctx.rope import ROPE_SPECS, compute_inv_freq

RE_ROPE = {"rope_type": "rerope", "rerope_window": 12}
LEAKY = {"rope_type": "leaky-rerope", "rerope_window": 12, "factor": 8.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 4.0}

# model overrides per case; lengths run to 40 positions: past the ReRoPE window and, for dynamic NTK, past L_train
CASES = {
    "rerope": dict(rope_parameters=RE_ROPE),
    "leaky": dict(rope_parameters=LEAKY),
    "dynamic": dict(rope_parameters=DYNAMIC, max_position_embeddings=24),
    "rerope-logn-trained": dict(rope_parameters=RE_ROPE, logn_scaling="trained"),
    "dynamic-logn-posthoc": dict(rope_parameters=DYNAMIC, max_position_embeddings=24, logn_scaling="posthoc"),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
    "default": dict(),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 3.0}),
    "ntk": dict(rope_parameters={"rope_type": "ntk", "factor": 8.0}),
    "ntk-fixed": dict(rope_parameters={"rope_type": "ntk-fixed", "factor": 8.0}),
    "ntk-mixed": dict(rope_parameters={"rope_type": "ntk-mixed", "factor": 8.0, "mixed_exponent": 0.75}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}
KEYS_BEFORE_ROPE = ("rerope", "leaky", "dynamic", "rerope-logn-trained", "dynamic-logn-posthoc")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny shapes, many small ops


def sharp_model(attn, seed=0, **overrides):
    """`tiny_model` with attention weights drawn so that scores are O(1–5) (q, k std 0.2) and outputs O(1)."""
    model = tiny_model(attn=attn, seed=seed, **overrides)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            for name, std in (("q_proj", 0.2), ("k_proj", 0.2), ("v_proj", 0.1), ("o_proj", 0.1)):
                weight = getattr(layer.self_attn, name).weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    return model


def positions_of(real):
    """Position of each token: how many real tokens precede it in its row (left padding: real tokens from 0)."""
    return (real.long().cumsum(-1) - 1).clamp(min=0)


def record_attention(model):
    """Forward hooks on every attention layer: per layer a list of (hidden states in, output) of each call."""
    calls = [[] for _ in model.model.layers]
    for layer, layer_calls in zip(model.model.layers, calls):
        layer.self_attn.register_forward_hook(
            lambda module, args, output, _calls=layer_calls: _calls.append((args[0].detach(), output[0].detach())))
    return calls


def assert_layers_equal_the_formula(model, calls, positions, real):
    """Each layer's outputs (concatenated over the calls) equal `dense_attention` of its inputs, on real tokens."""
    for layer, layer_calls in zip(model.model.layers, calls):
        hidden = torch.cat([inputs for inputs, _ in layer_calls], 1)
        got = torch.cat([output for _, output in layer_calls], 1)
        expected = dense_attention(layer.self_attn, model.config, hidden, positions, real)
        torch.testing.assert_close(got[real].double(), expected[real], atol=1e-5, rtol=1e-5)


# backend id -> (attn_implementation, settings): the defaults, ReRoPE's fused path at any length (by default from 384
# queries or 4096 keys), and the block-wise paths of the keys-before-RoPE schemes 7 query rows at a time
BACKENDS = {"eager": ("eager", None), "sdpa": ("sdpa", None), "sdpa-fused": ("sdpa", "fused"),
            "sdpa-blocks-of-7": ("sdpa", 7)}


def backend_settings(backend, use_attention_settings, batch, kv_len):
    attn, blocks = BACKENDS[backend]
    if blocks == "fused":
        use_attention_settings(fused_rerope_from=(1, 1))
    elif blocks is not None:
        use_attention_settings(score_block_elements=batch * 4 * kv_len * blocks, fused_rerope=False,
                               rotated_key_elements=batch * 2 * kv_len * 16 * blocks)
    return attn


def runs_on(case, backend):
    """Which (case, backend) pairs the layer tests run: the fused path for ReRoPE, block-wise for keys before RoPE."""
    rope_type = CASES[case].get("rope_parameters", {}).get("rope_type")
    return {"sdpa-fused": rope_type in ("rerope", "leaky-rerope"),
            "sdpa-blocks-of-7": case in KEYS_BEFORE_ROPE}.get(backend, True)


@pytest.mark.parametrize("mode", ["prefill", "cached"])
@pytest.mark.parametrize("case,backend", [pytest.param(case, backend, id=f"{case}-{backend}") for case in CASES
                                          for backend in BACKENDS
                                          if runs_on(case, backend)])
def test_attention_layers_equal_the_formula(case, backend, mode, use_attention_settings):
    """Left-padded batch (40 and 29 real tokens), two layers. "cached": a 15-token prompt, a 7-token chunk, then
    one token per step through the cache. `BACKENDS`: the fused ReRoPE path, the block-wise paths in blocks of 7."""
    attn = backend_settings(backend, use_attention_settings, 2, 40)
    model = sharp_model(attn, **CASES[case])
    calls = record_attention(model)
    ids, mask = left_padded([40, 29], 40)
    with torch.no_grad():
        if mode == "prefill":
            model(ids, attention_mask=mask, use_cache=False)
        else:
            cache = output_cache(model(ids[:, :15], attention_mask=mask[:, :15], use_cache=True))
            model(ids[:, 15:22], attention_mask=mask[:, :22], cache=cache, use_cache=True)
            for t in range(22, 40):
                model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
    real = mask.bool()
    assert_layers_equal_the_formula(model, calls, positions_of(real), real)


@pytest.mark.parametrize("case", ["rerope", "leaky", "dynamic"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_at_given_positions_with_gaps_equals_the_formula(case, attn):
    """Explicit position_ids that jump (packed or edited sequences): distances are positions, not indices."""
    model = sharp_model(attn, **CASES[case])
    calls = record_attention(model)
    ids, mask = left_padded([40, 33], 40)
    real = mask.bool()
    positions = positions_of(real) + (torch.arange(40) >= 25) * 9
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, use_cache=False)
    assert_layers_equal_the_formula(model, calls, positions, real)


@pytest.mark.parametrize("case,backend", [pytest.param(case, backend, id=f"{case}-{backend}")
                                          for case in ("rerope", "leaky", "dynamic") for backend in BACKENDS
                                          if runs_on(case, backend)])
def test_attention_after_padding_holes_equals_the_formula(case, backend, use_attention_settings):
    """Padding inside a row (a right-padded prompt continued through the cache; a hole and left padding): the
    cached keys' positions skip the padding, and the padding keys stay hidden, in every path."""
    attn = backend_settings(backend, use_attention_settings, 3, 44)
    model = sharp_model(attn, **CASES[case])
    calls = record_attention(model)
    ids = torch.randint(1, 128, (3, 44), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 12:20] = 0  # right padding of the 20-token prompt, then 24 tokens more
    mask[2, :5], mask[2, 30:33] = 0, 0  # left padding and a hole
    with torch.no_grad():
        cache = output_cache(model(ids[:, :20], attention_mask=mask[:, :20], use_cache=True))
        model(ids[:, 20:27], attention_mask=mask[:, :27], cache=cache, use_cache=True)
        for t in range(27, 44):
            model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
    real = mask.bool()
    assert_layers_equal_the_formula(model, calls, positions_of(real), real)


@pytest.mark.parametrize("case", ["rerope", "leaky", "dynamic"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_gradients_equal_the_formula(case, attn, use_attention_settings):
    """Fine-tuning under these schemes (Su's InvLeaky recipe, dynamic NTK past L_train): the gradients of one
    attention layer — its weights and its input — equal those of the reference, through the block-wise paths."""
    use_attention_settings(score_block_elements=2 * 4 * 36 * 5, rotated_key_elements=2 * 2 * 36 * 16 * 5)
    model = sharp_model(attn, num_hidden_layers=1, **CASES[case]).train()
    layer, rotary = model.model.layers[0].self_attn, model.model.rotary_emb
    _, mask = left_padded([36, 27], 36)
    real = mask.bool()
    positions = positions_of(real)
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 36, 64, generator=generator).requires_grad_()
    upstream = torch.randn(2, 36, 64, generator=generator) * real[..., None]  # real queries only
    inputs = [hidden, *layer.parameters()]
    out, _ = layer(hidden, rotary(hidden, positions), AttentionMask(36, 36, real), position_ids=positions,
                   rotary=rotary)
    got = torch.autograd.grad((out * upstream).sum(), inputs)
    expected = torch.autograd.grad((dense_attention(layer, model.config, hidden, positions, real)
                                    * upstream.double()).sum(), inputs)
    for ours, reference in zip(got, expected):
        torch.testing.assert_close(ours.double(), reference.double(), atol=1e-5, rtol=1e-4)


def table_config(head_dim, rope_parameters, max_positions=4096):
    return LongCtxConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, num_hidden_layers=1,
                         intermediate_size=8, vocab_size=16, max_position_embeddings=max_positions,
                         rope_parameters=dict(rope_parameters))


TABLES = [
    {"rope_type": "default"},
    {"rope_type": "linear"},
    {"rope_type": "ntk"},
    {"rope_type": "ntk-fixed"},
    {"rope_type": "ntk-mixed"},
    {"rope_type": "ntk-mixed", "mixed_exponent": 0.3},
    {"rope_type": "ntk-mixed", "mixed_exponent": 1.0},
    {"rope_type": "dynamic"},
    {"rope_type": "dynamic", "original_max_position_embeddings": 1024},
    {"rope_type": "yarn"},
    {"rope_type": "yarn", "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 0.8},
    {"rope_type": "yarn", "truncate": False, "original_max_position_embeddings": 256},
    {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "rerope", "rerope_window": 512},
    {"rope_type": "leaky-rerope", "rerope_window": 512},
]


@pytest.mark.parametrize("rope", TABLES, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_frequency_tables_equal_the_formulas(rope):
    """`compute_inv_freq` (θ and the cos/sin factor) against `formulas.frequency_table`, over head sizes, bases,
    factors and, for dynamic NTK, lengths around L_train."""
    for head_dim, base, factor in itertools.product([16, 64, 128], [10000.0, 500000.0], [1.0, 2.0, 8.0, 32.0]):
        params = dict(rope, rope_theta=base, factor=factor)
        config = table_config(head_dim, params)
        L = train_length(params, 4096)
        lengths = [None, 100, L - 1, L, L + 1, 3 * L, 10 * L] if rope["rope_type"] == "dynamic" else [None]
        for length in lengths:
            got, got_factor = compute_inv_freq(config, length)
            expected, expected_factor = frequency_table(params, head_dim, 4096, length)
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0, msg=f"{params} at {length}")
            assert got_factor == pytest.approx(expected_factor, rel=1e-12), (params, length)


def test_every_rope_type_has_its_rows():
    """A new `RopeSpec` needs its row here (its frequency table) and a model case (its attention layers)."""
    assert {rope["rope_type"] for rope in TABLES} == set(ROPE_SPECS)
    cases = {CASES[case].get("rope_parameters", {}).get("rope_type", "default") for case in CASES}
    assert cases == set(ROPE_SPECS)

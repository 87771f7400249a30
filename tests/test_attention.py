"""Attention paths (longctx.attention): the block-wise fast path against the eager reference, the one chooser of every
path, the settings that steer it, and the padding rule every path shares."""

import functools

import pytest
import torch
from conftest import left_padded, tiny_config_kwargs, tiny_model

from longctx import LongCtxConfig, attention
from longctx.attention import (AttentionMask, AttentionSettings, PreRope, attention_settings, blocked_attention,
                               choose_attention, eager_attention, prefer_blocked, sdpa_attention)
from longctx.rope import ROPE_SPECS, compute_inv_freq


def qkv(batch, heads, kv_heads, q_len, kv_len, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, kv_len, 16, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("case", ["causal", "cache", "left-padded"])
def test_blocked_attention_equals_the_eager_reference(case):
    q_len, kv_len = 150, 150 if case != "cache" else 190  # with a cache: 40 keys before the first query
    padding = None
    if case == "left-padded":
        padding = left_padded([150, 97], 150)[1].bool()
    mask = AttentionMask(q_len, kv_len, padding)
    q, k, v = qkv(2, 4, 2, q_len, kv_len)  # grouped-query heads: 2 query heads per key head
    expected = eager_attention(q, k, v, mask, 0.25)
    smallest = AttentionSettings(blocked_score_elements=1)  # the smallest blocks: 64 rows, 3 of them
    assert smallest.blocked_block_rows(2, 4, kv_len) == 64
    torch.testing.assert_close(blocked_attention(q, k, v, mask, 0.25, settings=smallest), expected, atol=1e-5,
                               rtol=1e-5)


def test_sdpa_runs_blocked_only_for_cpu_bfloat16_prefill_without_autograd():
    mask = AttentionMask(300, 300)
    q, k, _ = qkv(1, 2, 2, 300, 300, dtype=torch.bfloat16)
    assert prefer_blocked(q, k, mask)
    assert not prefer_blocked(q.float(), k.float(), mask)  # float32: torch's kernel is faster
    assert not prefer_blocked(q, k, AttentionMask(1, 300))  # decoding
    assert not prefer_blocked(q, k, AttentionMask(300, 20000))  # beyond 16k keys torch's kernel is as fast
    assert not prefer_blocked(q, k, mask, AttentionSettings(blocked_queries=(301, 16384)))
    with torch.enable_grad():
        assert not prefer_blocked(q.requires_grad_(), k, mask)  # training keeps SDPA's memory-lean backward


def test_bfloat16_blocked_attention_is_as_close_to_float32_as_torch_sdpa():
    mask = AttentionMask(1024, 1024)
    q, k, v = (x * 2 for x in qkv(1, 4, 4, 1024, 1024, seed=3))
    exact = eager_attention(q.double(), k.double(), v.double(), mask, 0.25)
    low = [x.bfloat16() for x in (q, k, v)]
    with torch.no_grad():
        blocked = sdpa_attention(*low, mask, 0.25)  # dispatches to blocked_attention
        torch_sdpa = torch.nn.functional.scaled_dot_product_attention(*low, is_causal=True, scale=0.25).transpose(1, 2)
    error_blocked = (blocked.double() - exact).abs().mean()
    error_sdpa = (torch_sdpa.double() - exact).abs().mean()
    assert error_blocked < 3 * error_sdpa, (error_blocked, error_sdpa)  # scores rounded to bf16: ~2x SDPA's error


def test_bfloat16_model_logits_stay_close_to_float32():
    model = tiny_model(max_position_embeddings=512)
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits.float()
    assert (low - exact).abs().max() < 0.05 * exact.abs().max()


# --- the chooser: every path, from the backend, the rope_type's attention, the mask and the tensors ---------------

def holes(width=300):
    mask = torch.ones(2, width, dtype=torch.bool)
    mask[0, 100:120] = False  # not one run of real tokens
    return mask


def pre_rope(rope_parameters, q_len, kv_len, gap=0):
    config = LongCtxConfig(**tiny_config_kwargs(rope_parameters=rope_parameters))
    k_pos = torch.arange(kv_len)[None].expand(2, -1) + (torch.arange(kv_len) >= kv_len // 2) * gap
    return PreRope(k_pos[:, kv_len - q_len:], k_pos, compute_inv_freq(config)[0], config)


RE_ROPE = {"rope_type": "rerope", "rerope_window": 8}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}  # L_train = 64
CHOICES = [  # (backend, attention, q_len, kv_len, padding, dtype, settings, pre_rope) -> the path
    ("eager", "after_rope", 300, 300, None, torch.float32, {}, None, "eager_attention"),
    ("flash_attention_2", "after_rope", 300, 300, None, torch.float32, {}, None, "flash_attention_2"),
    ("sdpa", "after_rope", 300, 300, None, torch.float32, {}, None, "sdpa_causal"),
    ("sdpa", "after_rope", 1, 300, None, torch.float32, {}, None, "sdpa_unmasked"),  # a decoding step
    ("sdpa", "after_rope", 100, 300, None, torch.float32, {}, None, "sdpa_dense_mask"),  # a chunk after a cache
    ("sdpa", "after_rope", 100, 300, None, torch.float32, {"mask_block_elements": 64 * 300}, None,
     "masked_row_blocks"),
    ("sdpa", "after_rope", 300, 300, "left", torch.float32, {}, None, "sdpa_per_row"),
    ("sdpa", "after_rope", 255, 255, "left", torch.float32, {}, None, "sdpa_dense_mask"),  # short: one masked call
    ("sdpa", "after_rope", 300, 300, "left", torch.float32, {"per_row_queries": 10**9}, None, "sdpa_dense_mask"),
    ("sdpa", "after_rope", 300, 300, "holes", torch.float32, {}, None, "sdpa_dense_mask"),
    ("sdpa", "after_rope", 300, 300, "holes", torch.float32, {"mask_block_elements": 64 * 300}, None,
     "masked_row_blocks"),
    ("sdpa", "after_rope", 300, 300, None, torch.bfloat16, {}, None, "blocked_attention"),
    ("sdpa", "after_rope", 300, 300, "holes", torch.bfloat16, {}, None, "blocked_attention"),
    ("sdpa", "after_rope", 300, 300, None, torch.bfloat16, {"blocked_queries": (512, 16384)}, None, "sdpa_causal"),
    ("eager", "rerope", 300, 300, None, torch.float32, {}, (RE_ROPE, 0), "rerope_dense_attention"),
    ("sdpa", "rerope", 400, 400, None, torch.float32, {}, (RE_ROPE, 0), "rerope_fused_path"),  # inference, long
    ("sdpa", "rerope", 1, 4096, None, torch.float32, {}, (RE_ROPE, 0), "rerope_fused_path"),  # a step, long cache
    ("sdpa", "rerope", 400, 400, "left", torch.float32, {}, (RE_ROPE, 0), "rerope_fused_path"),
    ("sdpa", "rerope", 400, 400, None, torch.float32, {"fused_rerope": False}, (RE_ROPE, 0), "rerope_band_attention"),
    ("sdpa", "rerope", 400, 400, "holes", torch.float32, {}, (RE_ROPE, 0), "rerope_band_attention"),
    ("sdpa", "rerope", 300, 300, None, torch.float32, {}, (RE_ROPE, 0), "rerope_band_attention"),  # short
    ("sdpa", "rerope", 1, 300, None, torch.float32, {}, (RE_ROPE, 0), "rerope_band_attention"),
    ("sdpa", "rerope", 1, 300, None, torch.float32, {"fused_rerope_from": (1, 1)}, (RE_ROPE, 0), "rerope_fused_path"),
    ("sdpa", "rerope", 300, 300, None, torch.float32, {}, (RE_ROPE, 5), "rerope_attention"),  # positions jump
    ("flash_attention_2", "rerope", 300, 300, None, torch.float32, {}, (RE_ROPE, 5), "rerope_attention"),
    ("sdpa", "dynamic", 300, 300, None, torch.float32, {}, (DYNAMIC, 0), "dynamic_attention"),  # past L_train
    ("eager", "dynamic", 40, 40, None, torch.float32, {}, (DYNAMIC, 0), "dynamic_base_table+eager_attention"),
    ("sdpa", "dynamic", 40, 40, None, torch.float32, {}, (DYNAMIC, 0), "dynamic_base_table+sdpa_causal"),
    ("sdpa", "dynamic", 1, 40, None, torch.float32, {}, (DYNAMIC, 0), "dynamic_base_table+sdpa_unmasked"),
]


def path_name(path):
    if isinstance(path, functools.partial):
        return f"{path.func.__name__}+{path.keywords['after_rope'].__name__}"
    return path.__name__


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: f"{c[0]}-{c[1]}-{c[-1]}")
def test_the_chooser_names_every_path(choice):
    implementation, kind, q_len, kv_len, padding, dtype, changes, rope, expected = choice
    padding_mask = {"left": left_padded([kv_len, kv_len - 40], kv_len)[1].bool(), "holes": holes(kv_len),
                    None: None}[padding]
    mask = AttentionMask(q_len, kv_len, padding_mask)
    q, k, _ = qkv(2, 4, 2, q_len, kv_len, dtype=dtype)
    positions = pre_rope(rope[0], q_len, kv_len, gap=rope[1]) if rope else None
    with torch.no_grad():
        path = choose_attention(implementation, kind, q, k, mask, settings=AttentionSettings(**changes),
                                pre_rope=positions)
    assert path_name(path) == expected


def test_every_rope_spec_has_a_path_and_unknown_names_raise():
    mask = AttentionMask(40, 40)
    q, k, _ = qkv(2, 4, 2, 40, 40)
    rope_parameters = {"rerope": RE_ROPE, "dynamic": DYNAMIC}
    for spec in ROPE_SPECS.values():
        positions = pre_rope(rope_parameters[spec.attention], 40, 40) if spec.keys_before_rope else None
        for implementation in ("eager", "sdpa"):
            assert callable(choose_attention(implementation, spec.attention, q, k, mask, settings=AttentionSettings(),
                                             pre_rope=positions))
    with pytest.raises(ValueError, match="RopeSpec.attention='flex'.*'after_rope', 'rerope' and 'dynamic'"):
        choose_attention("sdpa", "flex", q, k, mask, settings=AttentionSettings())
    for kind in ("after_rope", "rerope", "dynamic"):
        with pytest.raises(ValueError, match='attn_implementation="flex_attention"` is not supported by longctx'):
            choose_attention("flex_attention", kind, q, k, mask, settings=AttentionSettings())


@pytest.mark.parametrize("kind", ["rerope", "dynamic"])
def test_every_path_of_a_rope_type_runs_with_the_shared_signature(kind):
    """The paths `choose_attention` returns take one signature; for keys before RoPE, each path (the reference, the
    block-wise ones) gives the same output."""
    rope = {"rerope": RE_ROPE, "dynamic": DYNAMIC}[kind]
    positions = pre_rope(rope, 70, 100)  # 30 cached keys, positions past L_train = 64
    mask = AttentionMask(70, 100, left_padded([100, 77], 100)[1].bool())
    q, k, v = qkv(2, 4, 2, 70, 100)
    outputs, blocks_of_7 = [], {"score_block_elements": 2 * 4 * 100 * 7, "rotated_key_elements": 2 * 2 * 100 * 16 * 7}
    block_wise, fused = {"fused_rerope": False}, {"fused_rerope_from": (1, 1)}  # (fused from 384 queries by default)
    names = []
    for implementation, changes in (("eager", {}), ("sdpa", fused), ("sdpa", block_wise),
                                    ("sdpa", dict(blocks_of_7, **block_wise))):
        settings = AttentionSettings(**changes)
        path = choose_attention(implementation, kind, q, k, mask, settings=settings, pre_rope=positions)
        names.append(path_name(path))
        outputs.append(path(q, k, v, mask, 0.25, 0.0, settings=settings, pre_rope=positions))
    if kind == "rerope":
        assert names == ["rerope_dense_attention", "rerope_fused_path"] + ["rerope_band_attention"] * 2
        # training keeps the block-wise paths (the fused kernels have no dropout, no gradient)
        assert choose_attention("sdpa", kind, q, k, mask, settings=AttentionSettings(**fused), pre_rope=positions,
                                dropout=0.1).__name__ == "rerope_band_attention"
        q.requires_grad_(True)
        assert choose_attention("sdpa", kind, q, k, mask, settings=AttentionSettings(**fused),
                                pre_rope=positions).__name__ == "rerope_band_attention"
    real = mask.query_padding()
    for out in outputs[1:]:
        torch.testing.assert_close(out[real], outputs[0][real], atol=1e-5, rtol=1e-5)


def test_attention_settings_nest_and_restore():
    default = attention.active_attention_settings()
    assert default == attention.DEFAULT_ATTENTION_SETTINGS == AttentionSettings()
    with attention_settings(per_row_queries=7) as outer:
        assert attention.active_attention_settings() is outer and outer.per_row_queries == 7
        with attention_settings(mask_block_elements=64) as inner:
            assert (inner.per_row_queries, inner.mask_block_elements) == (7, 64)  # changes add up
        assert attention.active_attention_settings() is outer
        with attention_settings(AttentionSettings()):
            assert attention.active_attention_settings() == AttentionSettings()
    assert attention.active_attention_settings() is default
    with pytest.raises(TypeError):
        with attention_settings(per_row_query=7):  # a misspelt field is an error, not ignored
            pass
    with pytest.raises(AttributeError):
        default.per_row_queries = 1  # frozen


def test_a_model_runs_under_the_active_settings(monkeypatch):
    """`attention_settings` reaches the model's layers: a padded prefill of 300 tokens runs row by row by default,
    as one masked call under a high `per_row_queries`."""
    paths, choose = [], attention.choose_attention

    def recording(*args, **kwargs):
        path = choose(*args, **kwargs)
        paths.append(path_name(path))
        return path

    monkeypatch.setattr(attention, "choose_attention", recording)
    model = tiny_model()
    ids, mask = left_padded([300, 250], 300)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        with attention_settings(per_row_queries=10**9):
            model(ids, attention_mask=mask)
    # two layers each; the row-by-row path's rows (no padding left in them) choose again
    assert paths[:3] == ["sdpa_per_row", "sdpa_causal", "sdpa_causal"] and paths[-2:] == ["sdpa_dense_mask"] * 2


# --- the padding rule, once: block-wise hiding and the dense mask agree ---------------------------------------------

@pytest.mark.parametrize("case", ["plain", "left-padded", "holes-and-cache"])
def test_block_hiding_equals_the_dense_mask(case):
    """`AttentionMask.hide_` (the block-wise paths) hides exactly what the dense mask (SDPA, eager) hides, block by
    block; a left-padding query, which has no real key at or before it, sees its causal keys in both."""
    q_len, kv_len, padding = 30, 30, None
    if case == "left-padded":
        padding = left_padded([30, 12], 30)[1].bool()
    if case == "holes-and-cache":
        q_len, kv_len, padding = 30, 40, torch.ones(2, 40, dtype=torch.bool)
        padding[0, :15], padding[1, 5:9], padding[1, 33:35] = False, False, False
    mask = AttentionMask(q_len, kv_len, padding)
    dense = mask.dense("cpu")
    for start, end in [(0, 7), (7, 20), (20, 30), (0, 30)]:
        scores = torch.zeros(2, 3, end - start, mask.past + end)
        hidden = mask.hide_(scores.clone(), start, end) == torch.finfo(scores.dtype).min
        assert torch.equal(hidden, ~dense[:, :, start:end, : mask.past + end].expand_as(hidden)), (start, end)
    if padding is not None:
        blind = ~(padding.cumsum(-1) > 0)[:, mask.past:]  # queries with no real key at or before them
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(mask.past)
        assert blind.any()
        assert torch.equal(dense[:, 0][blind], causal.expand(2, -1, -1)[blind])

"""ReRoPE / Leaky ReRoPE on fused kernels (issue 17 item 1; `longctx.rerope_fused`, methods.md §8).

Each kernel path against `formulas.dense_attention` (every score from its own rotation matrix, float64) and against
the block-wise paths (`fused_rerope=False`): flex attention's two passes merged by their LSEs and its one pass
over the keys laid out twice (eagerly; one test compiles it), and torch's CPU flash kernel; window 12, L_train 64,
grouped-query heads (4 over 2), left padding, explicit positions with gaps and restarts, and decoding step by step
from keys kept before RoPE; flex's block masks pair by pair; and the whole model on the path `choose_attention` picks
for it in inference. flash-attn's path needs CUDA and is skipped here."""

import functools
import shutil
import sys
import types

import pytest
import torch
from conftest import left_padded, tiny_config_kwargs, tiny_model
from formulas import dense_attention, frequency_table
from torch.nn.attention.flex_attention import create_mask

import longctx.rerope_fused as fused
from longctx import LongCtxConfig
from longctx.attention import AttentionMask, LongCtxAttention, attention_settings
from longctx.modeling_longctx import output_cache

RE_ROPE = {"rope_type": "rerope", "rerope_window": 12}
LEAKY = {"rope_type": "leaky-rerope", "rerope_window": 12, "factor": 8.0}
ROPES = [pytest.param(RE_ROPE, id="rerope"), pytest.param(LEAKY, id="leaky")]
# (lengths of the batch rows' real runs, width): below the window, above it, beyond 3 × L_train (64)
LENGTHS = {"below-window": ([9, 5], 9), "above-window": ([40, 29], 40), "3x-train-length": ([210, 150], 210)}
EAGER_PATHS = ["flex-two-pass", "flex-one-pass", "cpu-flash"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny shapes, many small ops


def sharp_layer(rope, seed=0):
    """An attention layer (hidden 64, 4 heads of 16 over 2 kv heads) with weights drawn so that scores are O(1–5):
    under a default init every score is ≈ 0 and no position scheme would show. And its config."""
    config = LongCtxConfig(**tiny_config_kwargs(rope_parameters=dict(rope), num_hidden_layers=1))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layer = LongCtxAttention(config, 0).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, std in (("q_proj", 0.2), ("k_proj", 0.2), ("v_proj", 0.1), ("o_proj", 0.1)):
            weight = getattr(layer, name).weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    return layer, config


def projections(layer, hidden):
    """q (batch, 4, seq, 16), k and v (batch, 2, seq, 16), un-rotated: what the fused paths receive."""
    batch, length, _ = hidden.shape
    return [getattr(layer, name)(hidden).view(batch, length, -1, 16).transpose(1, 2)
            for name in ("q_proj", "k_proj", "v_proj")]


def fused_attention(layer, config, hidden, positions, real, path, past=0):
    """The layer's output (batch, seq − past, hidden) through one fused path, for the queries after `past`."""
    rope = config.rope_parameters
    window, leaky = rope["rerope_window"], rope["factor"] if rope["rope_type"] == "leaky-rerope" else None
    inv_freq = frequency_table(rope, 16, config.max_position_embeddings)[0].float()  # independent of longctx.rope
    inv_freq = inv_freq.to(hidden.device)
    q, k, v = projections(layer, hidden)
    q, q_pos = q[:, :, past:], positions[:, past:]
    if path in ("flex-two-pass", "flex-one-pass"):
        operands = fused.rerope_operands(q, k, q_pos, positions, inv_freq, window, leaky)
        masks = fused.FlexMasks(q_pos, positions, real, window, block=16)  # small blocks: full, partial, empty ones
        step = fused.two_pass if path == "flex-two-pass" else fused.one_pass
        out = step(*operands, v, masks, 16**-0.5, compiled=False).transpose(1, 2)
    else:
        out = fused.rerope_fused_attention(q, k, v, q_pos, positions, inv_freq=inv_freq, window=window,
                                           leaky_factor=leaky, key_padding=real, scaling=16**-0.5, backend=path)
    return layer.o_proj(out.reshape(*out.shape[:2], -1))


def padded_inputs(lengths, width, seed):
    """(real (batch, width) bool, positions counting each row's real tokens from 0, hidden (batch, width, 64))."""
    _, mask = left_padded(lengths, width)
    hidden = torch.randn(len(lengths), width, 64, generator=torch.Generator().manual_seed(seed))
    return mask.bool(), (mask.cumsum(-1) - 1).clamp(min=0), hidden


def eager_flex(monkeypatch):
    """Where `backend="auto"` falls back to flex attention it compiles it on CPU; these tests keep it eager (as after
    a failed compile) — one test compiles."""
    monkeypatch.setitem(fused._COMPILE, "failed", "tests: eager")


def formula(layer, config, hidden, positions, real):
    return dense_attention(layer, config, hidden, positions, real)  # float64; padding queries 0


def assert_real_rows_equal(got, expected, real):
    torch.testing.assert_close(got[real].double(), expected[real].double(), atol=1e-5, rtol=0)


@functools.cache
def prefill_case(rope_id, lengths):
    """(layer, config, hidden, positions, real, the formula's output) of a left-padded batch, built once per case."""
    layer, config = sharp_layer({"rerope": RE_ROPE, "leaky": LEAKY}[rope_id])
    _, mask = left_padded(*LENGTHS[lengths])
    real = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = torch.randn(*real.shape, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return layer, config, hidden, positions, real, formula(layer, config, hidden, positions, real)


@pytest.mark.parametrize("rope_id", ["rerope", "leaky"])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("path", EAGER_PATHS)
def test_prefill_equals_the_formula(rope_id, lengths, path):
    """Left-padded batch, grouped-query heads; padding queries get 0."""
    layer, config, hidden, positions, real, expected = prefill_case(rope_id, lengths)
    with torch.no_grad():
        got = fused_attention(layer, config, hidden, positions, real, path)
    assert_real_rows_equal(got, expected, real)
    assert not got[~real].any()  # padding queries: 0, not NaN (both parts of their softmax are empty)


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("positions_kind", ["gaps", "restarts"])
def test_explicit_positions_equal_the_formula(rope, positions_kind, monkeypatch):
    """Positions that do not follow the indices — a jump of 30 (edited or packed text), or restarting at 0 (packed
    documents, so later keys can sit at smaller positions than the query) — need flex attention, whose masks read
    them: "auto" falls back to it, the CPU flash kernel refuses."""
    layer, config = sharp_layer(rope)
    real, positions, hidden = padded_inputs([70, 52], 70, seed=3)
    if positions_kind == "gaps":
        positions = positions + (torch.arange(70) >= 45) * 30
    else:
        positions = torch.where(torch.arange(70) >= 50, torch.arange(70) - 50, positions)
    with torch.no_grad():
        expected = formula(layer, config, hidden, positions, real)
        for path in ("flex-two-pass", "flex-one-pass"):
            assert_real_rows_equal(fused_attention(layer, config, hidden, positions, real, path), expected, real)
        with pytest.raises(ValueError, match="positions that follow the indices"):
            fused_attention(layer, config, hidden, positions, real, "cpu-flash")
        eager_flex(monkeypatch)
        assert_real_rows_equal(fused_attention(layer, config, hidden, positions, real, "auto"), expected, real)


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("path", ["flex-one-pass", "cpu-flash"])
def test_cached_decoding_step_by_step_equals_the_prefill(rope, path):
    """A 12-token prompt (past the window), a 5-token chunk, then one token per step, each against every key so far
    kept before RoPE (the pre-RoPE cache: `cache.PreRopeLayer`), equals the prefill of the whole sequence and the
    formula."""
    layer, config = sharp_layer(rope)
    _, mask = left_padded([30, 19], 30)
    real = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        prefill = fused_attention(layer, config, hidden, positions, real, path)
        steps = [fused_attention(layer, config, hidden[:, :end], positions[:, :end], real[:, :end], path, past=start)
                 for start, end in [(0, 12), (12, 17)] + [(t, t + 1) for t in range(17, 30)]]
        decoded = torch.cat(steps, 1)
    assert_real_rows_equal(decoded, prefill, real)
    assert_real_rows_equal(decoded, formula(layer, config, hidden, positions, real), real)


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("positions_kind", ["from-mask", "with-gaps"])
def test_equals_the_block_wise_path_of_the_attention_layer(rope, positions_kind, monkeypatch):
    """The layer on its block-wise paths (`fused_rerope=False`: the band path when positions follow the indices, the
    general one when they jump) against `rerope_fused_attention` on the same projections, "auto": the CPU flash
    kernel, and flex attention for the gaps."""
    layer, config = sharp_layer(rope)
    real, positions, hidden = padded_inputs([120, 61], 120, seed=5)
    if positions_kind == "with-gaps":
        positions = positions + (torch.arange(120) >= 90) * 7
    eager_flex(monkeypatch)
    with torch.no_grad(), attention_settings(fused_rerope=False):
        expected, _ = layer(hidden, None, AttentionMask(120, 120, real), position_ids=positions)
        got = fused_attention(layer, config, hidden, positions, real, "auto")
    assert_real_rows_equal(got, expected, real)


@pytest.mark.parametrize("rope", ROPES)
def test_the_model_on_the_fused_path_equals_the_block_wise_model(rope, monkeypatch, use_attention_settings):
    """The whole model (two layers, the pre-RoPE KV cache) on `choose_attention`'s fused path (the default): a
    left-padded prefill, then a cached chunk and single steps, give the logits of the block-wise paths
    (`fused_rerope=False`); training calls keep those paths."""
    model = tiny_model(attn="sdpa", rope_parameters=dict(rope))
    ids, mask = left_padded([40, 27], 40)
    with torch.no_grad(), attention_settings(fused_rerope=False):
        expected = model(ids, attention_mask=mask).logits
    use_attention_settings(fused_rerope_from=(1, 1))  # (by default from 384 queries or 4096 keys)
    taken = []
    monkeypatch.setattr(fused, "rerope_fused_attention",
                        lambda *a, _f=fused.rerope_fused_attention, **k: taken.append(a[0].shape[2]) or _f(*a, **k))
    with torch.no_grad():
        prefill = model(ids, attention_mask=mask).logits
        out = model(ids[:, :20], attention_mask=mask[:, :20], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        out = model(ids[:, 20:25], attention_mask=mask[:, :25], cache=cache, use_cache=True)
        steps.append(out.logits)
        for t in range(25, 40):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True).logits)
    real = mask.bool()
    assert_real_rows_equal(prefill, expected, real)
    assert_real_rows_equal(torch.cat(steps, 1), expected, real)
    assert taken == [40] * 2 + [20] * 2 + [5] * 2 + [1] * 30  # every layer, every call
    model.train()
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    assert len(taken) == 36  # with gradients: the block-wise paths


@pytest.mark.parametrize("case", ["prefill", "gaps-and-restarts", "chunk-after-cache", "decoding-step"])
@pytest.mark.parametrize("far", [False, True], ids=["band", "beyond"])
def test_block_states_never_skip_or_wrongly_drop_a_pair(case, far):
    """The BlockMask's FULL blocks (the kernels skip the mask there) hold only visible pairs, its EMPTY blocks (never
    computed) none — checked pair by pair against the mask written from the rule (key index ≤ query index, both real,
    p_i − p_j < w or ≥ w); flex's own `create_mask` of the mask_mod gives that rule too. Where positions follow the
    indices the states are exact: a PARTIAL block really is mixed."""
    block, window = 4, 12  # blocks < w/2: the band has FULL blocks too
    _, padding = left_padded([70, 41], 70)
    real = padding.bool()
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    # a chunk after 50 cached keys: the queries' blocks do not start at a key block's start
    q_len = {"prefill": 70, "gaps-and-restarts": 70, "chunk-after-cache": 20, "decoding-step": 1}[case]
    if case == "gaps-and-restarts":
        positions = positions + (torch.arange(70) >= 30) * 9
        positions = torch.where(torch.arange(70) >= 55, torch.arange(70) - 55, positions)
    past = 70 - q_len
    masks = fused.FlexMasks(positions[:, past:], positions, real, window, block=block)
    rule = ((torch.arange(70)[None, None, :] <= torch.arange(past, 70)[None, :, None])
            & real[:, None, :] & real[:, past:, None])
    beyond = (positions[:, past:, None] - positions[:, None, :]) >= window
    rule = rule & (beyond if far else ~beyond)  # (batch, q_len, kv_len)
    block_mask = masks.part(far)
    assert torch.equal(create_mask(block_mask.mask_mod, 2, 1, q_len, 70, device="cpu")[:, 0], rule)
    padded = torch.zeros(2, masks.q_padded, masks.k_padded, dtype=torch.bool)
    padded[:, :q_len, :70] = rule
    pairs = padded.unflatten(1, (-1, block)).unflatten(3, (-1, block)).sum((2, 4))  # visible pairs per block
    states = masks.states(far)
    assert (pairs[states == fused.FULL] == block * block).all()
    assert (pairs[states == fused.EMPTY] == 0).all()
    if case != "gaps-and-restarts":
        partial = pairs[states == fused.PARTIAL]
        assert ((partial > 0) & (partial < block * block)).all()
    assert (states == fused.FULL).any() and (states == fused.EMPTY).any() or q_len < block


def test_compiled_flex_on_cpu_equals_the_formula(monkeypatch):
    """torch.compile(flex_attention) on CPU: its kernel returns no LSE, so it runs the one pass over the keys laid out
    twice — and uses the block states (eager flex ignores them): blocks of 16 and a window of 40, so the band has
    FULL, PARTIAL and EMPTY blocks. Left padding, grouped-query heads, Leaky ReRoPE."""
    from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported

    if not check_cpu_supported() or not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile(flex_attention) on CPU needs an AVX2 x86 CPU and a C++ compiler")
    monkeypatch.setattr(fused, "BLOCK_SIZE", 16)
    monkeypatch.setattr(fused, "_COMPILE", {"fn": None, "failed": None})
    layer, config = sharp_layer(dict(LEAKY, rerope_window=40))
    _, mask = left_padded([150, 83], 150)
    real = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = torch.randn(2, 150, 64, generator=torch.Generator().manual_seed(6))
    calls = []
    monkeypatch.setattr(fused, "one_pass", lambda *a, _f=fused.one_pass, **k: calls.append(k) or _f(*a, **k))
    with torch.no_grad():
        got = fused_attention(layer, config, hidden, positions, real, "flex")
        assert fused._COMPILE["failed"] is None and calls == [{"compiled": True}]
        expected = formula(layer, config, hidden, positions, real)
        assert_real_rows_equal(got, expected, real)


def test_a_failed_compile_falls_back_to_eager_flex_and_says_so(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no working C++ compiler\n(details)")

    monkeypatch.setattr(fused, "_COMPILE", {"fn": broken_compile, "failed": None})
    layer, config, hidden, positions, real, expected = prefill_case("rerope", "above-window")
    said = r"failed \(RuntimeError: no working C\+\+ compiler\); .* eagerly"
    with torch.no_grad(), pytest.warns(UserWarning, match=said):
        got = fused_attention(layer, config, hidden, positions, real, "flex")
    assert_real_rows_equal(got, expected, real)
    assert fused._COMPILE["failed"] == "RuntimeError: no working C++ compiler"


def test_the_fused_path_is_offered_for_inference_where_its_kernel_is_faster():
    """On CPU: inference, and positions that follow the indices (torch's flash kernel); a chunk against a compiled
    static cache (`query_start`), gradients, dropout, or positions with gaps keep the block-wise paths."""
    query, key = torch.randn(2, 4, 8, 16, requires_grad=True), torch.randn(2, 2, 8, 16)
    _, padding = left_padded([8, 5], 8)
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    pre_rope = types.SimpleNamespace(q_pos=positions, k_pos=positions)  # as attention.PreRope
    mask = AttentionMask(8, 8, padding.bool())
    assert not fused.fused_rerope_supported(query, key, mask, pre_rope)  # gradients: the CPU kernels have none
    with torch.no_grad():
        assert fused.fused_rerope_supported(query, key, mask, pre_rope)
        assert not fused.fused_rerope_supported(query, key, mask, pre_rope, dropout=0.1)
        assert not fused.fused_rerope_supported(query, key, AttentionMask(8, 8, padding.bool(), query_start=0),
                                                pre_rope)
        gaps = types.SimpleNamespace(q_pos=positions + (torch.arange(8) >= 6), k_pos=positions + (torch.arange(8) >= 6))
        assert not fused.fused_rerope_supported(query, key, mask, gaps)
    with pytest.raises(ValueError, match="backend='sdpa'; choose one of 'auto'"):
        fused.rerope_fused_attention(query, key, key, None, None, inv_freq=None, window=4, backend="sdpa")


def test_the_module_travels_in_a_checkpoint(tmp_path):
    """attention.py imports it, so `save_pretrained` copies this module into checkpoints (`trust_remote_code`), and
    transformers' import check must ask for nothing but torch (flash-attn is imported inside a try)."""
    from transformers.dynamic_module_utils import get_imports

    assert set(get_imports(fused.__file__)) - set(sys.stdlib_module_names) == {"torch"}
    tiny_model(rope_parameters=dict(RE_ROPE)).save_pretrained(tmp_path)
    assert (tmp_path / "rerope_fused.py").read_text() == open(fused.__file__).read()


def flash_attn_usable():
    return torch.cuda.is_available() and fused.flash_attn_available(torch.empty(0, device="cuda", dtype=torch.bfloat16))


@pytest.mark.skipif(not flash_attn_usable(), reason="flash-attn's path needs CUDA and the flash-attn package")
@pytest.mark.parametrize("rope", ROPES)
def test_flash_attn_equals_flex(rope):
    """flash-attn's two passes (CUDA, bf16) against flex attention's on the same inputs; prefill and a step."""
    layer, config = sharp_layer(rope)
    layer = layer.cuda().to(torch.bfloat16)
    _, mask = left_padded([150, 97], 150)
    real = mask.bool().cuda()
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    hidden = torch.randn(2, 150, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for past in (0, 149):
            flash = fused_attention(layer, config, hidden, positions, real, "flash-attn", past=past)
            flex = fused_attention(layer, config, hidden, positions, real, "flex-two-pass", past=past)
            torch.testing.assert_close(flash[real[:, past:]], flex[real[:, past:]], atol=2e-2, rtol=0)

"""Core package (issue 2): Llama parity, cache, padding, save/load without longctx, clear errors."""

import json

import pytest
import torch
from conftest import assert_same_in_fresh_process, left_padded, tiny_config_kwargs, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.attention import AttentionMask
from longctx.convert import from_llama
from longctx.modeling_longctx import output_cache


def random_llama(tie=False, attn="eager", seed=0, **overrides):
    torch.manual_seed(seed)
    config = LlamaConfig(**tiny_config_kwargs(tie_word_embeddings=tie, **overrides))
    config._attn_implementation = attn
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms so a mix-up of norm weights would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_from_llama_matches_llama_logits_and_generation(tie, attn):
    llama = random_llama(tie=tie, attn=attn)
    model = from_llama(llama)
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        expected, got = llama(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    gen_kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:, :8], **gen_kwargs), llama.generate(ids[:, :8], **gen_kwargs))


def test_hidden_states_attentions_and_tuples_as_transformers_returns_them():
    """output_hidden_states / output_attentions (eager) / return_dict=False against LlamaForCausalLM's own."""
    llama = random_llama(attn="eager")
    model = from_llama(llama)
    model.set_attn_implementation("eager")
    ids, mask = left_padded([40, 29], 40)
    with torch.no_grad():
        expected = llama(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        got = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        assert len(got.hidden_states) == 3 and len(got.attentions) == 2
        real = mask.bool()[:, :, None]
        for ours, theirs in zip(got.hidden_states, expected.hidden_states):
            torch.testing.assert_close(ours * real, theirs * real, atol=1e-5, rtol=0)  # padded rows: unused
        for ours, theirs in zip(got.attentions, expected.attentions):
            torch.testing.assert_close(ours * real[:, None], theirs * real[:, None], atol=1e-6, rtol=0)
        loss, logits = model(ids, labels=ids, return_dict=False)[:2]
        torch.testing.assert_close(loss, model(ids, labels=ids).loss)
        assert logits.shape == (2, 40, 128)
        hybrid = tiny_model(attn="eager", block_types=["lru", "attention"], lru_state_size=16)
        assert hybrid(ids, output_attentions=True).attentions[0] is None  # an LRU block has no weights
        assert tiny_model(attn="sdpa")(ids, output_attentions=True).attentions is None  # a warning, as transformers


def test_output_attentions_in_the_config_never_breaks_a_forward(monkeypatch):
    """config.output_attentions=True: weights where they exist, None (a warning) elsewhere; scoring forms none."""
    from longctx.attention import LongCtxAttention

    ids = torch.randint(0, 128, (1, 20))
    rerope = {"rope_type": "rerope", "rerope_window": 8, "rope_theta": 10000.0}
    for model in (tiny_model(attn="sdpa", output_attentions=True),
                  tiny_model(attn="eager", output_attentions=True, rope_parameters=rerope)):
        assert model(ids).attentions is None
        out = model.generate(ids, max_new_tokens=3, do_sample=False)  # (a GenerateDecoderOnlyOutput here)
        assert out.sequences.shape == (1, 23)
    eager = tiny_model(attn="eager", output_attentions=True)
    assert len(eager(ids).attentions) == 2
    requested, forward = [], LongCtxAttention.forward
    monkeypatch.setattr(LongCtxAttention, "forward", lambda self, *a, output_attentions=False, **k: (
        requested.append(output_attentions), forward(self, *a, output_attentions=output_attentions, **k))[1])
    nll, correct = eager.score_tokens(ids)
    assert nll.shape == correct.shape == (1, 19) and requested == [False, False]


def test_loss_is_next_token_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 128)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    manual = -torch.log_softmax(logits[keep], -1).gather(1, target[keep, None]).mean()
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("overrides", [{}, {"block_types": ["lru", "attention"], "lru_state_size": 16}])
def test_generate_with_a_static_cache_equals_the_dynamic_cache(overrides):
    """generate(cache_implementation="static") pre-allocates keys: only the filled slots may be attended to."""
    model = tiny_model(**overrides)
    ids, mask = left_padded([12, 9], 12)
    kwargs = dict(attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decoding_equals_full_forward(attn):
    model = tiny_model(attn=attn)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :10], use_cache=True)  # prefill, then one token at a time
        steps = [out.logits]
        cache = output_cache(out)
        for t in range(10, 24):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_argument_takes_both_transformers_names():
    """transformers >= 5.24 passes `cache`, 5.23 `past_key_values`: both continue the same cache; both at once is
    refused."""
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = output_cache(model(ids[:, :-1], use_cache=True))
            step = model(ids[:, -1:], use_cache=True, **{name: cache})
            torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=1e-5)
            assert output_cache(step) is cache and cache.get_seq_length() == 12
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, -1:], cache=cache, past_key_values=cache)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_equals_each_sequence_alone(attn):
    model = tiny_model(attn=attn)
    lengths = [12, 7, 3]
    seqs = [torch.randint(1, 128, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits
            torch.testing.assert_close(batched[i, width - len(s):], alone[0], atol=1e-5, rtol=1e-5)
        # generation from the padded batch continues each sequence as if alone
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for i, s in enumerate(seqs):
            alone = model.generate(s[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(gen[i, width:], alone[0, len(s):])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_right_padding_is_hidden_from_the_tokens_after_it(attn):
    """A right-padded prompt continued through the cache (a chunk of 3 tokens, then one more): the padding keys now
    lie before real queries, and only the mask keeps them out. Each row equals its real tokens alone (positions
    count real tokens). The padding holds ordinary ids, so the test can fail: at the same positions but visible,
    they change the logits."""
    model = tiny_model(attn=attn)
    ids = torch.randint(1, 128, (2, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:10] = 0  # row 1: 6 real tokens, 4 of padding, then 4 real tokens more
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def continued(mask, position_ids=None):
        def part(start, end, cache):
            return model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True,
                         position_ids=None if position_ids is None else position_ids[:, start:end])
        with torch.no_grad():
            out = part(0, 10, None)
            cache = output_cache(out)
            return torch.cat([out.logits, part(10, 13, cache).logits, part(13, 14, cache).logits], 1)

    logits = continued(mask)
    with torch.no_grad():
        alone = model(ids[1:, mask[1].bool()]).logits[0]
        full = model(ids[:1]).logits[0]
    torch.testing.assert_close(logits[1, mask[1].bool()], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0], full, atol=1e-5, rtol=1e-5)
    shown = continued(torch.ones_like(mask), positions)  # the padding visible, every position as before
    torch.testing.assert_close(shown[:, :6], logits[:, :6], atol=1e-5, rtol=1e-5)  # before the padding: the same
    assert (shown[1, 10:] - logits[1, 10:]).abs().max() > 1e-3


def test_sdpa_causal_path_builds_no_dense_mask(monkeypatch):
    built = []
    original = AttentionMask.dense
    monkeypatch.setattr(AttentionMask, "dense", lambda self, device: built.append(1) or original(self, device))
    model = tiny_model(attn="sdpa")
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 200)), attention_mask=torch.ones(1, 200, dtype=torch.long))  # > max positions
    assert built == []


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prefill_runs_row_by_row_without_a_dense_mask(monkeypatch, side):
    """A padded batch of >= `AttentionSettings.per_row_queries` tokens: each row causal over its real run (no L × L
    mask), the real positions' logits and every gradient as with the dense mask."""
    import longctx.attention as attention

    model = tiny_model().train()
    width, lengths = 300, [300, 260, 181]
    ids, mask = left_padded(lengths, width)
    if side == "right":
        ids, mask = ids.flip(1), mask.flip(1)
    real = mask.bool()[..., None]

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        (logits * real).square().mean().backward()  # a loss over the real positions only
        return logits * real, {name: p.grad.clone() for name, p in model.named_parameters()}

    with attention.attention_settings(per_row_queries=10**9):  # no row-by-row split: one masked call
        dense_logits, dense_grads = logits_and_grads()
    assert attention.DEFAULT_ATTENTION_SETTINGS.per_row_queries <= width
    monkeypatch.setattr(AttentionMask, "dense", lambda self, device: pytest.fail("dense mask built"))
    logits, grads = logits_and_grads()
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_masked_prefills_run_in_row_blocks_without_the_whole_mask(monkeypatch):
    """A chunked prefill against a cache (left-padded batch) and a padded batch with holes: SDPA a block of rows at
    a time, no mask larger than the block budget, the same logits (and gradients) as one call with the whole mask."""
    import longctx.attention as attention

    model = tiny_model().train()
    ids, mask = left_padded([300, 240], 300)
    holes = mask.clone()
    holes[0, 120:140] = 0  # not one run: no per-row split either

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=holes, use_cache=False).logits
        (logits * holes[..., None]).square().mean().backward()
        with torch.no_grad():
            cache = output_cache(model(ids[:, :100], attention_mask=mask[:, :100], use_cache=True))
            chunked = model(ids[:, 100:], attention_mask=mask, cache=cache, use_cache=True).logits
        return logits, chunked, {name: p.grad.clone() for name, p in model.named_parameters()}

    with attention.attention_settings(mask_block_elements=10**12):  # one call, the whole mask
        whole = run()
    built, budget = [], 64 * 300
    build = AttentionMask._build
    monkeypatch.setattr(AttentionMask, "_build", lambda self, start, end, device: built.append(
        (end - start) * (self.kv_len - self.q_len + end)) or build(self, start, end, device))
    with attention.attention_settings(mask_block_elements=budget):  # blocks of 64 rows
        blocked = run()
    assert built and max(built) <= budget
    torch.testing.assert_close(blocked[0] * holes[..., None], whole[0] * holes[..., None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocked[1], whole[1], atol=1e-5, rtol=1e-5)  # the chunk: real tokens only
    for name, grad in blocked[2].items():
        torch.testing.assert_close(grad, whole[2][name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():  # and the chunked prefill is the full forward's
        full = model.eval()(ids, attention_mask=mask, use_cache=False).logits[:, 100:]
    torch.testing.assert_close(blocked[1] * mask[:, 100:, None], full * mask[:, 100:, None], atol=1e-5, rtol=1e-5)


def test_padding_runs_are_found_and_holes_keep_the_dense_mask():
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 100:110] = False  # not one run: no per-row split
    assert AttentionMask(300, 300, mask).real_spans() is None
    index = torch.arange(300)[None]
    left, right = index >= torch.tensor([[0], [20]]), index < torch.tensor([[300], [7]])
    assert AttentionMask(300, 300, left).real_spans() == [(0, 300), (20, 300)]
    assert AttentionMask(300, 300, right).real_spans() == [(0, 300), (0, 7)]
    assert AttentionMask(1, 300, mask[:1]).real_spans() is None  # a cached step: keys outnumber queries


def test_inputs_longer_than_max_position_embeddings_are_allowed():
    model = tiny_model()
    with torch.no_grad():
        logits = model(torch.randint(0, 128, (1, 3 * model.config.max_position_embeddings))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
])
def test_save_load_in_fresh_process_without_longctx(tmp_path, overrides):
    model = tiny_model(**overrides)
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_longctx.py", "configuration_longctx.py", "rope.py",
            "attention.py"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_longctx.LongCtxForCausalLM"
    ids = torch.randint(0, 128, (2, 30))
    assert_same_in_fresh_process(model, tmp_path / "ckpt", ids, tmp_path)


def test_auto_classes_load_in_process(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # registered by `import longctx`
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_unknown_attn_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match='attn_implementation="flash"` is not supported.*eager, sdpa, flash_attention'):
        LongCtxForCausalLM(LongCtxConfig(**tiny_config_kwargs(), attn_implementation="flash"))
    model = tiny_model()
    with pytest.raises(ValueError, match="attn_implementation"):
        model.set_attn_implementation("paged_magic")


def test_flash_attention_2_without_package_or_cuda_is_a_clear_error():
    try:
        import flash_attn  # noqa: F401
        expected, match = ValueError, "only on CUDA"
    except ImportError:
        expected, match = ImportError, "needs the flash-attn package.*pip install longctx\\[flash\\]"
    if torch.cuda.is_available() and expected is ValueError:
        pytest.skip("flash-attn and CUDA are both present")
    with pytest.raises(expected, match=match):
        LongCtxForCausalLM(LongCtxConfig(**tiny_config_kwargs(), attn_implementation="flash_attention_2"))


@pytest.mark.parametrize("blocks", [["attention", "attention"], ["lru", "attention"]])
def test_gradient_checkpointing_trains_without_a_cache_and_changes_no_gradient(blocks):
    """The backward replays each layer: with the default use_cache the model must not fill a cache twice."""
    model = tiny_model(block_types=blocks, lru_state_size=32).train()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    output = model(ids, labels=ids)  # use_cache defaults to True: ignored here
    output.loss.backward()
    assert output_cache(output) is None
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="cannot be used with gradient checkpointing while training"):
        model(ids, cache=DynamicCache(config=model.config))


def test_token_ids_outside_vocab_are_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="token id 128, outside the vocabulary \\[0, 127\\]"):
        model(torch.tensor([[1, 2, 128]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1]]))


def test_mismatched_attention_mask_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="attention_mask has shape \\(2, 5\\); expected .* \\(2, 6\\)"):
        model(torch.ones(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize("field,value,match", [
    ("num_key_value_heads", 3, "num_key_value_heads.*must divide"),
    ("head_dim", 15, "head_dim.*even"),
    ("hidden_size", 0, "hidden_size"),
    ("rope_parameters", {"rope_type": "nope"}, "rope_type.*'nope'.*allowed"),
])
def test_invalid_core_config_values_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        LongCtxConfig(**tiny_config_kwargs(**{field: value}))


def test_legacy_rope_scaling_and_rope_theta_are_folded_in():
    config = LongCtxConfig(**tiny_config_kwargs(), rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}

"""torch.compile: the compiled model computes what the eager one does — forward, loss, gradients — in one graph.

`aot_eager` traces exactly what inductor would (dynamo, functionalization, AOT autograd) without a C++ compiler;
one test runs inductor itself where a compiler is installed.
"""

import shutil

import pytest
import torch
from transformers import StaticCache

from conftest import left_padded, tiny_model

import longctx  # noqa: F401 - registers the custom operators torch.ops.longctx.*
from longctx.modeling_longctx import output_cache
from longctx.rope import set_rope

VARIANTS = {
    "default": {},
    "yarn+logn+qk_bias": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                               "original_max_position_embeddings": 32},
                              logn_scaling="trained", qk_bias=True),
    "rerope": dict(rope_parameters={"rope_type": "rerope", "rerope_window": 8, "rope_theta": 10000.0}),
    "hybrid lru": dict(block_types=["lru", "attention"], lru_state_size=32),
}


def fresh_compile(model, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True)


def loss_and_grads(model, ids, compiled=None):
    """The loss of `compiled` (or `model`) and the gradients it leaves on `model`'s parameters."""
    model.zero_grad(set_to_none=True)
    loss = (model if compiled is None else compiled)(ids, labels=ids, skip_logits=True).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_forward_and_gradients_equal_eager(variant):
    model = tiny_model(**VARIANTS[variant]).train()
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager_logits = model(ids).logits
        compiled_logits = fresh_compile(model)(ids).logits
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)
    eager_loss, eager_grads = loss_and_grads(model, ids)
    compiled_loss, compiled_grads = loss_and_grads(model, ids, fresh_compile(model))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("reverse", [False, True])
def test_lru_scan_operator_passes_opcheck(reverse):
    """Schema, fake (meta) shapes and strides, autograd registration: torch.library's own checks, on a strided
    input with document resets and an incoming state."""
    g = torch.Generator().manual_seed(7)
    lam = torch.polar(0.5 + 0.5 * torch.rand(6, generator=g), torch.rand(6, generator=g)).requires_grad_()
    b = torch.randn(6, 40, 3, dtype=torch.complex64, generator=g).transpose(0, 2).requires_grad_()  # (3, 40, 6)
    keep = torch.rand(3, 40, generator=g) > 0.1
    x0 = torch.randn(3, 6, dtype=torch.complex64, generator=g).requires_grad_()
    for backend in ("native", "chunked"):
        torch.library.opcheck(torch.ops.longctx.lru_scan.default, (lam, b, keep, x0, 16, reverse, backend))


@pytest.mark.parametrize("padded", [False, True])
def test_blocked_attention_operator_passes_opcheck(padded):
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 40, 4, 16, generator=g).transpose(1, 2).to(torch.bfloat16)  # (batch, heads, q_len, d), strided
    k, v = (torch.randn(2, 2, 40, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    padding = torch.arange(40)[None].expand(2, -1) >= torch.tensor([[0], [7]]) if padded else None
    torch.library.opcheck(torch.ops.longctx.blocked_attention.default, (q, k, v, padding, 40, 0.25, 0.0, 16))


def test_compiled_training_with_gradient_checkpointing_equals_eager():
    model = tiny_model(block_types=["lru", "attention"], lru_state_size=32).train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    eager_loss, eager_grads = loss_and_grads(model, ids)
    compiled_loss, compiled_grads = loss_and_grads(model, ids, fresh_compile(model))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_packed_documents_and_padding_mask_equal_eager():
    """Packed windows (position_ids restarting at 0) and a left-padding mask take the same paths compiled."""
    model = tiny_model()
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(25), torch.arange(15)]).expand(2, -1)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        padded = model(ids, attention_mask=mask).logits
        compiled = fresh_compile(model)
        torch.testing.assert_close(compiled(ids, position_ids=positions).logits, packed, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, padded, rtol=1e-5, atol=1e-5)


def test_compiled_bf16_prefill_keeps_the_blocked_attention_op():
    """On CPU in bf16 without gradients `sdpa` runs `blocked_attention`, a custom op the graph keeps whole."""
    model = tiny_model(max_position_embeddings=512).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend=record, fullgraph=True)(ids).logits
    assert "longctx.blocked_attention" in graphs[0].code
    torch.testing.assert_close(compiled, eager, rtol=1.6e-2, atol=1e-2)  # bf16: the rotation rounds differently


def inductor_works():
    """Whether this machine can run inductor's CPU code at all (it needs a C++ compiler)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return False
    try:
        torch._dynamo.reset()
        return bool(torch.compile(lambda x: x * 2 + 1, backend="inductor")(torch.ones(3)).eq(3).all())
    except Exception:  # noqa: BLE001 - any failure of the toolchain means: no inductor here
        return False


def test_inductor_compiled_training_step_equals_eager():
    if not inductor_works():
        pytest.skip("inductor's CPU backend cannot compile here (no working C++ compiler)")
    model = tiny_model(block_types=["lru", "attention"], lru_state_size=32).train()
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(2))
    eager_loss, eager_grads = loss_and_grads(model, ids)
    compiled_loss, compiled_grads = loss_and_grads(model, ids, fresh_compile(model, backend="inductor"))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_dynamic_ntk_compiles_with_graph_breaks_and_equals_eager():
    """Dynamic NTK picks its tables from the positions' values (within L_train or beyond): dynamo breaks the graph
    there, at any length."""
    model = tiny_model(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))  # beyond 64 positions
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(ids).logits, eager, rtol=1e-5, atol=1e-5)


def test_generate_with_compiled_forward_equals_eager():
    """Compiled from the first call (nothing eager before it fills a lazily built value), and again after
    `set_rope`: fullgraph holds."""
    model = tiny_model(block_types=["lru", "attention"], lru_state_size=32)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    reference = tiny_model(block_types=["lru", "attention"], lru_state_size=32)  # same seed, same weights
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    yarn = {"rope_type": "yarn", "factor": 2.0}
    set_rope(model, yarn)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                       set_rope(reference, yarn).generate(ids, max_new_tokens=6, do_sample=False))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the prefill and the one-token steps


STATIC_VARIANTS = {k: v for k, v in VARIANTS.items() if k != "rerope"}  # ReRoPE keeps keys before RoPE: no StaticCache
STATIC_VARIANTS["eager attention"] = {"attn": "eager"}


@pytest.mark.parametrize("variant", STATIC_VARIANTS)
def test_static_cache_generate_compiles_to_one_graph_per_shape(variant):
    """generate(cache_implementation="static") with a fullgraph-compiled forward, on a left-padded batch: the same
    tokens as eager decoding with a growing cache, from two graphs — the prefill and every decoding step (the
    filled length a tensor, the unfilled slots masked), as CUDA graphs need."""
    overrides = dict(STATIC_VARIANTS[variant])
    model = tiny_model(**overrides)
    ids, mask = left_padded([12, 9], 12)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = tiny_model(**overrides).generate(ids, **kwargs)  # same seed: same weights
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("variant", STATIC_VARIANTS)
def test_generates_own_compiled_static_cache_decoding_compiles_once_across_calls(variant):
    """transformers' own recipe — generate() compiles the decoding step itself (`compile_config`; on CUDA by default,
    here forced onto the CPU as transformers' tests do) after an eager prefill — gives eager decoding's tokens from
    one graph over three generate() calls: nothing the eager prefill leaves on the cache is guarded on."""
    from transformers import CompileConfig

    overrides = dict(STATIC_VARIANTS[variant])
    model = tiny_model(**overrides)
    assert type(model)._can_compile_fullgraph
    ids, mask = left_padded([12, 9], 12)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = tiny_model(**overrides).generate(ids, **kwargs)
    compile_config = CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        out = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
        assert torch.equal(out, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the decoding step, compiled once


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_forward_over_a_static_cache_equals_eager(padded):
    """Called directly (not through generate): chunks of several tokens, then single tokens, through an attention
    layer and then an LRU layer (which reads its queries' padding after the cache has counted them); the mask of
    every slot (zeros beyond the tokens so far) or none. Logits equal eager ones over a DynamicCache."""
    model = tiny_model(block_types=["attention", "lru"], lru_state_size=32)
    ids, mask = left_padded([14, 9] if padded else [14, 14], 14)
    compiled, slots = fresh_compile(model), 20
    static, cache = StaticCache(config=model.config, max_cache_len=slots), None
    with torch.no_grad():
        for start, end in ((0, 5), (5, 8), (8, 11), (11, 12), (12, 13), (13, 14)):
            eager = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
            cache = output_cache(eager)
            slot_mask = torch.nn.functional.pad(mask[:, :end], (0, slots - end)) if padded else None
            out = compiled(ids[:, start:end], attention_mask=slot_mask, cache=static)
            torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)


def test_compiled_forward_over_a_static_cache_refuses_a_mask_of_other_width():
    """The tokens so far are a tensor under compile: a mask narrower than the cache cannot be checked against
    them, so it is refused (eagerly, (batch, past + new tokens) is checked and accepted)."""
    model = tiny_model()
    static = StaticCache(config=model.config, max_cache_len=16)
    ids = torch.randint(1, 128, (1, 4))
    with pytest.raises(Exception, match=r"every cache slot, \(1, 16\)"):
        fresh_compile(model)(ids, attention_mask=torch.ones(1, 4, dtype=torch.long), cache=static)

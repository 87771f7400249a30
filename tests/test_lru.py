"""LRU blocks and hybrid stacks (issue 7): scans vs the float64 loop, the mixer vs its formula, ring init, cached
decoding and generate() vs the full forward, document resets, config errors, save -> load without longctx; the
scan backend chosen by `config.lru_scan_backend`, the native one's compiler driver (`longctx.lru_native`) imported
only when it may run (issue 16)."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_in_fresh_process, tiny_config_kwargs
from transformers.cache_utils import DynamicCache
from transformers.testing_utils import CaptureLogger

import longctx.lru_native
from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.lru import LongCtxLRU, lru_scan, lru_scan_sequential
from longctx.lru_native import native_scan_unavailable
from longctx.modeling_longctx import output_cache


def ring_eigenvalues(size, r_low, r_high, seed=0):
    """complex64 λ with |λ| uniform in [r_low, r_high] and random phases, as the model would hold them."""
    g = torch.Generator().manual_seed(seed)
    r = r_low + (r_high - r_low) * torch.rand(size, generator=g, dtype=torch.float64)
    theta = 2 * math.pi * torch.rand(size, generator=g, dtype=torch.float64)
    return torch.polar(r, theta).to(torch.complex64)


def random_inputs(batch, length, size, seed=0, reset_rate=0.0, with_x0=False):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(batch, length, size, 2, generator=g)
    b = torch.view_as_complex(b).to(torch.complex64)
    reset = torch.rand(batch, length, generator=g) < reset_rate if reset_rate else None
    x0 = torch.view_as_complex(torch.randn(batch, size, 2, generator=g)).to(torch.complex64) if with_x0 else None
    return b, reset, x0


def float64_reference(lam, b, reset=None, x0=None):
    """The sequential loop on the same (complex64) inputs, computed in complex128."""
    return lru_scan_sequential(lam.to(torch.complex128), b.to(torch.complex128), reset,
                               None if x0 is None else x0.to(torch.complex128))


def relative_error(got, ref):
    """Worst channel of max_t |got − ref| / max_t |ref|."""
    return ((got.to(ref.dtype) - ref).abs().amax(dim=(0, 1)) / ref.abs().amax(dim=(0, 1))).max().item()


# --- the scans -------------------------------------------------------------------------------------------------------
BACKENDS = [pytest.param("native", marks=pytest.mark.skipif(native_scan_unavailable() is not None,
                                                            reason=f"native scan: {native_scan_unavailable()}")),
            "chunked"]


def test_sequential_reference_is_the_closed_form_sum():
    lam = ring_eigenvalues(3, 0.5, 0.99).to(torch.complex128)
    b, _, _ = random_inputs(2, 9, 3)
    b = b.to(torch.complex128)
    expected = torch.stack([sum(lam ** (t - s) * b[:, s] for s in range(t + 1)) for t in range(9)], dim=1)
    torch.testing.assert_close(lru_scan_sequential(lam, b), expected)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, 4] = True  # row 0 restarts at t = 4: x_t = Σ_{s=4..t} λ^{t−s} b_s there
    got = lru_scan_sequential(lam, b, reset)
    restart = torch.stack([sum(lam ** (t - s) * b[0, s] for s in range(4, t + 1)) for t in range(4, 9)], dim=0)
    torch.testing.assert_close(got[0, 4:], restart)
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 1000, 4096 + 17])
@pytest.mark.parametrize("reset_rate,with_x0", [(0.0, False), (0.003, True)])
def test_fast_scan_equals_float64_loop(length, reset_rate, with_x0, backend):
    lam = torch.cat([ring_eigenvalues(3, 0.9999, 0.999999), ring_eigenvalues(3, 0.2, 0.9, seed=1)])
    b, reset, x0 = random_inputs(2, length, 6, reset_rate=reset_rate, with_x0=with_x0)
    got = lru_scan(lam, b, reset, x0, backend=backend)
    assert got.dtype == torch.complex64
    assert relative_error(got, float64_reference(lam, b, reset, x0)) <= 1e-4


@pytest.mark.parametrize("chunk_size", [2, 5, 16])
def test_fast_scan_is_exact_for_any_chunk_size(chunk_size):
    """Small chunks force several levels of chunk-of-chunks recursion and a ragged tail at each."""
    lam = ring_eigenvalues(4, 0.9, 0.99999)
    b, reset, x0 = random_inputs(3, 777, 4, reset_rate=0.01, with_x0=True)
    got = lru_scan(lam, b, reset, x0, chunk_size=chunk_size, backend="chunked")
    assert relative_error(got, float64_reference(lam, b, reset, x0)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_scan_at_64k_with_eigenvalues_near_one_and_far_from_it(backend):
    """64k steps: |λ| up to 1 − 1e-6 (long memory, growing state) and down to 0.3, where the cumsum of λ^{−k}·b
    would overflow (0.3^{−65536} is far beyond float64) — the scan uses positive powers only."""
    lam = torch.cat([ring_eigenvalues(3, 0.99999, 0.999999), ring_eigenvalues(1, 0.3, 0.3001, seed=2)])
    b, reset, x0 = random_inputs(1, 65536, 4, seed=3, reset_rate=1e-4, with_x0=True)
    got = lru_scan(lam, b, reset, x0, backend=backend)
    assert torch.isfinite(torch.view_as_real(got)).all()
    assert relative_error(got, float64_reference(lam, b, reset, x0)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_scan_gradients_equal_loop_autograd(backend):
    lam = ring_eigenvalues(5, 0.8, 0.9999)
    b, reset, x0 = random_inputs(2, 300, 5, reset_rate=0.02, with_x0=True)
    weight = random_inputs(2, 300, 5, seed=9)[0]
    grads = []
    for scan, dtype in ((lru_scan, torch.complex64), (lru_scan_sequential, torch.complex128)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (lam, b, x0)]
        extra = {"chunk_size": 16, "backend": backend} if scan is lru_scan else {}
        out = scan(inputs[0], inputs[1], reset, inputs[2], **extra)
        (out * weight.to(out.dtype)).real.sum().backward()
        grads.append([t.grad for t in inputs])
    for got, ref in zip(*grads):
        assert got.dtype == torch.complex64
        assert ((got.to(ref.dtype) - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.fixture
def fresh_native_scan(monkeypatch, tmp_path):
    """The native scan looked up afresh, with its kernel cache in `tmp_path`; looked up again after the test."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    longctx.lru_native._native_scan_library.cache_clear()
    yield tmp_path
    longctx.lru_native._native_scan_library.cache_clear()


NEEDS_NATIVE = pytest.mark.skipif(native_scan_unavailable() is not None,
                                  reason=f"native scan: {native_scan_unavailable()}")


@NEEDS_NATIVE
def test_native_scan_is_compiled_once_into_the_cache_directory(fresh_native_scan, monkeypatch):
    lam, (b, _, _) = ring_eigenvalues(4, 0.5, 0.99), random_inputs(1, 50, 4)
    lru_scan(lam, b, backend="native")
    [library] = (fresh_native_scan / "kernels").iterdir()  # one file, no temporaries left behind
    assert library.name.startswith("lru_scan-") and library.suffix == ".so"
    longctx.lru_native._native_scan_library.cache_clear()
    run = longctx.lru_native._run

    def no_compiling(command, **kwargs):
        assert "-shared" not in command, "compiled again although the library is in the cache"
        return run(command, **kwargs)

    monkeypatch.setattr(longctx.lru_native, "_run", no_compiling)
    assert relative_error(lru_scan(lam, b, backend="native"), float64_reference(lam, b)) <= 1e-5


@NEEDS_NATIVE
def test_a_broken_cached_library_is_rebuilt(fresh_native_scan):
    """A library in the cache that does not load (truncated, corrupted) is compiled again: in a new process, as this
    one has the good one loaded under that name."""
    lam, (b, _, _) = ring_eigenvalues(4, 0.5, 0.99), random_inputs(1, 40, 4)
    lru_scan(lam, b, backend="native")
    [library] = (fresh_native_scan / "kernels").iterdir()
    library.unlink()  # a new file: overwriting the mapped one in place would crash this process
    library.write_bytes(b"not a library")
    check = ("import torch; from longctx.lru import lru_scan, lru_scan_sequential\n"
             "from longctx.lru_native import native_scan_unavailable\n"
             "assert native_scan_unavailable() is None, native_scan_unavailable()\n"
             "lam = torch.polar(torch.full((4,), 0.9), torch.rand(4)); b = torch.randn(2, 40, 4, dtype=torch.cfloat)\n"
             "torch.testing.assert_close(lru_scan(lam, b, backend='native'), lru_scan_sequential(lam, b))")
    child = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "LONGCTX_CACHE": str(fresh_native_scan)})
    assert child.returncode == 0, child.stderr[-3000:]
    assert library.read_bytes() != b"not a library"


def fake_compiler(tmp_path, script):
    path = tmp_path / "fakecc"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")
@pytest.mark.parametrize("case", ["junk compiler", "shared cache", "no compiler", "failing compiler"])
def test_without_the_native_scan_the_chunked_one_runs(fresh_native_scan, monkeypatch, case):
    """No usable native scan — a compiler that writes junk (never loaded: it must reproduce the loop first), a cache
    directory others can write, no compiler, one that always fails: the default backend is the chunked scan, with
    the same results, and asking for the native one by name says why it cannot run."""
    junk = 'for a; do out=$a; done; [ "$1" = --version ] || echo junk > "$out"'
    env, reason = {
        "junk compiler": ({"CC": fake_compiler(fresh_native_scan, junk)}, "failed|wrong|invalid ELF|too short"),
        "shared cache": ({}, "writable by other users"),
        "no compiler": ({"CC": "/nonexistent/cc"}, "CC='/nonexistent/cc' is not an executable C compiler"),
        "failing compiler": ({"CC": "/bin/false"}, "/bin/false failed"),
    }[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if case == "shared cache":
        (fresh_native_scan / "kernels").mkdir()
        (fresh_native_scan / "kernels").chmod(0o777)
    lam, (b, reset, x0) = ring_eigenvalues(4, 0.5, 0.99), random_inputs(2, 300, 4, reset_rate=0.01, with_x0=True)
    assert re.search(reason, native_scan_unavailable()), native_scan_unavailable()
    assert relative_error(lru_scan(lam, b, reset, x0), float64_reference(lam, b, reset, x0)) <= 1e-5
    with pytest.raises(ValueError, match=rf"lru_scan_backend='native'\) needs a working C compiler and cannot run "
                                         rf"here: .*({reason}).*Use lru_scan_backend='auto' .* or 'chunked'"):
        lru_scan(lam, b, backend="native")
    assert not any((fresh_native_scan / "kernels").glob("*.so"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_broadcasts_reset_and_x0_and_refuses_other_shapes(backend):
    lam = ring_eigenvalues(4, 0.5, 0.99)
    b, _, _ = random_inputs(3, 30, 4)
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, 11] = True
    x0 = random_inputs(1, 1, 4, seed=5, with_x0=True)[2]  # (1, state): every row starts from it
    expected = float64_reference(lam, b, reset.expand(3, 30), x0.expand(3, 4))
    assert relative_error(lru_scan(lam, b, reset, x0, backend=backend), expected) <= 1e-5
    with pytest.raises(ValueError, match=r"lam of shape \(state,\); got b \(3, 30, 4\) and lam \(3,\)"):
        lru_scan(lam[:3], b, backend=backend)
    with pytest.raises(ValueError, match=r"lam of shape \(state,\)"):
        lru_scan(lam.expand(3, 4), b, backend=backend)  # one λ per state, shared by the batch
    with pytest.raises(ValueError, match=r"x0 has shape \(2, 4\); expected \(3, 4\)"):
        lru_scan(lam, b, x0=x0.expand(2, 4), backend=backend)
    with pytest.raises(ValueError, match=r"reset has shape \(3, 29\); expected \(3, 30\)"):
        lru_scan(lam, b, torch.zeros(3, 29, dtype=torch.bool), backend=backend)


def test_unknown_scan_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend='fast' is not an LRU scan backend; use one of \('auto', 'native', "
                                         r"'chunked'\)"):
        lru_scan(ring_eigenvalues(2, 0.5, 0.9), random_inputs(1, 3, 2)[0], backend="fast")


# --- the mixer -------------------------------------------------------------------------------------------------------
def lru_config(**overrides):
    return LongCtxConfig(**tiny_config_kwargs(**{"block_types": ["attention", "lru"], "lru_state_size": 16,
                                                 **overrides}))


def test_mixer_equals_the_paper_formula():
    torch.manual_seed(0)
    lru = LongCtxLRU(lru_config(), layer_idx=1)
    u = torch.randn(2, 12, 64)
    p = {name: value.detach().double() for name, value in lru.named_parameters()}
    assert set(p) == {"nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D"}
    lam = torch.exp(-torch.exp(p["nu_log"]) + 1j * torch.exp(p["theta_log"]))
    b_norm = (p["B_re"] + 1j * p["B_im"]) * torch.exp(p["gamma_log"])[:, None]
    c = p["C_re"] + 1j * p["C_im"]
    x = torch.zeros(2, 16, dtype=torch.complex128)
    expected = []
    for t in range(12):
        x = lam * x + u[:, t].double().to(torch.complex128) @ b_norm.T
        expected.append((x @ c.T).real + p["D"] * u[:, t].double())
    with torch.no_grad():
        got = lru(u)
    torch.testing.assert_close(got.double(), torch.stack(expected, 1), atol=1e-5, rtol=1e-5)


def test_ring_init_follows_the_paper():
    config = lru_config(lru_state_size=4096, hidden_size=64, lru_r_min=0.5, lru_r_max=0.99, lru_max_phase=3.0)
    torch.manual_seed(0)
    lru = LongCtxLRU(config, layer_idx=1)
    with torch.no_grad():
        lam = lru.eigenvalues().to(torch.complex128)
        r2, phase = lam.abs() ** 2, torch.exp(lru.theta_log.double())
        assert 0.5**2 - 1e-6 <= r2.min() and r2.max() <= 0.99**2 + 1e-6
        assert abs(r2.mean().item() - (0.5**2 + 0.99**2) / 2) < 0.01  # |λ|² ~ U[r_min², r_max²]
        assert 0 <= phase.min() and phase.max() <= 3.0 and abs(phase.mean().item() - 1.5) < 0.05
        torch.testing.assert_close(torch.exp(lru.gamma_log.double()), torch.sqrt(1 - r2), rtol=1e-5, atol=1e-6)
        assert abs(lru.B_re.std().item() - 1 / math.sqrt(2 * 64)) < 0.005
        assert abs(lru.C_im.std().item() - 1 / math.sqrt(4096)) < 0.001
        assert abs(lru.D.std().item() - 1.0) < 0.3


def test_model_init_applies_the_ring_init():
    torch.manual_seed(0)
    model = LongCtxForCausalLM(lru_config(lru_r_min=0.6, lru_r_max=0.7))
    r = model.model.layers[1].lru.eigenvalues().abs()
    assert 0.6 - 1e-6 <= r.min().item() and r.max().item() <= 0.7 + 1e-6
    assert not hasattr(model.model.layers[1], "self_attn") and not hasattr(model.model.layers[0], "lru")


def test_recurrence_runs_in_complex64_under_bfloat16():
    torch.manual_seed(0)
    model = LongCtxForCausalLM(lru_config()).eval()
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        reference = model(ids).logits
        half = model.to(torch.bfloat16)
        out = half(ids, use_cache=True)
    assert output_cache(out).layers[1].recurrent_states[0].dtype == torch.complex64
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), reference, atol=0.1, rtol=0.05)


# --- hybrid models: cache, generate, resets --------------------------------------------------
BLOCK_PATTERNS = [["attention", "lru"], ["lru", "lru"], ["lru", "attention", "lru"]]


def tiny_hybrid(block_types, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {"num_hidden_layers": len(block_types), "block_types": block_types, "lru_state_size": 16, **overrides}
    return LongCtxForCausalLM(LongCtxConfig(**tiny_config_kwargs(**kwargs))).eval()


@pytest.mark.parametrize("block_types", BLOCK_PATTERNS)
def test_cached_decoding_equals_full_forward(block_types):
    model = tiny_hybrid(block_types)
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :10], use_cache=True)  # prefill, a 5-token chunk, then one token at a time
        steps, cache = [out.logits], output_cache(out)
        out = model(ids[:, 10:15], cache=cache, use_cache=True)
        steps.append(out.logits)
        for t in range(15, 30):
            steps.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_types", [["attention", "lru"], ["lru", "lru"]])
def test_generate_with_left_padding_equals_full_forward(block_types):
    model = tiny_hybrid(block_types, eos_token_id=None)
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask, use_cache=False).logits
        alone = model.generate(ids[1:, 4:], max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(torch.stack(out.scores, 1), full[:, 8:-1], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.sequences[1, 9:], alone[0, 5:])  # the padded row continues as if alone


@pytest.mark.parametrize("block_types", [["attention", "lru"], ["lru", "lru"]])
def test_beam_search_with_cache_equals_recomputation(block_types):
    """Beam search reorders the cache every step: the LRU states must follow their beams."""
    model = tiny_hybrid(block_types, eos_token_id=None)
    ids = torch.randint(1, 128, (2, 8))
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_assisted_decoding_is_refused_for_recurrent_stacks():
    model = tiny_hybrid(["attention", "lru"])
    with pytest.raises(ValueError, match="stateful"):
        model.generate(torch.randint(0, 128, (1, 5)), assistant_model=model, max_new_tokens=2, do_sample=False)


def test_lru_cache_memory_is_constant_in_context_length():
    model = tiny_hybrid(["attention", "lru"])

    def cache_bytes(length):
        with torch.no_grad():
            cache = output_cache(model(torch.randint(0, 128, (1, length)), use_cache=True))
        lru_state = cache.layers[1].recurrent_states[0]
        attention = cache.layers[0].keys.nbytes + cache.layers[0].values.nbytes
        return lru_state.nbytes, attention

    (lru_short, attn_short), (lru_long, attn_long) = cache_bytes(16), cache_bytes(64)
    assert lru_short == lru_long == 16 * 8  # (batch 1, state 16) complex64
    assert attn_long == 4 * attn_short


def test_packed_documents_equal_each_alone():
    model = tiny_hybrid(["lru", "lru"])
    first, second = torch.randint(0, 128, (1, 11)), torch.randint(0, 128, (1, 7))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(7)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=positions).logits
        torch.testing.assert_close(together[:, :11], model(first).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[:, 11:], model(second).logits, atol=1e-5, rtol=1e-5)
        # a chunk that starts a new document (position 0) drops the cached state too
        cache = output_cache(model(first, use_cache=True))
        again = model(second, position_ids=torch.arange(7)[None], cache=cache, use_cache=True).logits
        torch.testing.assert_close(again, model(second).logits, atol=1e-5, rtol=1e-5)
        # without the restart the second document does see the first: the reset is what makes them equal
        carried = model(packed, position_ids=torch.arange(18)[None]).logits
        assert (carried[:, 11:] - together[:, 11:]).abs().max() > 1e-3


def test_padding_never_enters_the_state():
    """Left padding with positions that do not restart at the first real token: the mask alone keeps pads out."""
    model = tiny_hybrid(["lru", "lru"])
    ids = torch.randint(1, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    positions = torch.arange(1, 13)[None].expand(2, -1)  # never 0: no reset anywhere
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[1:, 5:], position_ids=positions[:1, 5:]).logits
    torch.testing.assert_close(padded[1, 5:], alone[0], atol=1e-5, rtol=1e-5)


def test_packed_rows_reset_independently():
    torch.manual_seed(0)
    lru = LongCtxLRU(lru_config(), layer_idx=1)
    u = torch.randn(2, 10, 64)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6], list(range(10))])
    with torch.no_grad():
        packed = lru(u, positions)
        torch.testing.assert_close(packed[0, 3:], lru(u[:1, 3:])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[1], lru(u[1:])[0], atol=1e-5, rtol=1e-5)


def test_training_backward_reaches_the_lru_parameters():
    model = tiny_hybrid(["attention", "lru"]).train()
    ids = torch.randint(0, 128, (2, 40))
    model(ids, labels=ids).loss.backward()
    for name in ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D"):
        grad = getattr(model.model.layers[1].lru, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_cache_without_recurrent_slot_is_a_clear_error():
    model = tiny_hybrid(["attention", "lru"])
    with pytest.raises(ValueError, match="LRU layer 1 .*DynamicCache\\(config=model.config\\)"):
        model(torch.randint(0, 128, (1, 5)), cache=DynamicCache(), use_cache=True)


@pytest.mark.parametrize("field,value,match", [
    ("lru_state_size", 0, "`lru_state_size`=0 .*integer >= 1"),
    ("lru_r_min", -0.1, "`lru_r_min`=-0.1 .*>= 0"),
    ("lru_r_max", 1.5, "`lru_r_max`=1.5 .*<= 1"),
    ("lru_r_min", 0.9995, "`lru_r_min`=0.9995 .*< lru_r_max=0.999"),
    ("lru_max_phase", 0.0, "`lru_max_phase`=0.0 .*> 0"),
    ("block_types", ["lru"], "`block_types`=\\['lru'\\] .*one entry per layer \\(num_hidden_layers=2\\)"),
    ("block_types", ["lru", "mamba"], "`block_types`=.*'mamba'.*one of attention, lru"),
    ("block_types", "lru", "`block_types`='lru' .*expected a list with one entry per layer"),
    ("lru_scan_backend", "torch", "`lru_scan_backend`='torch' is invalid; allowed: auto, native, chunked"),
    ("lru_scan_backend", None, "`lru_scan_backend`=None is invalid; allowed: auto, native, chunked"),
])
def test_invalid_lru_config_values_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        LongCtxConfig(**tiny_config_kwargs(**{field: value}))


def test_block_types_derive_transformers_layer_types():
    config = lru_config(num_hidden_layers=3, block_types=["lru", "attention", "lru"])
    assert config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert [type(layer).__name__ for layer in DynamicCache(config=config).layers] == \
        ["LinearAttentionLayer", "DynamicLayer", "LinearAttentionLayer"]


# --- the scan backend: config.lru_scan_backend ------------------------------------------------------------------------
@pytest.fixture
def native_calls(monkeypatch):
    """The number of scans the native kernel has run (forward and backward) since the fixture was set up."""
    calls, scan = [], longctx.lru_native.native_scan

    def counting(*args, **kwargs):
        calls.append(1)
        return scan(*args, **kwargs)

    monkeypatch.setattr(longctx.lru_native, "native_scan", counting)
    return calls


def logits_and_grads(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids, skip_logits=False)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if "lru" in name}


@NEEDS_NATIVE
def test_scan_backends_of_the_config_give_equal_outputs(native_calls):
    """Same weights under "chunked", "native" and "auto": the same logits and LRU gradients (to float32 rounding);
    the native kernel runs for "native" and "auto" on CPU and never for "chunked"."""
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(1))  # several chunks of 16
    results = {}
    for backend in ("chunked", "native", "auto"):
        model = tiny_hybrid(["lru", "attention", "lru"], lru_scan_backend=backend).train()
        assert model.config.lru_scan_backend == backend
        before = len(native_calls)
        results[backend] = logits_and_grads(model, ids)
        assert (len(native_calls) > before) == (backend != "chunked"), backend  # forward and backward scans
    for backend in ("native", "auto"):
        torch.testing.assert_close(results[backend][0], results["chunked"][0], rtol=1e-5, atol=1e-5)
        for name, grad in results["chunked"][1].items():
            torch.testing.assert_close(results[backend][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(results["auto"][0], results["native"][0])  # "auto" is the native kernel here


def test_native_backend_without_a_compiler_is_a_clear_error_and_auto_falls_back(fresh_native_scan, monkeypatch,
                                                                                native_calls):
    """CC=/bin/false (compiles nothing): "native" raises naming the reason and the alternatives; "auto" runs the
    chunked scan, equal to "chunked", and says why once."""
    monkeypatch.setenv("CC", "/bin/false")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    native = tiny_hybrid(["attention", "lru"], lru_scan_backend="native")
    with pytest.raises(ValueError, match=r"The native LRU scan \(lru_scan_backend='native'\) needs a working C "
                                         r"compiler and cannot run here: /bin/false failed.*Use "
                                         r"lru_scan_backend='auto' \(native where it builds, else the chunked torch "
                                         r"scan\) or 'chunked'"):
        native(ids)
    longctx.lru_native._native_scan_library.cache_clear()
    monkeypatch.setenv("CC", fake_compiler(fresh_native_scan, "exit 3"))  # its path: a reason never logged before
    with CaptureLogger(longctx.lru_native.logger) as captured, torch.no_grad():
        auto = tiny_hybrid(["attention", "lru"], lru_scan_backend="auto")(ids).logits
        tiny_hybrid(["attention", "lru"], lru_scan_backend="auto")(ids)
    assert captured.out.count("The LRU scan runs its chunked torch backend on CPU (slower): ") == 1, captured.out
    assert "fakecc failed" in captured.out
    with torch.no_grad():
        torch.testing.assert_close(auto, tiny_hybrid(["attention", "lru"], lru_scan_backend="chunked")(ids).logits,
                                   rtol=0, atol=0)
    assert not native_calls and not any((fresh_native_scan / "kernels").glob("*.so"))


def test_deprecated_environment_switch_turns_off_only_auto(fresh_native_scan, monkeypatch, native_calls):
    """LONGCTX_NATIVE_SCAN=0 (deprecated, a FutureWarning once): "auto" runs chunked without looking for a compiler;
    the config field decides otherwise ("native" still runs natively where it can)."""
    monkeypatch.setenv("LONGCTX_NATIVE_SCAN", "0")
    longctx.lru._native_scan_turned_off.cache_clear()  # (it warns once per process)
    lam, (b, reset, x0) = ring_eigenvalues(4, 0.5, 0.99), random_inputs(2, 100, 4, reset_rate=0.01, with_x0=True)
    with pytest.warns(FutureWarning, match=r"LONGCTX_NATIVE_SCAN=0 is deprecated: set `config.lru_scan_backend = "
                                           r"'chunked'`"):
        got = lru_scan(lam, b, reset, x0)
        model = tiny_hybrid(["attention", "lru"])
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 20)))
    assert relative_error(got, float64_reference(lam, b, reset, x0)) <= 1e-5 and not native_calls
    assert longctx.lru_native._native_scan_library.cache_info().currsize == 0  # no compiler looked for
    if native_scan_unavailable() is None:  # builds it: "native" is not turned off
        torch.testing.assert_close(lru_scan(lam, b, reset, x0, backend="native"), got, rtol=1e-5, atol=1e-5)
        assert native_calls


LAZY_IMPORT_CHECK = """
import sys, torch
import longctx
from longctx import LongCtxConfig, LongCtxForCausalLM
config = LongCtxConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, block_types=["lru", "attention"], lru_state_size=16,
                       lru_scan_backend="chunked")
model = LongCtxForCausalLM(config)
ids = torch.randint(0, 128, (2, 40))
model(ids, labels=ids).loss.backward()
model.eval().generate(ids[:, :8], max_new_tokens=3, do_sample=False, pad_token_id=0)
assert "longctx.lru_native" not in sys.modules, "imported on the chunked backend"
model.config.lru_scan_backend = "auto"
model(ids)
assert "longctx.lru_native" in sys.modules, "not imported for auto"
"""


def test_chunked_models_never_import_the_native_scan_module(tmp_path):
    """In a fresh process: import longctx, train a step and generate on the chunked backend — `longctx.lru_native`
    (the C-compiler driver) is not imported; switching the config to "auto" imports it."""
    child = subprocess.run([sys.executable, "-c", LAZY_IMPORT_CHECK], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "LONGCTX_CACHE": str(tmp_path)})
    assert child.returncode == 0, child.stderr[-3000:]


REMOTE_NATIVE_CHECK = """
import sys, torch
sys.modules["longctx"] = None  # as on a machine where longctx is not installed
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert model.config.lru_scan_backend == "native", model.config.lru_scan_backend
with torch.no_grad():
    logits = model(torch.load(sys.argv[2])).logits
native = [name for name in sys.modules if name.startswith("transformers_modules") and name.endswith(".lru_native")]
assert native, "the checkpoint's lru_native was not imported"
torch.save(logits, sys.argv[3])
"""


@NEEDS_NATIVE
def test_remote_code_checkpoint_runs_the_native_scan_from_its_own_copy(tmp_path):
    """A checkpoint saved with lru_scan_backend="native", loaded with trust_remote_code where longctx is not
    importable: it compiles and runs its own copy of lru_native.py (in a fresh kernel cache), same logits."""
    model = tiny_hybrid(["lru", "attention"], lru_scan_backend="native")
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (2, 40))
    torch.save(ids, tmp_path / "ids.pt")
    child = subprocess.run([sys.executable, "-c", REMOTE_NATIVE_CHECK, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                            str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "LONGCTX_CACHE": str(tmp_path / "cache")})
    assert child.returncode == 0, child.stderr[-3000:]
    assert any((tmp_path / "cache" / "kernels").glob("lru_scan-*.so"))
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(ids).logits)


# --- save -> load ----------------------------------------------------------------------------------------------------
def test_hybrid_save_load_in_fresh_process_without_longctx(tmp_path):
    model = tiny_hybrid(["lru", "attention", "lru"])
    model.save_pretrained(tmp_path / "ckpt")
    for name in ("lru.py", "lru_native.py", "cache.py"):  # the files lru.py imports (lru_native lazily) go along
        assert (tmp_path / "ckpt" / name).exists(), name
    ids = torch.randint(0, 128, (2, 30))
    assert_same_in_fresh_process(model, tmp_path / "ckpt", ids, tmp_path)

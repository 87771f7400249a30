"""The Linear Recurrent Unit (Orvieto et al. 2023; methods.md §13): the mixer, its ring init, its two scans.

    λ = exp(−exp(ν_log) + i·exp(θ_log)),   x_t = λ ⊙ x_{t−1} + γ ⊙ (B u_t),   y_t = Re(C x_t) + D ⊙ u_t

`lru_scan_sequential` is the reference: one step at a time. `lru_scan` is the fast one, with two backends:
- "native" (CPU): the loop itself in C, one read of b and one write of x, compiled once per machine with the
  system's C compiler into longctx's cache directory and loaded with ctypes (`native_scan_kernel`);
- "chunked" (any device; CPU where no C compiler works): chunks of `chunk_size` steps scanned side by side, the
  state entering each chunk by the same scan one level up (λ^T per step), then the chunks again from their true
  incoming states. Only λ and its positive powers appear (|λ^k| ≤ 1): the cumsum of λ^{−k}·b overflows
  (methods.md §13, pitfall 9).
Both run in complex64 whatever the model dtype, and drop λ·x_{t−1} where `reset` is True, a document start
(`position_ids == 0`). The fast scan is a custom operator (`torch.ops.longctx.lru_scan`) whose backward is the same
scan run backwards in time with conj(λ): `torch.compile` keeps it whole in its graph.

The recurrent state (batch, state_size) of each LRU layer lives in transformers' cache, in the
`LinearAttentionLayer` that `DynamicCache(config=...)` builds for `layer_types[i] == "linear_attention"`.
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import LinearAttentionCacheLayerMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

SCAN_CHUNK_SIZE = 16  # steps per chunk of `lru_scan`: fastest of 8–128 on a 2-core CPU (BENCHMARKS.md, ## LRU)


# --- scans ----------------------------------------------------------------------------------------------------------
def lru_scan_sequential(lam, b, reset=None, x0=None):
    """Reference scan (methods.md §13): x_t = λ·x_{t−1} + b_t for t = 0..L−1, x_{−1} = x0 (or 0).

    `lam` (state,) complex; `b` (batch, L, state) complex; `reset` (batch, L) bool drops λ·x_{t−1} at True;
    `x0` (batch, state). Returns every state, (batch, L, state). Plain autograd, in the dtype of `b`."""
    state = torch.zeros_like(b[:, 0]) if x0 is None else x0.to(b.dtype)
    states = []
    for t in range(b.shape[1]):
        carried = lam * state
        if reset is not None:
            carried = torch.where(reset[:, t, None], torch.zeros_like(carried), carried)
        state = carried + b[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


SCAN_BACKENDS = ("native", "chunked")


def lru_scan(lam, b, reset=None, x0=None, chunk_size=SCAN_CHUNK_SIZE, backend=None):
    """Fast scan with the semantics of `lru_scan_sequential`, in complex64, differentiable (its own backward).

    `backend`: "native" (CPU, needs a C compiler), "chunked" (any device, `chunk_size` steps per chunk), or None:
    native where it runs, else chunked. One custom op (`torch.ops.longctx.lru_scan`): `torch.compile` keeps it
    whole in its graph."""
    if backend is not None and backend not in SCAN_BACKENDS:
        raise ValueError(f"backend={backend!r} is not an LRU scan backend; use one of {SCAN_BACKENDS} or None.")
    if b.dim() != 3 or lam.shape != (b.shape[-1],):
        raise ValueError(f"lru_scan takes b of shape (batch, length, state) and lam of shape (state,); got b "
                         f"{tuple(b.shape)} and lam {tuple(lam.shape)}.")
    batch, length, size = b.shape
    if length == 0:
        return b.to(torch.complex64)
    keep = None if reset is None else ~_broadcast("reset", reset, (batch, length))
    if x0 is not None:  # a copy: the cache rewrites its state buffer in place
        x0 = _broadcast("x0", x0, (batch, size)).to(torch.complex64, copy=True)
    return _scan_op(lam, b.to(torch.complex64), keep, x0, chunk_size, False, backend or "auto")


def _broadcast(name, tensor, shape):
    try:
        return tensor.expand(shape)
    except RuntimeError:
        raise ValueError(f"lru_scan: {name} has shape {tuple(tensor.shape)}; expected {shape} (or one that "
                         "broadcasts to it).") from None


def _coefficient(lam, keep, t):
    """λ·keep_t: the factor on x_{t−1} at step t (0 where a document starts)."""
    return lam if keep is None else lam * keep[..., t, None]


def _recur(b, lam, keep, x0, out):
    """x_t = λ·keep_t·x_{t−1} + b_t along dim −2, x_{−1} = x0 (nothing when None), written into `out` (may be b)."""
    previous = x0
    for t in range(b.shape[-2]):
        if previous is None:
            if out is not b:
                out[..., t, :].copy_(b[..., t, :])
        else:
            torch.addcmul(b[..., t, :], previous, _coefficient(lam, keep, t), out=out[..., t, :])
        previous = out[..., t, :]
    return out


def _last_state(b, lam, keep):
    """The state after the last step along dim −2 from a zero start, keeping no other state."""
    state = b[..., 0, :].clone()
    for t in range(1, b.shape[-2]):
        torch.addcmul(b[..., t, :], state, _coefficient(lam, keep, t), out=state)
    return state


def _chunked_scan(b, log_lam, keep, x0, chunk_size, out):
    """The scan of b (batch, L, state) complex64 into `out` (may be b). `log_lam` (state,) complex128.

    Chunks of T steps side by side: (1) each chunk's end state from a zero start; (2) the true end states by the same
    scan over chunks, whose step factor is λ^T (recursively: chunks of chunks); (3) every chunk again from its true
    incoming state, writing x. b is read twice, x written once; the factors formed are λ, λ^T, λ^{T²}, …."""
    batch, length, size = b.shape
    lam = torch.exp(log_lam).to(torch.complex64)
    chunks = length // chunk_size
    if chunks < 2:
        return _recur(b, lam, keep, x0, out)
    span = chunks * chunk_size
    b_chunks = b[:, :span].view(batch, chunks, chunk_size, size)  # (batch, chunks, T, state), views
    keep_chunks = None if keep is None else keep[:, :span].view(batch, chunks, chunk_size)
    ends = _last_state(b_chunks, lam, keep_chunks)  # (batch, chunks, state)
    ends = _chunked_scan(ends, chunk_size * log_lam, None if keep is None else keep_chunks.all(-1), x0, chunk_size,
                         out=ends)
    incoming = torch.cat([torch.zeros_like(ends[:, :1]) if x0 is None else x0[:, None], ends[:, :-1]], dim=1)
    _recur(b_chunks, lam, keep_chunks, incoming, out[:, :span].view(batch, chunks, chunk_size, size))
    _recur(b[:, span:], lam, None if keep is None else keep[:, span:], ends[:, -1], out[:, span:])  # L mod T
    return out


# The native backend: the sequential loop in C over contiguous complex64 (re, im) pairs, vectorised across the
# state; one read of b and one write of x, which no composition of torch ops reaches (BENCHMARKS.md, "LRU scan").
_SCAN_SOURCE = r"""
/* x_t = lam * keep_t * x_prev + b_t for each batch row, prev = x_{t-1} (or x_{t+1} when reverse), x0 before the
   first step (none: x = b there). Complex numbers as (re, im) float pairs; b, x: (batch, length, size) contiguous;
   keep: (batch, length) bytes or NULL; x0: (batch, size) or NULL. */
void longctx_lru_scan(const float *restrict lam, const float *restrict b, const unsigned char *restrict keep,
                      const float *restrict x0, float *restrict x, long long batch, long long length,
                      long long size, int reverse)
{
    const long long row = 2 * size;
    for (long long i = 0; i < batch; i++) {
        const float *prev = x0 ? x0 + i * row : 0;
        for (long long s = 0; s < length; s++) {
            const long long t = reverse ? length - 1 - s : s, at = (i * length + t) * row;
            const float *restrict bt = b + at;
            float *restrict xt = x + at;
            if (!prev || (keep && !keep[i * length + t])) {
                for (long long n = 0; n < row; n++)
                    xt[n] = bt[n];
            } else {
                for (long long n = 0; n < row; n += 2) {
                    xt[n] = bt[n] + (lam[n] * prev[n] - lam[n + 1] * prev[n + 1]);
                    xt[n + 1] = bt[n + 1] + (lam[n] * prev[n + 1] + lam[n + 1] * prev[n]);
                }
            }
            prev = xt;
        }
    }
}
"""


def _cpu_identity():
    """What the compiled code depends on besides its source: the architecture and (Linux) the CPU's features, so
    a cache directory shared between different machines keeps one library per kind of CPU (`-march=native`)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


class _NoNativeScan(Exception):
    """Why the native scan cannot run here (the chunked backend runs instead)."""


def _compiler():
    """The C compiler command: $CC (may carry arguments, e.g. "ccache gcc"), else the first of cc, gcc, clang."""
    if os.environ.get("CC"):
        command = shlex.split(os.environ["CC"])
        if not command or not shutil.which(command[0]):
            raise _NoNativeScan(f"CC={os.environ['CC']!r} is not an executable C compiler")
        return command
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise _NoNativeScan("no C compiler found (CC is unset and none of cc, gcc, clang is on PATH)")


def _run(command, **kwargs):
    try:
        return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120, check=False,
                              **kwargs)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise _NoNativeScan(f"{' '.join(command)}: {error}") from error


def _private(path):
    """Whether `path` belongs to this user and no one else can write it (a library found in a shared place could
    be anybody's code). Always true where there are no POSIX owners."""
    if not hasattr(os, "getuid"):
        return True
    status = path.stat()
    return status.st_uid == os.getuid() and not status.st_mode & 0o022


def _build_scan_library(rebuild=False):
    """The path of the compiled native scan: $LONGCTX_CACHE/kernels (default ~/.cache/longctx/kernels), one file per
    source, compiler (its --version) and kind of CPU, written atomically; compiling takes ~0.1 s."""
    compiler = _compiler()
    version = _run([*compiler, "--version"]).stdout
    key = hashlib.sha256(f"{_SCAN_SOURCE}\0{compiler}\0{version}\0{_cpu_identity()}".encode()).hexdigest()[:16]
    directory = Path(os.environ.get("LONGCTX_CACHE") or Path.home() / ".cache" / "longctx") / "kernels"
    path = directory / f"lru_scan-{key}.so"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(directory):
        raise _NoNativeScan(f"{directory} is writable by other users; not loading code from it")
    if path.exists() and not rebuild:
        return path
    with tempfile.TemporaryDirectory(dir=directory) as work:
        source, library = Path(work) / "lru_scan.c", Path(work) / "lru_scan.so"
        source.write_text(_SCAN_SOURCE)
        for flags in (["-O3", "-march=native"], ["-O3"]):  # not every compiler knows -march=native
            built = _run([*compiler, *flags, "-std=c99", "-shared", "-fPIC", str(source), "-o", str(library)])
            if built.returncode == 0:
                os.replace(library, path)
                return path
    raise _NoNativeScan(f"{' '.join(compiler)} failed: {built.stderr.strip()[-300:]}")


def _load_scan_library(path):
    """The kernel from `path` as a ctypes function, once it has reproduced the reference loop on a small case."""
    if not _private(path):
        raise _NoNativeScan(f"{path} is writable by other users; not loading it")
    kernel = ctypes.CDLL(str(path)).longctx_lru_scan
    kernel.restype = None
    kernel.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_longlong] * 3 + [ctypes.c_int]
    g = torch.Generator().manual_seed(0)
    lam = torch.polar(torch.rand(3, generator=g), torch.rand(3, generator=g)).to(torch.complex64)
    b = torch.randn(2, 5, 3, dtype=torch.complex64, generator=g)
    keep, x0 = torch.rand(2, 5, generator=g) > 0.3, torch.randn(2, 3, dtype=torch.complex64, generator=g)
    for reverse in (False, True):
        got = _native_scan(lam, b, keep, x0, reverse, kernel=kernel)
        flip = (lambda t: t.flip(1)) if reverse else (lambda t: t)
        expected = flip(lru_scan_sequential(lam, flip(b), ~flip(keep), x0))
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise _NoNativeScan(f"{path} computes wrong results")
    return kernel


@functools.cache
def _native_scan_library():
    """(kernel, None) or (None, why not): built and loaded once per process; a cached library that fails to load
    or to reproduce the reference is rebuilt once."""
    if os.environ.get("LONGCTX_NATIVE_SCAN", "1").lower() in ("0", "false", "off", "no"):
        return None, f"LONGCTX_NATIVE_SCAN={os.environ['LONGCTX_NATIVE_SCAN']}"
    try:
        path = _build_scan_library()
        try:
            return _load_scan_library(path), None
        except (OSError, AttributeError, _NoNativeScan):  # a broken cached library: compile it again, once
            path = _build_scan_library(rebuild=True)
            try:
                return _load_scan_library(path), None
            except BaseException:
                path.unlink(missing_ok=True)  # nothing broken stays behind
                raise
    except Exception as error:  # whatever goes wrong, the model still runs (on the chunked backend)
        return None, str(error) if isinstance(error, _NoNativeScan) else f"{type(error).__name__}: {error}"


def native_scan_kernel():
    """The compiled native scan (a ctypes function), or None where it cannot run: then `lru_scan` runs the chunked
    backend, and says why once. `LONGCTX_NATIVE_SCAN=0` turns it off."""
    kernel, reason = _native_scan_library()
    if kernel is None:
        log = logger.info_once if reason.startswith("LONGCTX_NATIVE_SCAN") else logger.warning_once
        log(f"The LRU scan runs its chunked torch backend on CPU (slower): {reason}.")
    return kernel


def native_scan_unavailable():
    """Why the native scan cannot run here, or None when it can."""
    return _native_scan_library()[1]


# From 32 MiB glibc maps every allocation afresh: each page faults on its first write. torch's threads take those
# faults side by side (`zero_`) 1.4× faster than the single-threaded kernel would (BENCHMARKS.md, "LRU scan").
LARGE_OUTPUT_BYTES = 2**25


def _native_scan(lam, b, keep, x0, reverse, out=None, kernel=None):
    """The scan by the native kernel on CPU tensors: lam (state,), b (batch, L, state), keep (batch, L), x0
    (batch, state), made complex64 / uint8 and contiguous here (the kernel reads raw memory). `out`: a contiguous
    complex64 tensor shaped like `b`, not `b` itself, to write into (benchmarks). The kernel releases the GIL."""
    batch, length, size = b.shape
    if lam.shape != (size,) or (keep is not None and keep.shape != (batch, length)) or (
            x0 is not None and x0.shape != (batch, size)):
        raise ValueError(f"native LRU scan: lam {tuple(lam.shape)}, keep {None if keep is None else tuple(keep.shape)}"
                         f", x0 {None if x0 is None else tuple(x0.shape)} do not fit b {tuple(b.shape)}")
    b = b.to(torch.complex64).resolve_conj().contiguous()
    lam = lam.to(torch.complex64).resolve_conj().contiguous()
    keep = None if keep is None else keep.to(torch.uint8).contiguous()
    x0 = None if x0 is None else x0.to(torch.complex64).resolve_conj().contiguous()
    if out is None:
        x = torch.empty_like(b)
        if x.nbytes >= LARGE_OUTPUT_BYTES:
            x.zero_()
    elif (out.shape != b.shape or out.dtype != torch.complex64 or not out.is_contiguous()
          or out.data_ptr() == b.data_ptr()):
        raise ValueError("`out` must be a contiguous complex64 tensor shaped like b, and not b")
    else:
        x = out
    kernel = kernel or native_scan_kernel()
    kernel(lam.data_ptr(), b.data_ptr(), None if keep is None else keep.data_ptr(),
           None if x0 is None else x0.data_ptr(), x.data_ptr(), batch, length, size, int(reverse))
    return x


def _scan(lam, b, keep, x0, chunk_size, reverse, backend):
    """x_t = λ·keep_t·x_{t∓1} + b_t, forward in time (−) or backward (+, `reverse`): a new complex64 tensor."""
    b = b.detach().to(torch.complex64)
    x0 = None if x0 is None else x0.detach().to(torch.complex64)
    kernel = native_scan_kernel() if b.device.type == "cpu" and backend != "chunked" else None
    if backend == "native" and kernel is None:
        raise ValueError(f"backend='native' needs CPU tensors (got {b.device.type}) and a working C compiler "
                         f"({native_scan_unavailable() or 'found'}); use backend='chunked' or None.")
    if kernel is not None:  # "native", or "auto" (decided here, at run time: the op is opaque to torch.compile)
        return _native_scan(lam.detach(), b, keep, x0, reverse, kernel=kernel)
    log_lam = torch.log(lam.detach().to(torch.complex128))
    if reverse:
        b, keep = b.flip(1).contiguous(), None if keep is None else keep.flip(1)  # flip keeps b's strides
        return _chunked_scan(b, log_lam, keep, x0, chunk_size, out=b).flip(1)
    b = b.contiguous()
    return _chunked_scan(b, log_lam, keep, x0, chunk_size, out=torch.empty_like(b))


@torch.library.custom_op("longctx::lru_scan", mutates_args=())
def _scan_op(lam: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None, x0: torch.Tensor | None,
             chunk_size: int, reverse: bool, backend: str) -> torch.Tensor:
    """`_scan` as an operator: torch.compile sees one node with the shape below, autograd the rule below."""
    return _scan(lam, b, keep, x0, chunk_size, reverse, backend)


@_scan_op.register_fake
def _(lam, b, keep, x0, chunk_size, reverse, backend):
    return torch.empty_like(b, dtype=torch.complex64, memory_format=torch.contiguous_format)


def _scan_setup(ctx, inputs, output):
    lam, _, keep, x0, chunk_size, reverse, backend = inputs
    ctx.chunk_size, ctx.reverse, ctx.backend = chunk_size, reverse, backend
    ctx.save_for_backward(lam, output, keep, x0)


def _scan_backward(ctx, grad_x):
    """x_t = λ·k_t·x_{t−1} + b_t gives g_t = ∂L/∂x_t total = grad_t + conj(λ)·k_{t+1}·g_{t+1}: the same scan the
    other way in time with conj(λ); then ∂L/∂b = g, ∂L/∂λ = Σ_t k_t·g_t·conj(x_{t−1}), ∂L/∂x0 = conj(λ)·k_0·g_0."""
    lam, x, keep, x0 = ctx.saved_tensors
    step = 1 if ctx.reverse else -1  # x_t depends on x_{t+step}
    # k_{t−step}: the factor the next state in the scan's direction puts on x_t
    keep_next = None if keep is None else torch.roll(keep, step, dims=1)
    g = _scan_op(lam.conj(), grad_x, keep_next, None, ctx.chunk_size, not ctx.reverse, ctx.backend)
    weighted = g if keep is None else g * keep[..., None]
    start = torch.zeros_like(x[:, :1]) if x0 is None else x0[:, None].to(x.dtype)
    previous = torch.cat([start, x[:, :-1]], dim=1) if step == -1 else torch.cat([x[:, 1:], start], dim=1)
    grad_lam = (weighted * previous.conj()).sum(dim=(0, 1)).to(lam.dtype) if ctx.needs_input_grad[0] else None
    first = 0 if step == -1 else -1
    grad_x0 = (weighted[:, first] * lam.conj().to(g.dtype)) if x0 is not None and ctx.needs_input_grad[3] else None
    return grad_lam, g if ctx.needs_input_grad[1] else None, None, grad_x0, None, None, None


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup)


# --- the recurrent state in transformers' cache ---------------------------------------------------------------------
def _state_layer(cache, layer_idx):
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if not isinstance(layer, LinearAttentionCacheLayerMixin):
        raise ValueError(
            f"LRU layer {layer_idx} needs a recurrent-state slot in the cache, but the cache has "
            f"{type(layer).__name__} there. Build the cache with `DynamicCache(config=model.config)` (what the model "
            "and generate() do by default): config.layer_types marks LRU layers 'linear_attention'.")
    return layer


def read_lru_state(cache, layer_idx):
    """The state (batch, state_size) complex64 after the tokens already seen, or None before the first one."""
    layer = _state_layer(cache, layer_idx)
    return layer.recurrent_states[0] if layer.has_previous_state[0] else None


def write_lru_state(cache, layer_idx, state, new_tokens):
    """Store the state after this forward (copied into a fixed buffer: constant memory) and, in an all-LRU stack
    (no attention layer counts its keys), count the tokens. Not counted elsewhere: a compiled hybrid step would
    otherwise be specialised on the count and recompiled."""
    layer = _state_layer(cache, layer_idx)
    if all(cache.is_linear):
        layer.lru_seen_tokens = (layer.lru_seen_tokens if layer.has_previous_state[0] else 0) + new_tokens
    cache.update_recurrent_state(state, layer_idx)
    layer.has_previous_state[0] = True  # `cache.reset()` clears it: the state then restarts from zero


def cached_length(cache):
    """Tokens the cache has seen: an attention layer's key count, or in an all-LRU stack the LRU token count."""
    if not cache.layers or not all(cache.is_linear):
        return int(cache.get_seq_length())  # the first attention layer's (a StaticLayer counts in a tensor)
    layer = _state_layer(cache, 0)
    return layer.lru_seen_tokens if layer.has_previous_state[0] else 0


# --- the mixer --------------------------------------------------------------------------------------------------------
class LongCtxLRU(nn.Module):
    """The LRU mixer (methods.md §13): hidden_size → complex state of `lru_state_size` → hidden_size.

    Parameters as in the paper's appendix: `nu_log`, `theta_log`, `gamma_log` (state,), `B_re`, `B_im`
    (state, hidden), `C_re`, `C_im` (hidden, state), `D` (hidden,)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        hidden, state = config.hidden_size, config.lru_state_size
        self.nu_log = nn.Parameter(torch.empty(state))
        self.theta_log = nn.Parameter(torch.empty(state))
        self.gamma_log = nn.Parameter(torch.empty(state))
        self.B_re = nn.Parameter(torch.empty(state, hidden))
        self.B_im = nn.Parameter(torch.empty(state, hidden))
        self.C_re = nn.Parameter(torch.empty(hidden, state))
        self.C_im = nn.Parameter(torch.empty(hidden, state))
        self.D = nn.Parameter(torch.empty(hidden))
        self.ring_init_()

    @torch.no_grad()
    def ring_init_(self):
        """Ring init (methods.md §13): |λ|² ~ U[r_min², r_max²], arg λ ~ U[0, max_phase], γ = √(1 − |λ|²);
        B ~ N(0, 1/(2H)), C ~ N(0, 1/N), D ~ N(0, 1). Parameters loaded from a checkpoint are left alone."""
        config, (state, hidden) = self.config, self.B_re.shape
        tiny = torch.finfo(torch.float64).tiny  # keeps log() finite when rand() returns exactly 0
        u1 = torch.rand(state, dtype=torch.float64).clamp(min=tiny)
        u2 = torch.rand(state, dtype=torch.float64).clamp(min=tiny)
        r_min2, r_max2 = config.lru_r_min**2, config.lru_r_max**2
        nu = -0.5 * torch.log(u1 * (r_max2 - r_min2) + r_min2)
        init.copy_(self.nu_log, torch.log(nu))
        init.copy_(self.theta_log, torch.log(config.lru_max_phase * u2))
        init.copy_(self.gamma_log, 0.5 * torch.log(-torch.expm1(-2 * nu)))  # log √(1 − |λ|²), |λ|² = e^{−2ν}
        for weight, std in ((self.B_re, 1 / math.sqrt(2 * hidden)), (self.B_im, 1 / math.sqrt(2 * hidden)),
                            (self.C_re, 1 / math.sqrt(state)), (self.C_im, 1 / math.sqrt(state)), (self.D, 1.0)):
            init.normal_(weight, mean=0.0, std=std)

    def eigenvalues(self):
        """λ = exp(−exp(ν_log) + i·exp(θ_log)), (state,) complex64."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log.float()), torch.exp(self.theta_log.float())))

    def forward(self, hidden_states, position_ids=None, padding_mask=None, cache=None):
        """(batch, q_len, hidden) -> (batch, q_len, hidden). The state restarts where `position_ids == 0`; padded
        positions (`padding_mask` False) add nothing to it; with a cache it continues from the stored state."""
        batch, q_len, hidden = hidden_states.shape
        with torch.autocast(hidden_states.device.type, enabled=False):  # the recurrence is float32 / complex64
            u = hidden_states.float()
            gamma = torch.exp(self.gamma_log.float())[:, None]
            b_weight = torch.stack([self.B_re.float() * gamma, self.B_im.float() * gamma], dim=1)  # (state, 2, H)
            bu = torch.view_as_complex((u @ b_weight.reshape(-1, hidden).T).view(batch, q_len, -1, 2))  # γ ⊙ B u
            if padding_mask is not None:
                bu = bu * padding_mask[:, -q_len:, None].to(bu.device)
            reset = None if position_ids is None else (position_ids == 0).expand(batch, q_len).to(bu.device)
            x0 = None if cache is None else read_lru_state(cache, self.layer_idx)
            x = lru_scan(self.eigenvalues(), bu, reset, x0)  # (batch, q_len, state) complex64
            if cache is not None:
                write_lru_state(cache, self.layer_idx, x[:, -1], q_len)
            c_weight = torch.stack([self.C_re.float(), -self.C_im.float()], dim=-1).reshape(hidden, -1)
            y = torch.view_as_real(x).reshape(batch, q_len, -1) @ c_weight.T + self.D.float() * u  # Re(C x) + D ⊙ u
        return y.to(hidden_states.dtype)

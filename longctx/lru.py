"""The Linear Recurrent Unit (Orvieto et al. 2023; methods.md §13): the mixer, its ring init, its two scans.

    λ = exp(−exp(ν_log) + i·exp(θ_log)),   x_t = λ ⊙ x_{t−1} + γ ⊙ (B u_t),   y_t = Re(C x_t) + D ⊙ u_t

`lru_scan_sequential` is the reference: one step at a time. `lru_scan` is the fast one, with two backends, chosen by
`config.lru_scan_backend` ("auto": native where it runs, else chunked):
- "native" (CPU): the loop itself in C, one read of b and one write of x, compiled once per machine with the
  system's C compiler into longctx's cache directory and loaded with ctypes (`lru_native`, imported only when a
  scan may run natively: a chunked model never imports it);
- "chunked" (any device; CPU where no C compiler works): chunks of `chunk_size` steps scanned side by side, the
  state entering each chunk by the same scan one level up (λ^T per step), then the chunks again from their true
  incoming states. Only λ and its positive powers appear (|λ^k| ≤ 1): the cumsum of λ^{−k}·b overflows
  (methods.md §13, pitfall 9).
Both run in complex64 whatever the model dtype, and drop λ·x_{t−1} where `reset` is True, a document start
(`position_ids == 0`). The fast scan is a custom operator (`torch.ops.longctx.lru_scan`) whose backward is the same
scan run backwards in time with conj(λ): `torch.compile` keeps it whole in its graph.

The recurrent state (batch, state_size) of each LRU layer lives in transformers' cache, in the
`LinearAttentionLayer` that `DynamicCache(config=...)` builds for `layer_types[i] == "linear_attention"`
(`cache.read_lru_state` / `cache.write_lru_state`).
"""

import functools
import math
import os
import warnings

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import logging

from .cache import read_lru_state, write_lru_state
from .configuration_longctx import LRU_SCAN_BACKENDS

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


SCAN_BACKENDS = LRU_SCAN_BACKENDS  # "auto", "native", "chunked": the values of config.lru_scan_backend


def lru_scan(lam, b, reset=None, x0=None, chunk_size=SCAN_CHUNK_SIZE, backend="auto"):
    """Fast scan with the semantics of `lru_scan_sequential`, in complex64, differentiable (its own backward).

    `backend` (the model passes `config.lru_scan_backend`): "native" (CPU, needs a C compiler; a ValueError with
    the reason where it cannot run), "chunked" (any device, `chunk_size` steps per chunk), or "auto" (None too):
    native where it runs, else chunked. One custom op (`torch.ops.longctx.lru_scan`): `torch.compile` keeps it
    whole in its graph."""
    backend = "auto" if backend is None else backend
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"backend={backend!r} is not an LRU scan backend; use one of {SCAN_BACKENDS}.")
    if b.dim() != 3 or lam.shape != (b.shape[-1],):
        raise ValueError(f"lru_scan takes b of shape (batch, length, state) and lam of shape (state,); got b "
                         f"{tuple(b.shape)} and lam {tuple(lam.shape)}.")
    batch, length, size = b.shape
    if length == 0:
        return b.to(torch.complex64)
    keep = None if reset is None else ~_broadcast("reset", reset, (batch, length))
    if x0 is not None:  # a copy: the cache rewrites its state buffer in place
        x0 = _broadcast("x0", x0, (batch, size)).to(torch.complex64, copy=True)
    return _scan_op(lam, b.to(torch.complex64), keep, x0, chunk_size, False, backend)


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


@functools.cache
def _native_scan_turned_off(value):
    """The deprecated switch LONGCTX_NATIVE_SCAN=0 (false, off, no): "auto" runs the chunked scan. Warns once."""
    if value.lower() not in ("0", "false", "off", "no"):
        return False
    warnings.warn(f"LONGCTX_NATIVE_SCAN={value} is deprecated: set `config.lru_scan_backend = 'chunked'` instead "
                  "(the variable only turns off the native scan of lru_scan_backend='auto').", FutureWarning)
    return True


def _native_kernel(device, backend):
    """The native kernel this scan runs on, or None for the chunked scan. Imports the compiler driver (`lru_native`)
    only here, and only for "native" or "auto" on CPU; "native" where it cannot run raises with the reason."""
    if backend == "native" and device.type != "cpu":
        raise ValueError(f"lru_scan_backend='native' runs on CPU tensors only (got {device.type}); use 'auto' or "
                         "'chunked' (any device).")
    if backend == "chunked" or device.type != "cpu" or (
            backend == "auto" and _native_scan_turned_off(os.environ.get("LONGCTX_NATIVE_SCAN", "1"))):
        return None
    try:
        from .lru_native import native_scan_kernel
    except ImportError as error:  # model files copied without it: "auto" runs as where no compiler works
        if backend == "native":
            raise
        logger.warning_once(f"The LRU scan runs its chunked torch backend on CPU (slower): {error}.")
        return None
    return native_scan_kernel(required=backend == "native")


def _scan(lam, b, keep, x0, chunk_size, reverse, backend):
    """x_t = λ·keep_t·x_{t∓1} + b_t, forward in time (−) or backward (+, `reverse`): a new complex64 tensor."""
    b = b.detach().to(torch.complex64)
    x0 = None if x0 is None else x0.detach().to(torch.complex64)
    kernel = _native_kernel(b.device, backend)  # "auto" decided here, at run time: the op is opaque to torch.compile
    if kernel is not None:
        from .lru_native import native_scan

        return native_scan(lam.detach(), b, keep, x0, reverse, kernel=kernel)
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
            x = lru_scan(self.eigenvalues(), bu, reset, x0, backend=self.config.lru_scan_backend)  # complex64
            if cache is not None:
                write_lru_state(cache, self.layer_idx, x[:, -1], q_len)
            c_weight = torch.stack([self.C_re.float(), -self.C_im.float()], dim=-1).reshape(hidden, -1)
            y = torch.view_as_real(x).reshape(batch, q_len, -1) @ c_weight.T + self.D.float() * u  # Re(C x) + D ⊙ u
        return y.to(hidden_states.dtype)

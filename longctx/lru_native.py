"""The native LRU scan: the sequential loop in C, compiled once per machine with the system's C compiler into
longctx's cache directory, loaded with ctypes once it has reproduced the reference loop (methods.md §13).

Only `lru.py` imports this module, and only when a scan may run natively (`lru_scan_backend` "native", or "auto" on
CPU): a model on the chunked backend never starts a compiler, never loads a library, never imports this file. It
has no dependency beyond the standard library and torch, and is copied into checkpoints with the other model files
(`save_pretrained`: `lru.py` imports it relatively), so remote-code models run the native scan as well.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging

from .lru import lru_scan_sequential

logger = logging.get_logger(__name__)

# The sequential loop over contiguous complex64 (re, im) pairs, vectorised across the state; one read of b and one
# write of x, which no composition of torch ops reaches (BENCHMARKS.md, "LRU scan").
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
        got = native_scan(lam, b, keep, x0, reverse, kernel=kernel)
        flip = (lambda t: t.flip(1)) if reverse else (lambda t: t)
        expected = flip(lru_scan_sequential(lam, flip(b), ~flip(keep), x0))
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise _NoNativeScan(f"{path} computes wrong results")
    return kernel


@functools.cache
def _native_scan_library():
    """(kernel, None) or (None, why not): built and loaded once per process; a cached library that fails to load
    or to reproduce the reference is rebuilt once."""
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


def native_scan_kernel(required=False):
    """The compiled native scan (a ctypes function), or None where it cannot run: then `lru_scan` runs the chunked
    backend, and this says why once. `required` (backend "native"): a ValueError with the reason instead."""
    kernel, reason = _native_scan_library()
    if kernel is None and required:
        raise ValueError(f"The native LRU scan (lru_scan_backend='native') needs a working C compiler and cannot run "
                         f"here: {reason}. Use lru_scan_backend='auto' (native where it builds, else the chunked "
                         "torch scan) or 'chunked'.")
    if kernel is None:
        logger.warning_once(f"The LRU scan runs its chunked torch backend on CPU (slower): {reason}.")
    return kernel


def native_scan_unavailable():
    """Why the native scan cannot run here, or None when it can (building it on the first call)."""
    return _native_scan_library()[1]


# From 32 MiB glibc maps every allocation afresh: each page faults on its first write. torch's threads take those
# faults side by side (`zero_`) 1.4× faster than the single-threaded kernel would (BENCHMARKS.md, "LRU scan").
LARGE_OUTPUT_BYTES = 2**25


def native_scan(lam, b, keep, x0, reverse, out=None, kernel=None):
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
    kernel = kernel or native_scan_kernel(required=True)
    kernel(lam.data_ptr(), b.data_ptr(), None if keep is None else keep.data_ptr(),
           None if x0 is None else x0.data_ptr(), x.data_ptr(), batch, length, size, int(reverse))
    return x


__all__ = ["native_scan", "native_scan_kernel", "native_scan_unavailable"]

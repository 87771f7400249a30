"""LRU: the scan's two backends (native C loop, chunked torch) against the sequential loop, a log-depth scan, a
λ^{t−s}-matrix scan and one elementwise pass. (Decode speed and cache memory of hybrid and all-LRU stacks:
benchmarks/bench_decode.py.)

Scan: hidden 256 / state 256, batch 1, complex64, forward only (no grad). `floor` is one elementwise pass over a
tensor of the scan's size (`b * λ`, output allocated like the scan's): what any scan must at least pay. Outputs of
32 MiB and more (16k steps here) come from glibc as fresh pages whose first-touch faults cost more than the work
itself, so the native scan and the floor are also timed writing into a reused output (`*_reused_ms`).

Timings are the fastest of several runs, the compared functions taking turns. Writes benchmarks/results/lru.json.

Usage: python -m benchmarks.bench_lru [--lengths 1024 ... 65536] [--chunk-sizes 8 16 32 64 128]
"""

import argparse
import resource

import torch

from benchmarks.common import print_table, take_turns, write_results
from longctx import LongCtxConfig
from longctx.lru import SCAN_CHUNK_SIZE, LongCtxLRU, lru_scan, lru_scan_sequential
from longctx.lru_native import native_scan, native_scan_unavailable

HIDDEN, STATE = 256, 256


def best_of(fns, repeats):
    """{name: fastest of `repeats` runs in ms}, the functions taking turns."""
    return {name: 1e3 * times[0] for name, times in take_turns(fns, repeats).items()}


def log_depth_scan(lam, b):
    """Hillis–Steele scan, the log-depth alternative: log2(L) passes x_t += λ^{2^k}·x_{t−2^k} (positive powers)."""
    x, log_lam, step = b.clone(), torch.log(lam.to(torch.complex128)), 1
    while step < x.shape[1]:
        x[:, step:] = torch.addcmul(x[:, step:], x[:, :-step], torch.exp(step * log_lam).to(x.dtype))
        step *= 2
    return x


def powers_matrix_scan(lam, b, chunk_size=32):
    """Chunked alternative: within chunks one matmul by the (T, T) matrix of λ^{t−s}, t ≥ s, per channel; the carry
    between chunks sequentially; then x_{c,t} += λ^{t+1}·carry_c. O(T) flops per element instead of O(1)."""
    batch, length, size = b.shape
    chunks = length // chunk_size  # lengths here are multiples of the chunk size
    log_lam = torch.log(lam.to(torch.complex128))
    steps = torch.arange(chunk_size)
    lags = (steps[:, None] - steps[None, :]).clamp(min=0)
    matrix = torch.exp(lags[..., None] * log_lam) * (steps[:, None] >= steps[None, :])[..., None]  # (T, T, state)
    local = torch.matmul(matrix.permute(2, 0, 1).to(b.dtype),  # (state, T, T) @ (state, T, batch·chunks)
                         b.view(batch * chunks, chunk_size, size).permute(2, 1, 0))
    x = local.permute(2, 1, 0).contiguous().view(batch, chunks, chunk_size, size)
    powers = torch.exp(torch.arange(1, chunk_size + 1)[:, None] * log_lam).to(b.dtype)  # λ^1..λ^T
    carry = torch.zeros_like(x[:, 0, 0])
    for c in range(chunks):
        x[:, c] += powers * carry[:, None]
        carry = x[:, c, -1]
    return x.view(batch, length, size)


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def scan_inputs(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = 0.9 + 0.099 * torch.rand(STATE, generator=g)  # the default ring, r in [0.9, 0.999]
    lam = torch.polar(r, 6.283 * torch.rand(STATE, generator=g))
    b = torch.view_as_complex(torch.randn(1, length, STATE, 2, generator=g))
    return lam, b


@torch.no_grad()
def scan_row(length, loop_max_length):
    lam, b = scan_inputs(length)
    layer = LongCtxLRU(LongCtxConfig(hidden_size=HIDDEN, lru_state_size=STATE, num_hidden_layers=1,
                                     num_attention_heads=4, block_types=["lru"]), layer_idx=0)
    u = torch.randn(1, length, HIDDEN)
    scan_out, floor_out = torch.empty_like(b), torch.empty_like(b)
    fns = {"chunked_ms": lambda: lru_scan(lam, b, backend="chunked"), "floor_ms": lambda: b * lam,
           "floor_reused_ms": lambda: torch.mul(b, lam, out=floor_out),
           "layer_ms": lambda: layer(u)}  # layer: the whole mixer, B, the scan, C, D (lru_scan_backend="auto")
    if native_scan_unavailable() is None:
        fns.update({"native_ms": lambda: lru_scan(lam, b, backend="native"),
                    "native_reused_ms": lambda: native_scan(lam, b, None, None, False, out=scan_out)})
    repeats = 10 if length <= 16384 else 5
    row = {"length": length, **best_of(fns, repeats)}
    faults = minor_faults()
    b * lam
    row["floor_fresh_pages"] = minor_faults() - faults  # page faults of one `b * λ`: 0 when glibc reused memory
    # apart: the log-depth scan's allocations leave glibc's heap able to serve the next 32 MiB without fresh pages
    row.update(best_of({"log_depth_ms": lambda: log_depth_scan(lam, b),
                        "matrix_ms": lambda: powers_matrix_scan(lam, b)}, repeats))
    if length <= loop_max_length:
        row.update(best_of({"loop_ms": lambda: lru_scan_sequential(lam, b)}, 2))
    for scan in ("native", "chunked"):
        if f"{scan}_ms" in row:
            row[f"{scan}_floor_x"] = row[f"{scan}_ms"] / row["floor_ms"]
            row[f"{scan}_loop_x"] = row["loop_ms"] / row[f"{scan}_ms"] if "loop_ms" in row else None
    if "native_reused_ms" in row:
        row["reused_floor_x"] = row["native_reused_ms"] / row["floor_reused_ms"]
        row["reused_loop_x"] = row["loop_ms"] / row["native_reused_ms"] if "loop_ms" in row else None
    return row


@torch.no_grad()
def chunk_row(length, chunk_sizes):
    lam, b = scan_inputs(length)
    fns = {f"T={t}_ms": (lambda t=t: lru_scan(lam, b, chunk_size=t, backend="chunked")) for t in chunk_sizes}
    return {"length": length, **best_of(fns, 10 if length <= 16384 else 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--loop-max-length", type=int, default=65536, help="skip the loop above this length")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[8, 16, 32, 64, 128])
    parser.add_argument("--chunk-lengths", type=int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    scan = [scan_row(n, args.loop_max_length) for n in args.lengths]
    print(f"scan (hidden {HIDDEN}, state {STATE}; chunked: chunks of {SCAN_CHUNK_SIZE}): ms; *_loop_x = loop/scan, "
          f"*_floor_x = scan/floor; native scan: {native_scan_unavailable() or 'available'}")
    print_table(scan, ["length", "loop_ms", "native_ms", "chunked_ms", "log_depth_ms", "matrix_ms", "floor_ms",
                       "native_loop_x", "native_floor_x", "chunked_loop_x", "chunked_floor_x", "layer_ms"])
    print("\nwriting into a reused output (no fresh pages): ms")
    print_table(scan, ["length", "native_reused_ms", "floor_reused_ms", "reused_loop_x", "reused_floor_x",
                       "floor_fresh_pages"])
    chunks = [chunk_row(n, args.chunk_sizes) for n in args.chunk_lengths] if args.chunk_sizes else []
    if chunks:
        print("\nchunked scan time by chunk size T (ms)")
        print_table(chunks, ["length", *[f"T={t}_ms" for t in args.chunk_sizes]])
    path = write_results("lru", scan, chunk_sizes=chunks, threads=args.threads,
                         scan_shape={"hidden": HIDDEN, "state": STATE, "batch": 1, "chunk_size": SCAN_CHUNK_SIZE})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

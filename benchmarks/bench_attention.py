"""Attention backends at 1k–32k tokens: causal self-attention alone, batch 1, 4 heads of 64 (`--heads`), float32
and bfloat16, on CUDA when a GPU is present.

- `eager`: the reference (dense scores, float32 softmax), up to `--eager-max` tokens (it holds L × L scores);
- `sdpa_torch`: torch's scaled_dot_product_attention (`is_causal`; its fused flash kernel on CPU);
- `blocked`: `longctx.attention.blocked_attention`, two matmuls per block of query rows with the softmax in place
  between them — what longctx's `sdpa` backend runs on CPU in bfloat16 without autograd;
- `rerope`: ReRoPE's block-wise prefill (`rerope_band_attention`, window L_train/4 with L_train = L/4): two score
  matrices, so no fused kernel;
- `flash_attn`: the flash-attn package, where it is installed (CUDA only).
Time: median of `--repeats`, backends taking turns. `gflops` counts the causal q kᵀ and p v products
(4 · L(L+1)/2 · d per head); `frac` divides it by this machine's large-matmul rate in the same dtype.

Usage: python -m benchmarks.bench_attention [--lengths 1024 ... 32768] [--dtypes float32 bfloat16] [--repeats 3]
"""

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import matmul_rate, median, print_table, take_turns, write_results
from longctx.attention import AttentionMask, PreRope, blocked_attention, eager_attention, rerope_band_attention
from longctx.configuration_longctx import LongCtxConfig

HEADS, HEAD_DIM = 4, 64
BACKENDS = ("eager", "sdpa_torch", "blocked", "rerope", "flash_attn")


def backends(q, k, v, length, eager_max):
    heads, head_dim = q.shape[1], q.shape[-1]
    scale, mask = head_dim**-0.5, AttentionMask(length, length)
    positions = torch.arange(length, device=q.device)[None]
    config = LongCtxConfig(hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=length,
                           rope_parameters={"rope_type": "rerope", "rerope_window": max(1, length // 16)})
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=q.device).float() / head_dim)
    pre_rope = PreRope(positions, positions, inv_freq, config)  # blocks of 2**22 scores (AttentionSettings' default)
    fns = {
        "sdpa_torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
        "blocked": lambda: blocked_attention(q, k, v, mask, scale),
        "rerope": lambda: rerope_band_attention(q, k, v, mask, scale, pre_rope=pre_rope),
    }
    if length <= eager_max:
        fns["eager"] = lambda: eager_attention(q, k, v, mask, scale)
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    if flash_attn_func is not None and q.is_cuda and q.dtype != torch.float32:
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        fns["flash_attn"] = lambda: flash_attn_func(qt, kt, vt, causal=True, softmax_scale=scale)
    if q.is_cuda:  # time the kernels, not their launch
        fns = {name: (lambda fn=fn: (fn(), torch.cuda.synchronize())) for name, fn in fns.items()}
    return fns


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-max", type=int, default=4096, help="longest length for the dense eager reference")
    parser.add_argument("--heads", type=int, default=HEADS, help="attention heads (of 64 dimensions)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for dtype in args.dtypes:
        rate = matmul_rate(dtype, device)
        for length in args.lengths:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, args.heads, length, HEAD_DIM, generator=g).to(device, getattr(torch, dtype))
                       for _ in range(3))
            with torch.no_grad():
                times = take_turns(backends(q, k, v, length, args.eager_max), args.repeats)
            flops = 4 * length * (length + 1) / 2 * HEAD_DIM * args.heads
            row = {"dtype": dtype, "length": length}
            for name in BACKENDS:
                if name in times:
                    row[f"{name}_ms"] = 1e3 * median(times[name])
                    row[f"{name}_frac"] = flops / median(times[name]) / rate
            row["blocked_vs_sdpa"] = median(times["sdpa_torch"]) / median(times["blocked"])
            rows.append(row)
            print_table(rows[-1:], list(rows[-1]))
    print()
    present = [f"{name}_{unit}" for name in BACKENDS for unit in ("ms", "frac") if any(f"{name}_ms" in r for r in rows)]
    print_table(rows, ["dtype", "length", *present, "blocked_vs_sdpa"])
    name = "attention" if device == "cpu" else "attention_cuda"
    print("wrote", write_results(name, rows, heads=args.heads, head_dim=HEAD_DIM, device=device,
                                 repeats=args.repeats))


if __name__ == "__main__":
    main()

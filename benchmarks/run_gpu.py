"""The GPU set (issue 6, item 4) in one command, for a machine with a CUDA device (H100 / H200): attention
backends in bf16 (torch SDPA's flash kernel against eager, flash-attn where it imports), the forward with labels
against transformers in bf16, and the `125m` training step in bf16 autocast at 4k–16k tokens — eager, and both
models compiled at 8k — with its MFU (`flops_frac`: matmul FLOP/s over this GPU's measured bf16 matmul rate).
Sized to finish in about 8 minutes, so one device session can run it and rerun it; results in
benchmarks/results/*_cuda*.json, the targets summary at the end.

Usage: python -m benchmarks.run_gpu [--only attention forward train8k ...]
"""

import argparse
import sys

from benchmarks.run_cpu import load, run_suite

TRAIN = ["--presets", "125m", "--micro-batch", "4", "--autocast", "bfloat16", "--steps", "6"]
SUITE = {  # name -> (script, arguments)
    "attention": ("attention", ["--lengths", "4096", "16384", "32768", "--dtypes", "bfloat16", "--heads", "12",
                                "--eager-max", "16384", "--repeats", "5"]),
    "forward": ("forward", ["--lengths", "8192", "32768", "--dtypes", "bfloat16", "--repeats", "5"]),
    "train4k": ("train", [*TRAIN, "--seq-len", "4096"]),
    "train8k": ("train", [*TRAIN, "--seq-len", "8192"]),
    "train16k": ("train", [*TRAIN, "--seq-len", "16384", "--micro-batch", "1"]),
    "train8k_compiled": ("train", [*TRAIN, "--seq-len", "8192", "--compile"]),
}


def summary():
    rows = []
    for name, mode in (("train_cuda_seq8192_bfloat16", "eager"), ("train_cuda_seq8192_bfloat16_compiled", "compiled")):
        for r in load(name):
            rows.append((f"GPU training MFU, {r['preset']} {r['batch_x_seq']} bf16 {mode}: >= 40%",
                         f"{100 * r['flops_frac']:.0f}% ({r['speed_ratio']:.2f}x transformers)",
                         r["flops_frac"] >= 0.4))
    for r in load("forward_cuda"):
        rows.append((f"GPU forward+labels {r['length']} bf16 vs transformers", f"{r['speed_ratio']:.2f}x, "
                     f"{r['memory_ratio']:.2f}x memory", r["speed_ratio"] >= 1.0 and r["memory_ratio"] <= 1.0))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SUITE), help="run these benchmarks only")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks.run_gpu needs a CUDA device (torch.cuda.is_available() is False); on CPU: make bench")
    run_suite(SUITE, args.only or list(SUITE), summary)


if __name__ == "__main__":
    main()

"""The output head's loss: `longctx.loss.linear_cross_entropy` (fused projection + cross-entropy, gradients formed
chunk by chunk in the forward) against the reference `causal_lm_loss(F.linear(h, W), labels)` (what transformers
computes: full logits, log-softmax, its backward), forward + backward and forward alone (no grad), float32.
Chunk sizes are set through `LOGITS_CHUNK_BYTES` (float32 logits per chunk). Median of `--repeats`, taking turns.

Usage: python -m benchmarks.bench_loss [--shapes 4096x8000x256 4096x32000x768 16384x8000x256] [--chunk-mb 8 32 128]
"""

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import median, print_table, take_turns, write_results
from longctx import loss as L


def shape_row(tokens, vocab, hidden, chunk_mbs, repeats):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).requires_grad_()
    w = (0.02 * torch.randn(vocab, hidden, generator=g)).requires_grad_()
    y = torch.randint(0, vocab, (1, tokens), generator=g)

    def train(fn):
        def step():
            fn().backward()
            h.grad = w.grad = None
        return step

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    reference = lambda: L.causal_lm_loss(F.linear(h, w), y)  # noqa: E731
    fns = {"ref_train": train(reference), "ref_eval": no_grad(reference)}
    for mb in chunk_mbs:
        chunk = L.logits_chunk_size(vocab, None) if mb == 0 else max(256, mb * 2**20 // (4 * vocab))
        fused = lambda chunk=chunk: L.linear_cross_entropy(h, w, y, chunk_size=chunk)  # noqa: E731
        fns[f"fused{mb or ''}_train"], fns[f"fused{mb or ''}_eval"] = train(fused), no_grad(fused)
    times = take_turns(fns, repeats)
    row = {"shape": f"{tokens}x{vocab}x{hidden}"}
    row.update({f"{name}_ms": 1e3 * median(t) for name, t in times.items()})
    row["train_speedup"] = row["ref_train_ms"] / row["fused_train_ms"]
    row["eval_speedup"] = row["ref_eval_ms"] / row["fused_eval_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x8000x256", "4096x32000x768", "16384x8000x256"],
                        help="TOKENSxVOCABxHIDDEN")
    parser.add_argument("--chunk-mb", type=int, nargs="*", default=[8, 128],
                        help="other chunk sizes to compare (MiB of float32 logits) beside the default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        rows.append(shape_row(*map(int, shape.split("x")), [0, *args.chunk_mb], args.repeats))
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    print("wrote", write_results("loss", rows, default_chunk_bytes=L.LOGITS_CHUNK_BYTES, min_chunk_tokens=256))


if __name__ == "__main__":
    main()

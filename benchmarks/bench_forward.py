"""Whole-model forward with labels: longctx against transformers' LlamaForCausalLM, same config, weights and dtype.

The evaluation workload: one forward that returns the next-token loss over every position. transformers
materialises the (tokens × vocab) logits and their log-softmax; longctx computes the loss chunk by chunk
(`skip_logits=True`, longctx.loss) and, in bfloat16 on CPU, runs attention as block-wise bf16 matmuls
(`longctx.attention.blocked_attention`). Both use SDPA otherwise.
- speed: both models in one process, forwards taking turns, median of `--repeats` each (load from other processes
  slows both alike); `flops_frac` = longctx's achieved matmul FLOP/s over this machine's large-matmul rate in the
  same dtype (`common.matmul_rate`);
- memory: each implementation alone in a fresh process: peak RSS above the loaded model, one forward (on CUDA,
  where it runs when a GPU is present: peak allocated memory above the loaded model).
Targets (issue 6): 16k fp32 ≥ 1.0× tokens/s and ≤ 0.6× memory; 16k bf16 ≥ 1.1× and ≤ 0.6×; 2k fp32 ≥ 1.2×.

Usage: python -m benchmarks.bench_forward [--lengths 2048 8192 16384] [--dtypes float32 bfloat16] [--repeats 3]
"""

from benchmarks.common import (case_parser, forward_flops, matmul_rate, median, print_table, run_case, serve_case,
                               take_turns, timed, write_results)

SHAPE = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
IMPLS = ("transformers", "longctx")
MODULE = "benchmarks.bench_forward"


def build(dtype, device="cpu"):
    """{impl: model}: transformers' Llama and longctx's model with the same weights, in `dtype` on `device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.convert import from_llama

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa")).eval()
    ours = from_llama(llama).to(device, getattr(torch, dtype))
    return {"transformers": llama.to(device, getattr(torch, dtype)), "longctx": ours}


def forward_fn(impl, model, ids):
    import torch

    extra = {"skip_logits": True} if impl == "longctx" else {}

    def forward():
        with torch.no_grad():
            return float(model(ids, labels=ids, **extra).loss)

    return forward


def case(spec):
    """Speed (both models) or memory (one model, alone in this process): CPU peak RSS, or CUDA peak allocation,
    above the loaded model. `float(loss)` ends every forward, which synchronises CUDA."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, spec["length"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    if spec["measure"] == "memory":
        model = build(spec["dtype"], device)[spec["impl"]]
        if device == "cpu":
            _, peak = timed(forward_fn(spec["impl"], model, ids), repeats=0)
        else:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward_fn(spec["impl"], model, ids)()
            peak = torch.cuda.max_memory_allocated() - base
        return {"peak_mb": peak / 2**20}
    models = build(spec["dtype"], device)
    fns = {impl: forward_fn(impl, model, ids) for impl, model in models.items()}
    losses = {impl: fn() for impl, fn in fns.items()}
    times = take_turns(fns, spec["repeats"])
    return {"seconds": {impl: median(t) for impl, t in times.items()}, "losses": losses, "device": device,
            "flops": forward_flops(models["longctx"].config, spec["length"]),
            "matmul_rate": matmul_rate(spec["dtype"], device)}


def main():
    parser = case_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards of each (median), after a warm-up")
    args = parser.parse_args()
    if serve_case(args, case):
        return
    rows = []
    for dtype in args.dtypes:
        for length in args.lengths:
            spec = {"length": length, "dtype": dtype}
            speed = run_case(MODULE, {**spec, "measure": "speed", "repeats": args.repeats}, timeout=3600)
            memory = {impl: run_case(MODULE, {**spec, "measure": "memory", "impl": impl})["peak_mb"] for impl in IMPLS}
            hf_s, ours_s = speed["seconds"]["transformers"], speed["seconds"]["longctx"]
            rows.append({"device": speed["device"], "length": length, "dtype": dtype, "hf_tok_s": length / hf_s,
                         "longctx_tok_s": length / ours_s,
                         "speed_ratio": hf_s / ours_s, "hf_peak_mb": memory["transformers"],
                         "longctx_peak_mb": memory["longctx"],
                         "memory_ratio": memory["longctx"] / memory["transformers"],
                         "loss_diff": abs(speed["losses"]["longctx"] - speed["losses"]["transformers"]),
                         "longctx_gflops": speed["flops"] / ours_s / 1e9,
                         "flops_frac": speed["flops"] / ours_s / speed["matmul_rate"],
                         "matmul_gflops": speed["matmul_rate"] / 1e9})
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    name = "forward" if rows[0]["device"] == "cpu" else "forward_cuda"
    print("wrote", write_results(name, rows, shape=SHAPE, repeats=args.repeats,
                                 targets={"16384 float32": "speed >= 1.0, memory <= 0.6",
                                          "16384 bfloat16": "speed >= 1.1, memory <= 0.6",
                                          "2048 float32": "speed >= 1.2"}))


if __name__ == "__main__":
    main()

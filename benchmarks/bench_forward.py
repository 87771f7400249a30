"""Whole-model forward with labels: longctx vs transformers' LlamaForCausalLM, same config and weights, both SDPA.

Each (implementation, length) runs in a fresh process so the peak RSS above the loaded model is that forward's
alone. Usage: python -m benchmarks.bench_forward [--lengths 2048 8192 16384] [--dtype float32]
"""

import argparse
import json

from benchmarks.common import print_table, run_case, timed, write_results

SHAPE = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def build(impl, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.convert import from_llama

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa")).eval()
    model = llama if impl == "transformers" else from_llama(llama)
    return model.to(getattr(torch, dtype))


def case(spec):
    import torch

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model = build(spec["impl"], spec["dtype"])
    ids = torch.randint(0, SHAPE["vocab_size"], (1, spec["length"]), generator=torch.Generator().manual_seed(0))

    # longctx computes the loss in chunks without materialising the logits (skip_logits); transformers cannot
    extra = {} if spec["impl"] == "transformers" else {"skip_logits": True}

    def forward():
        with torch.no_grad():
            return model(ids, labels=ids, **extra).loss

    seconds, peak = timed(forward, repeats=spec.get("repeats", 2))
    n_params = sum(p.numel() for p in model.parameters())
    return {**spec, "seconds": seconds, "tokens_per_s": spec["length"] / seconds, "peak_mb": peak / 2**20,
            "loss": float(forward()), "params_m": n_params / 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(json.loads(args.case))))
        return
    rows = []
    for length in args.lengths:
        pair = {impl: run_case("benchmarks.bench_forward", {"impl": impl, "length": length, "dtype": args.dtype})
                for impl in ("transformers", "longctx")}
        hf, ours = pair["transformers"], pair["longctx"]
        rows.append({"length": length, "dtype": args.dtype, "hf_tok_s": hf["tokens_per_s"],
                     "longctx_tok_s": ours["tokens_per_s"], "speed_ratio": ours["tokens_per_s"] / hf["tokens_per_s"],
                     "hf_peak_mb": hf["peak_mb"], "longctx_peak_mb": ours["peak_mb"],
                     "memory_ratio": ours["peak_mb"] / hf["peak_mb"], "loss_diff": abs(ours["loss"] - hf["loss"])})
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    print("wrote", write_results(f"forward_{args.dtype}", rows, shape=SHAPE))


if __name__ == "__main__":
    main()

"""A left-padded batch against the same batch unpadded: does padding cost an (L × L) mask?

longctx's `sdpa` runs a padded prefill of at least `PER_ROW_QUERIES` tokens row by row, each row causal over its
real tokens (`AttentionMask.real_spans`); `--dense` (PER_ROW_QUERIES raised out of reach) gives the masked SDPA call
it replaces. A 4-layer model (hidden 256, 4 heads of 64), batch 2 (one row `--pad` tokens shorter), float32,
forward without the output head's full logits (`logits_to_keep=1`); each case in a fresh process: seconds of one
forward after a warm-up on a short input, and peak RSS above the loaded model.

Usage: python -m benchmarks.bench_padding [--lengths 2048 8192 16384] [--pad 100]
"""

from benchmarks.common import case_parser, print_table, run_case, serve_case, timed, write_results

MODULE = "benchmarks.bench_padding"
MODES = ("unpadded", "padded", "padded_dense")


def case(spec):
    import torch

    import longctx.attention as attention
    from longctx import LongCtxConfig, LongCtxForCausalLM

    torch.set_num_threads(2)
    if spec["mode"] == "padded_dense":
        attention.PER_ROW_QUERIES = 2**62
    torch.manual_seed(0)
    length = spec["length"]
    config = LongCtxConfig(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, max_position_embeddings=length)
    model = LongCtxForCausalLM(config).eval()
    ids = torch.randint(1, 8000, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :spec["pad"]] = 0  # row 1 left-padded
    kwargs = {} if spec["mode"] == "unpadded" else {"attention_mask": mask}

    def forward():
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1, **kwargs)

    with torch.no_grad():  # warm-up on a short input, so the peak below is the long forward's
        model(ids[:, :256], use_cache=False, logits_to_keep=1)
    seconds, peak = timed(forward, repeats=1)
    return {"seconds": seconds, "peak_mb": peak / 2**20}


def main():
    parser = case_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--pad", type=int, default=100)
    args = parser.parse_args()
    if serve_case(args, case):
        return
    rows = []
    for length in args.lengths:
        row = {"length": length}
        for mode in MODES:
            result = run_case(MODULE, {"length": length, "pad": args.pad, "mode": mode}, timeout=3600)
            row[f"{mode}_s"], row[f"{mode}_mb"] = result["seconds"], result["peak_mb"]
        row["padded_vs_unpadded_time"] = row["padded_s"] / row["unpadded_s"]
        row["dense_vs_row_time"] = row["padded_dense_s"] / row["padded_s"]
        row["dense_vs_row_memory"] = row["padded_dense_mb"] / row["padded_mb"]
        rows.append(row)
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    print("wrote", write_results("padding", rows, pad=args.pad))


if __name__ == "__main__":
    main()

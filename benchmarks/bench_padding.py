"""Masks in prefills: does a padded batch, or a prefill in chunks against a cache, cost an (L × L) mask?

longctx's `sdpa` runs a padded prefill of at least `per_row_queries` tokens row by row, each row causal over its
real tokens (`AttentionMask.real_spans`); `padded_dense` (`per_row_queries` and `mask_block_elements` of
`longctx.attention.AttentionSettings` out of reach) is the one masked SDPA call it replaces. A prefill in chunks of
`--chunk` tokens through the cache needs a mask (its queries are the last of the keys): `chunked` runs it a block
of query rows at a time (`mask_block_elements`), `chunked_whole_mask` as one call with the whole (chunk × keys)
mask. A 4-layer model (hidden 256, 4 heads of 64), batch 2 (for `padded` one row `--pad` tokens shorter),
float32, no full logits (`logits_to_keep=1`); each case in a fresh process: seconds of one forward (or chunked
prefill) after a warm-up on a short input, and peak RSS above the loaded model.

Usage: python -m benchmarks.bench_padding [--lengths 2048 8192 16384] [--pad 100] [--chunk 4096]
       [--chunk-lengths 8192]
"""

from benchmarks.common import case_parser, print_table, run_case, serve_case, timed, write_results

MODULE = "benchmarks.bench_padding"
MODES = ("unpadded", "padded", "padded_dense")
CHUNKED_MODES = ("chunked", "chunked_whole_mask")


def case(spec):
    import torch

    import longctx.attention as attention
    from longctx import LongCtxConfig, LongCtxForCausalLM
    from longctx.modeling_longctx import output_cache

    torch.set_num_threads(2)
    whole_mask = {}
    if spec["mode"] in ("padded_dense", "chunked_whole_mask"):  # one SDPA call with the whole mask
        whole_mask = {"per_row_queries": 2**62, "mask_block_elements": 2**62}
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
        with torch.no_grad(), attention.attention_settings(**whole_mask):
            if spec["mode"] in CHUNKED_MODES:
                cache = None
                for start in range(0, length, spec["chunk"]):
                    cache = output_cache(model(ids[:, start:start + spec["chunk"]], cache=cache, use_cache=True,
                                               logits_to_keep=1))
            else:
                model(ids, use_cache=False, logits_to_keep=1, **kwargs)

    with torch.no_grad():  # warm-up on a short input, so the peak below is the long forward's
        model(ids[:, :256], use_cache=False, logits_to_keep=1)
    seconds, peak = timed(forward, repeats=spec.get("repeats", 1))
    return {"seconds": seconds, "peak_mb": peak / 2**20}


def main():
    parser = case_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--pad", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=4096, help="chunked prefill: tokens per chunk")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the one that measures memory (best)")
    parser.add_argument("--chunk-lengths", type=int, nargs="*", default=None,
                        help="lengths with the chunked modes (default: every length above --chunk)")
    args = parser.parse_args()
    if serve_case(args, case):
        return
    rows = []
    for length in args.lengths:
        row = {"length": length}
        chunked = length > args.chunk and (args.chunk_lengths is None or length in args.chunk_lengths)
        for mode in MODES + (CHUNKED_MODES if chunked else ()):
            result = run_case(MODULE, {"length": length, "pad": args.pad, "mode": mode, "chunk": args.chunk,
                                       "repeats": args.repeats}, timeout=3600)
            row[f"{mode}_s"], row[f"{mode}_mb"] = result["seconds"], result["peak_mb"]
        row["padded_vs_unpadded_time"] = row["padded_s"] / row["unpadded_s"]
        row["dense_vs_row_time"] = row["padded_dense_s"] / row["padded_s"]
        row["dense_vs_row_memory"] = row["padded_dense_mb"] / row["padded_mb"]
        if "chunked_s" in row:
            row["whole_vs_blocks_time"] = row["chunked_whole_mask_s"] / row["chunked_s"]
            row["whole_vs_blocks_memory"] = row["chunked_whole_mask_mb"] / row["chunked_mb"]
        rows.append(row)
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(dict.fromkeys(column for row in rows for column in row)))
    print("wrote", write_results("padding", rows, pad=args.pad, chunk=args.chunk))


if __name__ == "__main__":
    main()

"""ReRoPE / Leaky ReRoPE prefill against plain RoPE on SDPA: time and peak memory at 4k, 8k, 16k tokens.

ReRoPE needs two score matrices and cannot use a fused kernel (methods.md §8); longctx computes them a block of
query rows at a time (`longctx.attention.SCORE_BLOCK_ELEMENTS` scores per block), so memory grows linearly with
length. Targets: memory ≤ 2×, time ≤ 2.5× plain RoPE on SDPA. The model is the decoder stack alone (no output
head, whose logits would dominate memory). Peak memory: one forward per fresh process, peak RSS above the loaded
model. Time: default and scheme alternate in one process, best of `--repeats` each, so load from other processes
hits both alike.

Usage: python -m benchmarks.bench_rerope [--lengths 4096 8192 16384] [--block-elements 4194304 ...]
"""

import itertools
import os

from benchmarks.common import case_parser, print_table, run_case, serve_case, take_turns, timed, write_results

SHAPE = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2048)
SCHEMES = {
    "default": {"rope_type": "default"},
    "rerope": {"rope_type": "rerope", "rerope_window": 512},
    "leaky-rerope": {"rope_type": "leaky-rerope", "rerope_window": 512, "factor": 16.0},
}
MODULE = "benchmarks.bench_rerope"


def build(scheme, block_elements):
    import torch

    import longctx.attention
    from longctx import LongCtxConfig, LongCtxModel

    if block_elements:
        longctx.attention.SCORE_BLOCK_ELEMENTS = block_elements
    torch.manual_seed(0)
    config = LongCtxConfig(**SHAPE, rope_parameters=SCHEMES[scheme], attn_implementation="sdpa")
    return LongCtxModel(config).eval()


def forward_fn(model, length):
    import torch

    ids = torch.randint(0, SHAPE["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            return model(ids, use_cache=False).last_hidden_state

    return forward


def case(spec):
    """`memory`: one scheme, one forward in this fresh process, peak RSS above the loaded model. `time`: the
    default and the scheme in one process, alternating, best of `repeats` each (robust to load from others)."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["measure"] == "memory":
        _, peak = timed(forward_fn(build(spec["scheme"], spec["block_elements"]), spec["length"]), repeats=0)
        return {**spec, "peak_mb": peak / 2**20}
    runs = {name: forward_fn(build(name, spec["block_elements"]), spec["length"])
            for name in ("default", spec["scheme"])}
    best = {name: times[0] for name, times in take_turns(runs, spec["repeats"]).items()}
    return {**spec, "default_s": best["default"], "scheme_s": best[spec["scheme"]]}


def main():
    parser = case_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--schemes", nargs="+", default=["rerope", "leaky-rerope"], choices=list(SCHEMES)[1:])
    parser.add_argument("--block-elements", type=int, nargs="+", default=[0],
                        help="SCORE_BLOCK_ELEMENTS values to sweep (0 = the library default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if serve_case(args, case):
        return
    import longctx.attention

    rows = []
    for length in args.lengths:
        common = {"length": length, "threads": args.threads}
        base_mb = run_case(MODULE, {**common, "measure": "memory", "scheme": "default", "block_elements": 0})["peak_mb"]
        for scheme, block in itertools.product(args.schemes, args.block_elements):
            spec = {**common, "scheme": scheme, "block_elements": block}
            mb = run_case(MODULE, {**spec, "measure": "memory"})["peak_mb"]
            times = run_case(MODULE, {**spec, "measure": "time", "repeats": args.repeats})
            rows.append({"length": length, "scheme": scheme,
                         "block_elements": block or longctx.attention.SCORE_BLOCK_ELEMENTS,
                         "default_s": times["default_s"], "scheme_s": times["scheme_s"],
                         "time_ratio": times["scheme_s"] / times["default_s"], "default_mb": base_mb,
                         "scheme_mb": mb, "memory_ratio": mb / base_mb, "load": os.getloadavg()[0]})
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    path = write_results("rerope", rows, shape=SHAPE, schemes={s: SCHEMES[s] for s in ["default", *args.schemes]},
                         targets={"memory_ratio": 2.0, "time_ratio": 2.5}, threads=args.threads)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""ReRoPE / Leaky ReRoPE prefill against plain RoPE on SDPA: time and peak memory at 4k, 8k, 16k tokens.

ReRoPE needs two score matrices (methods.md §8). The block-wise path computes them a block of query rows at a time
(`AttentionSettings.score_block_elements` scores per block), so memory grows linearly with length. Targets: memory
≤ 2×, time ≤ 2.5× plain RoPE on SDPA. The model is the decoder stack alone (no output
head, whose logits would dominate memory). Peak memory: one forward per fresh process, peak RSS above the loaded
model. Time: default and scheme alternate in one process, best of `--repeats` each, so load from other processes
hits both alike.

`--paths`: ReRoPE's path. "fused" is what the model takes in inference (`longctx.rerope_fused`, issue 17; target ≤
1.3× time at 16k, memory linear in length: on CPU torch's flash kernel, two passes merged by their LSEs);
"blockwise" the path it takes in training (`fused_rerope=False`); "flex" compiles flex attention (on CPU one pass over
the keys laid out twice). Memory of a fused row: the peak of a forward after two short ones (flex compiles in
those), against the default measured the same way.

Usage: python -m benchmarks.bench_rerope [--lengths 4096 8192 16384] [--block-elements 4194304 ...]
                                         [--paths blockwise fused flex]
"""

import itertools
import os
import re
from pathlib import Path

from benchmarks.common import (case_parser, current_rss_bytes, print_table, run_case, serve_case, take_turns, timed,
                               write_results)

SHAPE = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2048)
SCHEMES = {
    "default": {"rope_type": "default"},
    "rerope": {"rope_type": "rerope", "rerope_window": 512},
    "leaky-rerope": {"rope_type": "leaky-rerope", "rerope_window": 512, "factor": 16.0},
}
PATHS = ("blockwise", "fused", "flex")  # ReRoPE's attention path
MODULE = "benchmarks.bench_rerope"


def route(path):
    """The `AttentionSettings` changes for ReRoPE's path: "blockwise" turns the fused path off, "fused" is the
    library's choice (from 384 queries: the fused path), "flex" that path with `rerope_fused_attention`'s backend
    "flex" in place of "auto" (which on CPU takes torch's flash kernel)."""
    if path == "flex":
        import functools

        import longctx.attention as attention
        import longctx.rerope_fused as fused

        attention.rerope_fused_path = functools.partial(fused.rerope_fused_path, backend="flex")
    return {"fused_rerope": False} if path == "blockwise" else {}


def warm_peak_bytes(model, length):
    """Peak RSS of a forward of `length` tokens above the RSS before it, after forwards of 512 and 768 tokens (flex
    attention compiles in them, for any length from the second on; Linux: the peak is then reset through
    /proc/self/clear_refs): the kernel's memory, not the compiler's."""
    for warm_up in (512, 768):
        forward_fn(model, warm_up)()
    Path("/proc/self/clear_refs").write_text("5")
    base = current_rss_bytes()
    forward_fn(model, length)()
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024 - base


def build(scheme):
    import torch

    from longctx import LongCtxConfig, LongCtxModel

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

    from longctx.attention import attention_settings

    torch.set_num_threads(spec["threads"])
    changes = route(spec.get("path", "blockwise"))
    if spec["block_elements"]:
        changes["score_block_elements"] = spec["block_elements"]
    with attention_settings(**changes):
        if spec["measure"] == "memory":
            model = build(spec["scheme"])
            peak = (warm_peak_bytes(model, spec["length"]) if spec.get("warm")
                    else timed(forward_fn(model, spec["length"]), repeats=0)[1])
            return {**spec, "peak_mb": peak / 2**20}
        runs = {name: forward_fn(build(name), spec["length"]) for name in ("default", spec["scheme"])}
        best = {name: times[0] for name, times in take_turns(runs, spec["repeats"]).items()}
    return {**spec, "default_s": best["default"], "scheme_s": best[spec["scheme"]]}


def main():
    parser = case_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--schemes", nargs="+", default=["rerope", "leaky-rerope"], choices=list(SCHEMES)[1:])
    parser.add_argument("--block-elements", type=int, nargs="+", default=[0],
                        help="AttentionSettings.score_block_elements values to sweep (0 = the library default)")
    parser.add_argument("--paths", nargs="+", default=["blockwise", "fused"], choices=PATHS,
                        help="ReRoPE's attention paths to measure (fused, flex: longctx.rerope_fused)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if serve_case(args, case):
        return
    from longctx.attention import DEFAULT_ATTENTION_SETTINGS

    rows = []
    for length in args.lengths:
        common = {"length": length, "threads": args.threads}
        base_mb = run_case(MODULE, {**common, "measure": "memory", "scheme": "default", "block_elements": 0})["peak_mb"]
        warm_mb = None  # the default's peak after two short forwards: what the fused rows' memory is compared with
        if set(args.paths) - {"blockwise"}:
            warm_mb = run_case(MODULE, {**common, "measure": "memory", "scheme": "default", "block_elements": 0,
                                        "warm": True})["peak_mb"]
        for scheme, path, block in itertools.product(args.schemes, args.paths, args.block_elements):
            if path != "blockwise" and block != args.block_elements[0]:
                continue  # the block budget is the block-wise path's
            warm = path != "blockwise"
            spec = {**common, "scheme": scheme, "path": path, "block_elements": block}
            mb = run_case(MODULE, {**spec, "measure": "memory", "warm": warm})["peak_mb"]
            times = run_case(MODULE, {**spec, "measure": "time", "repeats": args.repeats})
            default_mb = warm_mb if warm else base_mb
            rows.append({"length": length, "scheme": scheme, "path": path,
                         "block_elements": block or DEFAULT_ATTENTION_SETTINGS.score_block_elements,
                         "default_s": times["default_s"], "scheme_s": times["scheme_s"],
                         "time_ratio": times["scheme_s"] / times["default_s"], "default_mb": default_mb,
                         "scheme_mb": mb, "memory_ratio": mb / default_mb, "load": os.getloadavg()[0]})
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    path = write_results("rerope", rows, shape=SHAPE, schemes={s: SCHEMES[s] for s in ["default", *args.schemes]},
                         targets={"memory_ratio": 2.0, "time_ratio": 2.5}, threads=args.threads)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

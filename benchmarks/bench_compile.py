"""Does torch.compile pay? longctx and transformers' LlamaForCausalLM, each eager and compiled (inductor), same
weights, in one process taking turns: the forward with labels of `bench_forward`, the training step of
`bench_train`, and decoding — single-token forwards over a cache, and greedy `generate()`: eager with the default
growing cache, compiled the way transformers documents it, a `StaticCache` (`cache_implementation="static"`) and a
fullgraph-compiled forward, one graph for every decoding step.

Reports the first call (compilation + one run), the median time of each of the four, and the ratios: what compiling
gains each model, longctx against transformers when both are compiled, and each at its best (the faster of its
eager and compiled runs). `model.compile()` needs a C++ compiler on CPU (inductor).

Usage: python -m benchmarks.bench_compile [--forward 2048:float32 2048:bfloat16 16384:float32 16384:bfloat16]
                                          [--train small:2048] [--decode 512:32] [--generate 512:64]
                                          [--repeats 4]
"""

import argparse
import time

from benchmarks.common import median, print_table, take_turns, write_results

VARIANTS = ("transformers", "transformers_compiled", "longctx", "longctx_compiled")


def forward_variants(length, dtype):
    """{variant: forward-with-labels function}."""
    import torch

    from benchmarks.bench_forward import SHAPE, build, forward_fn

    ids = torch.randint(0, SHAPE["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
    eager, compiled = build(dtype), build(dtype)
    fns = {}
    for impl in ("transformers", "longctx"):
        compiled[impl].compile()
        fns[impl] = forward_fn(impl, eager[impl], ids)
        fns[f"{impl}_compiled"] = forward_fn(impl, compiled[impl], ids)
    return fns


def train_variants(preset, seq_len):
    """{variant: training-step function} at micro-batch 1 (the pipeline's step, `compile: true` for compiled)."""
    from benchmarks.bench_train import make_step

    return {variant: make_step(variant.removesuffix("_compiled"), {"preset": preset, "seq_len": seq_len,
                                                                   "micro_batch": 1,
                                                                   "compile": variant.endswith("_compiled")}, "cpu")[0]
            for variant in VARIANTS}


def decode_variants(context, tokens, steps_only):
    """{variant: function}, batch 1, fp32: `tokens` single-token forwards after a `context`-token prefill (the cache
    cropped back to the prefill before each call; `steps_only`), or greedy `generate()` of `tokens` new tokens after
    a `context`-token prompt."""
    import torch
    from transformers import DynamicCache, StaticCache

    from benchmarks.bench_forward import SHAPE, build

    ids = torch.randint(0, SHAPE["vocab_size"], (1, context + tokens), generator=torch.Generator().manual_seed(0))
    eager, compiled = build("float32"), build("float32")
    fns = {}
    for impl in ("transformers", "longctx"):
        compiled[impl].forward = torch.compile(compiled[impl].forward, fullgraph=True)
        if steps_only:
            for name, model in ((impl, eager[impl]), (f"{impl}_compiled", compiled[impl])):
                cache = (DynamicCache(config=model.config) if model is eager[impl]
                         else StaticCache(config=model.config, max_cache_len=context + tokens))
                fns[name] = steps_fn(model, ids, context, cache)
        else:
            fns[impl] = generate_fn(eager[impl], ids[:, :context], tokens)
            fns[f"{impl}_compiled"] = generate_fn(compiled[impl], ids[:, :context], tokens,
                                                  cache_implementation="static")
    return fns


def steps_fn(model, ids, context, cache):
    """One call: crop `cache` back to the first `context` tokens (prefilled on the first call), then feed the
    remaining tokens of `ids` one at a time. Positions are passed, as generate() does."""
    import torch

    def steps():
        with torch.no_grad():
            if cache.get_seq_length() == 0:
                model(ids[:, :context], cache=cache, position_ids=torch.arange(context)[None])
            extra = int(cache.get_seq_length()) - context
            if extra:
                cache.crop(-extra)  # negative: remove that many tokens
            for t in range(context, ids.shape[1]):
                model(ids[:, t:t + 1], cache=cache, position_ids=torch.tensor([[t]]))

    return steps


def generate_fn(model, ids, new_tokens, **kwargs):
    import torch

    def generate():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, **kwargs)
        assert out.shape[1] == ids.shape[1] + new_tokens

    return generate


def measure(workload, make_fns, repeats):
    import torch

    torch._dynamo.reset()  # each workload compiles afresh, within dynamo's recompile limit
    fns, row = make_fns(), dict(workload)
    for variant, fn in fns.items():  # the first call of a compiled model compiles it
        start = time.perf_counter()
        fn()
        row[f"{variant}_first_s"] = time.perf_counter() - start
    times = {variant: median(t) for variant, t in take_turns(fns, repeats).items()}
    row.update({f"{variant}_ms": 1e3 * t for variant, t in times.items()})
    hf, ours = times["transformers"], times["longctx"]
    hf_c, ours_c = times["transformers_compiled"], times["longctx_compiled"]
    row.update({"hf_gain": hf / hf_c, "longctx_gain": ours / ours_c, "eager_ratio": hf / ours,
                "compiled_ratio": hf_c / ours_c, "best_ratio": min(hf, hf_c) / min(ours, ours_c)})
    return row


def main():
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forward", nargs="*", help="LENGTH:DTYPE",
                        default=["2048:float32", "2048:bfloat16", "16384:float32", "16384:bfloat16"])
    parser.add_argument("--train", nargs="*", default=["small:2048"], help="PRESET:SEQ_LEN, micro-batch 1, fp32")
    parser.add_argument("--decode", nargs="*", default=["512:32"], help="CONTEXT:STEPS, batch 1, fp32")
    parser.add_argument("--generate", nargs="*", default=["512:64"], help="CONTEXT:NEW_TOKENS, batch 1, fp32")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for spec in args.forward:
        length, dtype = spec.split(":")
        rows.append(measure({"workload": f"forward+labels {length} {dtype}"},
                            lambda: forward_variants(int(length), dtype), args.repeats))
        print_table(rows[-1:], list(rows[-1]))
    for spec in args.train:
        preset, seq_len = spec.split(":")
        rows.append(measure({"workload": f"train step {preset} 1x{seq_len} float32"},
                            lambda: train_variants(preset, int(seq_len)), args.repeats))
        print_table(rows[-1:], list(rows[-1]))
    for steps_only, specs in ((True, args.decode), (False, args.generate)):
        for spec in specs:
            context, tokens = (int(n) for n in spec.split(":"))
            label = f"{tokens} decoding steps" if steps_only else f"generate {tokens} tokens"
            rows.append(measure({"workload": f"{label} after {context} fp32", "tokens": tokens},
                                lambda: decode_variants(context, tokens, steps_only), args.repeats))
            rows[-1].update({f"{v}_tok_s": tokens / rows[-1][f"{v}_ms"] * 1e3 for v in VARIANTS})
            print_table(rows[-1:], list(rows[-1]))
    print("\nms: median per call; gain: eager / compiled; ratios: transformers time / longctx time")
    print_table(rows, ["workload", *[f"{v}_ms" for v in VARIANTS], "hf_gain", "longctx_gain", "eager_ratio",
                       "compiled_ratio", "best_ratio"])
    print("\nfirst call (compile + run), s")
    print_table(rows, ["workload", *[f"{v}_first_s" for v in VARIANTS]])
    print("\nwrote", write_results("compile", rows, repeats=args.repeats, threads=args.threads))


if __name__ == "__main__":
    main()

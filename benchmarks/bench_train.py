"""Training throughput and memory: longctx vs transformers' LlamaForCausalLM of the same shape, in the training step.

For the `tiny` and `small` presets: the same weights (`from_llama`), the same batch (`micro_batch_size` windows of
`seq_len` tokens with position_ids), the pipeline's own step (train.loop.lm_loss -> backward -> clip -> AdamW),
longctx with the preset's `chunked_loss` (the fused loss of longctx.loss).
- speed: both models in one process, their steps alternating, median step time of each — other work on the
  machine slows both alike, so the ratio survives a busy machine better than two separate runs would;
- memory: each implementation alone in a fresh process: peak RSS above the RSS before the first step (CPU),
  torch.cuda.max_memory_allocated (GPU).

Usage: python -m benchmarks.bench_train [--presets tiny small] [--steps 8] [--profile]
"""

from benchmarks.common import (case_parser, current_rss_bytes, forward_flops, matmul_rate, median, peak_rss_bytes,
                               print_table, run_case, serve_case, take_turns, write_results)

IMPLS = ("transformers", "longctx")


def build(impl, preset, seq_len=None, micro_batch=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import train
    from longctx.convert import from_llama

    config = train.load_preset(preset)
    config["seq_len"] = seq_len or config["seq_len"]
    config["micro_batch_size"] = micro_batch or config["micro_batch_size"]
    fields = {k: v for k, v in config["model"].items() if k != "rope_parameters"}
    llama_config = LlamaConfig(**fields, vocab_size=config["vocab_size"], max_position_embeddings=config["seq_len"],
                               rope_parameters=config["model"]["rope_parameters"], attn_implementation="sdpa")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config)
    model = llama if impl == "transformers" else from_llama(llama)
    return model.train(), config


def make_step(impl, spec, device):
    """(step function returning the loss, model, config) for one implementation, with its own AdamW."""
    import torch

    from train.loop import lm_loss, param_groups

    autocast = spec.get("autocast")
    model, config = build(impl, spec["preset"], spec.get("seq_len"), spec.get("micro_batch"))
    model.to(device)
    if spec.get("compile"):  # in place (the pipeline's `compile: true`); the first step compiles
        model.compile()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    batch_size, seq_len = config["micro_batch_size"], config["seq_len"]
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, config["vocab_size"], (batch_size, seq_len), generator=generator),
             "position_ids": torch.arange(seq_len).expand(batch_size, -1)}
    dtype = getattr(torch, autocast or "float32")
    chunked = config["chunked_loss"] if impl == "longctx" else None  # the preset's choice, as in training

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = lm_loss(model, batch, device, chunked)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return step, model, config


def speed_case(spec):
    """Both implementations, steps alternating; median seconds per step of each, and the first losses."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    built = {impl: make_step(impl, spec, device) for impl in IMPLS}
    steps = {impl: step for impl, (step, _, _) in built.items()}
    _, model, config = built["longctx"]
    first = {impl: steps[impl]() for impl in IMPLS}
    times = take_turns(steps, spec["steps"])  # one more warm-up step each, then alternating
    result = {"device": device, "batch": config["micro_batch_size"], "seq_len": config["seq_len"],
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "first_loss_diff": abs(first["longctx"] - first["transformers"])}
    for impl in IMPLS:
        result[f"{impl}_step_s"] = median(times[impl])
    # training ≈ 3 forward passes of matmul FLOPs (forward, and the two products of each backward)
    result["flops"] = 3 * forward_flops(model.config, config["seq_len"], config["micro_batch_size"])
    result["matmul_rate"] = matmul_rate(spec.get("autocast") or "float32", device)
    if spec.get("profile"):
        for impl in IMPLS:
            with torch.profiler.profile() as prof:
                steps[impl]()
            result[f"{impl}_profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return result


def memory_case(spec):
    """One implementation alone: peak memory of a few training steps."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    step, _, _ = make_step(spec["impl"], spec, device)
    base = current_rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes() - base
    return {"peak_mb": peak / 2**20}


def case(spec):
    return speed_case(spec) if spec["kind"] == "speed" else memory_case(spec)


def main():
    parser = case_parser(__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each, after one warm-up (median)")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="both models compiled (model.compile(), inductor)")
    parser.add_argument("--seq-len", type=int, help="override the preset's seq_len (e.g. 2048)")
    parser.add_argument("--micro-batch", type=int, help="override the preset's micro_batch_size")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for each model")
    args = parser.parse_args()
    if serve_case(args, case):
        return
    rows = []
    for preset in args.presets:
        common = {"preset": preset, "autocast": args.autocast, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                  "compile": args.compile}
        speed = run_case("benchmarks.bench_train", {**common, "kind": "speed", "steps": args.steps,
                                                   "profile": args.profile}, timeout=3600)
        memory = {impl: run_case("benchmarks.bench_train", {**common, "kind": "memory", "impl": impl})["peak_mb"]
                  for impl in IMPLS}
        if args.profile:
            for impl in IMPLS:
                print(f"--- {preset} / {impl}\n{speed.pop(f'{impl}_profile')}")
        tokens = speed["batch"] * speed["seq_len"]
        hf_tok_s, ours_tok_s = tokens / speed["transformers_step_s"], tokens / speed["longctx_step_s"]
        rows.append({"preset": preset, "device": speed["device"], "params_m": speed["params_m"],
                     "batch_x_seq": f"{speed['batch']}x{speed['seq_len']}", "hf_tok_s": hf_tok_s,
                     "longctx_tok_s": ours_tok_s, "speed_ratio": ours_tok_s / hf_tok_s,
                     "hf_peak_mb": memory["transformers"], "longctx_peak_mb": memory["longctx"],
                     "memory_ratio": memory["longctx"] / memory["transformers"],
                     "first_loss_diff": speed["first_loss_diff"],
                     "longctx_gflops": speed["flops"] / speed["longctx_step_s"] / 1e9,
                     "flops_frac": speed["flops"] / speed["longctx_step_s"] / speed["matmul_rate"]})
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    name = "_".join(["train", *([] if rows[0]["device"] == "cpu" else [rows[0]["device"]]),
                     *([f"seq{args.seq_len}"] if args.seq_len else []), *([args.autocast] if args.autocast else []),
                     *(["compiled"] if args.compile else [])])
    print("wrote", write_results(name, rows, steps=args.steps, autocast=args.autocast, seq_len=args.seq_len,
                                 compiled=args.compile,
                                 micro_batch=args.micro_batch, target={"small, 2k tokens": "speed >= 1.2"}))


if __name__ == "__main__":
    main()

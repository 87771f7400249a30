"""Shared benchmark plumbing: one measurement per fresh subprocess (clean peak RSS), tables, JSON results."""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}, torch {torch.__version__}"


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timed(fn, repeats=2):
    """Run `fn` once for the peak-memory high-water mark, then `repeats` times; return (best seconds, peak bytes
    above the RSS before the first run)."""
    base = current_rss_bytes()
    start = time.perf_counter()
    fn()
    times = [time.perf_counter() - start]
    peak = peak_rss_bytes() - base
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), peak


def take_turns(fns: dict, repeats: int, clock=time.perf_counter) -> dict:
    """{name: sorted seconds of `repeats` runs}: one warm-up each, then the functions take turns, so load from other
    processes falls on all of them alike. Use [0] for the best run, [len // 2] for the median."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: sorted(values) for name, values in times.items()}


def median(values):
    return sorted(values)[len(values) // 2]


def matmul_rate(dtype="float32", device="cpu", size=None, repeats=5) -> float:
    """This machine's large-matmul rate in FLOP/s (best of `repeats` (size × size) products; on CPU with this
    process's threads): the denominator of every "fraction of matmul peak" in BENCHMARKS.md."""
    import torch

    size = size or (2048 if device == "cpu" else 8192)
    a, b = (torch.randn(size, size, device=device).to(getattr(torch, dtype)) for _ in range(2))

    def product():
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * size**3 / take_turns({"mm": product}, repeats)["mm"][0]


def forward_flops(config, tokens: int, batch: int = 1) -> float:
    """Matmul FLOPs of one causal-LM forward over `batch` sequences of `tokens`: 2 × (projection and head
    parameters) per token, plus causal attention (q kᵀ and p v over the L(L+1)/2 visible pairs), per layer."""
    hidden, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    attention = 2 * hidden * heads * head_dim + 2 * hidden * config.num_key_value_heads * head_dim  # q, o; k, v
    lru = 4 * hidden * config.lru_state_size  # B and C, real and imaginary parts
    attention_layers = config.block_types.count("attention")
    params = (attention_layers * attention + (config.num_hidden_layers - attention_layers) * lru
              + config.num_hidden_layers * 3 * hidden * config.intermediate_size + hidden * config.vocab_size)
    pairs = tokens * (tokens + 1) / 2
    return batch * (2 * params * tokens + attention_layers * 4 * pairs * heads * head_dim)


def case_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser of a script whose cases `run_case` runs in fresh processes (the hidden `--case JSON`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser


def serve_case(args, case) -> bool:
    """In a process `run_case` started: run `case(spec)`, print its JSON result as the last line, return True."""
    if not args.case:
        return False
    print(json.dumps(case(json.loads(args.case))))
    return True


def run_case(module: str, case: dict, timeout=900) -> dict:
    """Run `python -m module --case JSON` in a fresh process; it prints one JSON line as its last output."""
    out = subprocess.run([sys.executable, "-m", module, "--case", json.dumps(case)], capture_output=True, text=True,
                         timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"{module} {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], columns: list[str]):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_results(name: str, rows: list[dict], **meta) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "date": date.today().isoformat(), "machine": machine(),
               "load_before": os.getloadavg()[0],
               "command": " ".join(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}"] + sys.argv[1:]),
               **meta, "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path

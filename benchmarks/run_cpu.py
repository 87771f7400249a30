"""`make bench`: the CPU benchmark set, one script after another, each printing its table and writing
benchmarks/results/NAME.json; then a summary of the issue's targets from those files. Under 15 minutes on a
2-core CPU once the default model is cached (the first run trains it: about 3 more minutes).

Usage: python -m benchmarks.run_cpu [--only attention forward ...]
"""

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import RESULTS_DIR

# name -> arguments; each is `python -m benchmarks.bench_NAME ARGS`. Fewer repeats than the BENCHMARKS.md tables
# (their commands are there): the set stays under 15 minutes on a 2-core VM that runs slow (16.9 min with more).
SUITE = {
    "attention": ["--lengths", "1024", "2048", "4096", "8192", "16384", "32768", "--repeats", "1"],
    "forward": ["--lengths", "2048", "8192", "16384", "--repeats", "2"],
    "train": ["--presets", "tiny", "small", "--steps", "4"],
    "loss": ["--shapes", "4096x8000x256", "4096x32000x768", "--chunk-mb", "--repeats", "2"],
    "rerope": ["--lengths", "4096", "16384", "--repeats", "1"],
    "lru": ["--lengths", "1024", "4096", "16384", "65536", "--chunk-sizes"],
    "padding": ["--lengths", "2048", "8192", "16384", "--chunk-lengths", "8192", "--repeats", "0"],
    "decode": ["--contexts", "1024", "4096", "16384", "32768", "--steps", "16"],
    "eval": ["--lengths", "1x", "4x", "16x", "--repeats", "2"],
    "precision": ["--model", "default", "--length", "4096", "--windows", "2"],
}


def load(name):
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def summary():
    """(target, measured, met) rows from the result files."""
    rows = []
    forward = {(r["length"], r["dtype"]): r for r in load("forward")}
    for (length, dtype), speed, memory in (((16384, "float32"), 1.0, 0.6), ((16384, "bfloat16"), 1.1, 0.6),
                                           ((2048, "float32"), 1.2, None)):
        r = forward.get((length, dtype))
        if r:
            met = r["speed_ratio"] >= speed and (memory is None or r["memory_ratio"] <= memory)
            rows.append((f"forward+labels {length} {dtype}: >= {speed}x tok/s" + (f", <= {memory}x memory" if memory
                         else ""), f"{r['speed_ratio']:.2f}x, {r['memory_ratio']:.2f}x memory", met))
    for r in load("train"):
        rows.append((f"training step {r['preset']} ({r['batch_x_seq']}): >= 1.2x tok/s",
                     f"{r['speed_ratio']:.2f}x", r["speed_ratio"] >= 1.2))
    for r in load("rerope"):
        if r["length"] == 16384:
            rows.append((f"{r['scheme']} prefill 16k: <= 2.5x time, <= 2x memory",
                         f"{r['time_ratio']:.2f}x, {r['memory_ratio']:.2f}x", r["time_ratio"] <= 2.5
                         and r["memory_ratio"] <= 2))
    for r in load("lru"):
        for kind, label in (("reused", "into a reused output"), ("native", "fresh output"),
                            ("chunked", "chunked, fresh output")):
            if r["length"] == 16384 and r.get(f"{kind}_loop_x"):
                loop_x, floor_x = r[f"{kind}_loop_x"], r[f"{kind}_floor_x"]
                rows.append((f"LRU scan 16k ({label}): >= 50x the loop, <= 4x the elementwise floor",
                             f"{loop_x:.1f}x, {floor_x:.1f}x", loop_x >= 50 and floor_x <= 4))
    for r in load("precision_default"):
        if r["attention"].startswith("blocked"):
            rows.append(("bf16 perplexity within 0.5% of fp32", f"{r['vs_fp32_pct']:+.3f}%",
                         abs(r["vs_fp32_pct"]) <= 0.5))
    return rows


def run_suite(suite, names, summary_rows):
    """Run `python -m benchmarks.bench_SCRIPT ARGS` for each name (suite: name -> (script, args)), then print the
    time each took and the targets met / not met."""
    durations = {}
    for name in names:
        script, arguments = suite[name] if isinstance(suite[name], tuple) else (name, suite[name])
        print(f"\n=== benchmarks.bench_{script} {' '.join(arguments)}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"benchmarks.bench_{script}", *arguments], check=True)
        durations[name] = time.perf_counter() - start
    print("\n=== time per benchmark: " + ", ".join(f"{n} {s:.0f} s" for n, s in durations.items())
          + f"; total {sum(durations.values()) / 60:.1f} min")
    print("\n=== targets (issue 6), from benchmarks/results/*.json")
    for target, measured, met in summary_rows():
        print(f"{'met    ' if met else 'NOT met'}  {target:<70} {measured}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SUITE), help="run these benchmarks only")
    args = parser.parse_args()
    run_suite(SUITE, args.only or list(SUITE), summary)


if __name__ == "__main__":
    main()

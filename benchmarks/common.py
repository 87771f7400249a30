"""Shared benchmark plumbing: one measurement per fresh subprocess (clean peak RSS), tables, JSON results."""

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

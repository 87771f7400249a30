"""Mutation check: plant one wrong formula at a time and check that the test meant to catch it fails.

    .venv/bin/python tests/mutations.py             # every mutation: a table of caught / survived
    .venv/bin/python tests/mutations.py --list      # the mutations, nothing run
    .venv/bin/python tests/mutations.py leaky-offset dynamic-length   # some of them, by name

Each mutation is a one-line change to a file of the package, applied to a copy of `longctx/` and `tests/` in a
temporary folder (the working tree is never touched: other people edit it), where the tests it names run with
that copy first on `sys.path`. "caught" means the test named in `catcher` failed; the other failing tests are
listed too. The unmutated copy runs first: every named test must pass there. Not collected by pytest (no
`test_` prefix); the table is in tests/README.md ("Mutation check"). About 3 minutes on 2 busy cores.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFS = "tests/test_references.py"
TABLES = f"{REFS}::test_frequency_tables_equal_the_formulas"
LAYERS = f"{REFS}::test_attention_layers_equal_the_formula"
LOGN = "tests/test_logn.py::test_logn_equals_explicit_computation_with_padding"


def layers(case, variants=("eager-prefill", "sdpa-prefill", "eager-cached", "sdpa-cached")):
    return [f"{LAYERS}[{case}-{variant}]" for variant in variants]


@dataclass
class Mutation:
    name: str
    formula: str  # what is wrong, in the words of methods.md
    path: str  # file, relative to the repository
    old: str  # must occur exactly once in the file
    new: str
    catcher: str  # the test function that must fail
    tests: list  # pytest node ids to run


MUTATIONS = [
    Mutation("plain-exponent", "RoPE θ_i = b^{-2i/d} (§1) → b^{-2i/(d−2)}", "longctx/rope.py",
             "dtype=torch.int64, device=device).float() / dim", "dtype=torch.int64, device=device).float() / (dim - 2)",
             "test_frequency_tables_equal_the_formulas", [TABLES, *layers("default"), *layers("rerope")]),
    Mutation("rotation-sign", "RoPE rotation (§1): x_c cos − x_{c+d/2} sin → + (a reflection, not a rotation)",
             "longctx/rope.py", "addcmul_(x2, s, value=-1)", "addcmul_(x2, s, value=1)",
             "test_attention_layers_equal_the_formula", layers("default")),
    Mutation("linear-factor", "PI θ/k (§2) → θ·k", "longctx/rope.py",
             '_default_inv_freq(base, dim, device) / rope["factor"], 1.0',
             '_default_inv_freq(base, dim, device) * rope["factor"], 1.0',
             "test_frequency_tables_equal_the_formulas", [TABLES, *layers("linear")]),
    Mutation("ntk-base", "NTK-aware b' = b·k^{d/(d−2)} (§3) → b·k (NTK-old)", "longctx/rope.py",
             'base * rope["factor"] ** (dim / (dim - 2)), dim', 'base * rope["factor"], dim',
             "test_frequency_tables_equal_the_formulas", [TABLES, *layers("ntk")]),
    Mutation("ntk-fixed-lambda", "NTK-fixed's extra 1/λ = k^{-2/d} (§4) dropped (→ NTK-old)", "longctx/rope.py",
             "_default_inv_freq(base * k, dim, device) * k ** (-2.0 / dim), 1.0",
             "_default_inv_freq(base * k, dim, device), 1.0",
             "test_frequency_tables_equal_the_formulas", [TABLES, *layers("ntk-fixed")]),
    Mutation("ntk-mixed-index", "NTK-mixed exp(−a·m^e), m = i + 1 (§5) → m = i (pitfall §14.1)", "longctx/rope.py",
             "torch.arange(1, dim // 2 + 1, dtype=torch.float64", "torch.arange(0, dim // 2, dtype=torch.float64",
             "test_frequency_tables_equal_the_formulas", [TABLES, *layers("ntk-mixed")]),
    Mutation("dynamic-alpha", "dynamic NTK b·(k·l/L − (k−1))^{d/(d−2)} (§10) → b·(l/L)^{d/(d−2)}", "longctx/rope.py",
             "((factor * lengths / train_len) - (factor - 1))", "(lengths / train_len)",
             "test_frequency_tables_equal_the_formulas",
             [TABLES, *layers("dynamic"), "tests/test_rope.py::test_dynamic_attention_uses_each_query_own_table"]),
    Mutation("dynamic-exponent", "dynamic NTK exponent d/(d−2) (§10) → 1", "longctx/rope.py",
             "- (factor - 1)) ** (dim / (dim - 2))", "- (factor - 1))",
             "test_frequency_tables_equal_the_formulas",
             [TABLES, *layers("dynamic"), "tests/test_rope.py::test_dynamic_attention_uses_each_query_own_table"]),
    Mutation("dynamic-length", "dynamic NTK: query at p uses the table of length p + 1 → p", "longctx/attention.py",
             "dynamic_inv_freq(config, q_pos[:, rows] + 1)", "dynamic_inv_freq(config, q_pos[:, rows])",
             "test_attention_layers_equal_the_formula",
             [*layers("dynamic"), *layers("dynamic", ("sdpa-blocks-of-7-prefill", "sdpa-blocks-of-7-cached"))]),
    Mutation("dynamic-boundary", "dynamic NTK: base table while every position < L → ≤ L", "longctx/attention.py",
             "if int(q_pos.max()) < train_len:", "if int(q_pos.max()) <= train_len:",
             "test_attention_layers_equal_the_formula", layers("dynamic")),
    Mutation("yarn-ramp", "YaRN: extrapolation weight 1 − ramp (§10) → ramp (high frequencies interpolated)",
             "longctx/rope.py", "extrapolation_weight = 1 - ramp", "extrapolation_weight = ramp",
             "test_frequency_tables_equal_the_formulas", [TABLES, *layers("yarn")]),
    Mutation("yarn-bounds", "YaRN: low = floor, high = ceil of the correction pairs (§10) → ceil, floor",
             "longctx/rope.py", "low, high = math.floor(low), math.ceil(high)",
             "low, high = math.ceil(low), math.floor(high)",
             "test_frequency_tables_equal_the_formulas", [TABLES, *layers("yarn")]),
    Mutation("yarn-mscale", "YaRN mscale 0.1·ln s + 1 (§10) → 0.2·ln s + 1", "longctx/rope.py",
             "0.1 * m * math.log(scale) + 1.0", "0.2 * m * math.log(scale) + 1.0",
             "test_frequency_tables_equal_the_formulas", [TABLES, *layers("yarn")]),
    Mutation("llama3-smooth", "llama3 smooth = (L/λ − low)/(high − low) → (λ/L − low)/(high − low)",
             "longctx/rope.py", "smooth = (train_len / wavelen - ", "smooth = (wavelen / train_len - ",
             "test_frequency_tables_equal_the_formulas", [TABLES, *layers("llama3")]),
    Mutation("rerope-window", "ReRoPE r' = min(r, w) (§8) → min(r, w − 1) beyond the window",
             "longctx/rerope_fused.py", "rotate(query, torch.full_like(q_pos, window), inv_freq), key",
             "rotate(query, torch.full_like(q_pos, window - 1), inv_freq), key",
             "test_attention_layers_equal_the_formula", layers("rerope")),
    # (i − j ≤ w in place of < w would be an equivalent mutant: at r = w both formulas give the distance w)
    Mutation("rerope-near", "ReRoPE/Leaky: a1 where i − j < w (§8) → i − j < w − 1 (dense and general paths)",
             "longctx/attention.py", "k_pos[:, None, None, :key_end]) < window",
             "k_pos[:, None, None, :key_end]) < window - 1",
             "test_attention_layers_equal_the_formula",
             [*layers("rerope", ("eager-prefill", "eager-cached")),
              f"{REFS}::test_attention_at_given_positions_with_gaps_equals_the_formula"]),
    Mutation("rerope-band", "ReRoPE/Leaky band path: beyond the window from i − j ≥ w → ≥ w − 1 (sdpa)",
             "longctx/attention.py", ".tril(first - lo - window)", ".tril(first - lo - window + 1)",
             "test_attention_layers_equal_the_formula",
             layers("leaky", ("sdpa-prefill", "sdpa-blocks-of-7-prefill", "sdpa-cached"))),
    Mutation("fused-band", "fused ReRoPE: the band pass 0 ≤ i − j < w (§8) → < w − 1 (CPU flash kernel)",
             "longctx/rerope_fused.py", "inside = (c >= r) & (c < r + window)",
             "inside = (c >= r) & (c < r + window - 1)",
             "test_attention_layers_equal_the_formula",
             layers("rerope", ("sdpa-fused-prefill", "sdpa-fused-cached"))),
    Mutation("fused-beyond", "fused ReRoPE: the far pass i − j ≥ w (§8) → ≥ w + 1 (CPU flash kernel)",
             "longctx/rerope_fused.py", "first = max(past, start + window)  #",
             "first = max(past, start + window + 1)  #",
             "test_attention_layers_equal_the_formula",
             layers("leaky", ("sdpa-fused-prefill", "sdpa-fused-cached"))),
    Mutation("leaky-offset", "Leaky r' = w + (r − w)/k (§8) → w + r/k (query at (i − w)/k + w → i/k + w)",
             "longctx/rerope_fused.py", "rotate(query, (q_pos - window) / k + window, inv_freq)",
             "rotate(query, q_pos / k + window, inv_freq)",
             "test_attention_layers_equal_the_formula",
             [*layers("leaky"), *layers("leaky", ("sdpa-blocks-of-7-prefill", "sdpa-blocks-of-7-cached"))]),
    Mutation("leaky-keys", "Leaky: keys at j/k (§8) → j (r' = (i − w)/k + w − j)", "longctx/rerope_fused.py",
             "rotate(key, k_pos / k, inv_freq)", "rotate(key, k_pos, inv_freq)",
             "test_attention_layers_equal_the_formula", layers("leaky")),
    Mutation("logn-posthoc", "logn† max(1, log(p + 1)/log L) (§6) → max(1, log p/log L)", "longctx/attention.py",
             "torch.log(position_ids.float() + 1) / log_train", "torch.log(position_ids.float()) / log_train",
             "test_attention_layers_equal_the_formula",
             [*layers("dynamic-logn-posthoc"), LOGN]),
    Mutation("logn-floor", "log-n (trained): log(max(visible keys, 16))/log L (§6) → floor 1", "longctx/attention.py",
             "torch.log(visible.clamp(min=16)) / log_train", "torch.log(visible.clamp(min=1)) / log_train",
             "test_attention_layers_equal_the_formula",
             [*layers("rerope-logn-trained"), LOGN]),
    Mutation("padding-mask-dropped", "the padding mask: never built (every token real, positions = indices)",
             "longctx/modeling_longctx.py", "padding_mask = attention_mask.bool()  # compiled",
             "padding_mask = None  # compiled",
             "test_right_padding_is_hidden_from_the_tokens_after_it",
             ["tests/test_core.py::test_right_padding_is_hidden_from_the_tokens_after_it"]),
    Mutation("padding-keys-visible", "the mask (dense and block-wise): padding keys no longer hidden (positions "
             "still counted)", "longctx/attention_common.py",
             "return ~real[:, None, None, :keys] & sighted[:, None, :, None]",
             "return ~real[:, None, None, :keys] & sighted[:, None, :, None] & False",
             "test_right_padding_is_hidden_from_the_tokens_after_it",
             ["tests/test_core.py::test_right_padding_is_hidden_from_the_tokens_after_it",
              f"{REFS}::test_attention_after_padding_holes_equals_the_formula"]),
    # (no model output shows this one on CPU: torch 2.13's SDPA gives an all-hidden row zeros, eager's minimum-filled
    # row is uniform, and a left-padding query's output is never used; the rule keeps softmax finite everywhere)
    Mutation("padding-blind-rows", "a query with no real key at or before it (left padding) sees its causal keys → "
             "none", "longctx/attention_common.py",
             "return ~real[:, None, None, :keys] & sighted[:, None, :, None]", "return ~real[:, None, None, :keys]",
             "test_block_hiding_equals_the_dense_mask",
             ["tests/test_attention.py::test_block_hiding_equals_the_dense_mask"]),
]


def copy_tree(destination):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("longctx", "tests"):
        shutil.copytree(ROOT / folder, destination / folder, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", destination / "pyproject.toml")  # pytest's settings


def run_pytest(where, node_ids):
    """(exit code, failed node ids, seconds) of pytest over `node_ids` in `where` (its longctx first on sys.path)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--no-header",
                           "--tb=no", *node_ids], cwd=where, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", done.stdout, flags=re.M)
    return done.returncode, failed, time.monotonic() - start, done.stdout[-2000:] + done.stderr[-2000:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s) {sorted(unknown)}; known: {', '.join(m.name for m in MUTATIONS)}")
    if args.list:
        for m in chosen:
            print(f"{m.name:22} {m.path}: {m.formula}\n{'':22} must fail: {m.catcher}")
        return 0
    with tempfile.TemporaryDirectory(prefix="longctx-mutations-") as folder:
        where = Path(folder)
        copy_tree(where)
        if not args.no_baseline:
            every = list(dict.fromkeys(node for m in chosen for node in m.tests))
            code, failed, seconds, tail = run_pytest(where, every)
            if code != 0:
                print(f"the unmutated tests do not pass (exit {code}): {failed}\n{tail}")
                return 2
            print(f"unmutated: {len(every)} selections pass ({seconds:.0f} s)")
        rows, bad = [], 0
        for m in chosen:
            target = where / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                rows.append((m, "stale", f"`{m.old}` occurs {original.count(m.old)} times in {m.path}"))
                bad += 1
                continue
            try:
                target.write_text(original.replace(m.old, m.new))
                code, failed, seconds, tail = run_pytest(where, m.tests)
            finally:
                target.write_text(original)
            names = sorted({re.sub(r"^.*::", "", node) for node in failed})
            if code not in (0, 1):
                verdict, detail = "error", f"pytest exit {code}: {tail[-300:]}"
            elif any(node.split("::")[-1].split("[")[0] == m.catcher for node in failed):
                verdict, detail = "caught", ", ".join(names)
            else:
                verdict, detail = "SURVIVED", ", ".join(names) or "no test failed"
            bad += verdict != "caught"
            rows.append((m, verdict, detail))
            print(f"{m.name:22} {verdict:8} ({seconds:.0f} s, {len(failed)} failed) {detail[:160]}", flush=True)
    print("\n| mutation | formula → planted change | file | verdict | failing tests |\n|---|---|---|---|---|")
    for m, verdict, detail in rows:
        print(f"| {m.name} | {m.formula} | {m.path} | {verdict} | {detail} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

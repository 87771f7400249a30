"""Fine-tuning for length extension, measured: `python -m eval.finetune_study [--steps 40 160] [--factor 4]`.

From a base model (default: the embedded default, L_train = 256) to k × L_train, each scheme (PI, NTK-aware,
ntk-mixed, YaRN; methods.md §2, §3, §5, §10) is fine-tuned with `python -m train` for the same token budget, and
YaRN and PI (`--long-schemes`) for a second, larger one (Chen et al.: PI recovers with fine-tuning; Peng et al.:
YaRN reaches a given perplexity at k × with fewer tokens than PI). Every run is one printed `python -m train`
command; then `python -m eval.extrapolation` (plain and repeat sets at 1× and k×) and `python -m eval.passkey` (k×)
score it, and the untuned base is scored with the same variants for the "before" rows. The validation loss at
k × L_train that training logs every few steps gives the curves against tokens. Writes OUT/study.{md,csv,json,png}.
Finished runs and rows are kept: the same command resumes (train's own checkpoints, eval's row cache).
`--seed N` repeats the fine-tuning runs with another order of windows, beside seed 0's (`...-seedN`), for the spread.
`--passkey-fraction F` and `--copy-fraction F` fine-tune on windows of which F (not the preset's 1.0) carry a passkey
span or a copied span (`...-passkeyF`, `...-copyF`): with both 0 the long-length data is plain text, as in Chen et al.
and Peng et al., and retrieval at k × is only carried over.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import report

SCHEMES = {"pi": "linear", "ntk": "ntk", "ntk-mixed": "ntk-mixed", "yarn": "yarn"}  # eval variant -> rope_type
COLUMNS = ["variant", "steps", "tokens", "minutes", "val_loss_long", "ppl_plain_1x", "ppl_plain_kx",
           "ppl_repeat_1x", "ppl_repeat_kx", "passkey_kx"]


def train_command(base, variant, steps, args, out_dir) -> list[str]:
    """The `python -m train` run fine-tuning `base` with `variant` at k × L_train for `steps` steps."""
    rope = {"rope_type": SCHEMES[variant], "factor": args.factor}
    return [sys.executable, "-m", "train", "--config", "tiny", "--init-from", str(base),
            "--seq-len", str(args.train_len * int(args.factor)), "--max-steps", str(steps),
            "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--warmup-steps", str(max(1, steps // 10)),
            "--eval-every", str(max(1, steps // 8)), "--eval-windows", "16", "--save-every", str(steps),
            "--model.rope_parameters", json.dumps(rope), "--out-dir", str(out_dir), "--progress", "false",
            "--seed", str(args.seed), "--passkey-from-step", "0",  # the preset's copying-first schedule is for scratch
            *(["--passkey-fraction", f"{args.passkey_fraction:g}"] if args.passkey_fraction is not None else []),
            *(["--copy-fraction", f"{args.copy_fraction:g}"] if args.copy_fraction is not None else []),
            *(["--corpus", args.corpus] if args.corpus else [])]


def run_tag(args) -> str:
    """The suffix of the runs, rows and study files of a seed, passkey or copy fraction other than the preset's (""
    for seed 0 at the preset's fractions: the names the study always had)."""
    seed = f"-seed{args.seed}" if args.seed else ""
    return (seed + (f"-passkey{args.passkey_fraction:g}" if args.passkey_fraction is not None else "")
            + (f"-copy{args.copy_fraction:g}" if args.copy_fraction is not None else ""))


def check_kept_runs(base, run_dirs):
    """Runs kept from before must be of this base (a changed preset makes a new default, a new base): else stop, naming
    the run, its source and what to do."""
    import yaml

    for run_dir in run_dirs:
        trained_config = Path(run_dir) / "config.yaml"
        if trained_config.is_file():
            source = (yaml.safe_load(trained_config.read_text()) or {}).get("init_from")
            if source is not None and Path(source).resolve() != Path(base).resolve():
                raise SystemExit(f"eval.finetune_study: {run_dir} was fine-tuned from {source}, not from the base "
                                 f"{base}; pass --runs DIR (and --out DIR) for this base's runs, or remove {run_dir}")


def run(command) -> float:
    """Run `command` (printed first), fail loudly; returns its minutes."""
    print("$ " + shlex.join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True)
    return (time.time() - start) / 60


def fine_tune(base, variant, steps, args, run_dir) -> float | None:
    """Train the run unless it finished before; its wall minutes, kept in run_dir/minutes.json (None: not recorded,
    a run from before the file existed)."""
    recorded = Path(run_dir) / "minutes.json"
    if not (Path(run_dir) / "model" / "config.json").is_file():
        report.write_json(recorded, {"minutes": round(run(train_command(base, variant, steps, args, run_dir)), 2)})
    return json.loads(recorded.read_text())["minutes"] if recorded.is_file() else None


def score(model, variant, run_name, args) -> dict:
    """Perplexity on both sets at 1× and k×, passkey accuracy at k× (the eval CLIs, their row caches)."""
    common = ["--model", str(model), "--variants", variant, "--factor", str(args.factor), "--run", run_name,
              "--output-dir", str(args.out), "--no-progress", *(["--corpus", args.corpus] if args.corpus else [])]
    run([sys.executable, "-m", "eval.extrapolation", *common, "--lengths", "1x", f"{int(args.factor)}x"])
    run([sys.executable, "-m", "eval.passkey", *common, "--lengths", f"{int(args.factor)}x",
         "--depths", "0", "0.5", "1", "--trials", str(args.trials)])
    rows = json.loads((args.out / run_name / "extrapolation.json").read_text())["rows"]
    cell = {(r["set"], r["length_ratio"]): r["perplexity"] for r in rows if r["protocol"] == "chunked"}
    keys = json.loads((args.out / run_name / "passkey.json").read_text())["rows"]
    hits = sum(r["accuracy"] * r["trials"] for r in keys) / max(1, sum(r["trials"] for r in keys))
    k = float(args.factor)
    return {"ppl_plain_1x": cell.get(("plain", 1.0)), "ppl_plain_kx": cell.get(("plain", k)),
            "ppl_repeat_1x": cell.get(("repeat", 1.0)), "ppl_repeat_kx": cell.get(("repeat", k)), "passkey_kx": hits}


def curve(run_dir, tokens_per_step) -> tuple[list, list]:
    """(tokens, validation loss at the fine-tuning length) from the run's log.jsonl."""
    points = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
    points = [p for p in points if "val_loss" in p]
    return [p["step"] * tokens_per_step for p in points], [p["val_loss"] for p in points]


def plot(curves, path, factor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, (tokens, losses) in curves.items():
        axis.plot(tokens, losses, marker="o", label=label)
    axis.set_xlabel("fine-tuning tokens")
    axis.set_ylabel(f"validation loss at {factor:g} × L_train")
    axis.set_xscale("log")
    axis.legend()
    axis.grid(alpha=0.3)
    report.atomic_savefig(figure, path)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m eval.finetune_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="the model to extend (default: the embedded default)")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES),
                        help="the schemes fine-tuned with the shared budget (default: all four)")
    parser.add_argument("--corpus", default=None, help="training and eval text (default: the presets', shakespeare)")
    parser.add_argument("--factor", type=float, default=4.0, help="k: fine-tune and score at k × L_train")
    parser.add_argument("--steps", type=int, nargs=2, default=[40, 160], metavar=("SMALL", "LARGE"),
                        help="the shared budget, and the second one of --long-schemes (steps of BATCH windows)")
    parser.add_argument("--long-schemes", nargs="+", default=None, choices=list(SCHEMES),
                        help="the schemes also fine-tuned with the second budget (default: pi and yarn, those of "
                             "them in --schemes)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--trials", type=int, default=4, help="passkey keys per depth")
    parser.add_argument("--seed", type=int, default=0,
                        help="train's seed: the order of the fine-tuning windows (not 0: runs, rows and study files "
                             "are named ...-seedN, beside seed 0's)")
    parser.add_argument("--passkey-fraction", type=float, default=None, metavar="F",
                        help="the fraction of fine-tuning windows with a passkey span (default: the preset's, 1.0; "
                             "given, runs, rows and study files are named ...-passkeyF)")
    parser.add_argument("--copy-fraction", type=float, default=None, metavar="F",
                        help="the fraction of fine-tuning windows with a copied span (default: the preset's, 1.0; "
                             "given, named ...-copyF; with --passkey-fraction 0, 0 is plain text)")
    parser.add_argument("--runs", default="runs/finetune", type=Path, help="training runs go here")
    parser.add_argument("--out", default="results/finetune", type=Path, help="results go here")
    args = parser.parse_args(argv)
    if args.long_schemes is None:
        args.long_schemes = [v for v in ("pi", "yarn") if v in args.schemes]
    if missing := [v for v in args.long_schemes if v not in args.schemes]:
        parser.error(f"--long-schemes {' '.join(missing)}: not in --schemes ({' '.join(args.schemes)}); a scheme's "
                     "second budget is beside its first")
    for flag, value in (("--passkey-fraction", args.passkey_fraction), ("--copy-fraction", args.copy_fraction)):
        if value is not None and not 0 <= value <= 1:
            parser.error(f"{flag} {value:g}: expected a fraction in [0, 1]")
    return args


def plan_runs(args) -> list[tuple[str, int]]:
    """(scheme, steps) of every fine-tuning run: each scheme at the shared budget, then --long-schemes at the second
    (in --schemes' order)."""
    small, large = args.steps
    plan = [(v, small) for v in args.schemes]
    return plan + [(v, large) for v in args.schemes if v in args.long_schemes and large != small]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from .models import default_model_dir

    base = default_model_dir() if args.base == "default" else Path(args.base)
    config = json.loads((Path(base) / "config.json").read_text())
    args.train_len = (config["rope_parameters"].get("original_max_position_embeddings")
                      or config["max_position_embeddings"])
    tokens_per_step = args.batch_size * args.train_len * int(args.factor)
    tag = run_tag(args)
    check_kept_runs(base, [args.runs / f"{variant}-{steps}{tag}" for variant, steps in plan_runs(args)])
    rows, curves = [], {}
    for variant in args.schemes:  # before fine-tuning: the same scheme applied to the base at inference only
        rows.append({"variant": variant, "steps": 0, "tokens": 0, "minutes": 0.0, "val_loss_long": None,
                     **score(base, variant, f"base-{variant}", args)})
    for variant, steps in plan_runs(args):
        run_dir = args.runs / f"{variant}-{steps}{tag}"
        minutes = fine_tune(base, variant, steps, args, run_dir)
        tokens, losses = curve(run_dir, tokens_per_step)
        curves[f"{variant}, {steps} steps"] = (tokens, losses)
        rows.append({"variant": variant, "steps": steps, "tokens": steps * tokens_per_step,
                     "minutes": minutes, "val_loss_long": losses[-1] if losses else None,
                     **score(run_dir / "model", variant, f"{variant}-{steps}{tag}", args)})
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(args.out / f"study{tag}.csv", rows, COLUMNS)
    report.write_json(args.out / f"study{tag}.json", {"base": str(base), "factor": args.factor, "rows": rows,
                                                      "curves": {k: {"tokens": t, "val_loss": v}
                                                                 for k, (t, v) in curves.items()}})
    body = [[r[c] for c in COLUMNS] for r in rows]
    report.atomic_write(args.out / f"study{tag}.md", report.markdown_table(COLUMNS, body) + "\n")
    plot(curves, args.out / f"study{tag}.png", args.factor)
    print(report.text_table(COLUMNS, body))
    print(f"wrote {args.out}/study{tag}.{{md,csv,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

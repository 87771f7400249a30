"""Passkey retrieval by length and depth for the position-scheme variants.

    python -m eval.passkey --model default | DIR | FILE.gguf [--variants ...] [--lengths ...] [--depths 0 0.5 1]

The prompt of landmark-attention / YaRN's `passkey.py` (anchors.md §3.1): an instruction, the filler "The grass is
green. The sky is blue. ..." repeated, the needle "The pass key is 68123. Remember it. 68123 is the pass key." at
the given depth of the filler, then "What is the pass key? The pass key is" and the answer. The whole sequence is
exactly L tokens. A trial is correct when greedy decoding would give the answer: the argmax at every answer position
equals the answer token (one forward, the answer teacher-forced). Finished rows are cached; writes
RUN_DIR/passkey.{csv,json,md,png}.
"""

import argparse
import random
import shlex
import sys
import time

import torch
from tqdm.auto import tqdm

from longctx.rope import set_rope

from . import report
from .cli import add_common_arguments, prepare, run_cli
from .metrics import token_scores
from .texts import TextTooShort, leading_bos
from .variants import effective_scheme, variant_scheme

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Part of every cached row's key (as eval.metrics.METRIC_VERSION): bump it with any change to how a trial is scored.
PASSKEY_METRIC_VERSION = 1
CSV_COLUMNS = ["variant", "rope_type", "logn_scaling", "length", "length_ratio", "depth", "trials", "accuracy",
               "answer_nll", "seconds"]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, key: str) -> tuple[list[int], list[int]]:
    """(question ids, answer ids): the answer is what follows the question when both are tokenised together."""
    question, full = _ids(tokenizer, QUESTION), _ids(tokenizer, f"{QUESTION} {key}")
    shared = 0
    while shared < min(len(question), len(full)) and question[shared] == full[shared]:
        shared += 1
    return full[:shared], full[shared:]


def passkey_sample(tokenizer, key: str, length: int, depth: float, bos=None) -> tuple[list[int], int]:
    """(ids of exactly `length` tokens, number of answer tokens at the end); the needle sits after
    round(depth · filler) filler tokens. `TextTooShort` where the fixed parts alone exceed `length`."""
    question, answer = answer_ids(tokenizer, key)
    head = ([bos] if bos is not None else []) + _ids(tokenizer, INTRO)
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    n_filler = length - len(head) - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise TextTooShort(f"the passkey prompt needs {length - n_filler} tokens without filler, more than {length}")
    unit = _ids(tokenizer, FILLER)
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    before = round(depth * n_filler)
    return head + filler[:before] + needle + filler[before:] + question + answer, len(answer)


def make_keys(trials: int, digits: int, seed: int) -> list[str]:
    """The same random `digits`-digit keys for every variant, length and depth (paired comparisons)."""
    rng = random.Random(seed)
    return [str(rng.randint(10 ** (digits - 1), 10**digits - 1)) for _ in range(trials)]


@torch.no_grad()
def score_trials(model, samples) -> tuple[float, float]:
    """(accuracy, mean answer NLL) of teacher-forced answers; samples = [(ids, n_answer)] of one length."""
    device = next(model.parameters()).device
    nll, correct = token_scores(model, torch.tensor([ids for ids, _ in samples], device=device))
    hits, losses = [], []
    for row, (_, n_answer) in enumerate(samples):
        hits.append(bool(correct[row, -n_answer:].all()))
        losses.append(float(nll[row, -n_answer:].sum()))
    return sum(hits) / len(hits), sum(losses) / len(losses)


def run_passkey(model, tokenizer, variants, lengths, depths, settings, *, trials=4, digits=5, seed=0, cache=None,
                model_id="model", progress=True, log=None) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): accuracy for every (length, depth, variant), reading finished rows from `cache`."""
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    cache = cache if cache is not None else report.MemoryCache()
    bos, keys = leading_bos(tokenizer), make_keys(trials, digits, seed)
    rows, skipped = [], []
    bar = tqdm(total=len(lengths) * len(depths) * len(variants), desc="passkey", unit="row", disable=not progress)
    for length in lengths:
        for depth in depths:
            try:
                samples = [passkey_sample(tokenizer, key, length, depth, bos) for key in keys]
            except TextTooShort as err:
                log(f"skipped length {length} (depth {depth}): {err}.")
                skipped.append({"length": length, "depth": depth, "reason": str(err)})
                bar.update(len(variants))
                continue
            digest = report.RowCache.key(samples=samples)
            for variant in variants:
                scheme = variant_scheme(variant, settings, length)
                key = report.RowCache.key(model=model_id, scheme=effective_scheme(scheme, length, settings),
                                          length=length, depth=depth, samples=digest, metric=PASSKEY_METRIC_VERSION)
                row = cache.get(key)
                if row is None:
                    bar.set_postfix_str(f"{variant} L={length} depth={depth}")
                    set_rope(model, **scheme)
                    start = time.perf_counter()
                    accuracy, answer_nll = score_trials(model, samples)
                    row = {"variant": variant, "rope_type": scheme["rope_parameters"]["rope_type"],
                           "logn_scaling": scheme["logn_scaling"], "length": length,
                           "length_ratio": length / settings.train_len, "depth": depth, "trials": len(samples),
                           "accuracy": accuracy, "answer_nll": answer_nll, "seconds": time.perf_counter() - start}
                    cache.put(key, row)
                rows.append({**row, "variant": variant, "rope_type": scheme["rope_parameters"]["rope_type"],
                             "logn_scaling": scheme["logn_scaling"]})
                bar.update(1)
    bar.close()
    return rows, skipped


def mean_over_depths(rows) -> list[dict]:
    """One row per (variant, length): accuracy averaged over depths (equal trials per depth)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["variant"], r["length"]), []).append(r["accuracy"])
    return [{"variant": v, "length": n, "accuracy": sum(a) / len(a)} for (v, n), a in groups.items()]


def write_reports(run_dir, rows, protocol, skipped) -> dict:
    paths = {ext: run_dir / f"passkey.{ext}" for ext in ("csv", "json", "md", "png")}
    report.write_csv(paths["csv"], rows, CSV_COLUMNS)
    report.write_json(paths["json"], {"protocol": protocol, "skipped": skipped, "rows": rows})
    variants, lengths, body = report.pivot(mean_over_depths(rows), "variant", "length",
                                           lambda r: f"{100 * r['accuracy']:.0f}")
    lines = [f"# Passkey retrieval: {protocol['model']}", "", "## Protocol", "", report.protocol_markdown(protocol),
             "", "## Accuracy % by length (mean over depths)", "",
             report.markdown_table(["variant"] + [str(n) for n in lengths], [[v] + b for v, b in zip(variants, body)])]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- length {s['length']} depth {s['depth']}: {s['reason']}" for s in skipped]
    report.atomic_write(paths["md"], "\n".join(lines) + "\n")
    plot(rows, protocol, paths["png"])
    return paths


def plot(rows, protocol, path):
    """One heatmap per variant: accuracy by depth (rows) and length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    columns = min(6, len(variants))
    n_rows = -(-len(variants) // columns)
    figure, axes = plt.subplots(n_rows, columns, figsize=(2.6 * columns, 2.4 * n_rows), squeeze=False)
    table = {(r["variant"], r["length"], r["depth"]): r["accuracy"] for r in rows}
    for ax, variant in zip(axes.flat, variants):
        grid = [[table.get((variant, n, d), float("nan")) for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_title(variant, fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6, rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
    for ax in list(axes.flat)[len(variants):]:
        ax.axis("off")
    figure.supxlabel("length (tokens)")
    figure.supylabel("needle depth")
    figure.suptitle(f"{protocol['model']}: passkey accuracy (yellow = 100%), L_train={protocol['L_train']}")
    figure.tight_layout()
    report.atomic_savefig(figure, path)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eval.passkey", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--depths", nargs="+", type=float, default=list(DEFAULT_DEPTHS),
                        help="needle depths, fractions of the filler before it (default 0 0.25 0.5 0.75 1)")
    parser.add_argument("--trials", type=int, default=4, help="random keys per (length, depth) (default 4)")
    parser.add_argument("--digits", type=int, default=5, help="digits of the pass key (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    args = parser.parse_args(argv)
    if any(not 0 <= d <= 1 for d in args.depths):
        parser.error(f"--depths {args.depths}: each depth must be in [0, 1]")
    if args.trials < 1 or args.digits < 1:
        parser.error("--trials and --digits must be >= 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    session = prepare(args, f"python -m eval.passkey {shlex.join(argv)}")
    cache = report.RowCache(session.run_dir / "passkey-cache")
    try:
        rows, skipped = run_passkey(session.loaded.model, session.loaded.tokenizer, session.variants,
                                    session.lengths, sorted(set(args.depths)), session.settings, trials=args.trials,
                                    digits=args.digits, seed=args.seed, cache=cache,
                                    model_id=session.loaded.fingerprint, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished rows are kept in {cache.directory}; run the same command to resume.",
              file=sys.stderr)
        return 130
    if not rows:
        print("error: no row could be scored (see the messages above).", file=sys.stderr)
        return 1
    s = session.settings
    protocol = {"model": args.model, "model_fingerprint": session.loaded.fingerprint,
                "metric_version": PASSKEY_METRIC_VERSION, "L_train": s.train_len,
                "factor_k": s.factor, "rerope_window": s.rerope_window, "leaky_factor": s.leaky_factor,
                "dynamic": s.dynamic,
                "prompt": INTRO + " [filler]" + NEEDLE + " [filler]" + QUESTION + " {key}", "filler": FILLER,
                "trials": args.trials, "digits": args.digits, "seed": args.seed, "depths": sorted(set(args.depths)),
                "scoring": "correct = argmax at every answer position equals the answer (greedy decoding would "
                           "produce it), one forward with the answer teacher-forced",
                "bos": leading_bos(session.loaded.tokenizer) is not None, "device": session.device,
                "dtype": session.dtype, "command": session.command, "date": session.started}
    paths = write_reports(session.run_dir, rows, protocol, skipped)
    variants, lengths, body = report.pivot(mean_over_depths(rows), "variant", "length",
                                           lambda r: f"{100 * r['accuracy']:.0f}")
    print("\npasskey accuracy % by length (mean over depths)")
    print(report.text_table(["variant"] + [str(n) for n in lengths], [[v] + b for v, b in zip(variants, body)]))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Passkey retrieval by length and depth for the position-scheme variants.

    python -m eval.passkey --model default | DIR | FILE.gguf [--variants ...] [--lengths ...] [--depths 0 0.5 1]

The prompt of landmark-attention / YaRN's `passkey.py` (anchors.md §3.1): an instruction, the filler "The grass is
green. The sky is blue. ..." repeated, the needle "The pass key is 68123. Remember it. 68123 is the pass key." at
the given depth of the filler, then "What is the pass key? The pass key is" and the answer. The whole sequence is
exactly L tokens. A trial is correct when greedy decoding would give the answer: the argmax at every answer position
equals the answer token (one forward, the answer teacher-forced). Finished rows are cached; writes
RUN_DIR/passkey.{csv,json,md,png}.
"""

import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from longctx.data import PASSKEY_NEEDLE as NEEDLE
from longctx.data import PASSKEY_QUESTION as QUESTION

from . import report, sweep
from .cli import make_parser, run_cli
from .metrics import token_scores
from .texts import TextTooShort, leading_bos
from .variants import mixed_exponent

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
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


def passkey_samples(tokenizer, keys, length: int, depth: float, bos=None) -> list[tuple[list[int], int]]:
    """One `passkey_sample` per key: the trials of one (length, depth) cell."""
    return [passkey_sample(tokenizer, key, length, depth, bos) for key in keys]


@dataclass
class Passkey:
    """Passkey retrieval accuracy and the answer's NLL of each (length, depth) cell, over `trials` random keys of
    `digits` digits (seeded: the same keys for every variant, length and depth)."""

    depths: tuple = DEFAULT_DEPTHS  # needle depths, fractions of the filler before it
    trials: int = 4
    digits: int = 5
    seed: int = 0

    name: ClassVar[str] = "passkey"
    title: ClassVar[str] = "Passkey retrieval"
    # Bump it with any change to how a trial is scored, so old cached rows are recomputed, not mixed.
    metric_version: ClassVar[int] = 1
    columns: ClassVar[list] = CSV_COLUMNS
    labels: ClassVar[tuple] = ("variant", "rope_type", "logn_scaling")
    cache_dir: ClassVar[str] = "passkey-cache"

    @classmethod
    def from_args(cls, args, session):
        return cls(sorted(set(args.depths)), args.trials, args.digits, args.seed)

    def cells(self, tokenizer, lengths, settings):
        bos, keys = leading_bos(tokenizer), make_keys(self.trials, self.digits, self.seed)
        plan = [sweep.Cell(length, length / settings.train_len, {"depth": depth}, f"(depth {depth})",
                           partial(passkey_samples, tokenizer, keys, length, depth, bos))
                for length in lengths for depth in self.depths]
        return plan, {"bos": bos is not None}

    def digest(self, samples) -> dict:
        return {"samples": report.RowCache.key(samples=samples)}

    def score(self, model, cell, samples, variant, progress) -> dict:
        start = time.perf_counter()
        accuracy, answer_nll = score_trials(model, samples)
        return {"length": cell.length, "length_ratio": cell.length_ratio, **cell.condition, "trials": len(samples),
                "accuracy": accuracy, "answer_nll": answer_nll, "seconds": time.perf_counter() - start}

    def protocol(self, session) -> dict:
        s = session.settings
        return {"rerope_window": s.rerope_window, "leaky_factor": s.leaky_factor, "dynamic": s.dynamic,
                "mixed_exponent": mixed_exponent(s),
                "prompt": INTRO + " [filler]" + NEEDLE + " [filler]" + QUESTION + " {key}", "filler": FILLER,
                "trials": self.trials, "digits": self.digits, "seed": self.seed, "depths": list(self.depths),
                "scoring": "correct = argmax at every answer position equals the answer (greedy decoding would "
                           "produce it), one forward with the answer teacher-forced"}

    def tables(self, rows) -> list[report.Table]:
        variants, lengths, body = report.pivot(mean_over_depths(rows), "variant", "length",
                                               lambda r: f"{100 * r['accuracy']:.0f}")
        return [report.Table("Accuracy % by length (mean over depths)", ["variant"] + [str(n) for n in lengths],
                             [[v] + b for v, b in zip(variants, body)],
                             caption="passkey accuracy % by length (mean over depths)")]

    def skipped_line(self, record) -> str:
        return f"- length {record['length']} depth {record['depth']}: {record['reason']}"

    def summary(self, session) -> None:
        return None

    def plot(self, rows, protocol, path):
        plot(rows, protocol, path)


def mean_over_depths(rows) -> list[dict]:
    """One row per (variant, length): accuracy averaged over depths (equal trials per depth)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["variant"], r["length"]), []).append(r["accuracy"])
    return [{"variant": v, "length": n, "accuracy": sum(a) / len(a)} for (v, n), a in groups.items()]


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


def add_prompt_arguments(parser, depths=DEFAULT_DEPTHS, trials=4):
    """`--depths` and `--trials`, the passkey prompts' options (also eval.heads')."""
    parser.add_argument("--depths", nargs="+", type=float, default=list(depths),
                        help="needle depths, fractions of the filler before it (default "
                             + " ".join(f"{d:g}" for d in depths) + ")")
    parser.add_argument("--trials", type=int, default=trials,
                        help=f"random keys per (length, depth) (default {trials})")


def check_prompt_arguments(parser, args):
    if any(not 0 <= d <= 1 for d in args.depths):
        parser.error(f"--depths {args.depths}: each depth must be in [0, 1]")
    if args.trials < 1:
        parser.error("--trials must be >= 1")


def parse_args(argv=None):
    parser = make_parser("python -m eval.passkey", __doc__)
    add_prompt_arguments(parser)
    parser.add_argument("--digits", type=int, default=5, help="digits of the pass key (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    args = parser.parse_args(argv)
    check_prompt_arguments(parser, args)
    if args.digits < 1:
        parser.error("--digits must be >= 1")
    return args


def main(argv=None):
    return sweep.main(Passkey, parse_args, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))

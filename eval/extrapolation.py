"""Length-extrapolation sweep: perplexity and next-token accuracy by eval length for each position scheme.

    python -m eval.extrapolation --model default | DIR | FILE.gguf [--variants ...] [--lengths 1x 2x 4096 ...]

For every (length, set, variant) it scores windows of the held-out text (SPEC §3 protocol words: `chunked`,
optional `sliding`, `by-position`; Su's `plain` and `repeat` sets, methods.md §7), switching the position
scheme with `set_rope` (never reloading weights). Each finished row is cached on disk at once, so an interrupted
sweep resumes where it stopped. Writes RUN_DIR/extrapolation.{csv,json,md,png} and prints the table.
"""

import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from tqdm.auto import tqdm

from . import report, sweep
from .cli import eval_text, make_parser, run_cli
from .metrics import score_windows
from .texts import (
    EVAL_SETS,
    chunked_windows,
    leading_bos,
    sliding_windows,
    token_stream,
    windows_for_budget,
)
from .variants import BASE_VARIANTS, LOGN, mixed_exponent

DYNAMIC_PROTOCOL = {
    "prefill": "prefill: the window length l sets the scale for the whole window, as HF's full forward and YaRN's "
               "perplexity eval do: NTK-aware with k = max(1, l / L_train)",
    "causal": "causal: the query at position p uses the table of length p + 1 for itself and its keys (longctx "
              "rope_type 'dynamic', factor 1), as generation with the KV cache does",
}
CSV_COLUMNS = ["variant", "rope_type", "logn_scaling", "set", "protocol", "stride", "length", "length_ratio",
               "windows", "tokens_scored", "perplexity", "accuracy", "loss", "seconds", "scored_tokens_per_s"]


def sweep_order(lengths, sets, sliding):
    """(length, set, protocol, stride) in sweep order: short lengths first, so early rows are useful."""
    for length in lengths:
        for eval_set in sets:
            yield length, eval_set, "chunked", None
            if sliding and eval_set == "plain":
                yield length, eval_set, "sliding", sliding


def build_windows(stream, length, eval_set, protocol, stride, max_tokens, bos):
    if protocol == "sliding":
        return sliding_windows(stream, length, stride, windows_for_budget(max_tokens, stride), bos)
    return chunked_windows(stream, length, eval_set, windows_for_budget(max_tokens, length), bos)


@dataclass
class Extrapolation:
    """Perplexity, next-token accuracy and the by-position loss of each (length, set, protocol) cell (SPEC §3).

    `max_tokens` bounds the tokens per row: ⌊max_tokens / L⌋ chunked windows of L tokens (at least one), or
    ⌊max_tokens / S⌋ sliding windows of stride S = `sliding`; so a row costs about the same at every length but
    for attention. `batch_tokens` bounds the tokens of one forward.
    """

    documents: list  # the eval text
    text: str = "the eval text"  # how the protocol names it
    sets: tuple = EVAL_SETS
    max_tokens: int = 4096
    sliding: int | None = None
    batch_tokens: int = 8192

    name: ClassVar[str] = "extrapolation"
    title: ClassVar[str] = "Length extrapolation"
    # The version of the scoring (`eval.metrics`): bump it with any change to what a row's numbers mean (which
    # tokens are scored, how they are aggregated), so old cached rows are recomputed, not mixed.
    metric_version: ClassVar[int] = 1
    columns: ClassVar[list] = CSV_COLUMNS
    labels: ClassVar[tuple] = ("variant", "rope_type", "logn_scaling", "rope_parameters")
    cache_dir: ClassVar[str] = "cache"

    def __post_init__(self):
        sliding = self.sliding
        if sliding is not None and (isinstance(sliding, bool) or not isinstance(sliding, int) or sliding < 1):
            raise ValueError(f"--sliding stride {sliding!r} is invalid; it must be a whole number of tokens >= 1 "
                             "(or leave --sliding out).")

    @classmethod
    def from_args(cls, args, session):
        documents, text = eval_text(args, session.loaded)
        return cls(documents, text, args.sets, args.max_tokens, args.sliding, args.batch_tokens)

    def cells(self, tokenizer, lengths, settings):
        bos, sliding = leading_bos(tokenizer), self.sliding or 0
        needed = self.max_tokens + 2 * max(lengths) + sliding * windows_for_budget(self.max_tokens, sliding or 1)
        stream = token_stream(tokenizer, self.documents, max_tokens=needed)
        plan = [sweep.Cell(length, length / settings.train_len, {"set": s, "protocol": p, "stride": stride},
                           f"({s}, {p})", partial(build_windows, stream, length, s, p, stride, self.max_tokens, bos),
                           skip_keys=("set", "protocol"))
                for length, s, p, stride in sweep_order(lengths, self.sets, self.sliding)]
        return plan, {"bos": bos is not None, "text_tokens_read": len(stream)}

    def digest(self, windows) -> dict:
        return {"windows": report.RowCache.key(windows=windows.tolist())}

    def score(self, model, cell, windows, variant, progress) -> dict:
        """Score the windows of one cell (the variant's scheme is set); the row's columns."""
        protocol, stride = cell.condition["protocol"], cell.condition["stride"]
        inner = tqdm(total=len(windows), desc=f"  {variant} L={cell.length} {cell.condition['set']}", unit="window",
                     leave=False, disable=not progress or len(windows) < 2)
        start = time.perf_counter()
        score = score_windows(model, windows, stride if protocol == "sliding" else None,
                              max(1, self.batch_tokens // cell.length), inner)
        seconds = time.perf_counter() - start
        inner.close()
        return {**cell.condition, "length": cell.length, "length_ratio": cell.length_ratio, "windows": len(windows),
                "tokens_scored": score.count, "perplexity": score.perplexity, "accuracy": score.accuracy,
                "loss": score.loss, "seconds": seconds, "scored_tokens_per_s": score.count / max(seconds, 1e-9),
                "by_position": score.by_position()}

    def protocol(self, session) -> dict:
        s = session.settings
        logn = "+logn = Su's logn† (posthoc): q at position p × max(1, log(p+1)/log(L_train))"
        if s.native_logn == "trained":
            logn = "the model was pre-trained with log n (Su's -log n): every row uses it; no +logn rows"
        sliding = {}
        if self.sliding:
            sliding["sliding"] = f"plain set, windows of L every S={self.sliding} tokens, last S predictions scored"
        return {
            "rope_theta": s.rope_theta, "rerope_window": s.rerope_window, "leaky_factor": s.leaky_factor,
            "mixed_exponent": mixed_exponent(s), "dynamic": DYNAMIC_PROTOCOL[s.dynamic],
            "logn": logn, "lengths": session.lengths,
            "sets": {"plain": f"documents of {self.text}, joined by EOS, cut into disjoint windows (positions 0..L-1)",
                     "repeat": "each window = one segment of ceil(L/2) held-out tokens written twice, cut to L"},
            "chunked": "every prediction of every window scored (L − 1 per window)", **sliding,
            "by_position": "loss at each query position p (predicting token p + 1), mean over the chunked windows",
            "max_tokens_per_row": f"{self.max_tokens}: floor(max_tokens / L) windows per row, at least one",
            "aggregation": "token-weighted: perplexity = exp(total NLL / tokens scored)",
        }

    def tables(self, rows) -> list[report.Table]:
        return tables(rows)

    def skipped_line(self, record) -> str:
        return f"- length {record['length']} ({record['set']}, {record['protocol']}): {record['reason']}"

    def summary(self, session) -> str:
        return f"L_train={session.settings.train_len}, k={session.settings.factor:g}"

    def plot(self, rows, protocol, path):
        plot(rows, protocol, path)


def run_sweep(model, tokenizer, documents, variants, lengths, settings, *, cache=None, model_id="model",
              progress=True, log=None, **options) -> sweep.Sweep:
    """Score every (length, set, protocol, variant) cell of `documents` (`sweep.run` of an `Extrapolation`),
    reading finished rows from `cache` (a `report.RowCache`). `options` are `Extrapolation`'s: `sets`,
    `max_tokens`, `sliding`, `batch_tokens`. Cells the text is too short for are skipped with a message.
    """
    return sweep.run(Extrapolation(documents, **options), model, tokenizer, variants, lengths, settings, cache=cache,
                     model_id=model_id, progress=progress, log=log)


# --- reports ------------------------------------------------------------------------------------------------------
def tables(rows) -> list[report.Table]:
    """One per (set, protocol): variants × lengths, cells 'perplexity (accuracy %)'."""
    out = []
    for eval_set, protocol in dict.fromkeys((r["set"], r["protocol"]) for r in rows):
        part = [r for r in rows if r["set"] == eval_set and r["protocol"] == protocol]
        variants, lengths, body = report.pivot(part, "variant", "length",
                                               lambda r: f"{report.fmt(r['perplexity'])} ({100 * r['accuracy']:.1f})")
        title = f"{eval_set} set, {protocol}: perplexity (next-token accuracy %) by eval length"
        header = ["variant"] + [str(n) for n in lengths]
        out.append(report.Table(title, header, [[variant] + line for variant, line in zip(variants, body)]))
    return out


def log_binned(curve: dict, per_octave=3) -> tuple[list, list]:
    """A by-position curve averaged in log-spaced position bins (`per_octave` per doubling): early positions stay
    resolved, late ones are averaged over many tokens, so one long window still gives a readable line."""
    bucket, loss = curve["bucket"], curve["loss"]
    edges = sorted({0} | {int(round(2 ** (i / per_octave))) // bucket for i in range(per_octave * 40)})
    edges = [e for e in edges if e < len(loss)] + [len(loss)]
    centres, means = [], []
    for low, high in zip(edges, edges[1:]):
        if high > low:
            centres.append(bucket * (low + high) / 2)
            means.append(sum(loss[low:high]) / (high - low))
    return centres, means


def plot(rows, protocol, path):
    """Top: perplexity against eval length per variant (one panel per set). Bottom: loss by position at the
    longest length, in log-spaced bins. Colour = scheme, dashed = +logn; the dotted line marks L_train."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    chunked = [r for r in rows if r["protocol"] == "chunked"]
    sets = list(dict.fromkeys(r["set"] for r in chunked)) or ["plain"]
    figure, axes = plt.subplots(2, len(sets), figsize=(6.5 * len(sets), 9.5), squeeze=False)
    colours = plt.get_cmap("tab10")
    style = {}
    for variant in dict.fromkeys(r["variant"] for r in chunked):
        base = variant.removesuffix(LOGN)
        style[variant] = dict(color=colours(BASE_VARIANTS.index(base) % 10), linestyle="--" if variant != base else "-")
    lengths = sorted({r["length"] for r in chunked})
    for column, eval_set in enumerate(sets):
        part = [r for r in chunked if r["set"] == eval_set]
        top, bottom = axes[0][column], axes[1][column]
        for variant, kw in style.items():
            points = sorted((r["length"], r["perplexity"]) for r in part if r["variant"] == variant)
            if points:
                top.plot(*zip(*points), marker="o", markersize=3, label=variant, **kw)
        longest = max((r["length"] for r in part), default=None)
        for r in part:
            if r["length"] == longest and r["by_position"]:
                bottom.plot(*log_binned(r["by_position"]), linewidth=1.2, **style[r["variant"]])
        top.set(xscale="log", xlabel="eval length (tokens)", ylabel="perplexity",
                title=f"{eval_set} set: perplexity vs eval length")
        top.set_xticks(lengths, [str(n) for n in lengths])
        bottom.set(xscale="log", xlabel="position in the window (log scale)", ylabel="loss (nats), log-spaced bins",
                   title=f"{eval_set} set: loss by position at L={longest}")
        top.xaxis.set_minor_formatter(NullFormatter())
        for ax in (top, bottom):
            ax.axvline(protocol["L_train"], color="grey", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=(len(labels) + 1) // 2, fontsize=8, frameon=False)
    figure.suptitle(f"{protocol['model']}: L_train={protocol['L_train']} (dotted), k={protocol['factor_k']:g}, "
                    f"ReRoPE w={protocol['rerope_window']}; dashed = +logn")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    report.atomic_savefig(figure, path)
    plt.close(figure)


# --- command line -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = make_parser("python -m eval.extrapolation", __doc__)
    parser.add_argument("--sets", nargs="+", default=list(EVAL_SETS), choices=EVAL_SETS, help="Su's eval sets")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="token budget per row: ⌊max_tokens / L⌋ windows of length L, at least one (sliding: "
                             "⌊max_tokens / S⌋ windows); default 4096, which keeps `make demo` to minutes on CPU")
    parser.add_argument("--sliding", type=int, default=None, metavar="S",
                        help="also score the plain set with sliding windows of stride S (last S tokens scored)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward batch (default 8192)")
    args = parser.parse_args(argv)
    for name in ("max_tokens", "batch_tokens", "sliding"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


def main(argv=None):
    return sweep.main(Extrapolation, parse_args, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Length-extrapolation sweep: perplexity and next-token accuracy by eval length for each position scheme.

    python -m eval.extrapolation --model default | DIR | FILE.gguf [--variants ...] [--lengths 1x 2x 4096 ...]

For every (length, set, variant) it scores windows of the held-out text (SPEC §3 protocol words: `chunked`,
optional `sliding`, `by-position`; Su's `plain` and `repeat` sets, methods.md §7), switching the position
scheme with `set_rope` (never reloading weights). Each finished row is cached on disk at once, so an interrupted
sweep resumes where it stopped. Writes RUN_DIR/extrapolation.{csv,json,md,png} and prints the table.
"""

import argparse
import shlex
import sys
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from longctx.rope import set_rope

from . import report
from .cli import add_common_arguments, eval_text, prepare, run_cli
from . import metrics
from .metrics import score_windows
from .texts import (
    EVAL_SETS,
    TextTooShort,
    chunked_windows,
    leading_bos,
    sliding_windows,
    token_stream,
    windows_for_budget,
)
from .variants import BASE_VARIANTS, LOGN, effective_scheme, variant_scheme

DYNAMIC_PROTOCOL = {
    "prefill": "prefill: the window length l sets the scale for the whole window, as HF's full forward and YaRN's "
               "perplexity eval do: NTK-aware with k = max(1, l / L_train)",
    "causal": "causal: the query at position p uses the table of length p + 1 for itself and its keys (longctx "
              "rope_type 'dynamic', factor 1), as generation with the KV cache does",
}
CSV_COLUMNS = ["variant", "rope_type", "logn_scaling", "set", "protocol", "stride", "length", "length_ratio",
               "windows", "tokens_scored", "perplexity", "accuracy", "loss", "seconds", "scored_tokens_per_s"]


def cells(lengths, sets, sliding):
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
class Sweep:
    rows: list  # one dict per (length, set, protocol, variant), in sweep order
    skipped: list  # the (length, set, protocol) cells the text was too short for, with the reason
    text_tokens: int  # tokens of eval text read
    bos: int | None  # BOS id prepended to every window, if the tokenizer does so itself


def run_sweep(model, tokenizer, documents, variants, lengths, settings, *, sets=EVAL_SETS, max_tokens=4096,
              sliding=None, batch_tokens=8192, cache=None, model_id="model", progress=True, log=None) -> Sweep:
    """Score every (length, set, protocol, variant) cell, reading finished rows from `cache` (a `RowCache`).

    `max_tokens` bounds the tokens per row: ⌊max_tokens / L⌋ chunked windows of L tokens (at least one), or
    ⌊max_tokens / S⌋ sliding windows; so a row costs about the same at every length but for attention. Cells
    the text is too short for are skipped with a message. A cached row's key holds the model id, the variant's
    exact scheme, the length, set, protocol and a digest of the token windows, so any change to them recomputes
    the row; variants that compute bit-identical numbers at a length (`effective_scheme`: `+logn` within
    L_train) share one row.
    """
    if sliding is not None and (isinstance(sliding, bool) or not isinstance(sliding, int) or sliding < 1):
        raise ValueError(f"--sliding stride {sliding!r} is invalid; it must be a whole number of tokens >= 1 "
                         "(or leave --sliding out).")
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    cache = cache if cache is not None else report.MemoryCache()
    bos = leading_bos(tokenizer)
    needed = max_tokens + 2 * max(lengths) + (sliding or 0) * windows_for_budget(max_tokens, sliding or 1)
    stream = token_stream(tokenizer, documents, max_tokens=needed)
    plan = list(cells(lengths, sets, sliding))
    sweep = Sweep([], [], len(stream), bos)
    bar = tqdm(total=len(plan) * len(variants), desc="sweep", unit="row", disable=not progress)
    for length, eval_set, protocol, stride in plan:
        try:
            windows = build_windows(stream, length, eval_set, protocol, stride, max_tokens, bos)
        except TextTooShort as err:
            log(f"skipped length {length} ({eval_set}, {protocol}): {err}.")
            sweep.skipped.append({"length": length, "set": eval_set, "protocol": protocol, "reason": str(err)})
            bar.update(len(variants))
            continue
        digest = report.RowCache.key(windows=windows.tolist())
        for variant in variants:
            scheme = variant_scheme(variant, settings, length)
            key = report.RowCache.key(model=model_id, scheme=effective_scheme(scheme, length, settings),
                                      length=length, set=eval_set, protocol=protocol, stride=stride, windows=digest,
                                      metric=metrics.METRIC_VERSION)
            row = cache.get(key)
            if row is None:
                bar.set_postfix_str(f"{variant} L={length} {eval_set}")
                row = score_cell(model, windows, variant, scheme, settings, eval_set, protocol, stride,
                                 batch_tokens, progress)
                cache.put(key, row)
            sweep.rows.append({**row, **row_labels(variant, scheme)})
            bar.update(1)
    bar.close()
    return sweep


def row_labels(variant, scheme) -> dict:
    return {"variant": variant, "rope_type": scheme["rope_parameters"]["rope_type"],
            "logn_scaling": scheme["logn_scaling"], "rope_parameters": scheme["rope_parameters"]}


def score_cell(model, windows, variant, scheme, settings, eval_set, protocol, stride, batch_tokens, progress):
    """One row: switch the position scheme in place (`set_rope`) and score the windows."""
    set_rope(model, **scheme)
    length = windows.shape[1]
    inner = tqdm(total=len(windows), desc=f"  {variant} L={length} {eval_set}", unit="window", leave=False,
                 disable=not progress or len(windows) < 2)
    start = time.perf_counter()
    score = score_windows(model, windows, stride if protocol == "sliding" else None,
                          max(1, batch_tokens // length), inner)
    seconds = time.perf_counter() - start
    inner.close()
    return {**row_labels(variant, scheme), "set": eval_set, "protocol": protocol, "stride": stride,
            "length": length, "length_ratio": length / settings.train_len, "windows": len(windows),
            "tokens_scored": score.count, "perplexity": score.perplexity, "accuracy": score.accuracy,
            "loss": score.loss, "seconds": seconds, "scored_tokens_per_s": score.count / max(seconds, 1e-9),
            "by_position": score.by_position()}


# --- reports ------------------------------------------------------------------------------------------------------
def protocol_record(session, args, sweep: Sweep, text: str) -> dict:
    """Everything the numbers depend on, written beside them (SPEC §3)."""
    s = session.settings
    logn = "+logn = Su's logn† (posthoc): q at position p × max(1, log(p+1)/log(L_train))"
    if s.native_logn == "trained":
        logn = "the model was pre-trained with log n (Su's -log n): every row uses it; no +logn rows"
    record = {
        "model": args.model, "model_fingerprint": session.loaded.fingerprint, "metric_version": metrics.METRIC_VERSION,
        "L_train": s.train_len, "factor_k": s.factor, "rope_theta": s.rope_theta, "rerope_window": s.rerope_window,
        "leaky_factor": s.leaky_factor, "mixed_exponent": 0.625, "dynamic": DYNAMIC_PROTOCOL[s.dynamic],
        "logn": logn, "lengths": session.lengths,
        "sets": {"plain": f"documents of {text}, joined by EOS, cut into disjoint windows (positions 0..L-1)",
                 "repeat": "each window = one segment of ceil(L/2) held-out tokens written twice, cut to L"},
        "chunked": "every prediction of every window scored (L − 1 per window)",
        "by_position": "loss at each query position p (predicting token p + 1), mean over the chunked windows",
        "max_tokens_per_row": f"{args.max_tokens}: floor(max_tokens / L) windows per row, at least one",
        "aggregation": "token-weighted: perplexity = exp(total NLL / tokens scored)",
        "bos": sweep.bos is not None, "text_tokens_read": sweep.text_tokens, "device": session.device,
        "dtype": session.dtype, "attn_implementation": session.loaded.model.config._attn_implementation,
        "command": session.command, "date": session.started,
    }
    if args.sliding:
        record["sliding"] = f"plain set, windows of L every S={args.sliding} tokens, last S predictions scored"
    return record


def tables(rows) -> list[tuple[str, list, list]]:
    """(title, header, body) per (set, protocol): variants × lengths, cells 'perplexity (accuracy %)'."""
    out = []
    for eval_set, protocol in dict.fromkeys((r["set"], r["protocol"]) for r in rows):
        part = [r for r in rows if r["set"] == eval_set and r["protocol"] == protocol]
        variants, lengths, body = report.pivot(part, "variant", "length",
                                               lambda r: f"{report.fmt(r['perplexity'])} ({100 * r['accuracy']:.1f})")
        title = f"{eval_set} set, {protocol}: perplexity (next-token accuracy %) by eval length"
        header = ["variant"] + [str(n) for n in lengths]
        out.append((title, header, [[variant] + line for variant, line in zip(variants, body)]))
    return out


def write_reports(run_dir, rows, protocol, skipped) -> dict:
    """extrapolation.{csv,json,md,png} under `run_dir`; returns their paths."""
    paths = {ext: run_dir / f"extrapolation.{ext}" for ext in ("csv", "json", "md", "png")}
    report.write_csv(paths["csv"], rows, CSV_COLUMNS)
    report.write_json(paths["json"], {"protocol": protocol, "skipped": skipped, "rows": rows})
    lines = [f"# Length extrapolation: {protocol['model']}", "", "## Protocol", "", report.protocol_markdown(protocol)]
    for title, header, body in tables(rows):
        lines += ["", f"## {title}", "", report.markdown_table(header, body)]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- length {s['length']} ({s['set']}, {s['protocol']}): {s['reason']}"
                                           for s in skipped]
    report.atomic_write(paths["md"], "\n".join(lines) + "\n")
    plot(rows, protocol, paths["png"])
    return paths


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
    parser = argparse.ArgumentParser(prog="python -m eval.extrapolation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    session = prepare(args, f"python -m eval.extrapolation {shlex.join(argv)}")
    documents, text = eval_text(args, session.loaded)
    cache = report.RowCache(session.run_dir / "cache")
    try:
        sweep = run_sweep(session.loaded.model, session.loaded.tokenizer, documents, session.variants,
                          session.lengths, session.settings, sets=args.sets, max_tokens=args.max_tokens,
                          sliding=args.sliding, batch_tokens=args.batch_tokens, cache=cache,
                          model_id=session.loaded.fingerprint, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished rows are kept in {cache.directory}; run the same command to resume.",
              file=sys.stderr)
        return 130
    if not sweep.rows:
        print("error: no row could be scored (see the messages above).", file=sys.stderr)
        return 1
    protocol = protocol_record(session, args, sweep, text)
    paths = write_reports(session.run_dir, sweep.rows, protocol, sweep.skipped)
    for title, header, body in tables(sweep.rows):
        print(f"\n{title}\n{report.text_table(header, body)}")
    print(f"\nL_train={session.settings.train_len}, k={session.settings.factor:g}; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

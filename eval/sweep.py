"""The sweep engine of `eval.extrapolation` and `eval.passkey`: one loop over (length, condition, variant) cells.

A metric (`eval.extrapolation.Extrapolation`, `eval.passkey.Passkey`) says which cells there are and how one is
scored; the engine does the rest, the same way for both: switches the position scheme with `set_rope` (never
reloading weights), reads and writes each finished row in the resumable cache (`report.RowCache`, keyed with the
metric's version), shows progress, skips the cells the text is too short for, and on Ctrl-C keeps every finished
row and exits 130. `main` is the command line around it; `write_reports` the RUN_DIR/NAME.{csv,json,md,png}.
"""

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol

from tqdm.auto import tqdm

from longctx.rope import set_rope

from . import report
from .cli import prepare
from .texts import TextTooShort
from .variants import effective_scheme, variant_scheme


@dataclass(frozen=True)
class Cell:
    """One (length, condition) point of a sweep; every variant is scored on it."""

    length: int
    length_ratio: float  # length / L_train
    condition: dict  # the other coordinates, part of each row's cache key: set/protocol/stride, or depth
    where: str  # how a message names the condition: "(plain, chunked)", "(depth 0.5)"
    inputs: Callable[[], object]  # builds what is scored (token windows, prompts); TextTooShort if it cannot
    skip_keys: tuple = ()  # the condition's keys a skipped-cell record keeps (empty: all of them)

    def skipped(self, reason: str) -> dict:
        keys = self.skip_keys or tuple(self.condition)
        return {"length": self.length, **{k: self.condition[k] for k in keys}, "reason": reason}


class Metric(Protocol):
    """What a sweep measures. Rows are the variant's `labels`, then the columns `score` returns."""

    name: ClassVar[str]  # the file stem of its reports: RUN_DIR/NAME.{csv,json,md,png}
    title: ClassVar[str]  # the Markdown report's heading
    metric_version: ClassVar[int]  # part of every cached row's key: bump it with any change to how a row is scored
    columns: ClassVar[list]  # the CSV columns
    labels: ClassVar[tuple]  # which of variant, rope_type, logn_scaling, rope_parameters its rows carry
    cache_dir: ClassVar[str]  # the row cache, under RUN_DIR

    @classmethod
    def from_args(cls, args, session) -> "Metric":
        """The metric a command line asks for (`args` parsed, the model loaded)."""

    def cells(self, tokenizer, lengths, settings) -> tuple[list[Cell], dict]:
        """(the cells in sweep order, what was read for them: protocol fields such as `bos`)."""

    def digest(self, inputs) -> dict:
        """The cache-key field naming a cell's inputs exactly (a hash of them)."""

    def score(self, model, cell: Cell, inputs, variant: str, progress: bool) -> dict:
        """The row's columns for one variant, its scheme already set on `model`."""

    def tables(self, rows) -> list[report.Table]:
        """What the Markdown report and the terminal show."""

    def protocol(self, session) -> dict:
        """The metric's own protocol fields (SPEC §3: recorded beside the numbers)."""

    def skipped_line(self, record: dict) -> str:
        """A skipped cell's line in the Markdown report."""

    def summary(self, session) -> str | None:
        """What the last printed line says before the paths written, if anything."""

    def plot(self, rows, protocol, path):
        """The PNG report."""


@dataclass
class Sweep:
    rows: list  # one dict per (cell, variant), in sweep order
    skipped: list  # the cells the text was too short for, with the reason
    read: dict = field(default_factory=dict)  # what the metric read for its cells (protocol fields)


def variant_labels(metric, variant: str, scheme: dict) -> dict:
    """The columns naming a row's variant and its scheme, those the metric's rows carry."""
    labels = {"variant": variant, "rope_type": scheme["rope_parameters"]["rope_type"],
              "logn_scaling": scheme["logn_scaling"], "rope_parameters": scheme["rope_parameters"]}
    return {key: labels[key] for key in metric.labels}


def run(metric, model, tokenizer, variants, lengths, settings, *, cache=None, model_id="model", progress=True,
        log=None) -> Sweep:
    """Score every (cell, variant) of `metric`, reading finished rows from `cache` (a `report.RowCache`).

    A row's key holds the model id, the variant's exact scheme, the cell (length and condition), a digest of its
    inputs and the metric's version, so any change to them recomputes the row; variants that compute
    bit-identical numbers at a length (`effective_scheme`: `+logn` within L_train, NTK with k = 1) share one
    row. Each row is cached the moment it is scored, so an interrupted sweep resumes where it stopped.
    """
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    cache = cache if cache is not None else report.MemoryCache()
    plan, read = metric.cells(tokenizer, lengths, settings)
    sweep = Sweep([], [], read)
    with tqdm(total=len(plan) * len(variants), desc=metric.name, unit="row", disable=not progress) as bar:
        for cell in plan:
            try:
                inputs = cell.inputs()
            except TextTooShort as err:
                log(f"skipped length {cell.length} {cell.where}: {err}.")
                sweep.skipped.append(cell.skipped(str(err)))
                bar.update(len(variants))
                continue
            digest = metric.digest(inputs)
            for variant in variants:
                scheme = variant_scheme(variant, settings, cell.length)
                labels = variant_labels(metric, variant, scheme)
                key = report.RowCache.key(model=model_id, scheme=effective_scheme(scheme, cell.length, settings),
                                          length=cell.length, **cell.condition, **digest,
                                          metric=metric.metric_version)
                row = cache.get(key)
                if row is None:
                    bar.set_postfix_str(f"{variant} L={cell.length} {cell.where}")
                    set_rope(model, **scheme)
                    row = {**labels, **metric.score(model, cell, inputs, variant, progress)}
                    cache.put(key, row)
                sweep.rows.append({**row, **labels})  # a shared row, labelled with the variant asked for
                bar.update(1)
    return sweep


# --- reports ------------------------------------------------------------------------------------------------------
def protocol_record(metric, session, args, sweep: Sweep) -> dict:
    """Everything the numbers depend on, written beside them (SPEC §3): the model and L_train, the metric's own
    protocol, what it read, and where and how it ran."""
    s, loaded = session.settings, session.loaded
    return {"model": args.model, "model_fingerprint": loaded.fingerprint, "metric_version": metric.metric_version,
            "L_train": s.train_len, "factor_k": s.factor, **metric.protocol(session), **sweep.read,
            "device": session.device, "dtype": session.dtype,
            "attn_implementation": loaded.model.config._attn_implementation, "command": session.command,
            "date": session.started}


def write_reports(metric, run_dir, rows, protocol, skipped) -> dict:
    """NAME.{csv,json,md,png} under `run_dir`; returns their paths."""
    paths = {ext: Path(run_dir) / f"{metric.name}.{ext}" for ext in ("csv", "json", "md", "png")}
    report.write_csv(paths["csv"], rows, metric.columns)
    report.write_json(paths["json"], {"protocol": protocol, "skipped": skipped, "rows": rows})
    lines = [f"# {metric.title}: {protocol['model']}", "", "## Protocol", "", report.protocol_markdown(protocol)]
    for table in metric.tables(rows):
        lines += ["", f"## {table.title}", "", report.markdown_table(table.header, table.body)]
    if skipped:
        lines += ["", "## Skipped", ""] + [metric.skipped_line(s) for s in skipped]
    report.atomic_write(paths["md"], "\n".join(lines) + "\n")
    metric.plot(rows, protocol, paths["png"])
    return paths


# --- command line -------------------------------------------------------------------------------------------------
def main(metric_type, parse_args, argv=None) -> int:
    """`python -m eval.NAME`: parse, load the model (`cli.prepare`), run the metric's sweep over the cache in
    RUN_DIR, write the reports and print the tables. Ctrl-C keeps the finished rows: exit status 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    session = prepare(args, f"python -m eval.{metric_type.name} {shlex.join(argv)}")
    metric = metric_type.from_args(args, session)
    cache = report.RowCache(session.run_dir / metric.cache_dir)
    try:
        sweep = run(metric, session.loaded.model, session.loaded.tokenizer, session.variants, session.lengths,
                    session.settings, cache=cache, model_id=session.loaded.fingerprint, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished rows are kept in {cache.directory}; run the same command to resume.",
              file=sys.stderr)
        return 130
    if not sweep.rows:
        print("error: no row could be scored (see the messages above).", file=sys.stderr)
        return 1
    protocol = protocol_record(metric, session, args, sweep)
    paths = write_reports(metric, session.run_dir, sweep.rows, protocol, sweep.skipped)
    for table in metric.tables(sweep.rows):
        print(f"\n{table.caption or table.title}\n{report.text_table(table.header, table.body)}")
    wrote = "wrote " + ", ".join(str(p) for p in paths.values())
    print("\n" + "; ".join(filter(None, [metric.summary(session), wrote])))
    return 0

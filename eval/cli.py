"""Command-line pieces shared by `eval.extrapolation` and `eval.passkey`: model, variants, lengths, run folder."""

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from longctx.data import progress_bars

from .models import DEFAULT_CORPUS, LoadedModel, load_model
from .variants import (BASE_VARIANTS, DYNAMIC_MODES, LOGN, SCALED_BY_K, VARIANTS, available_variants, check_variants,
                       make_settings)

DEFAULT_LENGTHS = ("1x", "2x", "4x", "8x", "16x")


def add_common_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="default",
                        help="'default' (the embedded model, trained once and cached), a model directory, or a "
                             ".gguf file")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help=f"position schemes (default: all). Allowed: {', '.join(VARIANTS)}")
    parser.add_argument("--lengths", nargs="+", default=list(DEFAULT_LENGTHS), metavar="L",
                        help="eval lengths: token counts (4096) or multiples of L_train (2x); default "
                             + " ".join(DEFAULT_LENGTHS))
    parser.add_argument("--factor", type=float, default=None,
                        help="scale factor k of pi/ntk*/yarn (default: longest length / L_train)")
    parser.add_argument("--rerope-window", type=int, default=None, help="ReRoPE window w (default: L_train / 4)")
    parser.add_argument("--leaky-factor", type=float, default=None, help="Leaky ReRoPE factor (default: 2k)")
    parser.add_argument("--mixed-exponent", type=float, default=None,
                        help="ntk-mixed's exponent in (0, 1] (default 0.625, Su's for his GAU; his LLaMA patch: 0.75)")
    parser.add_argument("--dynamic", default="prefill", choices=DYNAMIC_MODES,
                        help="how `dynamic` is scored: prefill = the window's length sets the scale (HF's full "
                             "forward; default), causal = each query its own length's table, as generation with "
                             "the KV cache (much slower beyond L_train)")
    parser.add_argument("--corpus", default=None,
                        help="eval text: a corpus name or path for longctx.data.corpus_splits (default: the corpus "
                             f"in the model's training config, else {DEFAULT_CORPUS})")
    parser.add_argument("--split", default="test", choices=["test", "validation", "train"],
                        help="which whole-document split to evaluate on (default: test, held out from training)")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="seed of the split (default: the model's training split_seed, else 0)")
    parser.add_argument("--output-dir", default="results", help="results go to OUTPUT_DIR/RUN/ (default: results)")
    parser.add_argument("--run", default=None, help="run name (default: the model's name)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m eval.NAME` with the arguments every sweep shares; the command adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    return parser


def parse_lengths(tokens, train_len: int) -> list[int]:
    """'2x' -> 2·L_train, '4096' -> 4096; sorted, without duplicates; each at least 2 tokens."""
    lengths = set()
    for token in tokens:
        text = str(token).strip().lower()
        try:
            value = round(float(text[:-1]) * train_len) if text.endswith("x") else int(text)
        except ValueError:
            raise ValueError(f"--lengths: {token!r} is not a length; use token counts (4096) or multiples of "
                             f"L_train={train_len} (2x).") from None
        if value < 2:
            raise ValueError(f"--lengths: {token!r} gives {value} tokens; a window needs at least 2.")
        lengths.add(value)
    return sorted(lengths)


def eval_text(args, loaded: LoadedModel) -> tuple[list[str], str]:
    """(documents, description): the `--split` of `--corpus`, by default the held-out split of the corpus the
    model was trained on (`longctx.data.corpus_splits`)."""
    from longctx.data import corpus_splits

    corpus, seed = loaded.trained_on or (DEFAULT_CORPUS, 0)
    corpus = args.corpus or corpus
    seed = seed if args.split_seed is None else args.split_seed
    documents = corpus_splits(corpus, seed=seed)[args.split]
    if not documents:
        raise ValueError(f"--corpus {corpus!r} has no documents in its {args.split!r} split.")
    return documents, f"{corpus}, {args.split} split (seed {seed}, whole documents), {len(documents)} documents"


@dataclass
class Session:
    loaded: LoadedModel
    settings: object  # VariantSettings
    variants: list
    lengths: list
    run_dir: Path
    device: str
    dtype: str
    command: str
    started: str


def prepare(args, command: str) -> Session:
    """Check the cheap arguments, load the model, resolve variants and lengths against it. `command` is the
    command line, recorded with the results."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if args.variants:
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant {unknown[0]!r}; allowed: {', '.join(VARIANTS)}.")
    with progress_bars(not args.no_progress):
        loaded = load_model(args.model, getattr(torch, dtype), device, progress=not args.no_progress)
    train_len = _train_len(loaded.model.config)
    lengths = parse_lengths(args.lengths, train_len)
    settings = make_settings(loaded.model.config, max(lengths), args.factor, args.rerope_window, args.leaky_factor,
                             args.dynamic, args.mixed_exponent)
    variants = check_variants(args.variants or available_variants(settings), settings)
    if not args.variants and settings.native_logn == "trained":
        print("The model was pre-trained with log-n scaling: every variant uses it (Su's '-log n' rows); the '+logn' "
              f"variants are left out. Variants: {', '.join(BASE_VARIANTS)}.")
    same = [v for v in variants if v.removesuffix(LOGN) in SCALED_BY_K]  # what k = 1 would make plain RoPE
    if same and args.factor is None and settings.factor == 1:
        print(f"note: k = 1 (no --factor, and the longest length, {max(lengths)}, is within L_train = {train_len}): "
              f"{', '.join(same)} compute plain RoPE's numbers here; give --factor K to score them as they extend "
              "to K × L_train.", file=sys.stderr)
    run_dir = Path(args.output_dir) / (args.run or loaded.name)
    return Session(loaded, settings, variants, lengths, run_dir, device, dtype, command,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _train_len(config) -> int:
    from longctx.configuration_longctx import original_max_positions

    return original_max_positions(config)


def run_cli(main):
    """Run `main()`, turning the clear errors of bad input into one line on stderr and exit status 2."""
    try:
        return main()
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

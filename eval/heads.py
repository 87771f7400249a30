"""Which attention heads copy, and what each position scheme does to them.

    python -m eval.heads --model default | DIR [--variants baseline pi ntk yarn] [--factors 1.25 2 4 8] [--lengths 1x]

For each variant (and each k of `--factors` for the schemes scaled by k), at each length (default L_train), on
held-out text and on eval.passkey's prompt (RESULTS.md §1.0 and §3 read these):
- previous-token score of each head: its mean attention from token i to token i − 1 on plain windows — the first
  half of an induction circuit (Olsson et al. 2022);
- retrieval score of each head: its attention from the position before each answer token to the earlier places
  where the same token followed the same token (in the needle: where an induction head copies the key from);
- passkey accuracy and answer NLL (eval.passkey's prompt, keys and scoring);
- repeat-set halves: mean loss on the first and on the second copy of held-out text written twice (eval.texts'
  repeat set): a model that copies scores the second far below the first;
- induction score of each head: on those repeat windows, its attention from each token of the second copy to the
  token after the same token's first occurrence — the general copying that the retrieval score tests on one
  phrase (Olsson et al.'s prefix matching).
The table follows the heads that score highest in the first row. Needs the attention weights: the model runs
eager, one window at a time (L² × heads × layers floats); the ReRoPE variants, which never form the whole
matrix, get no attention columns; a length too short for the passkey prompt (a near-character vocabulary at
L_train) gets no passkey or retrieval columns. Writes RUN_DIR/heads.{md,json}.
"""

import math
import sys

import torch

from longctx.rope import KEYS_BEFORE_ROPE, set_rope

from . import report
from .cli import eval_text, make_parser, prepare, run_cli
from .metrics import token_scores
from .passkey import (add_prompt_arguments, answer_ids, check_prompt_arguments, make_keys, passkey_samples,
                      score_trials)
from .texts import TextTooShort, chunked_windows, leading_bos, token_stream
from .variants import LOGN, SCALED_BY_K, make_settings, variant_scheme

def previous_token_scores(attentions) -> torch.Tensor:
    """(layers, heads): mean attention weight from each token i ≥ 1 to token i − 1, over windows and positions."""
    return torch.stack([a.diagonal(offset=-1, dim1=-2, dim2=-1).float().mean((0, -1)) for a in attentions])


def copy_sources(ids: list[int], n_answer: int, n_question: int) -> list[tuple[int, list[int]]]:
    """For each answer token t: (t − 1, the positions j before the question with ids[j] = ids[t] and
    ids[j − 1] = ids[t − 1]) — where an induction head predicting t would attend."""
    start, prompt_end = len(ids) - n_answer, len(ids) - n_answer - n_question
    return [(t - 1, [j for j in range(1, prompt_end) if ids[j] == ids[t] and ids[j - 1] == ids[t - 1]])
            for t in range(start, len(ids))]


def retrieval_scores(attentions, sources) -> torch.Tensor | None:
    """(layers, heads): attention from each query to its sources, summed over the sources, averaged over the
    (query, sources) pairs that have any; `attentions` of one window (batch 1). None when no pair has a source."""
    pairs = [(query, where) for query, where in sources if where]
    if not pairs:
        return None
    return torch.stack([torch.stack([a[0, :, query, where].float().sum(-1) for query, where in pairs]).mean(0)
                        for a in attentions])


def induction_scores(attentions, unit: int, offset: int) -> torch.Tensor:
    """(layers, heads): on repeat windows (a unit of `unit` tokens from position `offset`, then its copy), the mean
    attention from each token p of the copy to the token after its first occurrence, p − unit + 1 (Olsson et al.'s
    prefix matching; the last token has nothing after it to predict)."""
    queries = torch.arange(offset + unit, attentions[0].shape[-1] - 1)
    return torch.stack([a[:, :, queries, queries - unit + 1].float().mean((0, -1)) for a in attentions])


def halves(nll: torch.Tensor, unit: int, offset: int) -> tuple[float, float]:
    """Mean loss on the first copy and on the second copy of repeat windows (nll: (batch, L − 1), predicting tokens
    1..L − 1); each copy's first token is left out (the first has nothing before it, the second's predecessor is
    the end of the first copy)."""
    return float(nll[:, offset:offset + unit - 1].mean()), float(nll[:, offset + unit:].mean())


@torch.no_grad()
def measure(model, plain, repeat, samples, unit, offset) -> dict:
    """Every measurement of one (variant, k, length): windows and samples one at a time."""
    eager = model.config.rope_parameters["rope_type"] not in KEYS_BEFORE_ROPE  # else no attention weights
    previous = retrieval = induction = None
    if eager:
        previous = sum(previous_token_scores(model(w[None], output_attentions=True).attentions) for w in plain)
        previous = previous / len(plain)
        induction = sum(induction_scores(model(w[None], output_attentions=True).attentions, unit, offset)
                        for w in repeat) / len(repeat)
        found = [retrieval_scores(model(plain.new_tensor([ids]), output_attentions=True).attentions, sources)
                 for ids, _, sources in samples]
        found = [r for r in found if r is not None]
        retrieval = sum(found) / len(found) if found else None
    accuracy, answer_nll = (score_trials(model, [(ids, n_answer) for ids, n_answer, _ in samples]) if samples
                            else (None, None))
    first, second = halves(torch.cat([token_scores(model, w[None])[0] for w in repeat]), unit, offset)
    return {"passkey": accuracy, "answer_nll": answer_nll, "previous_token_by_head": previous,
            "retrieval_by_head": retrieval, "induction_by_head": induction, "first_half": first,
            "second_half": second}


def top_head(scores) -> tuple[int, int] | None:
    """(layer, head) of the highest score; None without scores."""
    return None if scores is None else divmod(int(scores.argmax()), scores.shape[1])


def name(head) -> str:
    return "–" if head is None else f"L{head[0]}H{head[1]}"


def parse_args(argv=None):
    parser = make_parser("python -m eval.heads", __doc__)
    parser.set_defaults(lengths=["1x"], variants=["baseline", "pi", "ntk", "yarn"])
    for action in parser._actions:  # the shared options' help, with this command's defaults
        if action.dest == "variants":
            action.help = action.help.replace("(default: all)", "(default: baseline pi ntk yarn)")
        elif action.dest == "lengths":
            action.help = action.help.split("; default")[0] + "; default 1x"
    parser.add_argument("--factors", nargs="+", type=float, default=None, metavar="K",
                        help="k of the schemes scaled by k, one row each (default: --factor, else 8)")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of each set (default 16)")
    add_prompt_arguments(parser, depths=(0.0, 0.5, 1.0), trials=8)
    args = parser.parse_args(argv)
    check_prompt_arguments(parser, args)
    if args.windows < 1:
        parser.error("--windows must be >= 1")
    if any(k < 1 for k in args.factors or []):
        parser.error(f"--factors {args.factors}: each k must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    factors = args.factors or [args.factor or 8.0]
    args.factor = factors[0]  # the settings `prepare` checks the variants with (no "k = 1" note: k is given)
    session = prepare(args, "python -m eval.heads " + " ".join(sys.argv[1:] if argv is None else argv))
    loaded, device, lengths = session.loaded, session.device, session.lengths
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    model.set_attn_implementation("eager")
    documents, described = eval_text(args, loaded)
    bos = leading_bos(tokenizer)
    stream = token_stream(tokenizer, documents, max_tokens=args.windows * max(lengths))
    keys = make_keys(args.trials, 5, 0)
    rows = []
    for length in lengths:
        plain = chunked_windows(stream, length, "plain", args.windows, bos).to(device)
        repeat = chunked_windows(stream, length, "repeat", args.windows, bos).to(device)
        offset = int(bos is not None)
        unit = math.ceil((length - offset) / 2)  # eval.texts' repeat set: one unit written twice, cut to L
        samples = []
        try:
            for depth in args.depths:
                for key, (ids, n_answer) in zip(keys, passkey_samples(tokenizer, keys, length, depth, bos)):
                    samples.append((ids, n_answer, copy_sources(ids, n_answer, len(answer_ids(tokenizer, key)[0]))))
        except TextTooShort as err:  # e.g. a near-character vocabulary at L_train: the rest is still measured
            samples = []
            print(f"L={length}: no passkey or retrieval columns: {err}", file=sys.stderr)
        for variant in session.variants:
            for k in (factors if variant.removesuffix(LOGN) in SCALED_BY_K else [None]):
                settings = make_settings(model.config, length, k, args.rerope_window, args.leaky_factor,
                                         args.dynamic, args.mixed_exponent)
                set_rope(model, **variant_scheme(variant, settings, length))
                rows.append({"variant": variant, "factor": k, "length": length,
                             **measure(model, plain, repeat, samples, unit, offset)})
                if not args.no_progress:
                    print(f"{variant} k={k} L={length}: passkey {rows[-1]['passkey']}", file=sys.stderr)
    write(rows, args, session, described)
    return 0


def write(rows, args, session, described):
    """Print the table (the first row's top heads followed in every row); write heads.{md,json}."""
    previous_head = top_head(rows[0]["previous_token_by_head"])
    retrieval_head = top_head(rows[0]["retrieval_by_head"])
    induction_head = top_head(rows[0]["induction_by_head"])

    def at(scores, head):
        return None if scores is None or head is None else round(float(scores[head]), 3)

    header = ["variant", "k", "length", "passkey %", "answer NLL", f"previous-token {name(previous_head)}",
              f"retrieval {name(retrieval_head)}", f"induction {name(induction_head)}", "repeat 1st half",
              "repeat 2nd half"]

    def rounded(x, digits=0, scale=1):
        return "–" if x is None else round(scale * x, digits)

    body = [[r["variant"], r["factor"] or "–", r["length"], rounded(r["passkey"], scale=100),
             rounded(r["answer_nll"], 2),
             at(r["previous_token_by_head"], previous_head), at(r["retrieval_by_head"], retrieval_head),
             at(r["induction_by_head"], induction_head), round(r["first_half"], 3), round(r["second_half"], 3)]
            for r in rows]
    print(f"{session.loaded.name}: attention heads that copy ({described})")
    print(report.text_table(header, body))
    run_dir = session.run_dir
    protocol = {"command": session.command, "model": session.loaded.name, "text": described,
                "windows": args.windows, "depths": args.depths, "trials": args.trials, "variants": session.variants,
                "date": session.started}
    as_lists = [{key: (value.tolist() if isinstance(value, torch.Tensor) else value) for key, value in r.items()}
                for r in rows]
    report.write_json(run_dir / "heads.json", {"protocol": protocol, "rows": as_lists})
    report.atomic_write(run_dir / "heads.md", "# Attention heads that copy\n\n" + report.protocol_markdown(protocol)
                        + "\n\n" + report.markdown_table(header, body) + "\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))

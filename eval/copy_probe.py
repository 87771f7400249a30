"""Does a model learn to copy within a training budget? `python -m eval.copy_probe [--mode repeat] [--steps 600]`.

Copying (an induction head, Olsson et al. 2022) is what the repeat set and passkey retrieval measure (RESULTS.md
section 3). This probe trains a `LongCtxForCausalLM` from scratch on the train split of a corpus, with a fraction of
the windows made to reward copying, and logs every `--every` steps the loss of each half of three held-out repeat
sets — a text segment of L/2 tokens written twice, L/2 uniform random ids written twice, and the same with ids from
a 16-symbol alphabet. A model that copies scores the second half far below the first.

Windows that reward copying (`--mode`): `repeat` — a text segment of `--segment` tokens repeated to fill the window;
`random` — the same with uniform random ids, from an alphabet that may grow along `--curriculum`
("16:100,64:200": 16 symbols up to step 100, then 64 up to step 200, then the whole vocabulary; with
`--fresh-alphabet` each window draws its own alphabet of that size from the whole vocabulary, so that only a match
by token identity pays, not one learned for a fixed set of symbols); `span` — one text
span copied later in the window (`train`'s `copy_fraction`, `longctx.data.add_copied_spans`). Writes one JSON line
per evaluation to `--out`.
"""

import argparse
import json
import math
import tempfile
import time

import numpy as np
import torch

from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.data import copy_spans, corpus_splits, encode_documents, train_tokenizer
from train.loop import param_groups

FIRST_ID = 4  # after <unk>, <s>, </s>, <pad> (longctx.data.train_tokenizer)


def token_stream(tokenizer, documents) -> np.ndarray:
    """The documents' ids joined with EOS, one array."""
    return np.concatenate([np.array(ids + [tokenizer.eos_token_id], dtype=np.int64)
                           for ids in encode_documents(tokenizer, documents)])


def parse_curriculum(text: str) -> list[tuple[int, int]]:
    """"16:100,64:200" -> [(16, 100), (64, 200)]: (alphabet size, last step)."""
    try:
        return [tuple(int(x) for x in part.split(":")) for part in text.split(",")] if text else []
    except ValueError:
        raise SystemExit(f"--curriculum={text!r} is invalid; expected ALPHABET:LAST_STEP pairs, e.g. 16:100,64:200")


class CopyWindows:
    """Training batches: text windows, a `fraction` of them rewritten to reward copying (`mode`)."""

    def __init__(self, stream, vocab, eos_id, args):
        self.stream, self.eos_id, self.args = stream, eos_id, args
        self.rng = np.random.default_rng(args.seed)
        self.symbols = np.random.default_rng(7).permutation(np.arange(FIRST_ID, vocab))  # alphabet order
        self.curriculum = parse_curriculum(args.curriculum)
        self.segment = tuple(int(x) for x in args.segment.split(","))

    def alphabet(self, step) -> int:
        return next((size for size, last in self.curriculum if step <= last), len(self.symbols))

    def batch(self, step) -> torch.Tensor:
        a, rng, length = self.args, self.rng, self.args.seq_len
        x = np.stack([self.stream[s:s + length] for s in rng.integers(0, len(self.stream) - length, a.batch_size)])
        if a.mode == "span":  # exactly `train`'s copy_fraction augmentation, seeded by window number
            indices = range(step * a.batch_size, (step + 1) * a.batch_size)
            x = copy_spans({"input_ids": x}, indices, a.fraction, self.segment, a.seed, self.eos_id)["input_ids"]
            return torch.from_numpy(x)
        for row in x:
            if rng.random() >= a.fraction:
                continue
            n = int(rng.integers(self.segment[0], self.segment[1] + 1))
            if a.mode == "repeat":
                row[:] = np.resize(row[:n].copy(), length)
            else:  # random
                size = self.alphabet(step)
                symbols = rng.choice(self.symbols, size, replace=False) if a.fresh_alphabet else self.symbols
                row[:] = np.resize(symbols[rng.integers(0, size, n)], length)
        return torch.from_numpy(x)


def repeat_sets(stream, symbols, length, count=32, seed=123) -> dict[str, torch.Tensor]:
    """Held-out windows whose second half repeats the first: text, uniform ids, a 16-symbol alphabet."""
    rng, half = np.random.default_rng(seed), length // 2
    text = [np.tile(stream[s:s + half], 2) for s in rng.integers(0, len(stream) - half, count)]
    uniform = [np.tile(rng.choice(symbols, half), 2) for _ in range(count)]
    small = [np.tile(symbols[rng.integers(0, 16, half)], 2) for _ in range(count)]
    return {name: torch.from_numpy(np.stack(rows)) for name, rows in
            (("text", text), ("uniform", uniform), ("alphabet16", small))}


def build_model(args, vocab_size: int):
    """The probe's model: `LongCtxForCausalLM`, or transformers' own `LlamaForCausalLM` of the same shape (the same
    architecture written by others: a result both reproduce belongs to the task, not to longctx's code)."""
    shape = dict(vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=int(args.hidden_size * 2.75),
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                 max_position_embeddings=args.seq_len, tie_word_embeddings=args.tie_word_embeddings)
    if args.implementation == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    return LongCtxForCausalLM(LongCtxConfig(**shape))


@torch.no_grad()
def halves(model, windows) -> tuple[float, float]:
    """Mean loss predicting the first half's tokens and the second half's. Any causal LM, one code path: the full
    logits of either implementation (`--implementation`) are scored by the same cross-entropy."""
    logits = model(windows).logits[:, :-1].float()  # (batch, L − 1, vocab): predicting token t + 1
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    half = windows.shape[1] // 2
    return round(float(nll[:, :half - 1].mean()), 3), round(float(nll[:, half:].mean()), 3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--mode", default="repeat", choices=["repeat", "random", "span"])
    p.add_argument("--fraction", type=float, default=0.5, help="windows rewritten to reward copying")
    p.add_argument("--segment", default="32,128", help="the repeated segment's length in tokens: MIN,MAX")
    p.add_argument("--curriculum", default="", help="`random` mode's alphabet by step: SIZE:LAST_STEP,...")
    p.add_argument("--fresh-alphabet", action="store_true",
                   help="`random` mode: each window draws its own alphabet from the whole vocabulary")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--implementation", default="longctx", choices=["longctx", "llama"],
                   help="longctx's model, or transformers' LlamaForCausalLM of the same shape (an independent check)")
    p.add_argument("--tie-word-embeddings", action="store_true", help="one matrix for the input and output embedding")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="copy_probe.jsonl")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    splits = corpus_splits(args.corpus)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = train_tokenizer(splits["train"], args.vocab_size, directory, seed=args.seed)
    train, held_out = token_stream(tokenizer, splits["train"]), token_stream(tokenizer, splits["validation"])
    model = build_model(args, len(tokenizer))
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    data = CopyWindows(train, len(tokenizer), tokenizer.eos_token_id, args)
    held = repeat_sets(held_out, data.symbols, args.seq_len)
    start = time.time()
    with open(args.out, "a") as out:
        for step in range(1, args.steps + 1):
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # to lr / 10
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, step / max(1, args.warmup_steps)) * cosine
            x = data.batch(step)
            loss = model(x, labels=x).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % args.every and step != args.steps:
                continue
            model.eval()
            record = {"step": step, "seconds": round(time.time() - start), "train_loss": round(loss.item(), 3),
                      "alphabet": data.alphabet(step) if args.mode == "random" else None,
                      **{f"{name} (first, second half)": halves(model, w) for name, w in held.items()}}
            model.train()
            if step == args.every:
                record["args"] = vars(args)
            print(json.dumps(record), flush=True)
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

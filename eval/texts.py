"""Eval text -> token windows: Su's two sets (methods.md §7) and the windowings of SPEC §3.

- `plain`: held-out documents, tokenised, joined by EOS into one stream, cut into disjoint windows of L tokens.
- `repeat`: each window is one segment of ⌈L/2⌉ held-out tokens written twice (then cut to L), so the second
  half can be copied from the first, L/2 positions back: Su's test of global dependency.
- `sliding` (plain only): windows of L tokens starting every S tokens; the caller scores the last S of each.

Where the tokenizer itself starts every text with BOS, every window starts with BOS too (and L counts it).
"""

import math

import torch

from longctx.data import encode_documents

EVAL_SETS = ("plain", "repeat")


class TextTooShort(ValueError):
    """The eval text holds fewer tokens than one window needs."""


def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer prepends it to every text by itself (Llama-style), else None."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def token_stream(tokenizer, documents, max_tokens=None) -> torch.Tensor:
    """Documents tokenised without special tokens (`longctx.data.encode_documents`, the ids of
    `tokenizer(text)`) and joined by EOS (where the tokenizer has one), 1-D int64.

    Stops once `max_tokens` are gathered, so a large split is tokenised only as far as the sweep needs."""
    eos, ids = tokenizer.eos_token_id, []
    for document in documents:
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(encode_documents(tokenizer, [document])[0])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def _prepend(windows: torch.Tensor, bos) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat((torch.full((len(windows), 1), bos, dtype=windows.dtype), windows), dim=1)


def _too_short(stream, needed, length, eval_set):
    if len(stream) < needed:
        raise TextTooShort(f"the eval text has {len(stream)} tokens, fewer than the {needed} that one {eval_set} "
                           f"window of length {length} needs")


def chunked_windows(stream: torch.Tensor, length: int, eval_set: str, n_windows: int, bos=None) -> torch.Tensor:
    """Up to `n_windows` disjoint windows (n, length) of the `plain` or `repeat` set (at least one, or
    `TextTooShort`)."""
    content = length - (bos is not None)
    if eval_set == "plain":
        _too_short(stream, content, length, eval_set)
        n = min(n_windows, len(stream) // content)
        windows = stream[:n * content].view(n, content)
    elif eval_set == "repeat":
        unit = math.ceil(content / 2)
        _too_short(stream, unit, length, eval_set)
        n = min(n_windows, len(stream) // unit)
        windows = stream[:n * unit].view(n, unit).repeat(1, 2)[:, :content]
    else:
        raise ValueError(f"unknown eval set {eval_set!r}; allowed: {', '.join(EVAL_SETS)}")
    return _prepend(windows, bos)


def sliding_windows(stream: torch.Tensor, length: int, stride: int, n_windows: int, bos=None) -> torch.Tensor:
    """Up to `n_windows` windows (n, length) of plain text starting every `stride` tokens: the last `stride`
    predictions of consecutive windows cover consecutive stretches of the text, each with ≥ L − S context."""
    content = length - (bos is not None)
    if not 1 <= stride < content:
        raise ValueError(f"--sliding stride {stride} is invalid for length {length}; it must be in [1, {content}).")
    _too_short(stream, content, length, "sliding")
    n = min(n_windows, (len(stream) - content) // stride + 1)
    return _prepend(stream.unfold(0, content, stride)[:n], bos)


def windows_for_budget(max_tokens: int, tokens_per_window: int) -> int:
    """Whole windows within a budget of `max_tokens` tokens (at least one)."""
    return max(1, max_tokens // tokens_per_window)

"""Scoring protocols of SPEC §3: per-token loss and accuracy from one forward, `chunked`, `sliding`, `by-position`.

Aggregation is token-weighted: perplexity = exp(total NLL / tokens scored), accuracy = hits / tokens scored.
The metrics built on this scoring version their cached rows (`metric_version` of `eval.extrapolation.Extrapolation`
and `eval.passkey.Passkey`): a change here that alters what a row's numbers mean bumps theirs.
"""

import math

import torch


def token_scores(model, input_ids: torch.Tensor):
    """(nll, correct), each (batch, L − 1): loss and argmax hit of predicting token t+1 from tokens 0..t.

    One forward of the decoder; the output head runs over chunks of positions (`LongCtxForCausalLM.score_tokens`),
    so memory stays flat in L and in the vocabulary size (a 16k window of a 49k vocabulary would otherwise need
    3 GB of logits).
    """
    return model.score_tokens(input_ids)


class Score:
    """Running sums over windows: NLL, hits and count of the scored tokens, and the loss at each position."""

    def __init__(self):
        self.nll_sum, self.correct, self.count = 0.0, 0, 0
        self.position_nll, self.position_windows = None, 0  # (L - 1,) float64 sums over chunked windows

    def add(self, nll: torch.Tensor, correct: torch.Tensor, scored: int | None = None):
        """Add a batch of windows (batch, L − 1); only the last `scored` predictions count (None: all)."""
        if scored is None:
            sums = nll.double().sum(dim=0).cpu()
            self.position_nll = sums if self.position_nll is None else self.position_nll + sums
            self.position_windows += nll.shape[0]
        else:
            nll, correct = nll[:, -scored:], correct[:, -scored:]
        self.nll_sum += float(nll.double().sum())
        self.correct += int(correct.sum())
        self.count += nll.numel()

    @property
    def loss(self) -> float:
        return self.nll_sum / self.count

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows a float past ~709

    @property
    def accuracy(self) -> float:
        return self.correct / self.count

    def by_position(self, max_points=512) -> dict | None:
        """Mean loss at each query position p (predicting token p+1), averaged over windows, in buckets of
        `bucket` consecutive positions so that at most `max_points` values are kept."""
        if self.position_nll is None:
            return None
        curve = self.position_nll / self.position_windows
        bucket = math.ceil(len(curve) / max_points)
        means = [float(curve[i:i + bucket].mean()) for i in range(0, len(curve), bucket)]
        return {"bucket": bucket, "loss": means}


def score_windows(model, windows: torch.Tensor, scored=None, batch_size=1, progress=None) -> Score:
    """Score `windows` (n, L) in batches; `scored` = the number of final predictions counted per window
    (the sliding stride S), None for all (chunked). `progress` is a tqdm bar advanced by windows."""
    score = Score()
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        nll, correct = token_scores(model, batch)
        score.add(nll, correct, scored)
        if progress is not None:
            progress.update(len(batch))
    return score

"""Next-token losses: the reference over materialised logits, and the fused output projection + cross-entropy.

`causal_lm_loss(logits, labels)` is the reference (what transformers computes). `linear_cross_entropy(hidden,
weight, labels)` gives the same loss from the hidden states without ever holding the (tokens × vocab) logits: it
projects a chunk of tokens at a time, and when gradients are wanted it computes them in the same pass
(∂loss/∂logits = softmax − one-hot, formed in place over the chunk's logits), so the backward only scales two stored
gradients. Memory: one chunk of logits plus grad buffers the size of `hidden` and `weight`, instead of the logits
and their log-softmax; time: no recomputation, and fewer passes over the logits than log_softmax + its backward.
"""

import torch
import torch.nn.functional as F

LOGITS_CHUNK_BYTES = 2**25  # float32 logits per chunk (32 MiB; at least 256 tokens): BENCHMARKS.md, "Loss"


def next_token_targets(labels, shift_labels=None):
    """The target of each position, flattened: `shift_labels` as given (already shifted: a context-parallel shard
    cannot shift across its boundary, so accelerate passes them), else `labels` shifted — position t is scored on
    token t+1, the last on nothing (-100). transformers' `ForCausalLMLoss` convention."""
    if shift_labels is not None:
        return shift_labels.reshape(-1)
    return F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)


def causal_lm_loss(logits, labels, num_items_in_batch=None, shift_labels=None):
    """Reference: next-token cross-entropy over materialised logits, label -100 ignored, mean over scored tokens."""
    labels = next_token_targets(labels, shift_labels).to(logits.device)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels, ignore_index=-100, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())


def logits_chunk_size(vocab_size, chunk_size=None):
    """Tokens per chunk: `chunk_size`, or as many as keep one chunk of float32 logits at `LOGITS_CHUNK_BYTES`."""
    return chunk_size or max(256, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def _chunk_logits(hidden, weight):
    """Logits (tokens, vocab) in float32 (a no-op cast for float32 models)."""
    return (hidden @ weight.T).float()


def _exp_shifted_(logits, targets):
    """In place: logits ← exp(logits − rowmax m). Returns per row the NLL log Σ exp(x − m) + m − x_target, the
    argmax and Σ exp(x − m): one max pass serves the loss, the argmax and the softmax (= logits / sums)."""
    top, argmax = logits.max(dim=-1)  # the first maximal index on ties, as argmax
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    sums = logits.sub_(top[:, None]).exp_().sum(dim=-1)
    return sums.log() + top - target_logit, argmax, sums


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_t −log softmax(h_t Wᵀ)[y_t] over tokens with y_t ≠ −100, chunk by chunk, gradients formed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            valid = y != -100
            logits = _chunk_logits(h, weight)  # (rows, vocab) float32
            nll, _, sums = _exp_shifted_(logits, y.clamp(min=0))
            total += (nll * valid).sum()
            grad = logits.div_(sums[:, None])  # softmax, in place
            grad.scatter_add_(1, y.clamp(min=0)[:, None], -valid[:, None].float())  # − one-hot of the target
            if torch.compiler.is_compiling() or not bool(valid.all()):  # (compiled: no data-dependent branch)
                grad.mul_(valid[:, None])  # unscored rows contribute nothing
            grad = grad.to(hidden.dtype)
            if want_hidden:
                grad_hidden[start:start + chunk] = grad @ weight
            if want_weight and grad.dtype == torch.float32:
                grad_weight.addmm_(grad.T, h)
            elif want_weight:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = [None if g is None else g * grad_total.to(g.dtype) for g in (grad_hidden, grad_weight)]
        return scale[0], scale[1], None, None


def linear_cross_entropy(hidden_states, weight, labels, num_items_in_batch=None, chunk_size=None, shift_labels=None):
    """`causal_lm_loss(hidden_states @ weightᵀ, labels, shift_labels=...)` without materialising the logits (module
    docstring).

    `hidden_states` (batch, seq, hidden); `weight` (vocab, hidden); under autocast both are cast to its dtype first,
    as `F.linear` would be. Differentiable in `hidden_states` and `weight`."""
    device = hidden_states.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        hidden_states, weight = hidden_states.to(dtype), weight.to(dtype)
    targets = next_token_targets(labels, shift_labels).to(device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    chunk = logits_chunk_size(weight.shape[0], chunk_size)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        with torch.autocast(device.type, enabled=False):
            total = _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            y = targets[start:start + chunk]
            nll = _exp_shifted_(_chunk_logits(hidden[start:start + chunk], weight), y.clamp(min=0))[0]
            total += (nll * (y != -100)).sum()
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


@torch.no_grad()
def token_scores(hidden, weight, targets, chunk_size=None):
    """Next-token NLL (float32) and argmax hits per row of `hidden` (tokens, hidden) against `targets` (tokens,),
    chunk by chunk: the evaluation workload, without the full logits."""
    nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    correct = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    chunk = logits_chunk_size(weight.shape[0], chunk_size)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        nll[rows], argmax, _ = _exp_shifted_(_chunk_logits(hidden[rows], weight), targets[rows])
        correct[rows] = argmax == targets[rows]
    return nll, correct


__all__ = ["causal_lm_loss", "linear_cross_entropy", "logits_chunk_size", "next_token_targets", "token_scores"]

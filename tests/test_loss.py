"""Chunked loss and per-token scoring against the materialised-logits reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config_kwargs

from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.modeling_longctx import causal_lm_loss, chunked_causal_lm_loss


def test_chunked_loss_and_gradients_equal_the_reference():
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[1, :9] = -100
    reference = causal_lm_loss(hidden @ weight.T, labels)
    grads_ref = torch.autograd.grad(reference, (hidden, weight))
    chunked = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=10)  # 8 chunks, uneven last one
    grads = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, reference)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    # the plain mean over scored tokens, written out
    shifted = labels[:, 1:]
    logp = torch.log_softmax(hidden[:, :-1] @ weight.T, -1)
    keep = shifted != -100
    torch.testing.assert_close(reference, -logp[keep].gather(-1, shifted[keep][:, None]).mean())


@pytest.mark.parametrize("mode", ["plain", "half-swap"])
def test_skip_logits_forward_and_score_tokens_match_full_logits(mode):
    torch.manual_seed(0)
    model = LongCtxForCausalLM(LongCtxConfig(**tiny_config_kwargs(tie_word_embeddings=True,
                                                                  tied_embedding_mode=mode))).eval()
    ids = torch.randint(0, 128, (2, 50))
    full = model(ids, labels=ids)
    skipped = model(ids, labels=ids, skip_logits=True)
    assert skipped.logits is None
    torch.testing.assert_close(skipped.loss, full.loss)
    model.train()
    assert model(ids, labels=ids).logits is None  # training skips logits by default
    model.eval()
    nll, correct = model.score_tokens(ids, chunk_size=16)
    logp = torch.log_softmax(full.logits[:, :-1].float(), -1)
    torch.testing.assert_close(nll, -logp.gather(-1, ids[:, 1:, None])[..., 0])
    assert torch.equal(correct, full.logits[:, :-1].argmax(-1) == ids[:, 1:])
    with pytest.raises(ValueError, match="skip_logits=True needs `labels`"):
        model(ids, skip_logits=True)


def test_training_step_with_chunked_loss_matches_reference_gradients():
    torch.manual_seed(0)
    model = LongCtxForCausalLM(LongCtxConfig(**tiny_config_kwargs()))
    ids = torch.randint(0, 128, (2, 40))
    model.train()
    model(ids, labels=ids).loss.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(ids, skip_logits=False).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(chunked[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)

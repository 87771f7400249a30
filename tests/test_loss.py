"""Chunked loss and per-token scoring against the materialised-logits reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config_kwargs

from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.loss import causal_lm_loss, linear_cross_entropy, token_scores


def loss_inputs(seed=0, tokens=37, dtype=torch.float32):
    torch.manual_seed(seed)
    hidden = torch.randn(2, tokens, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (2, tokens))
    labels[1, :9] = -100  # unscored positions
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [None, 10, 7])  # one chunk; 8 chunks, the last one uneven; 11 chunks
def test_fused_loss_and_gradients_equal_the_reference(chunk_size):
    hidden, weight, labels = loss_inputs()
    reference = causal_lm_loss(hidden @ weight.T, labels)
    grads_ref = torch.autograd.grad(reference * 3.0, (hidden, weight))  # a non-unit upstream gradient
    fused = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
    grads = torch.autograd.grad(fused * 3.0, (hidden, weight))
    torch.testing.assert_close(fused, reference)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    with torch.no_grad():  # the loss-only path
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size), reference)
    # the reference is the plain mean over scored tokens, written out
    shifted = labels[:, 1:]
    logp = torch.log_softmax(hidden[:, :-1] @ weight.T, -1)
    keep = shifted != -100
    torch.testing.assert_close(reference, -logp[keep].gather(-1, shifted[keep][:, None]).mean())


def test_fused_loss_gradient_of_one_input_only_and_num_items():
    hidden, weight, labels = loss_inputs(seed=1)
    frozen = weight.detach()
    reference = causal_lm_loss(hidden @ frozen.T, labels, num_items_in_batch=100)
    fused = linear_cross_entropy(hidden, frozen, labels, num_items_in_batch=100, chunk_size=8)
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(torch.autograd.grad(fused, hidden)[0], torch.autograd.grad(reference, hidden)[0])
    frozen_hidden = hidden.detach()
    fused = linear_cross_entropy(frozen_hidden, weight, labels, chunk_size=8)
    reference = causal_lm_loss(frozen_hidden @ weight.T, labels)
    torch.testing.assert_close(torch.autograd.grad(fused, weight)[0], torch.autograd.grad(reference, weight)[0])


def test_fused_loss_under_bfloat16_autocast_matches_the_autocast_reference():
    hidden, weight, labels = loss_inputs(seed=2, tokens=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = causal_lm_loss(F.linear(hidden, weight), labels)
        fused = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    grads_ref = torch.autograd.grad(reference, (hidden, weight))
    grads = torch.autograd.grad(fused, (hidden, weight))
    torch.testing.assert_close(fused, reference, atol=1e-3, rtol=1e-3)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32  # gradients reach the float32 leaves through the casts
        torch.testing.assert_close(g, g_ref, atol=2e-2, rtol=2e-2)


def test_token_scores_are_the_cross_entropy_and_argmax_of_each_row():
    hidden, weight, labels = loss_inputs(seed=3)
    hidden, weight, targets = hidden.detach().reshape(-1, 16), weight.detach(), labels.reshape(-1).clamp(min=0)
    nll, correct = token_scores(hidden, weight, targets, chunk_size=5)
    logits = hidden @ weight.T
    torch.testing.assert_close(nll, F.cross_entropy(logits, targets, reduction="none"))
    assert torch.equal(correct, logits.argmax(-1) == targets)


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


@pytest.mark.parametrize("skip_logits", [False, True])
def test_shift_labels_are_used_as_given_by_both_loss_paths_as_in_llama(skip_logits):
    """`shift_labels` (already shifted targets, what context-parallel shards pass) replace the shift of `labels`,
    in the fused and the reference loss, exactly as transformers' Llama computes it (same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs())).eval()
    model = LongCtxForCausalLM(LongCtxConfig(**tiny_config_kwargs())).eval()
    model.load_state_dict(llama.state_dict())
    ids = torch.randint(0, 128, (2, 30))
    shifted = torch.randint(0, 128, (2, 30))
    shifted[0, 5:9] = -100
    with torch.no_grad():
        expected = llama(ids, labels=ids, shift_labels=shifted).loss
        got = model(ids, labels=ids, shift_labels=shifted, skip_logits=skip_logits).loss
        plain = model(ids, labels=ids, skip_logits=skip_logits).loss
        written_out = F.cross_entropy(llama(ids).logits.reshape(-1, 128), shifted.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, written_out)
    assert not torch.allclose(got, plain)  # the shift of `labels` is not what was scored
    with torch.no_grad():
        items = model(ids, labels=ids, shift_labels=shifted, skip_logits=skip_logits, num_items_in_batch=7).loss
    torch.testing.assert_close(items, llama(ids, labels=ids, shift_labels=shifted, num_items_in_batch=7).loss)

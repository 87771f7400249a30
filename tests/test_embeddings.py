"""RoPE + Bias (methods.md §11) and the tied-embedding modes (methods.md §12) of issue 3."""

import math

import pytest
import torch
from conftest import tiny_config_kwargs, tiny_model
from transformers import AutoModelForCausalLM

from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.attention import AttentionMask
from longctx.rope import compute_inv_freq

# --- qk_bias --------------------------------------------------------------------------------------------------------


def test_qk_bias_puts_bias_on_q_and_k_only():
    layer = tiny_model(qk_bias=True).model.layers[0].self_attn
    assert layer.q_proj.bias is not None and layer.k_proj.bias is not None
    assert layer.v_proj.bias is None and layer.o_proj.bias is None
    llama_bias = tiny_model(attention_bias=True).model.layers[0].self_attn  # Llama's meaning: all four
    assert all(getattr(llama_bias, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    plain = tiny_model().model.layers[0].self_attn
    assert all(getattr(plain, n).bias is None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_qk_bias_is_added_before_rope_and_gives_a_relative_position_term():
    """With q/k weights zero, score(m, n) = (R_m a)ᵀ(R_n b) = Re(Σ_i A_i B̄_i e^{i(m−n)θ_i}): the 4th term of
    methods.md §11, a function of m − n only. a = b = [√λ on the first half, 0] gives Sandwich's λ Σ cos((m−n)θ_i)."""
    model = tiny_model(qk_bias=True, num_hidden_layers=1)
    layer, config = model.model.layers[0].self_attn, model.config
    d, half, length = config.head_dim, config.head_dim // 2, 48
    with torch.no_grad():
        layer.q_proj.weight.zero_()
        layer.k_proj.weight.zero_()
        layer.q_proj.bias.copy_(torch.randn_like(layer.q_proj.bias))
        layer.k_proj.bias.copy_(torch.randn_like(layer.k_proj.bias))
        sandwich = torch.cat((torch.full((half,), 2.0), torch.zeros(half)))
        layer.q_proj.bias[:d] = sandwich  # head 0 (and its key head 0): the Sandwich pattern
        layer.k_proj.bias[:d] = sandwich
        hidden = torch.randn(1, length, config.hidden_size)
        positions = torch.arange(length)[None]
        got, _ = layer(hidden, model.model.rotary_emb(hidden, positions), AttentionMask(length, length),
                    position_ids=positions)

        theta = compute_inv_freq(config)[0].double()
        distance = (positions[0, :, None] - positions[0, None, :]).double()  # m − n
        a = layer.q_proj.bias.view(config.num_attention_heads, d).double()
        b = layer.k_proj.bias.view(config.num_key_value_heads, d).double().repeat_interleave(2, 0)
        product = torch.complex(a[:, :half], a[:, half:]) * torch.complex(b[:, :half], b[:, half:]).conj()
        scores = (product[:, None, None, :] * torch.exp(1j * distance[None, :, :, None] * theta)).real.sum(-1)
        torch.testing.assert_close(scores[0], 4.0 * torch.cos(distance[..., None] * theta).sum(-1))  # Sandwich
        scores = scores / math.sqrt(d) + torch.full((length, length), -torch.inf).triu(1)
        values = layer.v_proj(hidden).view(1, length, 2, d).transpose(1, 2).repeat_interleave(2, 1).double()
        out = torch.softmax(scores, -1)[None] @ values  # (1, heads, length, d)
        expected = layer.o_proj(out.transpose(1, 2).reshape(1, length, -1).float())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- tied-embedding modes -------------------------------------------------------------------------------------------

SU_SHAPE = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4)


def initial_loss(mode, su_premise):
    """Loss on random tokens at initialisation. Su's premise (9698): embedding std 1/√d and residual branches ≈ 0
    at init (DeepNorm-like), so the model is a tied 2-gram and the self-logit ‖w_i‖²/σ = √d dominates."""
    torch.manual_seed(0)
    extra = dict(initializer_range=SU_SHAPE["hidden_size"] ** -0.5) if su_premise else {}
    model = LongCtxForCausalLM(LongCtxConfig(**SU_SHAPE, tie_word_embeddings=True, tied_embedding_mode=mode,
                                             **extra)).eval()
    if su_premise:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    ids = torch.randint(0, SU_SHAPE["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, labels=ids).loss.item(), model


@pytest.mark.parametrize("su_premise", [True, False])
def test_initial_loss_of_the_tied_modes(su_premise):
    log_vocab = math.log(SU_SHAPE["vocab_size"])
    for mode in ("small-init", "projection", "half-swap"):
        loss, _ = initial_loss(mode, su_premise)
        assert abs(loss / log_vocab - 1) < 0.15, (mode, loss, log_vocab)
    plain, _ = initial_loss("plain", su_premise)
    if su_premise:  # ≈ √d = 16 against ln(8000) = 8.99
        assert plain > 1.5 * log_vocab, plain


def test_small_init_std_is_log_vocab_over_hidden_and_stays_tied():
    _, model = initial_loss("small-init", su_premise=False)
    std = model.model.embed_tokens.weight.std().item()
    assert std == pytest.approx(math.log(8000) / 256, rel=0.02)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_projection_is_orthogonal_and_feeds_the_tied_output():
    model = tiny_model(tie_word_embeddings=True, tied_embedding_mode="projection")
    weight = model.output_projection.weight
    torch.testing.assert_close(weight @ weight.T, torch.eye(64), atol=1e-5, rtol=0)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        torch.testing.assert_close(model(ids).logits, (hidden @ weight.T) @ model.model.embed_tokens.weight.T)
    assert "output_projection.weight" in model.state_dict()


def test_half_swap_swaps_the_halves_of_the_normed_hidden_state():
    model = tiny_model(tie_word_embeddings=True, tied_embedding_mode="half-swap")
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        swapped = torch.cat((hidden[..., 32:], hidden[..., :32]), dim=-1)
        torch.testing.assert_close(model(ids).logits, swapped @ model.model.embed_tokens.weight.T)
    assert not any("projection" in name for name in model.state_dict())


@pytest.mark.parametrize("mode", ["small-init", "projection", "half-swap"])
def test_tied_modes_survive_save_and_load(tmp_path, mode):
    model = tiny_model(tie_word_embeddings=True, tied_embedding_mode=mode)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert again.config.tied_embedding_mode == mode


@pytest.mark.parametrize("kwargs,match", [
    ({"tied_embedding_mode": "projection"}, "`tied_embedding_mode`='projection'.*tie_word_embeddings=True"),
    ({"tied_embedding_mode": "half-swap", "tie_word_embeddings": False}, "`tied_embedding_mode`='half-swap'"),
    ({"tied_embedding_mode": "swap", "tie_word_embeddings": True}, "`tied_embedding_mode`='swap'.*allowed: plain"),
    ({"tied_embedding_mode": None, "tie_word_embeddings": True}, "`tied_embedding_mode`=None"),
    ({"qk_bias": "yes"}, "`qk_bias`='yes'.*True or False"),
    ({"qk_bias": 1}, "`qk_bias`=1"),
    ({"qk_bias": None}, "`qk_bias`=None"),
])
def test_invalid_bias_and_tied_mode_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LongCtxConfig(**tiny_config_kwargs(**kwargs))

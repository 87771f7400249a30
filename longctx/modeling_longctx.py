"""longctx model: a Llama decoder (RMSNorm, SwiGLU, grouped-query attention, RoPE) with long-context options.

Reads in the order data flows: norm -> MLP -> decoder layer -> pretrained base -> model -> causal-LM head.
Parameter names follow Llama, so Llama state dicts and PEFT's default LoRA targets work unchanged.
Imports stay relative: `save_pretrained` copies these files into every checkpoint for `trust_remote_code`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import AttentionMask, LongCtxAttention, check_attn_implementation, logn_query_scale
from .configuration_longctx import LongCtxConfig
from .rope import LongCtxRotaryEmbedding


class LongCtxRMSNorm(nn.Module):
    """RMSNorm computed in float32: x / sqrt(mean(x²) + eps) · weight."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class LongCtxMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LongCtxDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), then x + MLP(norm(x)). The mixer is attention."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.block_type = config.block_types[layer_idx]
        self.self_attn = LongCtxAttention(config, layer_idx)
        self.mlp = LongCtxMLP(config)
        self.input_layernorm = LongCtxRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LongCtxRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, mask, query_scale=None, past_key_values=None,
                position_ids=None):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, mask,
                                       query_scale, past_key_values)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LongCtxOutputProjection(nn.Linear):
    """hidden×hidden projection after the final norm, orthogonally initialised (tied_embedding_mode="projection")."""


class LongCtxPreTrainedModel(PreTrainedModel):
    config_class = LongCtxConfig
    config: LongCtxConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongCtxDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = False

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        config.auto_map = {
            "AutoConfig": "configuration_longctx.LongCtxConfig",
            "AutoModel": "modeling_longctx.LongCtxModel",
            "AutoModelForCausalLM": "modeling_longctx.LongCtxForCausalLM",
        }

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        """Our own check: unknown names and flash-attn without the package or without CUDA raise clearly."""
        attn_implementation = attn_implementation or "sdpa"
        check_attn_implementation(attn_implementation)
        return attn_implementation

    def _init_weights(self, module):
        """Llama's init (normal(0, initializer_range), norms at 1) plus the tied-embedding modes (methods.md §12)."""
        config = self.config
        if isinstance(module, LongCtxOutputProjection):
            init.orthogonal_(module.weight)
        elif isinstance(module, nn.Embedding) and config.tied_embedding_mode == "small-init":
            init.normal_(module.weight, mean=0.0, std=math.log(config.vocab_size) / config.hidden_size)
        else:
            super()._init_weights(module)


class LongCtxModel(LongCtxPreTrainedModel):
    """Embeddings -> decoder layers -> final norm. Returns `BaseModelOutputWithPast`."""

    def __init__(self, config: LongCtxConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LongCtxDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LongCtxRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LongCtxRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, batch, kv_len):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, "
                                 f"{self.config.vocab_size - 1}] (vocab_size={self.config.vocab_size}).")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, kv_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected a 2D padding mask of shape "
                f"(batch, past + new tokens) = ({batch}, {kv_len}), 1 for real tokens and 0 for padding.")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        shape_source = input_ids if input_ids is not None else inputs_embeds
        batch, q_len = shape_source.shape[:2]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        kv_len = past_len + q_len
        self._check_inputs(input_ids, inputs_embeds, attention_mask, batch, kv_len)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding_mask = attention_mask.bool()
        if position_ids is None:
            if padding_mask is not None:  # left padding: real tokens count from 0
                position_ids = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, kv_len, device=inputs_embeds.device)[None].expand(batch, -1)
        mask = AttentionMask(q_len, kv_len, padding_mask)
        seq_len = None
        if self.config.rope_parameters["rope_type"] == "dynamic":
            seq_len = int(position_ids.max()) + 1
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype, seq_len)
        query_scale = logn_query_scale(self.config, position_ids, mask)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, query_scale, past_key_values,
                                  position_ids=position_ids)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       past_key_values=past_key_values if use_cache else None)


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Next-token cross-entropy: logits at t predict labels at t+1; label -100 is ignored."""
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch


class LongCtxForCausalLM(LongCtxPreTrainedModel, GenerationMixin):
    """`LongCtxModel` + output head (optionally tied, with the tied-embedding modes of methods.md §12)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LongCtxConfig):
        super().__init__(config)
        self.model = LongCtxModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        mode = config.tied_embedding_mode if config.tie_word_embeddings else "plain"
        if mode == "projection":
            self.output_projection = LongCtxOutputProjection(config.hidden_size, config.hidden_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def output_hidden(self, hidden_states):
        """What the (tied) output embedding sees: the normed hidden state, projected or half-swapped."""
        mode = self.config.tied_embedding_mode if self.config.tie_word_embeddings else "plain"
        if mode == "projection":
            return self.output_projection(hidden_states)
        if mode == "half-swap":
            first, second = hidden_states.chunk(2, dim=-1)
            return torch.cat((second, first), dim=-1)
        return hidden_states

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden_states = self.output_hidden(outputs.last_hidden_state)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


LongCtxConfig.register_for_auto_class()
LongCtxModel.register_for_auto_class("AutoModel")
LongCtxForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LongCtxForCausalLM", "LongCtxModel", "LongCtxPreTrainedModel"]

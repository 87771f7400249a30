"""longctx model: a Llama decoder (RMSNorm, SwiGLU, grouped-query attention, RoPE) with long-context options.

Reads in the order data flows: norm -> MLP -> decoder layer -> pretrained base -> model -> causal-LM head.
Parameter names follow Llama, so Llama state dicts and PEFT's default LoRA targets work unchanged.
Imports stay relative: `save_pretrained` copies these files into every checkpoint for `trust_remote_code`.
"""

import importlib.abc
import importlib.util
import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .attention import AttentionMask, LongCtxAttention, check_attn_implementation, logn_query_scale
from .cache import CacheView, cache_view, static_slots
from .configuration_longctx import LongCtxConfig
from .loss import causal_lm_loss, linear_cross_entropy, token_scores
from .lru import LongCtxLRU
from .rope import KEYS_BEFORE_ROPE, LongCtxRotaryEmbedding

logger = logging.get_logger(__name__)


def weights_available(config) -> bool:
    """Whether this model can return attention weights: the eager backend with keys cached after RoPE (the fused
    and block-wise paths never hold the whole matrix). If not, warns once, as transformers does for sdpa."""
    available = (config._attn_implementation == "eager"
                 and config.rope_parameters["rope_type"] not in KEYS_BEFORE_ROPE)
    if not available and not torch.compiler.is_compiling():
        logger.warning_once("output_attentions=True needs attn_implementation='eager' and a rope_type that caches "
                            "keys after RoPE (load with attn_implementation='eager'); `attentions` will be None.")
    return available


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
    """Pre-norm residual block: x + mixer(norm(x)), then x + MLP(norm(x)). The mixer is attention (`self_attn`)
    or, where `block_types[layer_idx] == "lru"`, the LRU (`lru`; methods.md §13)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.block_type = config.block_types[layer_idx]
        if self.block_type == "lru":
            self.lru = LongCtxLRU(config, layer_idx)
        else:
            self.self_attn = LongCtxAttention(config, layer_idx)
        self.mlp = LongCtxMLP(config)
        self.input_layernorm = LongCtxRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LongCtxRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, mask, query_scale=None, cache=None,
                position_ids=None, rotary=None, output_attentions=False):
        """(hidden states, the attention weights: None unless `output_attentions` in an attention block)."""
        residual, weights = hidden_states, None
        if self.block_type == "lru":
            hidden_states = self.lru(self.input_layernorm(hidden_states), position_ids, mask.query_padding(), cache)
        else:
            hidden_states, weights = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, mask,
                                                    query_scale, cache, position_ids=position_ids, rotary=rotary,
                                                    output_attentions=output_attentions)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), weights


# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`; 5.23 has the old name.
# The forwards accept both; outputs are built with whichever field this transformers has.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache(cache, past_key_values):
    """The cache a caller passed, under either name (`cache`, transformers >= 5.24; `past_key_values`, before)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
    if past_key_values is not None and CACHE_FIELD == "cache" and not torch.compiler.is_compiling():
        warnings.warn("`past_key_values` is deprecated (transformers >= 5.24 renamed it); use `cache` instead.",
                      FutureWarning, stacklevel=3)  # as transformers' own models say it
    return cache if cache is not None else past_key_values


def output_cache(outputs):
    """The cache held by a model output, whichever transformers named the field."""
    return getattr(outputs, CACHE_FIELD)


class LongCtxOutputProjection(nn.Linear):
    """hidden×hidden projection after the final norm, orthogonally initialised (tied_embedding_mode="projection")."""


class LongCtxPreTrainedModel(PreTrainedModel):
    config_class = LongCtxConfig
    config: LongCtxConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongCtxDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = False
    # generate(cache_implementation="static") compiles with fullgraph=True to one graph per shape (tests/test_compile);
    # dynamic NTK alone breaks the graph (its tables depend on the positions' values) and stays exact.
    _can_compile_fullgraph = True

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
        """Llama's init (normal(0, initializer_range), norms at 1) plus the tied-embedding modes (methods.md §12)
        and the LRU's ring init (methods.md §13)."""
        config = self.config
        if isinstance(module, LongCtxOutputProjection):
            init.orthogonal_(module.weight)
        elif isinstance(module, LongCtxLRU):
            module.ring_init_()
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

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, batch, view: CacheView):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None and input_ids.numel() and not torch.compiler.is_compiling():  # (no graph break)
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, "
                                 f"{self.config.vocab_size - 1}] (vocab_size={self.config.vocab_size}).")
        if attention_mask is None or tuple(attention_mask.shape) in ((batch, view.kv_len), (batch, view.slots)):
            return
        if view.fixed:  # (past + new tokens is a tensor here: a mask of that width cannot be checked, so it is refused)
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; a compiled forward over a StaticCache takes "
                f"the padding mask of every cache slot, ({batch}, {view.slots}) = (batch, max_cache_len), 0 beyond "
                "the tokens so far (generate() passes it so), or none.")
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected a 2D padding mask of shape "
            f"(batch, past + new tokens) = ({batch}, {view.kv_len}), 1 for real tokens and 0 for padding"
            + (f" (or, with this static cache, ({batch}, {view.slots}))." if view.slots is not None else "."))

    def _cache_for_forward(self, cache, use_cache):
        """(cache, use_cache) of this call: none while training with gradient checkpointing (the backward replays each
        layer: it would write the cache a second time); a new `DynamicCache` when `use_cache` and none was passed."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if cache is not None:
                raise ValueError("A cache cannot be used with gradient checkpointing while training; pass no `cache` "
                                 "(`past_key_values`) or call `model.gradient_checkpointing_disable()`.")
            if use_cache and not torch.compiler.is_compiling():  # (dynamo cannot trace the logger)
                logger.warning_once("Gradient checkpointing in training: `use_cache=True` ignored (no cache).")
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        return cache, use_cache

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, output_attentions=None, output_hidden_states=None, **kwargs):
        """`cache` (or its pre-5.24 name `past_key_values`): a `DynamicCache`; one is made when `use_cache`.
        `output_hidden_states`, `output_attentions` (eager only) and `return_dict` as in transformers."""
        cache, use_cache = self._cache_for_forward(resolve_cache(cache, past_key_values), use_cache)
        batch, q_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        view = cache_view(cache, q_len, self.config._attn_implementation)
        self._check_inputs(input_ids, inputs_embeds, attention_mask, batch, view)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        mask = attention_mask_of(attention_mask, view, batch, q_len, inputs_embeds.device)
        if position_ids is None:
            position_ids = default_position_ids(mask, batch, inputs_embeds.device)
        hidden_states, all_hidden, all_weights = self._layers(inputs_embeds, mask, position_ids, cache,
                                                              output_attentions, output_hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache if use_cache else None},
                                       hidden_states=all_hidden, attentions=all_weights)

    def _layers(self, hidden_states, mask, position_ids, cache, output_attentions, output_hidden_states):
        """The decoder layers and the final norm: (last hidden states, hidden states or None, weights or None).
        Hidden states in transformers' convention: the embeddings, each layer's input, and the normed last."""
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_attentions = output_attentions and weights_available(config)  # else a warning, as transformers
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        query_scale = logn_query_scale(config, position_ids, mask)
        all_hidden, all_weights = (), ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, weights = layer(hidden_states, position_embeddings, mask, query_scale, cache,
                                           position_ids=position_ids, rotary=self.rotary_emb,
                                           output_attentions=output_attentions)
            if output_attentions:
                all_weights += (weights,)  # None for an LRU block
        hidden_states = self.norm(hidden_states)
        return (hidden_states, all_hidden + (hidden_states,) if output_hidden_states else None,
                all_weights if output_attentions else None)


def attention_mask_of(attention_mask, view: CacheView, batch, q_len, device) -> AttentionMask:
    """The `AttentionMask` of a forward: the padding mask (None when every token is real), the static view's unfilled
    slots hidden whatever `attention_mask` says of them; a static cache's (batch, slots) mask cut to the filled
    slots."""
    if view.fixed:
        filled = torch.arange(view.slots, device=device) < view.past + q_len
        attention_mask = filled[None].expand(batch, -1) if attention_mask is None else attention_mask.bool() & filled
    elif attention_mask is not None:
        attention_mask = attention_mask[:, :view.kv_len]
    padding_mask = None
    if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
        padding_mask = attention_mask.bool()  # compiled: kept as given, as deciding would break the graph
    return AttentionMask(q_len, view.kv_len, padding_mask, query_start=view.past if view.fixed else None)


def default_position_ids(mask: AttentionMask, batch, device):
    """(batch, q_len) positions when none are passed: the slot indices, or with padding each row's real tokens
    counted from 0 (left padding starts at 0; padding repeats its neighbour's position, clamped at 0)."""
    if mask.padding_mask is None:
        return mask.query_slots(device)[None].expand(batch, -1)
    counts = mask.padding_mask.long().cumsum(-1) - 1
    return counts.index_select(1, mask.query_slots(counts.device)).clamp(min=0)


class LongCtxForCausalLM(LongCtxPreTrainedModel, GenerationMixin):
    """`LongCtxModel` + output head (optionally tied, with the tied-embedding modes of methods.md §12)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # tensor parallelism (`from_pretrained(..., tp_plan="auto")`), as Llama: the head sharded by vocabulary, its
    # logits gathered; with tied embeddings this shards the shared weight once for both uses
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LongCtxConfig):
        super().__init__(config)
        self.model = LongCtxModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        mode = config.tied_embedding_mode if config.tie_word_embeddings else "plain"
        if mode == "projection":
            self.output_projection = LongCtxOutputProjection(config.hidden_size, config.hidden_size, bias=False)
        self._is_stateful = "lru" in config.block_types  # an LRU state cannot be rolled back: no assisted decoding
        self.post_init()

    def _supports_default_dynamic_cache(self):
        """generate() pre-builds the cache unless the stack is all LRU: transformers' prefill asks a pre-built cache
        for its length, which only attention layers hold. Then the forward builds the cache (it counts tokens)."""
        return "attention" in self.config.block_types

    def create_masks_for_generate(self, attention_mask=None, cache=None, past_key_values=None, **kwargs):
        """generate() hook for the caches it may compile with (static; all-LRU in transformers 5.23): keep the 2D
        padding mask (the forward builds its masks), padded with zeros to a static cache's length: every step then
        has one shape."""
        cache = cache if cache is not None else past_key_values
        slots = static_slots(cache) if cache is not None else None
        if attention_mask is not None and attention_mask.dim() == 2 and slots is not None:
            attention_mask = F.pad(attention_mask, (0, slots - attention_mask.shape[-1]))
        return attention_mask

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def output_weight(self):
        """The output embedding (vocab, hidden) as one plain tensor for the fused loss and scoring: under tensor
        parallelism it is a vocabulary-sharded DTensor, gathered here (differentiably: gradients reach the shards)."""
        weight = self.lm_head.weight
        return weight.full_tensor() if hasattr(weight, "full_tensor") else weight

    def output_hidden(self, hidden_states):
        """What the (tied) output embedding sees: the normed hidden state, projected or half-swapped."""
        mode = self.config.tied_embedding_mode if self.config.tie_word_embeddings else "plain"
        if mode == "projection":
            return self.output_projection(hidden_states)
        if mode == "half-swap":
            first, second = hidden_states.chunk(2, dim=-1)
            return torch.cat((second, first), dim=-1)
        return hidden_states

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, skip_logits=None, past_key_values=None,
                output_attentions=None, output_hidden_states=None, **kwargs):
        """Causal-LM forward. With `labels` and `skip_logits` (default: while training) the loss is computed in
        chunks and `logits` is None: the (tokens × vocab) logits are never materialised. `past_key_values` is the
        pre-5.24 name of `cache`."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=resolve_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, return_dict=True)
        hidden_states = self.output_hidden(outputs.last_hidden_state)
        skip_logits = self.training and labels is not None if skip_logits is None else skip_logits
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True needs `labels`: without logits the loss is the only output.")
        logits = loss = None
        loss_kwargs = {key: kwargs.get(key) for key in ("num_items_in_batch", "shift_labels")}  # transformers' names
        if skip_logits:
            loss = linear_cross_entropy(hidden_states, self.output_weight(), labels, **loss_kwargs)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep])
            if labels is not None:
                loss = causal_lm_loss(logits, labels, **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: output_cache(outputs)},
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    @torch.no_grad()
    def score_tokens(self, input_ids, attention_mask=None, position_ids=None, chunk_size=None):
        """Next-token NLL and correctness per position, (batch, seq - 1) each, position t scoring token t+1.

        The evaluation workload: one forward, the output projection in chunks (no full logits), float32 NLL."""
        hidden = self.output_hidden(self.model(input_ids=input_ids, attention_mask=attention_mask,
                                               position_ids=position_ids, use_cache=False, return_dict=True,
                                               output_attentions=False, output_hidden_states=False
                                               ).last_hidden_state)
        batch, steps = input_ids.shape[0], input_ids.shape[1] - 1
        nll, correct = token_scores(hidden[:, :-1].reshape(batch * steps, -1), self.output_weight(),
                                    input_ids[:, 1:].reshape(-1), chunk_size)
        return nll.view(batch, steps), correct.view(batch, steps)


def register_peft_defaults(constants):
    """PEFT picks an adapter's default `target_modules` by `model_type` from tables in `peft.utils.constants`;
    longctx's modules carry Llama's names, so "longctx" gets Llama's entry in each table (LoRA: q_proj, v_proj —
    the attention layers of a hybrid stack; an all-LRU stack has none, and PEFT says so)."""
    for table in vars(constants).values():
        if isinstance(table, dict) and "llama" in table:
            table.setdefault("longctx", table["llama"])


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Calls `register_peft_defaults` once peft's constants are imported, when peft comes after this module."""

    name = "peft.utils.constants"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                register_peft_defaults(module)

            spec.loader.exec_module = exec_module  # this spec's own loader object
        return spec


if _AfterPeftImport.name in sys.modules:
    register_peft_defaults(sys.modules[_AfterPeftImport.name])
elif not any(type(finder).__name__ == _AfterPeftImport.__name__ for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterPeftImport())

LongCtxConfig.register_for_auto_class()
LongCtxModel.register_for_auto_class("AutoModel")
LongCtxForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LongCtxForCausalLM", "LongCtxModel", "LongCtxPreTrainedModel"]

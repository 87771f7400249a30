"""Llama-family checkpoints in: a `LlamaForCausalLM`, a directory of one, or a GGUF file -> `LongCtxForCausalLM`.

The parameter names are Llama's, so the state dict moves over unchanged and the logits equal the source's.
"""

import os

import torch

from .configuration_longctx import LongCtxConfig
from .files import check_model_source
from .modeling_longctx import LongCtxForCausalLM

_LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters", "attention_bias",
    "attention_dropout", "mlp_bias",
)


def load_llama(src, dtype=None):
    """A `LlamaForCausalLM` from a model directory or a `.gguf` file (transformers de-quantizes GGUF to `dtype`)."""
    from transformers import LlamaForCausalLM

    src = os.fspath(src)
    kind = check_model_source(src)  # damaged or unsupported files: one line naming the file, before loading
    if kind == "gguf":
        return LlamaForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(src)), gguf_file=os.path.basename(src),
                                                dtype=dtype or torch.float32)
    return LlamaForCausalLM.from_pretrained(src, dtype=dtype or "auto", use_safetensors=True)


def llama_to_longctx_config(llama_config, **config_overrides) -> LongCtxConfig:
    """LongCtxConfig with the Llama config's architecture; overrides (e.g. `rope_parameters`) win."""
    if getattr(llama_config, "model_type", "llama") not in ("llama", "longctx"):
        raise ValueError(f"from_llama expects a Llama-architecture model, got model_type={llama_config.model_type!r}")
    fields = {k: getattr(llama_config, k) for k in _LLAMA_FIELDS if getattr(llama_config, k, None) is not None}
    fields["rope_parameters"] = dict(fields.get("rope_parameters") or {})
    fields.update(config_overrides)
    return LongCtxConfig(**fields)


def from_llama(src, **config_overrides) -> LongCtxForCausalLM:
    """Convert `src` (LlamaForCausalLM, directory or GGUF path) to a LongCtxForCausalLM with the same weights."""
    from transformers import LlamaForCausalLM

    llama = src if isinstance(src, LlamaForCausalLM) else load_llama(src)
    config = llama_to_longctx_config(llama.config, **config_overrides)
    config._attn_implementation = llama.config._attn_implementation or "sdpa"
    dtype = next(llama.parameters()).dtype
    model = LongCtxForCausalLM(config).to(dtype)
    state = {k: v for k, v in llama.state_dict().items() if "rotary_emb" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    # parameters Llama lacks (q/k bias, output projection via overrides) keep their init: zero bias, orthogonal P
    missing = set(missing) - tied - {n for n, _ in model.named_parameters() if "output_projection" in n or ".bias" in n}
    if missing or unexpected:
        raise ValueError(f"from_llama: state dicts differ; missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval() if not llama.training else model


__all__ = ["from_llama", "load_llama", "llama_to_longctx_config"]

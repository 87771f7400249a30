"""longctx: Hugging Face model classes for long-context language modelling (see README and SPEC)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_longctx import LongCtxConfig
from .modeling_longctx import LongCtxForCausalLM, LongCtxModel, LongCtxPreTrainedModel

AutoConfig.register("longctx", LongCtxConfig, exist_ok=True)
AutoModel.register(LongCtxConfig, LongCtxModel, exist_ok=True)
AutoModelForCausalLM.register(LongCtxConfig, LongCtxForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["LongCtxConfig", "LongCtxForCausalLM", "LongCtxModel", "LongCtxPreTrainedModel"]

"""LongCtxConfig: Llama's fields plus the long-context options of SPEC §2, validated once at construction."""

import math

from transformers.configuration_utils import PreTrainedConfig

# Keys every rope_type accepts; each type's own keys, defaults and checks are its `longctx.rope.RopeSpec`.
COMMON_ROPE_KEYS = frozenset({"rope_type", "rope_theta", "factor", "original_max_position_embeddings"})
LOGN_SCALING_MODES = ("off", "trained", "posthoc")
TIED_EMBEDDING_MODES = ("plain", "small-init", "projection", "half-swap")
LRU_SCAN_BACKENDS = ("auto", "native", "chunked")  # auto: native (C, CPU) where it builds, else chunked (torch)
BLOCK_TYPES = {"attention": "full_attention", "lru": "linear_attention"}  # block type -> transformers layer type


MAX_SIZE = 2**31 - 1  # sizes and lengths beyond int32 overflow the kernels (and no memory holds them)
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def _fail(field, value, allowed):
    raise ValueError(f"LongCtxConfig: `{field}`={value!r} is invalid; {allowed}.")


def _check_int(field, value, minimum=1, maximum=MAX_SIZE):
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        _fail(field, value, f"expected an integer >= {minimum} (and at most {maximum})")


def _check_bool(field, value):
    if not isinstance(value, bool):
        _fail(field, value, "expected True or False")


def _check_choice(field, value, allowed):
    if not isinstance(value, (str, type(None))) or value not in allowed:
        _fail(field, value, f"allowed: {', '.join(map(str, allowed))}")


def _check_number(field, value, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, value, "expected a finite number")
    if low is not None and (value <= low if low_open else value < low):
        _fail(field, value, f"must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        _fail(field, value, f"must be <= {high}")


def _check_token_id(field, value, vocab_size, many=False):
    """None, or a token id of the vocabulary (`many`: or a non-empty list of them, as eos_token_id may be)."""
    ids = value if many and isinstance(value, list) and value else [value]
    if value is None:
        return
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        _fail(field, value, f"expected None or a token id in [0, {vocab_size - 1}] (vocab_size={vocab_size})"
              + (", or a list of them" if many else ""))


def _check_dtype(value):
    import torch

    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return
    if not isinstance(value, str) or not isinstance(getattr(torch, value, None), torch.dtype):
        _fail("dtype", value, "expected None, 'auto', a torch.dtype or its name ('float32', 'bfloat16', ...)")


def _rope_specs():
    """`longctx.rope.ROPE_SPECS`, imported when first needed: rope.py imports torch, and this module (which
    rope.py imports) does not."""
    from .rope import ROPE_SPECS

    return ROPE_SPECS


def original_max_positions(config) -> int:
    """L_train: `rope_parameters["original_max_position_embeddings"]`, else `max_position_embeddings`."""
    return config.rope_parameters.get("original_max_position_embeddings") or config.max_position_embeddings


class LongCtxConfig(PreTrainedConfig):
    r"""Configuration of a longctx model: a Llama decoder with long-context position schemes and optional LRU blocks.

    Llama's fields keep their names and defaults. Beyond them (SPEC §2): `rope_parameters` (any rope_type of
    `longctx.rope.ROPE_SPECS`), `logn_scaling`, `qk_bias`, `tied_embedding_mode`, `block_types` and the
    `lru_*` fields. Every field is checked here; a bad value raises `ValueError` naming the field.

    ```python
    >>> from longctx import LongCtxConfig, LongCtxForCausalLM
    >>> config = LongCtxConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
    ...                        rope_parameters={"rope_type": "ntk-mixed", "factor": 8.0})
    >>> model = LongCtxForCausalLM(config)
    ```"""

    model_type = "longctx"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    # Llama's fields, same names and defaults.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    # longctx fields (SPEC §2).
    logn_scaling: str = "off"
    qk_bias: bool = False
    tied_embedding_mode: str = "plain"
    block_types: list[str] | None = None
    layer_types: list[str] | None = None  # derived from block_types; transformers' DynamicCache reads it
    lru_state_size: int = 256
    lru_r_min: float = 0.9
    lru_r_max: float = 0.999
    lru_max_phase: float = 6.283
    lru_scan_backend: str = "auto"  # longctx.lru's scan: "auto", "native" or "chunked" (LRU_SCAN_BACKENDS)

    def __post_init__(self, **kwargs):
        # sizes first: head_dim, num_key_value_heads and block_types are derived from them
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            _check_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                _fail("num_attention_heads", self.num_attention_heads,
                      f"must divide hidden_size={self.hidden_size} (or give head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._resolve_block_types()
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, dict):
            _fail("rope_parameters", self.rope_parameters,
                  "expected a dict such as {'rope_type': 'yarn', 'factor': 4.0}")
        if self.rope_parameters is not None:  # a copy: transformers fills defaults in place, not in the caller's dict
            self.rope_parameters = dict(self.rope_parameters)
        given = dict(self.rope_parameters or kwargs.get("rope_scaling") or {})  # before transformers fills defaults
        _check_dtype(self.dtype)
        super().__post_init__(**kwargs)  # folds legacy `rope_scaling` / `rope_theta` into `rope_parameters`
        rope = dict(self.rope_parameters or {})
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", 10000.0)
        if rope.get("partial_rotary_factor", 1.0) in (None, 1, 1.0):  # full rotation is the only one supported
            rope.pop("partial_rotary_factor", None)
        self.rope_parameters = rope
        self.validate_longctx()
        spec = _rope_specs()[rope["rope_type"]]
        if spec.needs_original_length and given.get("original_max_position_embeddings") is None:
            _fail("rope_parameters.original_max_position_embeddings", None,
                  f"rope_type={rope['rope_type']!r} needs the pre-training length it scales from (HF's llama3 keys; "
                  "transformers would assume max_position_embeddings)")

    def _resolve_block_types(self):
        """`block_types` and transformers' `layer_types` name the same thing: one is derived from the other (all
        attention if neither is given); both given, they must agree."""
        names = {layer: block for block, layer in BLOCK_TYPES.items()}
        for field, value, words in (("block_types", self.block_types, BLOCK_TYPES),
                                    ("layer_types", self.layer_types, names)):
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != self.num_hidden_layers
                                      or not all(isinstance(v, str) and v in words for v in value)):
                _fail(field, value, f"expected a list with one entry per layer (num_hidden_layers="
                                    f"{self.num_hidden_layers}), each one of {', '.join(words)}")
        derived = [names[t] for t in self.layer_types] if self.layer_types is not None else None
        if self.block_types is None:
            self.block_types = derived or ["attention"] * self.num_hidden_layers
        self.block_types = list(self.block_types)
        layer_types = [BLOCK_TYPES[t] for t in self.block_types]
        if self.layer_types is not None and list(self.layer_types) != layer_types:
            _fail("layer_types", self.layer_types, f"contradicts block_types={self.block_types} (it is derived "
                                                   f"from it: {layer_types}); give one of them")
        self.layer_types = layer_types

    def lru_layers(self) -> list[int]:
        """Indices of the LRU layers (`block_types`), for the messages of what cannot run them."""
        return [i for i, block in enumerate(self.block_types) if block == "lru"]

    # --- validation: the one place every field is checked -------------------------------------------------------
    def validate(self):
        """transformers' class validators (run by `save_pretrained`), each looked up on this class — so ours replace
        its rope and layer_types ones, which would warn on every rope_type it does not know — then ours."""
        for validator in PreTrainedConfig.__class_validators__:
            getattr(self, validator.__name__)()
        self.validate_longctx()

    def validate_rope(self):
        """Replaces transformers' rope validation (which only warns on unknown types) with `validate_longctx`."""

    def validate_layer_type(self):
        """`layer_types` is derived from `block_types`, which `validate_longctx` checks."""

    def validate_longctx(self):
        """Every field: Llama's, transformers' common ones and longctx's (one ValueError naming field, value and
        what is allowed)."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "lru_state_size"):
            _check_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_key_value_heads", self.num_key_value_heads,
                  f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            _fail("head_dim", self.head_dim, "RoPE rotates pairs of channels, so head_dim must be even")
        for name in ("use_cache", "tie_word_embeddings", "attention_bias", "mlp_bias", "qk_bias",
                     "output_hidden_states", "return_dict", "is_encoder_decoder"):
            _check_bool(name, getattr(self, name))
        if self.is_encoder_decoder:
            _fail("is_encoder_decoder", True, "longctx models are decoder-only")
        _check_int("chunk_size_feed_forward", self.chunk_size_feed_forward, minimum=0)
        _check_choice("problem_type", self.problem_type, PROBLEM_TYPES)
        from transformers.activations import ACT2FN

        _check_choice("hidden_act", self.hidden_act, sorted(ACT2FN))
        _check_number("rms_norm_eps", self.rms_norm_eps, low=0, low_open=True)
        _check_number("attention_dropout", self.attention_dropout, low=0, high=1)
        _check_number("initializer_range", self.initializer_range, low=0)
        for name in ("pad_token_id", "bos_token_id"):
            _check_token_id(name, getattr(self, name), self.vocab_size)
        _check_token_id("eos_token_id", self.eos_token_id, self.vocab_size, many=True)
        self._validate_rope_parameters(self.rope_parameters)
        _check_choice("logn_scaling", self.logn_scaling, LOGN_SCALING_MODES)
        _check_choice("tied_embedding_mode", self.tied_embedding_mode, TIED_EMBEDDING_MODES)
        if self.tied_embedding_mode != "plain" and not self.tie_word_embeddings:
            _fail("tied_embedding_mode", self.tied_embedding_mode,
                  "modes other than 'plain' reparametrise a shared embedding: set tie_word_embeddings=True")
        self._resolve_block_types()
        _check_number("lru_r_min", self.lru_r_min, low=0, high=1)
        _check_number("lru_r_max", self.lru_r_max, low=0, high=1)
        if self.lru_r_min >= self.lru_r_max:
            _fail("lru_r_min", self.lru_r_min, f"must be < lru_r_max={self.lru_r_max}")
        _check_number("lru_max_phase", self.lru_max_phase, low=0, low_open=True)
        _check_choice("lru_scan_backend", self.lru_scan_backend, LRU_SCAN_BACKENDS)

    def _validate_rope_parameters(self, rope):
        """The common keys, then the rope_type's own (`RopeSpec`: defaults filled in, its `check`)."""
        specs = _rope_specs()
        rope_type = rope["rope_type"]
        if not isinstance(rope_type, str) or rope_type not in specs:
            _fail("rope_parameters.rope_type", rope_type, f"allowed: {', '.join(specs)}")
        spec = specs[rope_type]
        allowed = COMMON_ROPE_KEYS | set(spec.keys)
        unknown = sorted(set(rope) - allowed)
        if unknown:
            _fail(f"rope_parameters.{unknown[0]}", rope[unknown[0]],
                  f"rope_type={rope_type!r} accepts only {', '.join(sorted(allowed))}")
        _check_number("rope_parameters.rope_theta", rope["rope_theta"], low=1, low_open=True)
        if spec.needs_factor:
            if "factor" not in rope:
                _fail("rope_parameters.factor", None, f"rope_type={rope_type!r} needs a scale factor k >= 1")
            _check_number("rope_parameters.factor", rope["factor"], low=1)
        elif "factor" in rope and rope["factor"] is not None:
            _check_number("rope_parameters.factor", rope["factor"], low=1)
        if rope.get("original_max_position_embeddings") is not None:
            _check_int("rope_parameters.original_max_position_embeddings", rope["original_max_position_embeddings"])
        for key, default in spec.keys.items():
            if default is not None:
                rope.setdefault(key, default)
        if spec.check is not None:
            spec.check(rope, original_max_positions(self))


__all__ = ["LongCtxConfig"]

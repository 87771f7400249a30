"""Rotary position embeddings: one `RopeSpec` per `rope_type` (its frequency function, keys, checks, attention
path) in one registry, `ROPE_SPECS`; cos/sin; rotation.

Every frequency function has HF's shape `(config, device=None, seq_len=None) -> (inv_freq[head_dim // 2],
attention_scaling)`. Formulas: `reference/methods.md` §1–10. `attention_scaling` multiplies cos and sin (so q·k ×
scaling², YaRN §10). Each type's checks run after `LongCtxConfig`'s common ones, on its `rope_parameters` with the
spec's defaults filled in, and raise its ValueError naming the key.
"""

import copy
import json
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .configuration_longctx import (COMMON_ROPE_KEYS, LongCtxConfig, _check_int, _check_number, _fail,
                                    original_max_positions)


def _default_inv_freq(base: float, dim: int, device=None) -> torch.Tensor:
    """inv_freq[i] = b^{-2i/d} (methods.md §1)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base ** exponents)


def _params(config):
    rope = config.rope_parameters
    return rope, float(rope["rope_theta"]), config.head_dim


def _key(rope, name):
    """`rope[name]`, else its rope_type's default (`RopeSpec.keys`): validation writes the defaults in, but a
    `rope_parameters` dict set on a config after construction (as transformers' tests do) may lack them."""
    value = rope.get(name)
    return ROPE_SPECS[rope["rope_type"]].keys[name] if value is None else value


def default_rope(config, device=None, seq_len=None):
    """Plain RoPE (methods.md §1)."""
    _, base, dim = _params(config)
    return _default_inv_freq(base, dim, device), 1.0


def linear_rope(config, device=None, seq_len=None):
    """Position interpolation: inv_freq / k (methods.md §2)."""
    rope, base, dim = _params(config)
    return _default_inv_freq(base, dim, device) / rope["factor"], 1.0


def ntk_rope(config, device=None, seq_len=None):
    """NTK-aware scaled RoPE: base b·k^{d/(d−2)} (methods.md §3)."""
    rope, base, dim = _params(config)
    return _default_inv_freq(base * rope["factor"] ** (dim / (dim - 2)), dim, device), 1.0


def ntk_fixed_rope(config, device=None, seq_len=None):
    """Su's NTK-RoPE-fixed: inv_freq[i] = (b·k)^{-2i/d} · k^{-2/d} (methods.md §4)."""
    rope, base, dim = _params(config)
    k = rope["factor"]
    return _default_inv_freq(base * k, dim, device) * k ** (-2.0 / dim), 1.0


def ntk_mixed_rope(config, device=None, seq_len=None):
    """Su's β-base mixed NTK: inv_freq[i] = b^{-2i/d}·exp(−a(i+1)^e), a = ln k/(d/2)^e (methods.md §5)."""
    rope, base, dim = _params(config)
    k, exponent = rope["factor"], _key(rope, "mixed_exponent")
    a = math.log(k) / (dim / 2) ** exponent
    pair = torch.arange(1, dim // 2 + 1, dtype=torch.float64, device=device)
    return _default_inv_freq(base, dim, device) * torch.exp(-a * pair**exponent).float(), 1.0


def _check_ntk_mixed(rope, train_len):
    _check_number("rope_parameters.mixed_exponent", rope["mixed_exponent"], low=0, low_open=True, high=1)


def dynamic_inv_freq(config, seq_lens: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK tables for many lengths at once: (...,) lengths -> (..., head_dim // 2) (methods.md §10).

    base(l) = b·(k·l/L − (k−1))^{d/(d−2)} for l > L_train, else b; the same float32 pow as HF's table."""
    rope, base, dim = _params(config)
    factor, train_len = rope["factor"], original_max_positions(config)
    lengths = seq_lens.to(torch.float64).clamp(min=train_len)
    bases = base * ((factor * lengths / train_len) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_lens.device).float() / dim
    return 1.0 / (bases.float()[..., None] ** exponents)


def dynamic_rope(config, device=None, seq_len=None):
    """Dynamic NTK: base b·(k·l/L − (k−1))^{d/(d−2)} for the current length l > L_train (methods.md §10)."""
    seq_len = original_max_positions(config) if seq_len is None else int(seq_len)
    return dynamic_inv_freq(config, torch.tensor([seq_len], device=device))[0], 1.0


def yarn_rope(config, device=None, seq_len=None):
    """YaRN: NTK-by-parts ramp between PI and extrapolation, plus mscale = 0.1 ln k + 1 (methods.md §10)."""
    rope, base, dim = _params(config)
    factor, train_len = rope["factor"], original_max_positions(config)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):  # the pair index whose wavelength fits `rotations` times into L_train
        return dim * math.log(train_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(_key(rope, "beta_fast")), correction_dim(_key(rope, "beta_slow"))
    if rope.get("truncate", True):  # (HF's default; not written into the config)
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)  # HF's operation order, bit for bit
    interpolation, extrapolation = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight, float(attention_factor)


def _check_yarn(rope, train_len):
    _check_number("rope_parameters.beta_fast", rope["beta_fast"], low=0, low_open=True)
    _check_number("rope_parameters.beta_slow", rope["beta_slow"], low=0, low_open=True)
    if rope["beta_slow"] >= rope["beta_fast"]:
        _fail("rope_parameters.beta_slow", rope["beta_slow"], f"must be < beta_fast={rope['beta_fast']}")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if rope.get(key) is not None:
            _check_number(f"rope_parameters.{key}", rope[key], low=0, low_open=True)
    if "truncate" in rope and not isinstance(rope["truncate"], bool):
        _fail("rope_parameters.truncate", rope["truncate"], "expected True or False")


def llama3_rope(config, device=None, seq_len=None):
    """Llama-3.1 scaling: keep high frequencies, divide low ones by k, blend between (HF's llama3)."""
    rope, base, dim = _params(config)
    factor, train_len = rope["factor"], rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = train_len / rope["low_freq_factor"], train_len / rope["high_freq_factor"]
    inv_freq = _default_inv_freq(base, dim, device)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (train_len / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled), 1.0


def _check_llama3(rope, train_len):
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if rope.get(key) is None:
            _fail(f"rope_parameters.{key}", None, "rope_type='llama3' needs it (HF's llama3 keys)")
    _check_number("rope_parameters.low_freq_factor", rope["low_freq_factor"], low=0, low_open=True)
    _check_number("rope_parameters.high_freq_factor", rope["high_freq_factor"], low=0, low_open=True)
    if rope["high_freq_factor"] <= rope["low_freq_factor"]:
        _fail("rope_parameters.high_freq_factor", rope["high_freq_factor"],
              f"must be > low_freq_factor={rope['low_freq_factor']}")


def _check_rerope(rope, train_len):
    window = rope.get("rerope_window")
    _check_int("rope_parameters.rerope_window", window)
    if window >= train_len:
        _fail("rope_parameters.rerope_window", window,
              f"must be < the training length L_train={train_len} (w = L_train collapses; methods.md §8)")


@dataclass(frozen=True)
class RopeSpec:
    """Everything longctx knows of one `rope_type`. A new variant is one `RopeSpec` in `ROPE_SPECS` (plus its test
    row): config validation, the frequency registry, the KV cache and the attention read it from there.

    - `inv_freq`: its frequency table, `(config, device=None, seq_len=None) -> (inv_freq, attention_scaling)`.
    - `keys`: its own `rope_parameters` keys (besides `COMMON_ROPE_KEYS`), each with the default that validation
      writes in when it is absent; None: nothing is written (the key is optional, or `check` requires it).
    - `needs_factor`: whether `factor` (k >= 1) is required; every type accepts one.
    - `needs_original_length`: whether `original_max_position_embeddings` must be given by the caller
      (transformers would fill in max_position_embeddings).
    - `check`: `(rope_parameters, train_len) -> None`, its own checks after the common ones.
    - `attention`: its attention path (`longctx.attention.choose_attention`): "after_rope" (q and k rotated once,
      keys cached after RoPE, any backend), "rerope" (ReRoPE's two score matrices, methods.md §8) or "dynamic" (each
      query's own table, §10); the last two keep the keys before RoPE, in the KV cache too, and rotate them at every
      step.
    - `llama_export`: how `longctx.convert.to_llama` writes it in transformers' own rope types — "as-is"
      (transformers computes this rope_type, reading the `stock_keys` of `rope_parameters`;
      original_max_position_embeddings, when listed, is written as L_train), "base-change" (NTK-aware: rope_theta
      b·k^{d/(d−2)}, methods.md §3), "longrope" (its per-pair divisors, §4–5) — or None: refused, `export_refusal`
      saying why.
    """

    name: str
    inv_freq: Callable
    keys: Mapping[str, object] = field(default_factory=dict)
    needs_factor: bool = False
    needs_original_length: bool = False
    check: Callable | None = None
    attention: str = "after_rope"
    llama_export: str | None = None
    stock_keys: tuple[str, ...] = ()
    export_refusal: str = ""

    def __post_init__(self):
        object.__setattr__(self, "keys", types.MappingProxyType(dict(self.keys)))  # frozen all the way down
        if self.llama_export not in (None, "as-is", "base-change", "longrope"):
            raise ValueError(f"RopeSpec {self.name!r}: llama_export={self.llama_export!r}; allowed: None, 'as-is', "
                             "'base-change', 'longrope'")
        if self.llama_export is None and not self.export_refusal:
            raise ValueError(f"RopeSpec {self.name!r}: llama_export=None needs an export_refusal saying why")
        if set(self.keys) & COMMON_ROPE_KEYS:
            raise ValueError(f"RopeSpec {self.name!r}: keys {sorted(set(self.keys) & COMMON_ROPE_KEYS)} are common "
                             "to every rope_type (COMMON_ROPE_KEYS)")

    @property
    def keys_before_rope(self) -> bool:
        return self.attention != "after_rope"


_YARN_KEYS = {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "mscale": None, "mscale_all_dim": None,
              "truncate": None}  # truncate: True when absent (HF's)
ROPE_SPECS = {spec.name: spec for spec in (
    RopeSpec("default", default_rope, llama_export="as-is"),
    RopeSpec("linear", linear_rope, needs_factor=True, llama_export="as-is", stock_keys=("factor",)),
    RopeSpec("ntk", ntk_rope, needs_factor=True, llama_export="base-change"),
    RopeSpec("ntk-fixed", ntk_fixed_rope, needs_factor=True, llama_export="longrope"),
    RopeSpec("ntk-mixed", ntk_mixed_rope, {"mixed_exponent": 0.625}, needs_factor=True, check=_check_ntk_mixed,
             llama_export="longrope"),
    RopeSpec("dynamic", dynamic_rope, needs_factor=True, attention="dynamic", export_refusal=(
        "longctx's dynamic NTK gives each query at position p the table of length p + 1 over keys kept before RoPE "
        "(exact under the KV cache); transformers' 'dynamic' uses one table per forward pass (for its longest "
        "position, scaled from max_position_embeddings) and caches keys after RoPE, so the two differ beyond "
        "L_train")),
    RopeSpec("yarn", yarn_rope, _YARN_KEYS, needs_factor=True, check=_check_yarn, llama_export="as-is",
             stock_keys=("factor", *_YARN_KEYS, "original_max_position_embeddings")),
    RopeSpec("llama3", llama3_rope, {"low_freq_factor": None, "high_freq_factor": None}, needs_factor=True,
             needs_original_length=True, check=_check_llama3, llama_export="as-is",
             stock_keys=("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")),
    # ReRoPE and Leaky ReRoPE keep plain frequencies; the relative-position remapping lives in the attention (§8).
    RopeSpec("rerope", default_rope, {"rerope_window": None}, check=_check_rerope, attention="rerope",
             export_refusal="ReRoPE caps relative positions at the window w with a second score matrix (methods.md "
                            "§8); no stock rope type computes that"),
    RopeSpec("leaky-rerope", default_rope, {"rerope_window": None}, needs_factor=True, check=_check_rerope,
             attention="rerope", export_refusal="Leaky ReRoPE remaps relative positions beyond the window w with a "
                                                "second score matrix (methods.md §8); no stock rope type computes that"),
)}
# Views of ROPE_SPECS under the names transformers and earlier longctx use.
ROPE_INIT_FUNCTIONS = {name: spec.inv_freq for name, spec in ROPE_SPECS.items()}  # as HF's ROPE_INIT_FUNCTIONS
KEYS_BEFORE_ROPE = tuple(name for name, spec in ROPE_SPECS.items() if spec.keys_before_rope)


def compute_inv_freq(config, seq_len=None):
    """The frequency table and attention scaling of `config.rope_parameters` (`seq_len` matters for `dynamic`)."""
    return ROPE_SPECS[config.rope_parameters["rope_type"]].inv_freq(config, None, seq_len)


def rope_scheme(config) -> str:
    """The position scheme as a string (its `rope_parameters`): what keys cached after RoPE were rotated by. A cache
    layer keeps the scheme of its keys and refuses keys of another (after `set_rope`)."""
    numbers = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
               for k, v in config.rope_parameters.items()}  # 10000 and 10000.0 are one scheme
    return json.dumps(numbers, sort_keys=True, default=str)


class LongCtxRotaryEmbedding(nn.Module):
    """cos/sin of the base table for given positions. The table is recomputed from the config, never stored in a buffer.

    transformers 5.x refills non-persistent buffers with garbage on `from_pretrained` (anchors.md §1.5); keeping
    the table as a plain cache keyed by device sidesteps that trap. `reset()` drops it after `set_rope`.
    For `dynamic` this is the table at L_train; positions beyond it get their own tables in the attention.
    """

    def __init__(self, config: LongCtxConfig):
        super().__init__()
        self.config = config
        self._cache: dict = {}
        self._scheme: str | None = None

    def reset(self):
        self._cache.clear()
        self._scheme = None

    def scheme(self) -> str:
        """`rope_scheme(config)`, kept until `reset()`."""
        if self._scheme is None:
            self._scheme = rope_scheme(self.config)
        return self._scheme

    def inv_freq(self, device):
        """(inv_freq, attention_scaling) of `config.rope_parameters` on `device`."""
        key = str(device)
        if key not in self._cache:
            inv_freq, scaling = compute_inv_freq(self.config)
            self._cache[key] = (inv_freq.to(device), scaling)
        return self._cache[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """HF's rotary interface: position_ids (batch, seq) -> cos, sin (batch, seq, head_dim), computed in float32,
        in x's dtype (x is read for its dtype only)."""
        inv_freq, scaling = self.inv_freq(position_ids.device)
        return rotary_cos_sin(position_ids, inv_freq, x.dtype, scaling)


def rotary_cos_sin(positions, inv_freq, dtype, scaling=1.0):
    """cos, sin (..., head_dim) of the angles positions · inv_freq (broadcast over leading dims), in float32; the
    two halves are equal (HF's layout), so each is computed once."""
    freqs = positions[..., None].float() * inv_freq  # (..., head_dim // 2)
    cos, sin = (freqs.cos() * scaling).to(dtype), (freqs.sin() * scaling).to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def rotate_half(x):
    """Rotates half the hidden dims of the input (GPT-NeoX / HF convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(x, cos, sin):
    """Reference (HF's formula): x · cos + rotate_half(x) · sin; x (batch, heads, seq, d), cos/sin (batch, seq, d)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _rotate_halves(x, cos, sin):
    """(x1·c − x2·s, x2·c + x1·s) over the halves x1, x2 of x, c/s the first halves of cos/sin: two passes over x
    where the reference makes five (cat, neg, two products, sum). Computed in the promoted dtype, as the reference."""
    half = x.shape[-1] // 2
    c, s = cos.unsqueeze(1)[..., :half], sin.unsqueeze(1)[..., :half]  # (batch, 1, seq, d/2)
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x, dtype=torch.result_type(x, cos))
    torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=out[..., half:]).addcmul_(x1, s)
    return out


class _Rotary(torch.autograd.Function):
    """Rotation by the angles of cos/sin; its gradient is the rotation by the opposite angles."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotate_halves(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate_halves(grad, cos, -sin).to(ctx.x_dtype), None, None


def apply_rotary(x, cos, sin):
    """x (batch, heads, seq, head_dim) rotated by cos/sin (batch, seq, head_dim): `apply_rotary_reference`, faster.
    cos/sin are constants (no gradient flows to them). Under `torch.compile` the reference formula, which the
    compiler fuses into one pass (the two-pass function writes into slices of its output, which it cannot trace)."""
    if torch.compiler.is_compiling():
        return apply_rotary_reference(x, cos, sin)
    return _Rotary.apply(x, cos, sin)


def rotate(x, positions, inv_freq):
    """x (batch, heads, seq, d) rotated to `positions` (batch, seq) — float for Leaky ReRoPE's fractional ones (§8) —
    by inv_freq (d/2,) or one table per position (batch, seq, d/2)."""
    cos, sin = rotary_cos_sin(positions, inv_freq, x.dtype)
    return apply_rotary(x, cos, sin)


def set_rope(model, rope_parameters=None, logn_scaling=None):
    """Switch a loaded model's position scheme in place: no weight change, no reload. Returns the model.

    The new values are validated exactly as at construction; on error the model is left unchanged.
    """
    config = model.config
    candidate = copy.deepcopy(config.to_dict())
    for key in ("auto_map", "architectures", "transformers_version", "model_type", "layer_types"):
        candidate.pop(key, None)
    if rope_parameters is not None:
        candidate["rope_parameters"] = dict(rope_parameters)
    if logn_scaling is not None:
        candidate["logn_scaling"] = logn_scaling
    checked = LongCtxConfig(**candidate)  # raises ValueError naming the bad field
    config.rope_parameters = checked.rope_parameters
    config.logn_scaling = checked.logn_scaling
    for module in model.modules():
        if isinstance(module, LongCtxRotaryEmbedding):
            module.reset()
    return model

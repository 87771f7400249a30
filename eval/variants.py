"""The position-scheme variants of Su's extrapolation tables (methods.md §7), as `set_rope` arguments.

Every variant is built from the loaded model's own `rope_theta` and training length L_train, the scale factor
k (default: longest eval length / L_train, as Su's k = 8 for 512 -> 4096), the ReRoPE window w (default
L_train / 4, inside Su's optimum of 1/4–1/2 L_train, §8) and the Leaky ReRoPE factor (default 2k: Su's best
w128 setting used k16 for an 8x target, §8, and 2k keeps the farthest relative position w + (L − w)/2k inside
L_train for any L ≤ k·L_train when w = L_train/4). `+logn` adds Su's logn† (`logn_scaling="posthoc"`, §6).

`dynamic` (methods.md §10) is scored one of two ways:
- `prefill` (default): the window's own length l sets the scale, as a full forward does in HF transformers and in
  YaRN's perplexity evaluation: NTK-aware with k = max(1, l / L_train), i.e. `rope_type="ntk"` for that length.
- `causal`: longctx's `rope_type="dynamic"`, where the query at position p uses the table of length p + 1, exactly
  what generation with the KV cache computes. Beyond L_train every query has its own table, so keys are rotated
  per query: tens of times slower than the other variants on CPU.
"""

from dataclasses import dataclass

BASE_VARIANTS = ("baseline", "pi", "ntk", "ntk-fixed", "ntk-mixed", "dynamic", "yarn", "rerope", "leaky-rerope")
LOGN = "+logn"
VARIANTS = BASE_VARIANTS + tuple(name + LOGN for name in BASE_VARIANTS)
DYNAMIC_MODES = ("prefill", "causal")
SCALED_BY_K = ("pi", "ntk", "ntk-fixed", "ntk-mixed", "yarn")  # plain RoPE's table when k = 1 (methods.md §2–§5, §10)

# variant -> rope_type (methods.md §1 plain, §2 PI, §3 NTK, §4 fixed, §5 mixed, §10 dynamic/YaRN, §8 ReRoPE)
ROPE_TYPES = {
    "baseline": "default",
    "pi": "linear",
    "ntk": "ntk",
    "ntk-fixed": "ntk-fixed",
    "ntk-mixed": "ntk-mixed",
    "dynamic": "dynamic",
    "yarn": "yarn",
    "rerope": "rerope",
    "leaky-rerope": "leaky-rerope",
}


@dataclass(frozen=True)
class VariantSettings:
    """What the variant table is built from; recorded in every result's protocol."""

    train_len: int  # L_train
    rope_theta: float
    factor: float  # k
    rerope_window: int  # w
    leaky_factor: float
    native_logn: str  # the model's own logn_scaling: "off" or "trained"
    dynamic: str = "prefill"  # how `dynamic` is scored: DYNAMIC_MODES
    mixed_exponent: float | None = None  # ntk-mixed's; None: the rope type's default (ROPE_SPECS)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def make_settings(config, max_length, factor=None, rerope_window=None, leaky_factor=None,
                  dynamic="prefill", mixed_exponent=None) -> VariantSettings:
    """Settings for a model `config` evaluated up to `max_length` tokens (defaults in the module docstring)."""
    from longctx.configuration_longctx import original_max_positions

    train_len = original_max_positions(config)
    factor = float(factor if factor is not None else max(1.0, max_length / train_len))
    if factor < 1:
        raise ValueError(f"--factor={factor} is invalid; the scale factor k must be >= 1.")
    window = int(rerope_window if rerope_window is not None else max(1, train_len // 4))
    if not 1 <= window < train_len:
        raise ValueError(f"--rerope-window={window} is invalid; it must be in [1, L_train={train_len}) "
                         "(methods.md §8).")
    leaky = float(leaky_factor if leaky_factor is not None else 2 * factor)
    if leaky < 1:
        raise ValueError(f"--leaky-factor={leaky} is invalid; it must be >= 1.")
    if dynamic not in DYNAMIC_MODES:
        raise ValueError(f"--dynamic={dynamic!r} is invalid; allowed: {', '.join(DYNAMIC_MODES)}.")
    if mixed_exponent is not None:  # the rule is ntk-mixed's own (longctx.rope); named here by the flag
        from longctx.rope import ROPE_SPECS

        try:
            ROPE_SPECS["ntk-mixed"].check({"mixed_exponent": mixed_exponent}, train_len)
        except ValueError as error:
            raise ValueError(f"--mixed-exponent={mixed_exponent} is invalid (methods.md §5): {error}") from None
    native_logn = "trained" if config.logn_scaling == "trained" else "off"  # "posthoc" is an inference switch
    return VariantSettings(train_len, float(config.rope_parameters["rope_theta"]), factor, window, leaky, native_logn,
                           dynamic, None if mixed_exponent is None else float(mixed_exponent))


def mixed_exponent(settings: VariantSettings) -> float:
    """The exponent `ntk-mixed` rows use: `--mixed-exponent`, else the rope type's default (methods.md §5)."""
    from longctx.rope import ROPE_SPECS

    return settings.mixed_exponent or ROPE_SPECS["ntk-mixed"].keys["mixed_exponent"]


def available_variants(settings: VariantSettings) -> tuple[str, ...]:
    """All variants, less the `+logn` ones for a model pre-trained with log-n (its base rows already use it)."""
    if settings.native_logn == "trained":
        return BASE_VARIANTS
    return VARIANTS


def check_variants(names, settings: VariantSettings) -> list[str]:
    """Validate variant names (in order, without duplicates); a clear error lists what is allowed."""
    allowed = available_variants(settings)
    chosen = []
    for name in names:
        if name in VARIANTS and name not in allowed:
            raise ValueError(f"variant {name!r} is not available for this model: it was pre-trained with "
                             "logn_scaling='trained', so every variant already uses Su's log n; '+logn' (logn†, "
                             f"posthoc) is for models trained without it. Allowed: {', '.join(allowed)}.")
        if name not in allowed:
            raise ValueError(f"unknown variant {name!r}; allowed: {', '.join(allowed)}.")
        if name not in chosen:
            chosen.append(name)
    return chosen


def variant_scheme(name: str, settings: VariantSettings, length: int) -> dict:
    """`set_rope` keyword arguments (`rope_parameters`, `logn_scaling`) for variant `name` at eval length `length`
    (only `dynamic` in `prefill` mode depends on it)."""
    from longctx.rope import ROPE_SPECS  # which keys each rope_type takes; its other keys keep their defaults

    base = name.removesuffix(LOGN)
    spec = ROPE_SPECS[ROPE_TYPES[base]]
    rope = {"rope_type": spec.name, "rope_theta": settings.rope_theta,
            "original_max_position_embeddings": settings.train_len}
    if "rerope_window" in spec.keys:
        rope["rerope_window"] = settings.rerope_window
    if spec.needs_factor:
        rope["factor"] = settings.leaky_factor if base == "leaky-rerope" else settings.factor
    if "mixed_exponent" in spec.keys and settings.mixed_exponent is not None:  # else the spec's default
        rope["mixed_exponent"] = settings.mixed_exponent
    if base == "dynamic" and settings.dynamic == "prefill":
        rope.update(rope_type="ntk", factor=max(1.0, length / settings.train_len))  # the window's own scale
    elif base == "dynamic":
        rope["factor"] = 1.0  # scale (p + 1) / L_train: NTK with k = current length / L_train (YaRN §3.3)
    logn = "posthoc" if name.endswith(LOGN) else settings.native_logn
    return {"rope_parameters": rope, "logn_scaling": logn}


def effective_scheme(scheme: dict, length: int, settings: VariantSettings) -> dict:
    """The scheme that computes bit-identical numbers at eval length `length`, so that rows share the cache:
    logn† multiplies every query by exactly 1 while L ≤ L_train (§6), and NTK with k = 1 is plain RoPE."""
    rope, logn = dict(scheme["rope_parameters"]), scheme["logn_scaling"]
    if logn == "posthoc" and length <= settings.train_len:
        logn = "off"
    if rope["rope_type"] == "ntk" and rope["factor"] == 1.0:
        rope = {key: rope[key] for key in ("rope_theta", "original_max_position_embeddings")}
        rope["rope_type"] = "default"
    return {"rope_parameters": rope, "logn_scaling": logn}

"""The position schemes written out from `reference/methods.md`, in float64, for tests to check the model against.

Nothing here imports longctx or calls its helpers: a test hands `dense_attention` an attention layer's weights and
the hidden states that entered it, and gets back what the layer should output, every score rebuilt from its own
rotation matrix — RoPE's relative position (§1), ReRoPE / Leaky ReRoPE's remapped distance (§8), the dynamic NTK
table of the query's own length (§10) — with the log-n factor (§6) and YaRN's temperature (§10). Shared with the
model: the weights, the config's numbers. `python tests/mutations.py` plants one wrong formula at a time in a copy
of the package and checks that the tests built on these references catch it (tests/README.md).
"""

import math

import torch


def train_length(rope, max_position_embeddings):
    """L_train: `original_max_position_embeddings` when the rope dict names one, else `max_position_embeddings`."""
    return rope.get("original_max_position_embeddings") or max_position_embeddings


def frequency_table(rope, head_dim, max_position_embeddings, length=None):
    """(θ, m): θ (head_dim / 2,) float64 the angle per unit of position of each pair i = 0 … d/2 − 1, and m the
    factor on cos and sin (logits × m²). `length` is the current length l (dynamic NTK only)."""
    kind, b, d = rope.get("rope_type", "default"), float(rope.get("rope_theta", 10000.0)), head_dim
    k, half = float(rope.get("factor", 1.0)), head_dim // 2
    L = train_length(rope, max_position_embeddings)
    plain = [b ** (-2 * i / d) for i in range(half)]  # §1: θ_i = b^{-2i/d}
    beta = b ** (2 / d)  # Su's β-base view, m = i + 1: θ_m = 1 / β^{m−1}
    m = 1.0
    if kind in ("default", "rerope", "leaky-rerope"):  # ReRoPE keeps the plain table; its distances change (§8)
        theta = plain
    elif kind == "linear":  # §2: positions n → n/k
        theta = [t / k for t in plain]
    elif kind == "ntk":  # §3: b' = b·k^{d/(d−2)}
        theta = [(b * k ** (d / (d - 2))) ** (-2 * i / d) for i in range(half)]
    elif kind == "ntk-fixed":  # §4: θ_m = 1 / (λ·(βλ)^{m−1}), λ = k^{2/d}
        lam = k ** (2 / d)
        theta = [1 / (lam * (beta * lam) ** (pair - 1)) for pair in range(1, half + 1)]
    elif kind == "ntk-mixed":  # §5: θ_m = 1 / (β^{m−1}·λ_1…λ_m), λ_1…λ_m = exp(a·m^e), a = ln k / (d/2)^e
        e = rope.get("mixed_exponent", 0.625)
        a = math.log(k) / half ** e
        theta = [1 / (beta ** (pair - 1) * math.exp(a * pair ** e)) for pair in range(1, half + 1)]
    elif kind == "dynamic":  # §10: for l > L, b' = b·(k·l/L − (k − 1))^{d/(d−2)}; else b
        l = L if length is None else length
        base = b * (k * l / L - (k - 1)) ** (d / (d - 2)) if l > L else b
        theta = [base ** (-2 * i / d) for i in range(half)]
    elif kind == "yarn":  # §10, the code form (jquesnelle / HF): a ramp over the pair index
        if rope.get("mscale") or rope.get("mscale_all_dim"):
            raise NotImplementedError("yarn's mscale / mscale_all_dim: compared with transformers in test_rope.py")

        def pair_of(rotations):  # the pair i whose wavelength 2π b^{2i/d} fits `rotations` times into L
            return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(b))

        low, high = pair_of(rope.get("beta_fast", 32)), pair_of(rope.get("beta_slow", 1))
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        high = high + 0.001 if low == high else high
        ramp = [min(1.0, max(0.0, (i - low) / (high - low))) for i in range(half)]  # 0: kept, 1: divided by s
        theta = [t / k * g + t * (1 - g) for t, g in zip(plain, ramp)]
        given = rope.get("attention_factor")
        m = given if given is not None else (0.1 * math.log(k) + 1 if k > 1 else 1.0)  # √(1/t) = 0.1 ln s + 1
    elif kind == "llama3":  # Llama 3.1 (HF): wavelengths above L/low_freq_factor divided by k, below
        low_ff, high_ff = rope["low_freq_factor"], rope["high_freq_factor"]  # L/high_freq_factor kept, a blend between
        L = rope["original_max_position_embeddings"]
        theta = []
        for t in plain:
            wavelength = 2 * math.pi / t
            if wavelength < L / high_ff:
                theta.append(t)
            elif wavelength > L / low_ff:
                theta.append(t / k)
            else:
                smooth = (L / wavelength - low_ff) / (high_ff - low_ff)
                theta.append((1 - smooth) * t / k + smooth * t)
    else:
        raise NotImplementedError(kind)
    return torch.tensor(theta, dtype=torch.float64), float(m)


def remapped_distance(r, rope):
    """Su's r' (§8): r inside the window w; beyond it w (ReRoPE) or w + (r − w)/k (Leaky ReRoPE); r for the rest."""
    kind = rope.get("rope_type", "default")
    if kind not in ("rerope", "leaky-rerope") or r < rope["rerope_window"]:
        return float(r)
    w = rope["rerope_window"]
    return float(w) if kind == "rerope" else w + (r - w) / rope["factor"]


def rotation(angles):
    """(..., d/2) angles -> (..., d, d): the rotation of each channel pair (c, c + d/2) by its angle, the pairing of
    HF's rotate_half: x_c ↦ x_c cos − x_{c+d/2} sin, x_{c+d/2} ↦ x_c sin + x_{c+d/2} cos."""
    half = angles.shape[-1]
    matrix = angles.new_zeros(*angles.shape[:-1], 2 * half, 2 * half)
    c, s, pair = angles.cos(), angles.sin(), torch.arange(half)
    matrix[..., pair, pair], matrix[..., pair, pair + half] = c, -s
    matrix[..., pair + half, pair], matrix[..., pair + half, pair + half] = s, c
    return matrix


def logn_factor(mode, position, visible, train_len):
    """§6: "trained" log(max(visible keys, 16)) / log L; "posthoc" (logn†) max(1, log(p + 1) / log L); else 1."""
    if mode == "trained":
        return math.log(max(visible, 16)) / math.log(train_len)
    if mode == "posthoc":
        return max(1.0, math.log(position + 1) / math.log(train_len))
    return 1.0


def _project(linear, hidden, heads, head_dim):
    out = hidden.double() @ linear.weight.double().T
    if linear.bias is not None:
        out = out + linear.bias.double()
    return out.view(*hidden.shape[:2], heads, head_dim)  # (batch, seq, heads, d)


def dense_attention(layer, config, hidden, positions, real):
    """What an attention layer outputs for `hidden` (batch, seq, hidden_size), the states that entered it, at
    `positions` (batch, seq), `real` (batch, seq) bool marking real tokens: float64, zeros for padding queries.

    Query i sees the real keys j ≤ i; its score with key j is λ_i·m²·(R(r'_ij θ) q_i)·k_j / √d, R the block rotation
    of `rotation`, r'_ij the distance p_i − p_j remapped by `remapped_distance`, θ and m of `frequency_table` — for
    dynamic NTK the table of length p_i + 1, the query's own (Su's s(p) = max(L, p + 1)/L, what the model documents)
    — and λ_i of `logn_factor`. Then softmax over the keys, the weighted values, o_proj. Differentiable."""
    batch, length, _ = hidden.shape
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rope, max_positions = config.rope_parameters, config.max_position_embeddings
    train_len = train_length(rope, max_positions)
    q = _project(layer.q_proj, hidden, heads, d)
    k = _project(layer.k_proj, hidden, kv_heads, d)
    v = _project(layer.v_proj, hidden, kv_heads, d)
    group = torch.arange(heads) // (heads // kv_heads)  # the key/value head of each query head
    rows = []
    for b in range(batch):
        for i in range(length):
            if not real[b, i]:
                rows.append(hidden.new_zeros(heads * d, dtype=torch.float64))
                continue
            keys = [j for j in range(i + 1) if real[b, j]]
            p = int(positions[b, i])
            theta, m = frequency_table(rope, d, max_positions, length=p + 1)
            distances = torch.tensor([remapped_distance(p - int(positions[b, j]), rope) for j in keys],
                                     dtype=torch.float64)
            turn = rotation(distances[:, None] * theta)  # (keys, d, d): one rotation per score
            q_turned = torch.einsum("kde,he->hkd", turn, q[b, i])  # (heads, keys, d)
            k_seen, v_seen = k[b, keys][:, group].transpose(0, 1), v[b, keys][:, group].transpose(0, 1)
            scale = logn_factor(config.logn_scaling, p, len(keys), train_len) * m * m / math.sqrt(d)
            probs = torch.softmax((q_turned * k_seen).sum(-1) * scale, dim=-1)  # (heads, keys)
            rows.append(torch.einsum("hk,hkd->hd", probs, v_seen).reshape(heads * d))
    out = torch.stack(rows).view(batch, length, heads * d) @ layer.o_proj.weight.double().T
    return out if layer.o_proj.bias is None else out + layer.o_proj.bias.double()

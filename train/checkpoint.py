"""Checkpoints: a model directory users open, plus the state that makes `--resume` exact.

    out_dir/checkpoints/step-0000200/
        config.json, model.safetensors, *.py   the model (AutoModelForCausalLM, trust_remote_code=True)
        tokenizer.model, tokenizer_config.json the tokenizer (AutoTokenizer)
        training_state/                        weights, optimizer, scheduler, RNG: safetensors + JSON (state.py)
        trainer_state.json                     step, data position, the config; written last

Every checkpoint is written to a hidden temporary directory and renamed into place, so a run killed at any
moment leaves only complete checkpoints; the last `keep_last` are kept.
"""

import copy
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from .state import save_training_state

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def write_json_atomic(path, payload) -> None:
    """json.dump to a temporary file beside `path`, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def remove_partial_checkpoints(out_dir) -> None:
    """Temporary directories left by a run killed while writing a checkpoint."""
    root = Path(out_dir) / CHECKPOINT_DIR
    for path in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def save_model_dir(accelerator, model, tokenizer, directory) -> None:
    """The user-facing model directory: save_pretrained (safetensors + modeling source) and the tokenizer.

    Collective: every process must call it (FSDP gathers the full weights). A LoRA model is saved merged.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if hasattr(unwrapped, "merge_and_unload"):  # peft: a plain model with the adapters folded in
            unwrapped, state_dict = copy.deepcopy(unwrapped).merge_and_unload(), None
        with own_class(unwrapped):
            unwrapped.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    accelerator.wait_for_everyone()


@contextmanager
def own_class(model):
    """The model as an instance of its own class while it is saved.

    FSDP2 shards a model by changing its class to a subclass `FSDP<Class>` defined in torch.distributed.fsdp; saved
    as that, the directory's remote code (`auto_map`, the copied sources) would be torch's FSDP files, not longctx's.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = type(model)
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.__class__ = next(cls for cls in sharded.__mro__ if not issubclass(cls, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = sharded


def save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, trainer_state: dict, out_dir,
                    keep_last: int) -> Path:
    """Write checkpoint `step-{step}` atomically and prune old ones; returns its path. Collective."""
    root = Path(out_dir) / CHECKPOINT_DIR
    final = root / f"step-{trainer_state['step']:07d}"
    tmp = root / f".tmp-step-{trainer_state['step']:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_model_dir(accelerator, model, tokenizer, tmp)
    save_training_state(accelerator, model, optimizer, scheduler, tmp / "training_state")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, trainer_state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def publish_model(accelerator, model, tokenizer, out_dir) -> Path:
    """The final model directory `out_dir/model` (model + tokenizer, no training state), replaced atomically."""
    final = Path(out_dir) / "model"
    tmp = Path(out_dir) / ".tmp-model"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    save_model_dir(accelerator, model, tokenizer, tmp)
    if accelerator.is_main_process:
        old = Path(out_dir) / ".old-model"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint) -> dict:
    with open(Path(checkpoint) / STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["list_checkpoints", "publish_model", "read_trainer_state", "remove_partial_checkpoints",
           "save_checkpoint", "save_model_dir", "write_json_atomic"]

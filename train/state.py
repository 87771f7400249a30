"""Training state as data: what `--resume` needs beyond the model directory, in safetensors and JSON, no pickle.

    training_state/
        weights.safetensors        every parameter and buffer of the trained module (LoRA adapters included)
        optimizer.safetensors      the optimizer's per-parameter tensors (AdamW: step, exp_avg, exp_avg_sq)
        state.json                 optimizer param groups, lr scheduler, gradient scaler (fp16)
        rng-RANK.safetensors/.json the random generators of each process (torch CPU and CUDA; Python; NumPy)

accelerate's `save_state` pickles the scheduler and the generators, and its loader unpickles them without
restriction: resuming a checkpoint someone shared would run whatever code its pickles hold. Here a checkpoint is
read as tensors and JSON only. Tensors are gathered to full ones by name (`torch.distributed.checkpoint.state_dict`), so
one format serves one process, DDP and FSDP; every process reads the files and takes its part.
"""

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

FORMAT = "longctx-training-state-1"
SEPARATOR = "/"  # optimizer tensors are stored as "PARAMETER_NAME/STATE_KEY"


class TrainingStateError(ValueError):
    """A checkpoint's training state is missing, damaged or in a format that is not loaded (pickles)."""


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


def _plain(tensors: dict) -> dict:
    """Contiguous CPU tensors, each with storage of its own (safetensors refuses shared storage: tied weights)."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def save_training_state(accelerator, model, optimizer, scheduler, directory) -> None:
    """Write the state `load_training_state` restores. Collective: every process calls it."""
    directory = Path(directory)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim = get_state_dict(model, _inner(optimizer), options=options)
    rank = accelerator.process_index
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(_plain(weights), directory / "weights.safetensors")
        save_file(_plain({f"{name}{SEPARATOR}{key}": value for name, per_param in optim["state"].items()
                          for key, value in per_param.items()}), directory / "optimizer.safetensors")
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        payload = {"format": FORMAT, "param_groups": optim["param_groups"], "scheduler": scheduler.state_dict(),
                   "scaler": scaler}
        (directory / "state.json").write_text(json.dumps(payload, indent=1, allow_nan=False))
    accelerator.wait_for_everyone()
    generators = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        generators.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(_plain(generators), directory / f"rng-{rank}.safetensors")
    kind, keys, position, has_gauss, cached = np.random.get_state()
    (directory / f"rng-{rank}.json").write_text(json.dumps({
        "python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, cached]}))
    accelerator.wait_for_everyone()


def _read(directory: Path, rank: int):
    if not (directory / "state.json").is_file():
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in (".pkl", ".bin", ".pt"))
        if pickles:
            raise TrainingStateError(
                f"{directory} holds accelerate's pickled training state ({', '.join(pickles[:3])}), which --resume "
                f"does not load: unpickling runs any code the files hold. Start a new run from this checkpoint's "
                f"weights instead: --init-from {directory.parent}")
        raise TrainingStateError(f"{directory}: no state.json; the checkpoint is incomplete (delete it to resume "
                                 f"from the one before)")
    try:
        payload = json.loads((directory / "state.json").read_text())
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format') if isinstance(payload, dict) else payload!r}, "
                             f"expected {FORMAT!r}")
        weights = load_file(directory / "weights.safetensors")
        flat = load_file(directory / "optimizer.safetensors")
        generators = load_file(directory / f"rng-{rank}.safetensors")
        host = json.loads((directory / f"rng-{rank}.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as err:  # safetensors raises its own errors as these
        raise TrainingStateError(f"{directory}: the training state cannot be read ({err}); delete this checkpoint "
                                 f"to resume from the one before") from err
    return payload, weights, flat, generators, host


def load_training_state(accelerator, model, optimizer, scheduler, directory) -> None:
    """Restore weights, optimizer, scheduler, scaler and every generator from `save_training_state`'s files."""
    directory = Path(directory)
    payload, weights, flat, generators, host = _read(directory, accelerator.process_index)
    state = {}
    for key, tensor in flat.items():
        name, _, field = key.rpartition(SEPARATOR)
        state.setdefault(name, {})[field] = tensor
    groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group
              for group in payload["param_groups"]]
    set_state_dict(model, _inner(optimizer), model_state_dict=weights,
                   optim_state_dict={"state": state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(payload["scheduler"])
    if accelerator.scaler is not None and payload["scaler"] is not None:
        accelerator.scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(generators["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([generators[f"cuda{i}"] for i in range(torch.cuda.device_count())
                                      if f"cuda{i}" in generators])
    version, keys, gauss = host["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, keys, position, has_gauss, cached = host["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


__all__ = ["TrainingStateError", "load_training_state", "save_training_state"]

"""The training loop on `accelerate`, read top to bottom: `setup` builds a `Run`, `train_step` advances it,
`evaluate_and_save` scores and checkpoints it.

corpus -> split -> tokenizer -> packed windows -> model (new, or `init_from` with a new position scheme) ->
AdamW + warmup/cosine -> steps (accumulation, clipping) -> JSONL log, validation loss, checkpoints.
The same code runs on one CPU, several CPU processes (gloo) and several GPUs (DDP or FSDP), launched with
`accelerate launch`; `batch_size` is global, so the same config gives the same steps on any number of processes.
"""

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from longctx import LongCtxConfig, LongCtxForCausalLM
from longctx.configuration_longctx import original_max_positions
from longctx.files import check_model_source
from longctx.data import (add_copied_spans, add_passkey_spans, corpus_splits, load_tokenizer, pack_windows,
                          progress_bars, train_tokenizer)
from longctx.rope import set_rope

from .checkpoint import (
    list_checkpoints,
    publish_model,
    read_trainer_state,
    remove_partial_checkpoints,
    save_checkpoint,
)
from .config import ConfigError, check_context_parallel, compile_backend, extension_fields, resolve_config
from .context_parallel import context_parallel_step
from .state import load_training_state

# Keys that may differ when resuming (they change the schedule's length or the bookkeeping, not what a step does).
RESUMABLE_CHANGES = ("max_steps", "eval_every", "eval_windows", "save_every", "keep_last", "progress", "resume",
                     "overwrite", "out_dir", "compile")  # compile changes no number (tested)


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped before the optimizer step."""


# --- run directory ---------------------------------------------------------------------------------------------

def prepare_out_dir(config, accelerator):
    """Create/check `out_dir`; returns the checkpoint to resume from, or None. Raises before any training."""
    out = Path(config["out_dir"])
    saved_config = out / "config.yaml"
    if config["resume"] and saved_config.is_file():
        with open(saved_config, encoding="utf-8") as f:
            previous = yaml.safe_load(f)
        if previous.get("init_from") is not None and isinstance(previous.get("model"), dict):
            previous["model"] = extension_fields(previous["model"])  # older runs recorded the whole section
        changed = sorted(k for k in set(previous) | set(config)
                         if k not in RESUMABLE_CHANGES and previous.get(k) != config.get(k))
        if changed:
            raise ConfigError(f"--resume: the config differs from the run in {out} in {', '.join(changed)} "
                              f"(e.g. {changed[0]}: {previous.get(changed[0])!r} -> {config.get(changed[0])!r}); "
                              f"only {', '.join(RESUMABLE_CHANGES)} may change")
    elif not config["resume"] and (saved_config.exists() or list_checkpoints(out)) and not config["overwrite"]:
        raise ConfigError(f"out_dir {str(out)!r} already holds a run; pass --resume to continue it, "
                          f"--overwrite true to start over, or choose another --out_dir")
    probe = out / f".write-test-{accelerator.process_index}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"config `out_dir`={str(out)!r} is not writable: {err}") from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not config["resume"]:
            for name in ("checkpoints", "model", "tokenizer", "log.jsonl"):
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        remove_partial_checkpoints(out)
        with open(out / ".config.yaml.tmp", "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        (out / ".config.yaml.tmp").replace(saved_config)
    accelerator.wait_for_everyone()
    checkpoints = list_checkpoints(out) if config["resume"] else []
    return checkpoints[-1] if checkpoints else None


class JsonlLog:
    """One JSON object per line, flushed at once. Resuming drops the lines written after the checkpoint."""

    def __init__(self, path, enabled: bool, keep_through_step: int):
        self.path, self.enabled = Path(path), enabled
        if enabled and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# --- tokenizer and model ---------------------------------------------------------------------------------------

def get_tokenizer(config, train_documents, out_dir):
    """The source model's tokenizer (init_from), the run's saved one (resume), or a new one on the train split."""
    if config["init_from"] is not None:
        try:
            return load_tokenizer(config["init_from"])
        except (OSError, ValueError) as err:
            raise ConfigError(f"config `init_from`={config['init_from']!r}: no tokenizer could be loaded from it "
                              f"({err})") from err
    directory = Path(out_dir) / "tokenizer"
    if (directory / "tokenizer_config.json").is_file():
        return load_tokenizer(directory)
    return train_tokenizer(train_documents, config["vocab_size"], directory, seed=config["split_seed"])


def load_source_model(source):
    """A longctx model directory, a Llama directory or a GGUF file, as a float32 LongCtxForCausalLM."""
    from longctx.convert import from_llama

    if check_model_source(source) == "longctx":
        return LongCtxForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    return from_llama(source).float()


def build_model(config, tokenizer):
    """A new model (seeded) of the `model` fields, or the `init_from` model with a new position scheme / length."""
    if config["init_from"] is None:
        torch.manual_seed(config["seed"])
        model_config = LongCtxConfig(**config["model"], vocab_size=len(tokenizer),
                                     max_position_embeddings=config["seq_len"], bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                     attn_implementation=config["attn_implementation"])
        return LongCtxForCausalLM(model_config)
    model = load_source_model(config["init_from"])
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"init_from: the tokenizer has {len(tokenizer)} tokens, the model only "
                          f"{model.config.vocab_size}")
    new = extension_fields(config["model"])
    ignored = {k: v for k, v in config["model"].items() if k not in new and getattr(model.config, k, v) != v}
    if ignored:
        print(f"init_from: the architecture is {config['init_from']}'s; ignoring " +
              ", ".join(f"model.{k}={v!r} (source: {getattr(model.config, k)!r})" for k, v in ignored.items()))
    source_rope = model.config.rope_parameters
    rope = dict(new["rope_parameters"]) if "rope_parameters" in new else dict(source_rope)
    rope.setdefault("rope_theta", source_rope["rope_theta"])  # the base the source was trained with
    rope.setdefault("original_max_position_embeddings", original_max_positions(model.config))  # its L_train
    try:
        set_rope(model, rope, new.get("logn_scaling"))
    except ValueError as err:
        raise ConfigError(f"config `model.rope_parameters` for init_from: {err}") from err
    model.config.max_position_embeddings = max(config["seq_len"], model.config.max_position_embeddings)
    model.config.attention_dropout = new.get("attention_dropout", model.config.attention_dropout)
    try:
        model.config.validate_longctx()
    except ValueError as err:
        raise ConfigError(f"config `model` for init_from: {err}") from err
    model.set_attn_implementation(config["attn_implementation"])
    return model


def add_lora(model, lora):
    """Wrap with peft LoRA adapters (only they train); checkpoints are saved merged."""
    import peft

    adapter = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                              target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, adapter)


# --- optimisation ----------------------------------------------------------------------------------------------

def param_groups(model, weight_decay):
    """Weight decay on matrices and embeddings (ndim >= 2), none on norms and biases (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def lr_factor(step, config):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps; as a multiple of lr (for LambdaLR)."""
    lr, min_lr, warmup, total = config["lr"], config["min_lr"], config["warmup_steps"], config["max_steps"]
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)) / lr


# --- data order ------------------------------------------------------------------------------------------------

class BatchOrder:
    """Which windows make global step `s`: a seeded permutation per epoch, `batch_size` windows per step.

    The data position of step s is (epoch, offset) = divmod(s, steps_per_epoch), so a resumed run draws the same
    windows as one that never stopped. Each process takes a contiguous share of the global batch.
    """

    def __init__(self, n_windows, batch_size, seed):
        self.n, self.batch_size, self.seed = n_windows, batch_size, seed
        self.steps_per_epoch = n_windows // batch_size
        self._epoch, self._order = None, None

    def position(self, step):
        epoch, offset = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "window_offset": offset * self.batch_size}

    def rows(self, step):
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=generator)
        return self._order[offset * self.batch_size:(offset + 1) * self.batch_size]


def fingerprint(windows) -> str:
    """sha256 of the training windows, stored in checkpoints: a resume on other data is refused."""
    return hashlib.sha256(windows[:]["input_ids"].numpy().tobytes()).hexdigest()[:16]


def lm_loss(model, batch, device, chunked=None):
    """Mean next-token cross-entropy of a batch of windows, position_ids restarting at document starts.
    `chunked` (longctx models only) computes it without materialising the logits (`skip_logits`)."""
    input_ids = batch["input_ids"].to(device)
    extra = {} if chunked is None else {"skip_logits": chunked}
    return model(input_ids=input_ids, position_ids=batch["position_ids"].to(device), labels=input_ids,
                 use_cache=False, return_dict=True, **extra).loss


@torch.no_grad()
def evaluate(accelerator, model, windows, config) -> float:
    """Mean loss over the first `eval_windows` validation windows, shared evenly between processes."""
    n = len(windows) if config["eval_windows"] == 0 else min(config["eval_windows"], len(windows))
    world, rank = accelerator.num_processes, accelerator.process_index
    n = max(world, n - n % world)  # the same number of batches on every process
    rows = [i % len(windows) for i in range(rank, n, world)]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    model.eval()
    for start in range(0, len(rows), config["micro_batch_size"]):
        batch = windows[rows[start:start + config["micro_batch_size"]]]
        loss = lm_loss(model, batch, accelerator.device, config["chunked_loss"])  # prepared: autocasts itself
        targets = batch["input_ids"][:, 1:].numel()
        total += torch.stack([loss.double() * targets, torch.tensor(targets, dtype=torch.float64,
                                                                    device=accelerator.device)])
    model.train()
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1])


# --- the run ---------------------------------------------------------------------------------------------------

def make_accelerator(mixed_precision: str, context_parallel: int = 1):
    """accelerate's `Accelerator` as `accelerate launch` configured it (its ACCELERATE_* / FSDP_* environment), on the
    CPU when there is no GPU; with `context_parallel` > 1 a `ParallelismConfig(cp_size=context_parallel)` over the
    launch's processes (`context_parallel_accelerator`).

    On CPU processes accelerate (1.16) builds plain multi-process data parallelism (gloo) even under `--use_fsdp`:
    its state turns ACCELERATE_USE_FSDP into FSDP only on accelerator devices. FSDP2 (`--fsdp_version 2`) shards on
    the CPU with gloo, so there the state is switched to FSDP with the plugin built from the launch's FSDP_*
    variables, as accelerate does on GPUs. FSDP1 cannot run on CPU (accelerate refuses its `sync_module_states`
    there, and FSDP1 refuses the device `cpu:0` accelerate hands it): refused with what to pass instead.
    """
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

    cpu = not torch.cuda.is_available()
    fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP")
    if context_parallel > 1:
        return context_parallel_accelerator(mixed_precision, context_parallel, cpu, fsdp)
    if cpu and fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(f"accelerate launch --use_fsdp: FSDP version {os.environ.get('FSDP_VERSION', '1')} cannot "
                          "run on CPU processes; pass --fsdp_version 2 (or --multi_gpu for data parallelism)")
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    if cpu and fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)  # as accelerate's state does on GPUs
        accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def context_parallel_accelerator(mixed_precision: str, cp: int, cpu: bool, fsdp: bool):
    """The Accelerator of a context-parallel run: FSDP2 over every process, its sequences split over groups of `cp`
    (accelerate's mesh: data-parallel outside, cp inside, so process i is in data-parallel rank i // cp). Refused on
    CPU processes and without an FSDP2 launch, with what to do instead."""
    from accelerate import Accelerator

    try:
        from accelerate import ParallelismConfig
    except ImportError as err:  # (accelerate < 1.10)
        raise ConfigError(f"config `context_parallel`={cp} needs accelerate >= 1.10 (ParallelismConfig): "
                          "pip install -U accelerate") from err
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cpu:
        raise ConfigError(f"config `context_parallel`={cp} needs CUDA GPUs: torch's ring attention dispatches SDPA's "
                          "CUDA kernels; on this machine use context_parallel: 1")
    if not fsdp or os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(f"config `context_parallel`={cp} needs FSDP2: launch with accelerate launch --use_fsdp "
                          f"--fsdp_version 2 --num_processes N (N a multiple of {cp})")
    if world % cp:
        raise ConfigError(f"config `context_parallel`={cp} must divide the number of processes ({world})")
    parallelism = ParallelismConfig(dp_shard_size=world // cp, cp_size=cp)
    return Accelerator(mixed_precision=mixed_precision, parallelism_config=parallelism)


@dataclass
class Data:
    """The run's tokenizer and token windows, and the order the training windows are drawn in."""

    tokenizer: object
    train: object  # datasets.Dataset of packed windows: input_ids, position_ids
    validation: object
    order: BatchOrder
    fingerprint: str  # of the training windows: a resume on other data is refused
    early: object = None  # the windows of the steps before `switch_step` (passkey_from_step), or None
    switch_step: int = 0

    def windows(self, step: int):
        """The windows that global step `step` draws its rows from."""
        return self.early if self.early is not None and step < self.switch_step else self.train


@dataclass
class Run:
    """What the steps read and change: built once by `setup`, advanced by `train_step`, saved by `evaluate_and_save`."""

    config: dict
    accelerator: object
    model: torch.nn.Module  # prepared (DDP/FSDP-wrapped where launched so)
    optimizer: object  # accelerate's AcceleratedOptimizer around AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: Data
    log: JsonlLog
    step: int  # optimizer steps done
    tokens_seen: int
    last_checkpoint: Path | None  # named when a later step goes wrong

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(this process's data-parallel rank, their number): a context-parallel group shares its sequences."""
        cp = self.config["context_parallel"]
        return self.accelerator.process_index // cp, self.accelerator.num_processes // cp

    @property
    def per_process(self) -> int:
        """Sequences of each step's global batch that this process computes (with context_parallel: a shard of)."""
        return self.config["batch_size"] // self.data_parallel[1]

    @property
    def accumulation(self) -> int:
        """Micro-batches per step on each process."""
        return self.per_process // self.config["micro_batch_size"]


def run_training(config: dict) -> Path:
    """Train (or fine-tune) as `config` says; returns `out_dir/model`, the final model + tokenizer directory."""
    config = resolve_config(config)
    with progress_bars(config["progress"]):  # `progress: false` also hides datasets' and transformers' bars
        return _train(config)


def _train(config) -> Path:
    """setup -> (train_step -> log -> evaluate_and_save) until max_steps -> the final model directory."""
    run = setup(config)
    run.model.train()
    main = run.accelerator.is_main_process
    progress = tqdm(total=config["max_steps"], initial=run.step, disable=not (main and config["progress"]),
                    desc="train", dynamic_ncols=True)
    start_time, start_step = time.time(), run.step
    tokens_per_step = config["batch_size"] * config["seq_len"]
    while run.step < config["max_steps"]:
        record = train_step(run)
        elapsed = time.time() - start_time
        run.log.write(step=run.step, **record, tokens=run.tokens_seen,
                      tokens_per_s=(run.step - start_step) * tokens_per_step / max(elapsed, 1e-9), elapsed_s=elapsed)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        evaluate_and_save(run, record["loss"], progress)
    progress.close()
    final = publish_model(run.accelerator, run.model, run.data.tokenizer, config["out_dir"])
    run.accelerator.end_training()
    return final


# --- setup: everything checked and built before the first step ------------------------------------------------

def setup(config) -> Run:
    """Corpus, accelerator, run directory, data, model, optimizer and (with --resume) their saved state.

    Every error a user can cause is raised here, and those about the corpus and the init_from source before the run
    directory is written; `config["model"]` keeps only the fields an init_from run changes (what the run records).
    """
    try:  # a missing or unusable corpus fails before out_dir
        splits = corpus_splits(config["corpus"], seed=config["split_seed"])
    except ValueError as err:
        raise ConfigError(str(err)) from err  # the message names the corpus and the file
    accelerator = make_accelerator(config["mixed_precision"], config["context_parallel"])
    world = accelerator.num_processes // config["context_parallel"]  # data-parallel ranks
    if config["batch_size"] % (config["micro_batch_size"] * world):
        raise ConfigError(f"config `batch_size`={config['batch_size']} is invalid; must be divisible by "
                          f"micro_batch_size={config['micro_batch_size']} x {world} data-parallel processes")
    out_dir = Path(config["out_dir"])
    tokenizer = model = None
    if config["init_from"] is not None:  # the source's tokenizer and model first: their errors leave out_dir alone
        tokenizer = get_tokenizer(config, splits["train"], out_dir)
        model = build_model(config, tokenizer)
        check_context_parallel(config, model.config)
        # what the run records: the fields that changed the source, whose architecture the saved model holds
        config["model"] = extension_fields(config["model"])
    resume_from = prepare_out_dir(config, accelerator)
    if tokenizer is None:
        with accelerator.main_process_first():
            tokenizer = get_tokenizer(config, splits["train"], out_dir)
    data = build_data(config, tokenizer, splits)
    if model is None:
        model = build_model(config, tokenizer)
    model, optimizer, scheduler = build_training(config, accelerator, model)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        step, tokens_seen = restore(resume_from, accelerator, model, optimizer, scheduler, data.fingerprint)
    log = JsonlLog(out_dir / "log.jsonl", accelerator.is_main_process, keep_through_step=step)
    run = Run(config, accelerator, model, optimizer, scheduler, data, log, step, tokens_seen, resume_from)
    if accelerator.is_main_process:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"train: {len(data.train)} windows x {config['seq_len']} tokens, validation {len(data.validation)}; "
              f"{n_params / 1e6:.2f}M parameters; {world} process(es) x {run.accumulation} micro-batch(es) of "
              f"{config['micro_batch_size']} ({accelerator.distributed_type.value}, {accelerator.device}); "
              f"{'resuming at step ' + str(run.step) if run.step else 'from step 0'}"
              f"{'; passkey spans from step ' + str(data.switch_step) if data.early is not None else ''}",
              flush=True)
    return run


def build_data(config, tokenizer, splits) -> Data:
    """Fixed-length windows of the train split (with copied spans where asked) and of the validation split."""
    seq_len = config["seq_len"]
    first_id = max(tokenizer.all_special_ids, default=-1) + 1  # random spans draw ordinary tokens only
    random_tokens = (first_id, len(tokenizer) - 1) if config["copy_source"] == "random" else None
    copy_windows = add_copied_spans(pack_windows(tokenizer, splits["train"], seq_len), config["copy_fraction"],
                                    config["copy_span"], config["seed"], tokenizer.eos_token_id, random_tokens)
    train_windows = add_passkey_spans(copy_windows, config["passkey_fraction"], config["seed"], tokenizer)
    # passkey_from_step: the steps before it draw the same windows without their passkey spans
    early = copy_windows if config["passkey_from_step"] > 0 and config["passkey_fraction"] > 0 else None
    val_windows = pack_windows(tokenizer, splits["validation"], seq_len)
    if len(train_windows) < config["batch_size"]:
        raise ConfigError(f"corpus {config['corpus']!r}: the train split gives {len(train_windows)} windows of "
                          f"seq_len={seq_len}, fewer than batch_size={config['batch_size']}")
    if len(val_windows) == 0:
        raise ConfigError(f"corpus {config['corpus']!r}: the validation split is shorter than one window of "
                          f"seq_len={seq_len}")
    order = BatchOrder(len(train_windows), config["batch_size"], config["seed"])
    digest = fingerprint(train_windows) if early is None else fingerprint(early) + fingerprint(train_windows)
    return Data(tokenizer, train_windows, val_windows, order, digest, early, config["passkey_from_step"])


def build_training(config, accelerator, model):
    """The model with its training options, prepared by accelerate, and AdamW + the warmup/cosine schedule.

    FSDP2 shards the model and swaps the optimizer's parameters for the shards in one `prepare` call; every other
    mode (one process, DDP, FSDP1's flat parameters) prepares the model first and builds the optimizer on its
    parameters. The scheduler stays unprepared: one step per optimizer step.
    """
    from accelerate.utils import DistributedType

    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    if config["lora"] is not None:
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ConfigError("config `lora`: LoRA is supported with DDP and single processes, not with FSDP")
        model = add_lora(model, config["lora"])
    if compile_backend(config):  # in place: parameter names, checkpoints and saving are unchanged
        model.compile(backend=compile_backend(config))

    def optimization(model):
        optimizer = torch.optim.AdamW(param_groups(model, config["weight_decay"]), lr=config["lr"],
                                      betas=(config["beta1"], config["beta2"]))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))

    if accelerator.is_fsdp2:
        optimizer, scheduler = optimization(model)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model = accelerator.prepare(model)
        optimizer, scheduler = optimization(model)
        optimizer = accelerator.prepare(optimizer)
    return model, optimizer, scheduler


def restore(checkpoint: Path, accelerator, model, optimizer, scheduler, data_fingerprint: str) -> tuple[int, int]:
    """--resume: the weights, optimizer, schedule and random generators saved in `checkpoint`; returns its step and
    tokens seen. Refused when the training windows differ from the checkpoint's."""
    state = read_trainer_state(checkpoint)
    if state["data_fingerprint"] != data_fingerprint:
        raise ConfigError(f"--resume: the training windows differ from those of {checkpoint} (corpus or "
                          f"tokenizer changed)")
    load_training_state(accelerator, model, optimizer, scheduler, checkpoint / "training_state")
    return state["step"], state["tokens_seen"]


# --- the steps ----------------------------------------------------------------------------------------------------

def train_step(run: Run) -> dict:
    """One optimizer step on the global batch of step `run.step`: accumulated micro-batches, the gradient clipped,
    a non-finite loss stopped before the update. Returns what the log records: loss, lr, grad_norm."""
    config, accelerator, model = run.config, run.accelerator, run.model
    (rank, _), per_process, micro_batch = run.data_parallel, run.per_process, config["micro_batch_size"]
    rows = run.data.order.rows(run.step)[rank * per_process:(rank + 1) * per_process].tolist()
    lr = run.scheduler.get_last_lr()[0]
    losses, cp = [], config["context_parallel"]
    for micro in range(run.accumulation):
        batch = run.data.windows(run.step)[rows[micro * micro_batch:(micro + 1) * micro_batch]]
        sync = nullcontext() if micro == run.accumulation - 1 else accelerator.no_sync(model)
        if cp > 1:  # this process's shard of each sequence (train/context_parallel.py)
            with sync, context_parallel_step(accelerator, batch, cp) as inputs:
                loss = model(**inputs, use_cache=False, return_dict=True, skip_logits=config["chunked_loss"]).loss
                accelerator.backward(loss / run.accumulation)
        else:
            with sync:
                loss = lm_loss(model, batch, accelerator.device, config["chunked_loss"])
                accelerator.backward(loss / run.accumulation)
        losses.append(loss.detach().float())
    loss = float(accelerator.reduce(torch.stack(losses).mean(), "mean"))
    grad_norm = None
    if config["grad_clip"] > 0:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config["grad_clip"]))
    check_finite(run, loss, grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += config["batch_size"] * config["seq_len"]
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm}


def check_finite(run: Run, loss: float, grad_norm) -> None:
    """Raise NonFiniteLossError for a NaN/infinite loss, or gradient norm (fp16's scaler skips those steps itself)."""
    bad_norm = grad_norm is not None and not math.isfinite(grad_norm) and run.config["mixed_precision"] != "fp16"
    if math.isfinite(loss) and not bad_norm:
        return
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    where = (f"The last good checkpoint is {run.last_checkpoint}; continue from its weights with a lower lr "
             f"(or more warmup_steps): --init-from {run.last_checkpoint}" if run.last_checkpoint is not None
             else "No checkpoint was written before it.")
    raise NonFiniteLossError(f"step {run.step + 1}: the training {what} (not finite); stopped before the "
                             f"optimizer step, nothing was saved. {where}")


def evaluate_and_save(run: Run, loss: float, progress) -> None:
    """After step `run.step`: the validation loss every `eval_every` steps, a checkpoint every `save_every` (both at
    the last step)."""
    config, step = run.config, run.step
    last = step == config["max_steps"]
    if step % config["eval_every"] == 0 or last:
        val_loss = evaluate(run.accelerator, run.model, run.data.validation, config)
        run.log.write(step=step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
        progress.set_postfix(loss=f"{loss:.3f}", val_loss=f"{val_loss:.3f}", refresh=False)
    if step % config["save_every"] == 0 or last:
        trainer_state = {"step": step, "tokens_seen": run.tokens_seen, "data_position": run.data.order.position(step),
                         "data_fingerprint": run.data.fingerprint, "config": config}
        run.last_checkpoint = save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler,
                                              run.data.tokenizer, trainer_state, config["out_dir"], config["keep_last"])


__all__ = ["NonFiniteLossError", "make_accelerator", "run_training"]

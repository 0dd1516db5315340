"""Stage 3: train the LoRA adapter on data/train_data.json.

    python train.py                                  # the published recipe, on one GPU
    python train.py --precision bf16 --batch-size 8 --grad-accum 1
    python train.py --dry-run                        # print the plan; works without model weights
    python train.py --resume                         # continue from the latest checkpoint (none yet: start)
    python train.py --config run/train_config.yaml --output-dir again   # rerun a run with its resolved settings
    python train.py --overwrite-output-dir           # start afresh, deleting the previous run's outputs
    python train.py --use-dora                       # a LoRA variant: --use-rslora, --loraplus-lr-ratio 16, ...
    python train.py --keep-best                      # the adapter is the best validation checkpoint, not the last
    python train.py --seed 43 --output-dir run_s43   # another seed: evaluate.py groups seeds into arms
    torchrun --nproc_per_node 2 train.py             # DDP; the effective batch stays batch x accumulation

Edit the defaults in TrainConfig below, or override any field on the command line (--learning-rate 1e-4).
Writes fine_tuned_model/: the adapter (PEFT safetensors), tokenizer, a model card (README.md),
training_summary.json, train_config.yaml (the resolved settings), train_log.jsonl, loss_curve.png, TensorBoard
runs/ and checkpoints/. One run at a time per folder (a lock file), and a folder holding a previous run needs
--resume or --overwrite-output-dir; --resume alone is a command a requeued job can always repeat.

training_summary.json and every checkpoint's resume_settings.json record what was trained (`trained`): the settings
that shape the training, the sha256 of the data, the base model's identity (its config and weights by content:
resume_guard.model_identity), the planned optimizer steps, and what the run trained before each --resume-anyway
that changed them. evaluate.py groups seeds into arms by it, whatever folders, batch split or intervals they used.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from transformers import TrainingArguments, set_seed

from lora_summarization import data, modeling, resume_guard, run_folder
from lora_summarization.arms import arm_identity
from lora_summarization.cli import UsageError, config_as_dict, run_stage, write_atomic, write_json
from lora_summarization.disk_space import DiskFull, disk_full_reported, folder_size
from lora_summarization.evaluation import save_generation_config
from lora_summarization.logging_integrations import (
    arm_group,
    integrations,
    report_to_problems,
    tracker_environment,
    tracker_run,
)
from lora_summarization.model_card import write_model_card
from lora_summarization.run_lock import is_main_process, main_process_decides, output_dir_lock
from lora_summarization.run_summary import (
    cost_line,
    first_and_last,
    kept_best,
    kept_best_line,
    model_flops_utilization,
    run_facts,
    train_loss_first_and_last,
)
from lora_summarization.stops import early_stop_exit_code, memory_remedies
from lora_summarization.training import (
    RESUME_AFTER_FREEING_SPACE,
    build_trainer,
    checkpoint_step,
    core_training_arguments,
    encode_records,
    latest_checkpoint,
    optimizer_steps_per_epoch,
    out_of_memory_reported,
    plot_loss_curve,
    restore_checkpoint,
)


@dataclass
class TrainConfig:
    model: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "Hub id or local model folder"})
    data_dir: str = field(default="data", metadata={"help": "folder written by data_preparation.py"})
    output_dir: str = field(default="fine_tuned_model", metadata={"help": "where the adapter and logs go"})
    epochs: float = field(default=3, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides --epochs when > 0"})
    batch_size: int = field(default=2, metadata={"help": "micro-batch per device"})
    grad_accum: int = field(default=4, metadata={"help": "micro-batches per optimizer step, summed over devices"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak AdamW learning rate"})
    lr_scheduler: str = field(default="linear", metadata={"help": "learning-rate schedule after warm-up"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    max_length: int = field(default=512, metadata={"help": "token budget; long dialogues are shortened, not summaries"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "comma-separated module names, or all-linear"}
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA: LoRA on the direction, a trained magnitude per row"})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale the update by alpha/sqrt(r), not alpha/r"})
    loraplus_lr_ratio: float = field(
        default=0.0, metadata={"help": "LoRA+: the B matrices learn at this many times --learning-rate (0 = off)"}
    )
    neftune_noise_alpha: float = field(
        default=0.0, metadata={"help": "NEFTune: uniform noise of this scale on the embeddings in training (0 = off)"}
    )
    precision: str = field(default="fp32", metadata={"help": "fp32 (published), tf32 or bf16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    system_prompt: str | None = field(default=None, metadata={"help": "system message; None = template default"})
    eval_steps: int = field(default=200, metadata={"help": "validation loss every N optimizer steps"})
    eval_examples: int = field(default=200, metadata={"help": "validation examples scored (first N)"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N optimizer steps"})
    save_total_limit: int = field(default=3, metadata={"help": "checkpoints kept"})
    keep_best: bool = field(
        default=False,
        metadata={"help": "the adapter is the checkpoint with the lowest validation content loss, not the last step"},
    )
    logging_steps: int = field(default=10, metadata={"help": "log the train loss every N optimizer steps"})
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "comma-separated logging integrations (tensorboard, wandb, mlflow, ...), or none"},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue from the latest checkpoint in output-dir; with none yet, start afresh"},
    )
    resume_anyway: bool = field(
        default=False, metadata={"help": "with --resume: continue even if settings or data changed"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "delete everything in output-dir first (a previous run's adapter and logs)"}
    )
    dry_run: bool = field(default=False, metadata={"help": "print the plan and exit without training"})
    allow_cpu: bool = field(
        default=False, metadata={"help": "train a model of more than ~1B parameters on the CPU when no GPU is usable"}
    )
    seed: int = field(default=42, metadata={"help": "seed for LoRA init, data order and dropout"})
    debug: bool = field(default=False, metadata={"help": "show tracebacks for usage errors"})


def validate(config: TrainConfig, world_size: int) -> None:
    """Report every bad setting at once, before anything expensive."""
    problems = []
    if config.batch_size < 1 or config.grad_accum < 1:
        problems.append("--batch-size and --grad-accum must be at least 1")
    elif config.grad_accum % world_size:
        problems.append(f"--grad-accum {config.grad_accum} must be divisible by the {world_size} processes")
    if gpus := modeling.several_gpus_without_torchrun():
        problems.append(
            f"{gpus} GPUs are visible to one process, which would multiply the micro-batch by {gpus} (DataParallel); "
            f"use torchrun --nproc_per_node {gpus} train.py, or CUDA_VISIBLE_DEVICES=0 python train.py for one GPU"
        )
    problems += report_to_problems(config.report_to)
    if precision_problem := modeling.precision_problem(config.precision):
        problems.append(precision_problem)
    if config.epochs <= 0 and config.max_steps <= 0:
        problems.append("--epochs or --max-steps must be positive")
    if config.learning_rate < 0:
        problems.append("--learning-rate must not be negative")
    if config.resume and config.overwrite_output_dir:
        problems.append("--resume continues the run in --output-dir and --overwrite-output-dir deletes it: pass one")
    if config.resume_anyway and not config.resume:
        problems.append("--resume-anyway only applies with --resume")
    problems += modeling.lora_problems(
        config.model,
        **lora_settings(config),
        loraplus_lr_ratio=config.loraplus_lr_ratio,
        neftune_noise_alpha=config.neftune_noise_alpha,
    )
    if config.keep_best and (config.eval_steps < 1 or config.save_steps % config.eval_steps):
        problems.append(
            f"--keep-best chooses among checkpoints by their validation loss, so --save-steps ({config.save_steps}) "
            f"must be a multiple of --eval-steps ({config.eval_steps})"
        )
    if problems:
        raise UsageError("; ".join(problems))


def lora_settings(config: TrainConfig) -> dict:
    """The arguments of modeling.lora_config."""
    return {
        "r": config.lora_r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
    }


def load_datasets(config: TrainConfig, tokenizer):
    data_dir = Path(config.data_dir)
    train = encode_records(
        tokenizer, data.read_records(data_dir / data.TRAIN_FILE), config.max_length, config.system_prompt
    )
    validation_records = data.read_records(data_dir / data.VALIDATION_FILE)[: config.eval_examples]
    validation = encode_records(tokenizer, validation_records, config.max_length, config.system_prompt)
    return train, validation


# What a resumed run must share with its checkpoint; logging, evaluation and save intervals may change.
RESUME_FIELDS = (
    "model",
    "max_length",
    "batch_size",
    "grad_accum",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "epochs",
    "max_steps",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_dora",
    "use_rslora",
    "loraplus_lr_ratio",
    "neftune_noise_alpha",
    "precision",
    "seed",
    "system_prompt",
)


def resume_settings(config: TrainConfig, world_size: int) -> dict:
    data_files = [Path(config.data_dir) / name for name in (data.TRAIN_FILE, data.VALIDATION_FILE)]
    return resume_guard.resume_settings(config, RESUME_FIELDS, world_size, data_files)


def trained_record(config: TrainConfig, settings: dict, plan: dict, checkpoint: str | None, overrides: list[str]):
    """What this run trains, for every checkpoint and the training summary (resume_guard.trained_record); on the
    main process alone, which writes them."""
    earlier = resume_guard.earlier_parts(checkpoint, checkpoint_step(checkpoint), overrides) if checkpoint else []
    return main_process_decides(
        lambda: resume_guard.trained_record(settings, config.model, plan["optimizer_steps"], earlier)
    )


def build_model(config: TrainConfig, weights: bool):
    dtype = modeling.configure_precision(config.precision)
    base = modeling.load_base_model(config.model, dtype, weights=weights)
    set_seed(config.seed)  # the LoRA initialisation
    return modeling.apply_lora(base, gradient_checkpointing=config.gradient_checkpointing, **lora_settings(config))


def training_plan(config: TrainConfig, train, model, world_size: int) -> dict:
    per_epoch = optimizer_steps_per_epoch(len(train), config.batch_size, config.grad_accum // world_size, world_size)
    trainable, base = modeling.parameter_counts(model)
    return {
        "examples": len(train),
        "dialogues_shortened": sum(ex.dialogue_shortened for ex in train),
        "tokens_per_epoch": sum(len(ex.input_ids) for ex in train),
        "label_tokens_per_epoch": sum(ex.num_label_tokens for ex in train),
        "effective_batch": config.batch_size * config.grad_accum,
        "processes": world_size,
        "optimizer_steps": config.max_steps if config.max_steps > 0 else math.ceil(per_epoch * config.epochs),
        "trainable_parameters": trainable,
        "base_parameters": base,
        "precision": config.precision,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def print_plan(plan: dict) -> None:
    print(f"examples: {plan['examples']:,} ({plan['dialogues_shortened']:,} dialogues shortened to fit)")
    print(f"tokens per epoch: {plan['tokens_per_epoch']:,} ({plan['label_tokens_per_epoch']:,} summary tokens)")
    print(f"optimizer steps: {plan['optimizer_steps']:,} at an effective batch of {plan['effective_batch']}")
    share = 100 * plan["trainable_parameters"] / plan["base_parameters"]
    print(f"trainable parameters: {plan['trainable_parameters']:,} of {plan['base_parameters']:,} ({share:.2f}%)")
    print(f"precision: {plan['precision']}, device: {plan['device']}, processes: {plan['processes']}")


def training_arguments(config: TrainConfig, checkpoint_dir: Path, world_size: int, run_name: str) -> TrainingArguments:
    return core_training_arguments(
        output_dir=str(checkpoint_dir),
        run_name=run_name,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=max(config.batch_size, 8),
        gradient_accumulation_steps=config.grad_accum // world_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=config.precision == "bf16",
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        report_to=[name for name in integrations(config.report_to) if name != "tensorboard"] or "none",
        ddp_find_unused_parameters=False,
        neftune_noise_alpha=config.neftune_noise_alpha or None,  # the Trainer adds noise for any value but None
        seed=config.seed,
        **best_checkpoint_arguments(config.keep_best),
    )


def best_checkpoint_arguments(keep_best: bool) -> dict:
    """The Trainer's own best-checkpoint tracking (kept by rotation, restored on resume, loaded at the end)."""
    if not keep_best:
        return {}
    return {"load_best_model_at_end": True, "metric_for_best_model": "eval_content_loss", "greater_is_better": False}


def prepare_output_dir(config: TrainConfig) -> str | None:
    """Called under the lock, so a folder that a live run uses is never touched, and on rank 0 alone; every
    process gets the checkpoint to resume."""
    return main_process_decides(
        lambda: run_folder.check_output_dir(config.output_dir, config.resume, config.overwrite_output_dir)
    )


CONFIG_FILE = "train_config.yaml"
LAUNCH_FIELDS = ("resume", "resume_anyway", "overwrite_output_dir", "dry_run")  # how to start, not what to train


def write_config_file(config: TrainConfig) -> None:
    """The resolved settings as a --config file: `python train.py --config <output-dir>/train_config.yaml
    --output-dir again` reruns this run."""
    settings = {key: value for key, value in config_as_dict(config).items() if key not in LAUNCH_FIELDS}
    write_atomic(Path(config.output_dir) / CONFIG_FILE, yaml.safe_dump(settings, sort_keys=False))


def checkpoints_folder(config: TrainConfig) -> Path:
    return run_folder.checkpoints_folder(config.output_dir)


def save_outputs(config: TrainConfig, trainer, tokenizer, plan: dict, this_run: dict, trained: dict) -> None:
    """Adapter, tokenizer, model card, loss curve and training_summary.json, written to a staging folder and
    moved into --output-dir only when all are complete; `this_run` counts since a resume, `trained` is what the
    whole run trained (trained_record)."""
    output_dir = Path(config.output_dir)
    staging = run_folder.fresh_staging_folder(output_dir)
    try:
        with disk_full_reported(staging, lambda: final_save_disk_full(config, staging)):
            write_final_outputs(staging, config, trainer, tokenizer, plan, this_run, trained)
            run_folder.publish_staged(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if config.keep_best:
        print(kept_best_line(trainer.state))
    print(
        f"adapter saved to {output_dir} after {trainer.state.global_step:,} optimizer steps; "
        f"{cost_line(this_run, model_flops_utilization(plan, this_run))}"
    )


def final_save_disk_full(config: TrainConfig, staging: Path) -> DiskFull:
    latest = latest_checkpoint(checkpoints_folder(config))
    adapter = folder_size(Path(latest) / modeling.ADAPTER_WEIGHTS_FILE) if latest else 0
    needed = max(folder_size(staging), adapter)
    return DiskFull(config.output_dir, "the adapter", needed, RESUME_AFTER_FREEING_SPACE)


def write_final_outputs(
    folder: Path, config: TrainConfig, trainer, tokenizer, plan: dict, this_run: dict, trained: dict
) -> None:
    trainer.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_generation_config(folder, tokenizer)  # the decoding evaluate.py scores, for the card's snippet and serving
    history = trainer.state.log_history
    plot_loss_curve(history, folder / "loss_curve.png")
    summary = {
        **plan,
        "optimizer_steps": trainer.state.global_step,
        **this_run,
        **train_loss_first_and_last(history),
        **first_and_last(history, "eval_loss", "validation_loss"),
        **first_and_last(history, "eval_content_loss", "validation_content_loss"),
        "mfu": model_flops_utilization(plan, this_run),
        "kept_best": kept_best(trainer.state) if config.keep_best else None,
        "settings": config_as_dict(config),
        "trained": trained,
    }
    write_json(folder / "training_summary.json", summary)
    # After save_pretrained, which writes PEFT's own README.md; the card names --output-dir, not the staging folder.
    write_model_card(config.output_dir, summary, staging_dir=folder)


def main(config: TrainConfig) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    validate(config, world_size)
    refuse_cpu_training_unless_allowed(config)
    if world_size > 1:
        join_process_group()
    with nullcontext() if config.dry_run else output_dir_lock(config.output_dir, "train.py"):
        return plan_and_train(config, world_size)


def refuse_cpu_training_unless_allowed(config: TrainConfig) -> None:
    """A broken GPU driver must not silently start a run of days on the CPU (a dry run trains nothing: it plans)."""
    if not (config.allow_cpu or config.dry_run) and (problem := modeling.cpu_training_problem(config.model)):
        raise UsageError(problem)


def join_process_group() -> None:
    """Start torchrun's process group now, with the backend and timeout the Trainer would use, so that rank 0 can
    check the output folder alone and hand its outcome to the others."""
    PartialState(timeout=timedelta(seconds=TrainingArguments.ddp_timeout))


def plan_and_train(config: TrainConfig, world_size: int) -> int:
    checkpoint = None if config.dry_run else prepare_output_dir(config)
    tokenizer = modeling.load_tokenizer(config.model)
    train, validation = load_datasets(config, tokenizer)
    settings = resume_settings(config, world_size)
    overrides = resume_guard.check_resume(checkpoint, settings, config.resume_anyway) if checkpoint else []
    model = build_model(config, weights=not config.dry_run)
    start_afresh = config.overwrite_output_dir or (config.resume and checkpoint is None)
    main_process_decides(lambda: run_folder.clear_previous_run(config.output_dir, start_afresh, config.dry_run))
    plan = training_plan(config, train, model, world_size)
    print_plan(plan)
    if config.dry_run:
        return 0
    if is_main_process():
        write_config_file(config)
    if checkpoint and run_folder.final_outputs_saved(config.output_dir, checkpoint, plan["optimizer_steps"]):
        if is_main_process():
            print(
                f"{config.output_dir} already holds the adapter of the last step ({plan['optimizer_steps']}); "
                "nothing to train"
            )
        return 0
    trained = trained_record(config, settings, plan, checkpoint, overrides)
    tracker = main_process_decides(lambda: tracker_run(config.output_dir, tracker_group(config, trained), config.seed))
    trainer, guard = make_trainer(config, model, tokenizer, train, validation, trained, tracker, world_size)
    started = time.perf_counter()
    with tracker_environment(tracker):
        train_until_done_or_stopped(config, trainer, guard, checkpoint, plan["optimizer_steps"])
    exit_code = early_stop_exit_code(trainer, guard, world_size, checkpoints_folder(config))
    if exit_code is None:
        this_run = run_facts(trainer, started, checkpoint, overrides)
        if trainer.is_world_process_zero():
            save_outputs(config, trainer, tokenizer, plan, this_run, trained)
    end_processes_together(trainer)
    return exit_code or 0


def tracker_group(config: TrainConfig, trained: dict) -> str:
    return arm_group(arm_identity(config_as_dict(config), trained))


def make_trainer(config: TrainConfig, model, tokenizer, train, validation, trained: dict, tracker: dict, world_size):
    modeling.resolve_device()
    args = training_arguments(config, checkpoints_folder(config), world_size, tracker["name"])
    tensorboard = "tensorboard" in integrations(config.report_to)
    trainer, guard = build_trainer(
        model, tokenizer, train, validation, args, Path(config.output_dir), tensorboard, config.loraplus_lr_ratio
    )
    trainer.checkpoint_json[resume_guard.SETTINGS_FILE] = trained
    return trainer, guard


def train_until_done_or_stopped(config: TrainConfig, trainer, guard, checkpoint: str | None, last_step: int) -> None:
    """Train to the last step, or to the step where a NaN or a signal stopped every process; OOM is one line.

    A checkpoint at the last step is only loaded, for the final save: the Trainer would train a step past it.
    """
    if checkpoint and checkpoint_step(checkpoint) >= last_step:
        restore_checkpoint(trainer, checkpoint)
        return
    remedies = memory_remedies(config.gradient_checkpointing, config.precision, config.batch_size, config.grad_accum)
    with guard.signals_caught(), out_of_memory_reported("train.py", trainer, remedies, checkpoints_folder(config)):
        trainer.train(resume_from_checkpoint=checkpoint)


def end_processes_together(trainer) -> None:
    """Under DDP, wait for rank 0's saving and close the process group: a rank leaving while gloo's threads
    still serve the others can abort (`terminate called without an active exception`)."""
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_stage(main, TrainConfig))

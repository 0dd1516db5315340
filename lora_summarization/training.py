"""The training core shared by train.py and unit_test.py: dataset, collator, trainer and callbacks."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from .cli import write_json
from .disk_space import DiskFull, folder_size, is_disk_full
from .prompts import IGNORE_INDEX, EncodedExample, encode_example

CHECKPOINT_STAGING = ".incomplete"
RESUME_AFTER_FREEING_SPACE = "free space, then rerun the same train.py command with --resume"


def encode_records(tokenizer, records: list[dict], max_length: int, system_prompt: str | None) -> list[EncodedExample]:
    return [encode_example(tokenizer, r["dialogue"], r["summary"], max_length, system_prompt) for r in records]


def as_features(examples: list[EncodedExample]) -> list[dict]:
    return [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]


@dataclass
class ResponseCollator:
    """Right-pads a batch to its own longest example; labels were made before padding and pad with -100."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_token_losses(hidden_states: torch.Tensor, labels: torch.Tensor, output_embeddings) -> torch.Tensor:
    """Cross-entropy of every labelled token, computing the LM head only where a label exists.

    Position t predicts token t+1, so the hidden state at t is kept where labels[t+1] != -100.
    Equal to the loss of full logits over all positions, at ~14% of the LM-head cost on SAMSum.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = output_embeddings(hidden_states[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="none")


def model_hidden_states(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final (normed) hidden states through the model's own forward, so DDP and PEFT hooks still run.

    `logits_to_keep=1` makes the model's own LM head cost one position per sequence.
    """
    outputs = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        logits_to_keep=1,
        output_hidden_states=True,
        use_cache=False,
    )
    return outputs.hidden_states[-1]


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped shuffling whose order depends only on (seed, epoch): a resumed run sees the same batches."""

    def __init__(self, group_size: int, lengths: list[int], seed: int):
        super().__init__(group_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class SummaryTrainer(Trainer):
    """HF Trainer with a response-only loss normalised over the label tokens of the whole accumulated batch."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = torch.zeros((), dtype=torch.long, device=self.args.device)
        self.loss_is_finite = torch.ones((), dtype=torch.bool, device=self.args.device)
        # File name -> JSON payload, written into every checkpoint before it is renamed into place.
        self.checkpoint_json: dict[str, object] = {}

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        group_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return EpochSeededLengthGroupedSampler(group_size, [len(f["input_ids"]) for f in dataset], self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        token_losses = response_token_losses(
            model_hidden_states(model, inputs),
            inputs["labels"],
            self.accelerator.unwrap_model(model).get_output_embeddings(),
        )
        if num_items_in_batch is None:
            loss = token_losses.mean()
        else:
            # DDP averages gradients over ranks while num_items_in_batch counts every rank's tokens.
            loss = token_losses.sum() / num_items_in_batch * self.accelerator.num_processes
        if model.training:
            self.tokens_seen += inputs["attention_mask"].sum()
            self.loss_is_finite &= torch.isfinite(loss.detach())
        return (loss, {}) if return_outputs else loss

    def _save_checkpoint(self, model, trial):
        """Write each checkpoint into a staging folder and rename it when complete; keep the newest N."""
        final_dir = Path(self.args.output_dir)
        staging_dir = final_dir / CHECKPOINT_STAGING
        try:
            self._save_checkpoint_into(staging_dir, model, trial)
        except OSError as error:
            if not is_disk_full(error):
                raise
            raise checkpoint_disk_full(final_dir) from error
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            for checkpoint in staging_dir.iterdir():
                target = final_dir / checkpoint.name
                if target.exists():
                    shutil.rmtree(target)
                checkpoint.rename(target)
            staging_dir.rmdir()
            # The Trainer's own rotation ran inside the staging folder, where only the newest checkpoint is.
            rotate_checkpoints(str(final_dir), self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint_into(self, staging_dir: Path, model, trial) -> None:
        final_dir = self.args.output_dir
        self.args.output_dir = str(staging_dir)
        try:
            super()._save_checkpoint(model, trial)
            if self.is_world_process_zero():
                checkpoint = staging_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                for name, payload in self.checkpoint_json.items():
                    write_json(checkpoint / name, payload)
        finally:
            self.args.output_dir = final_dir


def checkpoint_disk_full(checkpoint_dir: Path) -> DiskFull:
    """Remove the failed checkpoint's staging folder (the previous checkpoints stay) and say what is needed."""
    latest = latest_checkpoint(checkpoint_dir)
    needed = max(folder_size(checkpoint_dir / CHECKPOINT_STAGING), folder_size(latest) if latest else 0)
    clear_incomplete_checkpoints(checkpoint_dir)
    return DiskFull(checkpoint_dir, "a checkpoint", needed, RESUME_AFTER_FREEING_SPACE)


def clear_incomplete_checkpoints(checkpoint_dir: Path) -> None:
    shutil.rmtree(Path(checkpoint_dir) / CHECKPOINT_STAGING, ignore_errors=True)


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    return get_last_checkpoint(str(checkpoint_dir)) if Path(checkpoint_dir).is_dir() else None


def optimizer_steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch, counted the way the HF Trainer counts them."""
    batches_per_rank = math.ceil(num_examples / (batch_size * world_size))
    return max(batches_per_rank // grad_accum + int(batches_per_rank % grad_accum > 0), 1)


class NonFiniteLossGuard(TrainerCallback):
    """Stops training at the first optimizer step whose loss is NaN or infinite, before anything is saved."""

    def __init__(self, trainer: SummaryTrainer):
        self.trainer = trainer
        self.bad_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        # One device sync per optimizer step (not per micro-batch).
        if not bool(self.trainer.loss_is_finite):
            self.bad_step = state.global_step
            control.should_save = control.should_evaluate = control.should_log = False
            control.should_training_stop = True
        return control


class JsonlLogger(TrainerCallback):
    """Appends every log record (train and validation loss, lr, grad norm) to a JSON Lines file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as log_file:
                log_file.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class LossProgressCallback(ProgressCallback):
    """The Trainer's tqdm bar (steps, ETA) with the latest losses as its postfix instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {key: f"{logs[key]:.4f}" for key in ("loss", "eval_loss") if key in logs}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def core_training_arguments(**settings) -> TrainingArguments:
    """TrainingArguments with what the training core relies on; each stage adds its hyperparameters."""
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        optim="adamw_torch",
        logging_nan_inf_filter=False,  # the NaN guard must see non-finite losses, not have them filtered
        prediction_loss_only=True,
        remove_unused_columns=False,  # features are token lists for the collator, not model kwargs
        report_to="none",  # build_trainer attaches TensorBoard itself, to a folder of our choosing
        use_cpu=not cuda,  # without it, torchrun on a CPU host trains each rank alone instead of DDP over gloo
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},
        **settings,
    )


def build_trainer(
    model, tokenizer, train, validation, args, log_dir: Path
) -> tuple[SummaryTrainer, NonFiniteLossGuard]:
    """The trainer with the project's callbacks: loss bar, JSONL and TensorBoard logs, NaN guard."""
    trainer = SummaryTrainer(
        model=model,
        args=args,
        train_dataset=as_features(train),
        eval_dataset=as_features(validation),
        data_collator=ResponseCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    guard = NonFiniteLossGuard(trainer)
    trainer.remove_callback(ProgressCallback)
    for callback in (LossProgressCallback(), JsonlLogger(log_dir / "train_log.jsonl"), guard):
        trainer.add_callback(callback)
    if trainer.is_world_process_zero():
        trainer.add_callback(TensorBoardCallback(SummaryWriter(log_dir=str(log_dir / "runs"))))
    return trainer, guard


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
    axes.set(xlabel="optimizer step", ylabel="loss per summary token", title="LoRA fine-tuning loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

"""The training core shared by train.py and unit_test.py: dataset, collator, trainer and callbacks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.optimizers import create_loraplus_optimizer
from safetensors import SafetensorError, safe_open
from torch.utils.data import Sampler
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback, TrainerState
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    get_last_checkpoint,
    rotate_checkpoints,
    sort_checkpoints,
)

from .cli import RunFailed, write_atomic, write_json
from .disk_space import DiskFull, disk_full_reported, folder_size
from .modeling import ADAPTER_WEIGHTS_FILE
from .prompts import IGNORE_INDEX, EncodedExample, encode_example

CHECKPOINT_STAGING = ".incomplete"
BROKEN_PREFIX = "broken-"  # outside the Trainer's checkpoint-* pattern, so that resuming and rotation skip it
LENGTH_GROUP_STEPS = 50  # optimizer steps' worth of examples sorted by length together
RESUME_AFTER_FREEING_SPACE = "free space, then rerun the same train.py command with --resume"


def encode_records(tokenizer, records: list[dict], max_length: int, system_prompt: str | None) -> list[EncodedExample]:
    return [encode_example(tokenizer, r["dialogue"], r["summary"], max_length, system_prompt) for r in records]


def as_features(examples: list[EncodedExample]) -> list[dict]:
    return [{"input_ids": ex.input_ids, "labels": ex.labels, "content_start": ex.content_start} for ex in examples]


@dataclass
class ResponseCollator:
    """Right-pads a batch to its own longest example; labels were made before padding and pad with -100.

    `content_start` (per example) is where the content labels begin, for the content loss of evaluation.
    """

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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "content_start": torch.tensor([feature["content_start"] for feature in features]),
        }


def response_token_losses(hidden_states: torch.Tensor, labels: torch.Tensor, output_embeddings) -> torch.Tensor:
    """Cross-entropy of every labelled token, computing the LM head only where a label exists.

    Position t predicts token t+1, so the hidden state at t is kept where labels[t+1] != -100.
    Equal to the loss of full logits over all positions, at ~14% of the LM-head cost on SAMSum.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    # Under bf16 autocast the model returns fp32 hidden states while the head's weights stay bf16.
    selected = hidden_states[:, :-1][keep].to(output_embeddings.weight.dtype)
    return F.cross_entropy(output_embeddings(selected).float(), targets[keep], reduction="none")


def summed_example_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example sums of cross-entropy, shape (2, batch): row 0 over the response, row 1 over its content."""
    labels = batch["labels"]
    token_losses = response_token_losses(model_hidden_states(model, batch), labels, model.get_output_embeddings())
    keep = labels[:, 1:] != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    predicted_positions = torch.arange(1, labels.shape[1], device=labels.device)
    is_content = (predicted_positions >= batch["content_start"][:, None])[keep]
    sums = torch.zeros((2, len(labels)), device=labels.device)
    sums[0].index_add_(0, rows, token_losses)
    sums[1].index_add_(0, rows[is_content], token_losses[is_content])
    return sums


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first, so little is padded and out-of-memory shows at once."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.inference_mode()
def example_loss_sums(model, examples: list[EncodedExample], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """`summed_example_losses` for every example, in order, on the CPU: shape (2, len(examples))."""
    collate = ResponseCollator(pad_token_id)
    sums = torch.zeros((2, len(examples)), dtype=torch.float64)
    batches = length_sorted_batches([len(example.input_ids) for example in examples], batch_size)
    for indices in batches:
        batch = collate(as_features([examples[i] for i in indices]))
        batch = {key: value.to(model.device) for key, value in batch.items()}
        sums[:, indices] = summed_example_losses(model, batch).double().cpu()
    return sums


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


class LengthGroupedEpochSampler(Sampler[int]):
    """Optimizer steps of similar-length examples, in an order that depends only on (seed, epoch): a resumed run
    sees the same.

    Each epoch is shuffled and cut into groups of `group_steps` steps' worth of examples; each group is sorted by
    length and cut into steps of `step_size` examples (the effective batch), whose order within the group is
    shuffled again, so the loss does not sweep from long to short examples every group. The epoch's longest step
    goes first, so an out-of-memory shows at once. Each step stays sorted by length, longest first, so the
    micro-batches cut from it pad little.

    Only the effective batch shapes the order: the dataloader cuts it into micro-batches, accelerate gives
    micro-batch i to process i % processes and each process accumulates its next micro-batches, so step k trains
    on examples [k * step_size, (k + 1) * step_size) however the batch is split into micro-batch x accumulation x
    processes. An epoch that does not divide into steps ends in a step completed with the next-shortest examples
    of its group, which that epoch then trains on twice: every step holds `step_size` examples (accelerate would
    otherwise complete a DDP epoch with the epoch's first examples, and a single process would take a smaller step).
    """

    def __init__(self, lengths: Sequence[int], step_size: int, group_steps: int, seed: int):
        self.lengths, self.step_size, self.group_steps, self.seed = list(lengths), step_size, group_steps, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.step_size) * self.step_size

    def steps(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        steps = []
        for group in self._groups(order):
            group_steps = self._cut_into_steps(self._longest_first(group))
            steps += [group_steps[i] for i in torch.randperm(len(group_steps), generator=generator).tolist()]
        longest = max(range(len(steps)), key=lambda i: self.lengths[steps[i][0]])
        steps.insert(0, steps.pop(longest))
        return steps

    def __iter__(self):
        return iter([index for step in self.steps() for index in step])

    def _groups(self, order: list[int]) -> list[list[int]]:
        """`group_steps` steps' worth of examples each; a remainder smaller than a step joins the group before it."""
        starts = list(range(0, len(order), self.group_steps * self.step_size))
        if len(starts) > 1 and len(order) - starts[-1] < self.step_size:
            starts.pop()
        return [order[start:end] for start, end in zip(starts, [*starts[1:], len(order)], strict=True)]

    def _cut_into_steps(self, group: list[int]) -> list[list[int]]:
        """Steps from a group sorted longest first; a partial last step becomes the group's `step_size` shortest.

        The group repeats only when it is smaller than one step (an epoch of fewer examples than the batch).
        """
        steps = [group[start : start + self.step_size] for start in range(0, len(group), self.step_size)]
        if len(steps[-1]) < self.step_size:
            repeated = group * math.ceil(self.step_size / len(group))
            steps[-1] = self._longest_first(repeated[-self.step_size :])
        return steps

    def _longest_first(self, indices: list[int]) -> list[int]:
        return sorted(indices, key=lambda index: -self.lengths[index])


def magnitudes_at_the_base_rate(optimizer, model) -> None:
    """Move DoRA's magnitude vectors from PEFT's LoRA+ fast groups (it puts every 1-D parameter there) into its
    first group, the A matrices' at the learning rate: LoRA+ speeds up B alone. Before the first step, while the
    optimizer holds no state."""
    magnitudes = {id(p) for name, p in model.named_parameters() if "lora_magnitude_vector" in name}
    base_rate, *others = optimizer.param_groups
    for group in others:
        base_rate["params"] += [p for p in group["params"] if id(p) in magnitudes]
        group["params"] = [p for p in group["params"] if id(p) not in magnitudes]


class SummaryTrainer(Trainer):
    """HF Trainer with a response-only loss normalised over the label tokens of the whole accumulated batch."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, validation_examples: list[EncodedExample] = (), loraplus_lr_ratio: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.validation_examples = list(validation_examples)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.tokens_seen = torch.zeros((), dtype=torch.long, device=self.args.device)
        # What attention and the LM head cost scales with, for the run's model FLOPs (hardware.training_flops).
        self.squared_lengths_seen = torch.zeros((), dtype=torch.long, device=self.args.device)
        self.lm_head_positions_seen = torch.zeros((), dtype=torch.long, device=self.args.device)
        self.examples_seen = 0
        self.loss_is_finite = torch.ones((), dtype=torch.bool, device=self.args.device)
        self.batch_shape: tuple[int, ...] | None = None  # of the micro-batch in progress, for out-of-memory reports
        # File name -> JSON payload, written into every checkpoint before it is renamed into place.
        self.checkpoint_json: dict[str, object] = {}

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        step_size = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedEpochSampler(
            [len(f["input_ids"]) for f in dataset], step_size, LENGTH_GROUP_STEPS, seed=self.args.seed
        )

    def create_optimizer(self, model=None):
        """The configured optimizer; with LoRA+ (Hayou et al. 2024), its B matrices in parameter groups at
        `loraplus_lr_ratio` x the learning rate, which the scheduler, optimizer.pt and --resume handle as any group."""
        if self.optimizer is None and self.loraplus_lr_ratio:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = create_loraplus_optimizer(
                opt_model,
                optimizer_cls,
                loraplus_lr_ratio=self.loraplus_lr_ratio,
                loraplus_weight_decay=self.args.weight_decay,
                **optimizer_kwargs,
            )
            magnitudes_at_the_base_rate(self.optimizer, opt_model)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.batch_shape = tuple(inputs["input_ids"].shape)
        token_losses = response_token_losses(
            model_hidden_states(model, inputs),
            inputs["labels"],
            self.accelerator.unwrap_model(model).get_output_embeddings(),
        )
        if num_items_in_batch is None:
            # No token count for the accumulated batch (a model without loss kwargs): a mean per micro-batch, which
            # must be divided here since loss_is_scaled_for_ga tells training_step not to.
            loss = token_losses.mean() / (self.current_gradient_accumulation_steps if model.training else 1)
        else:
            # DDP averages gradients over ranks while num_items_in_batch counts every rank's tokens.
            loss = token_losses.sum() / num_items_in_batch * self.accelerator.num_processes
        if model.training:
            self.tokens_seen += inputs["attention_mask"].sum()
            self.squared_lengths_seen += (inputs["attention_mask"].sum(dim=1) ** 2).sum()
            self.lm_head_positions_seen += len(token_losses)
            self.examples_seen += len(inputs["input_ids"])
            self.loss_is_finite &= torch.isfinite(loss.detach())
        return (loss, {}) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Response and content loss as token-weighted means over the validation examples, as evaluate.py computes.

        Each process scores every n-th example and the sums are added across processes.
        """
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        examples = self.validation_examples[rank::processes]
        self.model.eval()
        with self.accelerator.autocast():
            sums = example_loss_sums(
                self.model, examples, self.processing_class.pad_token_id, self.args.per_device_eval_batch_size
            )
        counts = [sum(ex.num_label_tokens for ex in examples), sum(ex.num_content_tokens for ex in examples)]
        totals = torch.tensor([*sums.sum(dim=1).tolist(), *counts], dtype=torch.float64, device=self.args.device)
        if processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        response_sum, content_sum, response_tokens, content_tokens = totals.tolist()
        metrics = {
            f"{metric_key_prefix}_loss": response_sum / response_tokens,
            f"{metric_key_prefix}_content_loss": content_sum / content_tokens,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model, trial):
        """Write each checkpoint into a staging folder and rename it when complete; keep the newest N."""
        final_dir = Path(self.args.output_dir)
        staging_dir = final_dir / CHECKPOINT_STAGING
        with disk_full_reported(staging_dir, lambda: checkpoint_disk_full(final_dir)):
            self._save_checkpoint_into(staging_dir, model, trial)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            for checkpoint in staging_dir.iterdir():
                target = final_dir / checkpoint.name
                if target.exists():
                    shutil.rmtree(target)
                checkpoint.rename(target)
            staging_dir.rmdir()
            # The Trainer's own rotation ran inside the staging folder, where only the newest checkpoint is.
            rotate_checkpoints(str(final_dir), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint_into(self, staging_dir: Path, model, trial) -> None:
        final_dir = self.args.output_dir
        self.args.output_dir = str(staging_dir)
        try:
            super()._save_checkpoint(model, trial)
            self.state.best_model_checkpoint = self.best_checkpoint_once_renamed(Path(final_dir))
            if self.is_world_process_zero():
                checkpoint = staging_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                if self.state.best_model_checkpoint:  # the state saved by the Trainer named the staging folder
                    self.state.save_to_json(str(checkpoint / TRAINER_STATE_NAME))
                for name, payload in self.checkpoint_json.items():
                    write_json(checkpoint / name, payload)
        finally:
            self.args.output_dir = final_dir

    def best_checkpoint_once_renamed(self, final_dir: Path) -> str | None:
        """The best checkpoint's final folder (the Trainer named the staging one), found by its step, so that
        rotation keeps it and a resumed run restores it; None without --keep-best or before any evaluation."""
        step = self.state.best_global_step
        folder = final_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        return str(folder) if step and (step == self.state.global_step or folder.is_dir()) else None


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


def checkpoint_step(checkpoint: str | Path) -> int:
    return TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME)).global_step


def restore_checkpoint(trainer: SummaryTrainer, checkpoint: str | Path) -> None:
    """Load a checkpoint's adapter and trainer state (step, log history) without training.

    For a checkpoint at the last step: `trainer.train(resume_from_checkpoint=...)` would train one step more,
    because the Trainer tests `max_steps` only after a step (DefaultFlowCallback.on_step_end), and a resumed
    epoch that the schedule ends early still has batches left to run.
    """
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))


def latest_loadable_checkpoint(checkpoint_dir: Path, set_aside: bool) -> str | None:
    """The newest checkpoint whose files all read back. Newer damaged ones are skipped and, when `set_aside`,
    named in a warning and renamed out of the Trainer's and the rotation's sight (kept to look at, not deleted)."""
    for checkpoint in reversed(sort_checkpoints(str(checkpoint_dir))):
        problem = checkpoint_problem(Path(checkpoint))
        if problem is None:
            return checkpoint
        if set_aside:
            set_aside_broken(Path(checkpoint), problem)
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """The first file of `checkpoint` that is missing, truncated or corrupt, and why; None when all read back."""
    required = [checkpoint / ADAPTER_WEIGHTS_FILE, checkpoint / TRAINER_STATE_NAME]
    others = [*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth"), *checkpoint.glob("*.json")]
    for path in dict.fromkeys([*required, *sorted(others)]):
        try:
            read_back(path)
        except (OSError, ValueError, SafetensorError, zipfile.BadZipFile) as error:
            return f"{path.name}: {error}"
    return None


def read_back(path: Path) -> None:
    """Read `path` through as resuming will, on the CPU and without keeping it; raises when it is damaged."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt", device="cpu") as weights:
            for name in weights.keys():
                weights.get_tensor(name)
    elif path.suffix in (".pt", ".pth"):
        with zipfile.ZipFile(path) as archive:  # torch.save's format: a zip whose members carry a CRC
            if (member := archive.testzip()) is not None:
                raise zipfile.BadZipFile(f"{member} fails its CRC check")
    else:
        json.loads(path.read_text(encoding="utf-8"))


def set_aside_broken(checkpoint: Path, problem: str) -> None:
    aside = checkpoint.with_name(f"{BROKEN_PREFIX}{checkpoint.name}")
    copies = 0
    while aside.exists():  # the same step broke before
        copies += 1
        aside = checkpoint.with_name(f"{BROKEN_PREFIX}{checkpoint.name}.{copies}")
    print(f"warning: {checkpoint} cannot be loaded ({problem}); set aside as {aside.name}", file=sys.stderr)
    checkpoint.rename(aside)


def optimizer_steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch, counted the way the HF Trainer counts them."""
    batches_per_rank = math.ceil(num_examples / (batch_size * world_size))
    return max(batches_per_rank // grad_accum + int(batches_per_rank % grad_accum > 0), 1)


class StepBoundaryStop(TrainerCallback):
    """Ends training at an optimizer-step boundary that every process agrees on, for one of two reasons.

    - A NaN or infinite loss: stop before anything is saved (`non_finite_step`).
    - SIGTERM or SIGINT (a preempted spot machine, Ctrl-C): finish the step, save a checkpoint, stop
      (`signal_number`, `signal_step`). A second Ctrl-C exits at once; the last complete checkpoint stays.
      Repeated SIGTERMs count as one: GNU timeout, SLURM and torchrun often send two within milliseconds.

    The processes combine their flags at each step boundary (one small all-reduce), so under DDP they all stop
    at the same step, whichever of them saw the NaN or the signal.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, trainer: SummaryTrainer):
        self.trainer = trainer
        self.received = 0
        self.non_finite_step: int | None = None
        self.signal_number: int | None = None
        self.signal_step: int | None = None

    @contextlib.contextmanager
    def signals_caught(self):
        previous = {number: signal.signal(number, self._on_signal) for number in self.SIGNALS}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _on_signal(self, number, frame):
        if number == signal.SIGINT and self.received == signal.SIGINT:
            os._exit(128 + number)
        self.received = self.received or number

    def agreed_flags(self) -> tuple[bool, int]:
        """(any process saw a non-finite loss, the largest signal number any process received)."""
        is_finite = self.trainer.loss_is_finite
        flags = torch.stack([(~is_finite).long(), torch.tensor(self.received, device=is_finite.device)])
        if self.trainer.accelerator.num_processes > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        non_finite, received = flags.tolist()
        return bool(non_finite), received

    def on_step_end(self, args, state, control, **kwargs):
        non_finite, received = self.agreed_flags()  # one device sync per optimizer step, not per micro-batch
        if non_finite:
            self.non_finite_step = state.global_step
            control.should_save = control.should_evaluate = control.should_log = False
            control.should_training_stop = True
        elif received:
            self.signal_number, self.signal_step = received, state.global_step
            control.should_save = control.should_training_stop = True
        return control


class JsonlLogger(TrainerCallback):
    """Appends every log record (train and validation loss, lr, grad norm) to a JSON Lines file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the file from the run's records so far: none, or on a resume the checkpoint's; what an interrupted
        run logged after its checkpoint is trained and logged again."""
        if state.is_world_process_zero:
            records = [json.dumps({"step": entry["step"], **entry}) + "\n" for entry in state.log_history]
            write_atomic(self.path, "".join(records))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as log_file:
                log_file.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class StepTimer(TrainerCallback):
    """Seconds inside optimizer steps (forward, backward, optimizer), from each step's start to its end.

    Evaluation, checkpoints, logging and the loading of each step's micro-batches happen between steps and are
    left out, as is the start-up before the first step.
    """

    def __init__(self):
        self.seconds = 0.0
        self.step_began: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels must finish inside the step's time
        self.seconds += time.perf_counter() - self.step_began


def tokens_per_second(trainer: SummaryTrainer, timer: StepTimer) -> float | None:
    """Non-padding tokens trained on per second of optimizer steps, summed over processes (every one calls it)."""
    tokens = int(trainer.accelerator.reduce(trainer.tokens_seen, reduction="sum"))
    return tokens / timer.seconds if timer.seconds > 0 else None


class LossProgressCallback(ProgressCallback):
    """The Trainer's tqdm bar (steps, ETA) with the latest losses and tokens/s as its postfix, not printed dicts."""

    def __init__(self, trainer: SummaryTrainer, timer: StepTimer):
        super().__init__()
        self.trainer, self.timer = trainer, timer

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Every process logs the train loss at the same steps: the token count is summed over them there.
        rate = tokens_per_second(self.trainer, self.timer) if logs and "loss" in logs else None
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {key: f"{logs[key]:.4f}" for key in ("loss", "eval_loss") if key in logs}
            if rate is not None:
                shown["tokens/s"] = f"{rate:,.0f}"
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def core_training_arguments(report_to: str | list[str] = "none", **settings) -> TrainingArguments:
    """TrainingArguments with what the training core relies on; each stage adds its hyperparameters."""
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        optim="adamw_torch",
        logging_nan_inf_filter=False,  # the NaN guard must see non-finite losses, not have them filtered
        prediction_loss_only=True,
        remove_unused_columns=False,  # features are token lists for the collator, not model kwargs
        report_to=report_to,  # never "tensorboard": build_trainer attaches it itself, to a folder of our choosing
        use_cpu=not cuda,  # without it, torchrun on a CPU host trains each rank alone instead of DDP over gloo
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},
        **settings,
    )


def build_trainer(
    model, tokenizer, train, validation, args, log_dir: Path, tensorboard: bool = True, loraplus_lr_ratio: float = 0.0
) -> tuple[SummaryTrainer, StepBoundaryStop]:
    """The trainer with the project's callbacks: loss bar, JSONL and TensorBoard logs, NaN and signal stops.

    TensorBoard is attached here rather than through `report_to`, so that its events go to `log_dir/runs`.
    `loraplus_lr_ratio` > 0 trains the LoRA B matrices at that multiple of the learning rate (LoRA+).
    """
    trainer = SummaryTrainer(
        model=model,
        args=args,
        train_dataset=as_features(train),
        eval_dataset=as_features(validation),
        validation_examples=validation,
        loraplus_lr_ratio=loraplus_lr_ratio,
        data_collator=ResponseCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    guard = StepBoundaryStop(trainer)
    trainer.step_timer = StepTimer()
    trainer.remove_callback(ProgressCallback)
    progress = LossProgressCallback(trainer, trainer.step_timer)
    # The timer comes after the guard, whose per-step flag check is part of the step.
    for callback in (progress, JsonlLogger(log_dir / "train_log.jsonl"), guard, trainer.step_timer):
        trainer.add_callback(callback)
    if tensorboard and trainer.is_world_process_zero():
        trainer.add_callback(TensorBoardCallback(SummaryWriter(log_dir=str(log_dir / "runs"))))
    return trainer, guard


@contextlib.contextmanager
def out_of_memory_reported(stage: str, trainer: SummaryTrainer, remedies: list[str], checkpoint_dir: Path | None):
    """Turn a CUDA out-of-memory into one line: where it happened, on what batch, and what to try, in order."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        examples, tokens = trainer.batch_shape or (0, 0)
        checkpoint = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
        kept = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
        raise RunFailed(
            f"out of GPU memory in {stage} at optimizer step {trainer.state.global_step + 1} on a micro-batch of "
            f"{examples} examples x {tokens} tokens; try, in this order: {'; '.join(remedies)}; {kept}"
        ) from error


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    curves = (("loss", "train"), ("eval_loss", "validation"), ("eval_content_loss", "validation, content only"))
    for key, label in curves:
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker=None if key == "loss" else "o", label=label)
    axes.set(xlabel="optimizer step", ylabel="loss per response token", title="LoRA fine-tuning loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

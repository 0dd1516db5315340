"""Every split of the effective batch of 8 into micro-batch x accumulation x processes trains each optimizer step on
the same examples, so that 2 x 4, 8 x 1, 1 x 8 and 2 processes x 2 x 2 end with the same adapter."""

import json
import subprocess
from collections import defaultdict
from types import SimpleNamespace

import pytest
import step_recorder
from accelerate.data_loader import BatchSamplerShard
from conftest import ROOT, load_script, script_env
from safetensors.torch import load_file
from torch.utils.data import BatchSampler
from train_test import torchrun_command, train_args

from lora_summarization import training
from lora_summarization.cli import run_stage

LAYOUTS = {"2x4": (2, 4, 1), "8x1": (8, 1, 1), "1x8": (1, 8, 1), "2 processes x 2x2": (2, 2, 2)}
RECORDER = ROOT / "tests" / "step_recorder.py"
ADAPTER_TOLERANCE = 1e-4


def layout_sampler(lengths: list[int], micro: int, accumulation: int, processes: int):
    """The sampler SummaryTrainer builds for this layout; it reads only these arguments and the dataset."""
    args = SimpleNamespace(
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, world_size=processes, seed=42
    )
    trainer = SimpleNamespace(args=args, train_dataset=[{"input_ids": [0] * n} for n in lengths])
    return training.SummaryTrainer._get_train_sampler(trainer)


def optimizer_step_examples(lengths: list[int], micro: int, accumulation: int, processes: int, epoch: int):
    """Example ids of each optimizer step as the Trainer consumes the sampler under accelerate (split_batches=False):
    the dataloader cuts micro-batches, micro-batch i goes to process i % processes, and each process accumulates
    its next `accumulation` micro-batches into one step."""
    sampler = layout_sampler(lengths, micro, accumulation, processes)
    sampler.set_epoch(epoch)
    batches = BatchSampler(sampler, micro, drop_last=False)
    shards = [list(BatchSamplerShard(batches, processes, rank)) for rank in range(processes)]
    steps = -(-len(shards[0]) // accumulation)  # the Trainer's count: a last step may hold fewer micro-batches
    assert steps == training.optimizer_steps_per_epoch(len(lengths), micro, accumulation, processes)  # as planned
    return [
        sorted(i for shard in shards for batch in shard[step * accumulation : (step + 1) * accumulation] for i in batch)
        for step in range(steps)
    ]


@pytest.mark.parametrize("epoch", [0, 1])
def test_every_split_of_the_effective_batch_gives_each_step_the_same_examples(epoch):
    lengths = [60 + (37 * i) % 500 for i in range(203)]  # not a multiple of 8: the epoch ends in a partial step
    layouts = {name: optimizer_step_examples(lengths, *layout, epoch) for name, layout in LAYOUTS.items()}
    reference = layouts.pop("2x4")
    for name, steps in layouts.items():
        assert steps == reference, name
    assert len(reference) == 26 and all(len(set(step)) == 8 for step in reference)
    assert {i for step in reference for i in step} == set(range(203))  # every example at least once an epoch


def recorded_steps(record_dir) -> dict[int, list[str]]:
    """Step -> sorted ids of the examples every process trained on in it, from step_recorder.py's files."""
    steps = defaultdict(list)
    for path in record_dir.glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps[entry["step"]] += entry["ids"]
    return {step: sorted(ids) for step, ids in sorted(steps.items())}


# 64 examples: 8 steps an epoch, so the run crosses into the second epoch's order.
SCHEDULE = ("--max-steps", "10", "--learning-rate", "1e-2", "--warmup-steps", "0", "--lora-dropout", "0")
QUIET = ("--eval-steps", "1000", "--save-steps", "1000", "--logging-steps", "1000", "--report-to", "none")


def train_in_this_process(argv: list[str], record_dir) -> int:
    """train.py's main() here, with step_recorder.py's replacements: a subprocess would spend most of its time
    importing."""
    with pytest.MonkeyPatch.context() as patch:
        for owner, name, replacement in step_recorder.replacements():
            patch.setattr(owner, name, replacement)
        patch.setenv("STEP_RECORD_DIR", str(record_dir))
        train = load_script("train.py")
        return run_stage(train.main, train.TrainConfig, argv)


def train_under_torchrun(argv: list[str], record_dir) -> int:
    env = {**script_env(), "STEP_RECORD_DIR": str(record_dir)}
    command = torchrun_command(RECORDER, ROOT / "train.py", *argv)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.returncode


@pytest.fixture(scope="session")
def layout_runs(tiny_model_dir, data_dir, tmp_path_factory) -> dict:
    """Output folder of train.py per layout, each with the step record of its processes."""
    runs = {}
    for name, (micro, accumulation, processes) in LAYOUTS.items():
        output_dir = tmp_path_factory.mktemp(name.replace(" ", "_"))
        split = ("--batch-size", micro, "--grad-accum", accumulation * processes)  # train.py divides it among them
        argv = [str(arg) for arg in train_args(tiny_model_dir, data_dir, output_dir, *SCHEDULE, *QUIET, *split)]
        train = train_in_this_process if processes == 1 else train_under_torchrun
        assert train(argv, output_dir) == 0
        runs[name] = output_dir
    return runs


def test_the_trainer_trains_each_step_on_the_same_examples_in_every_layout(layout_runs):
    steps = {name: recorded_steps(folder) for name, folder in layout_runs.items()}
    reference = steps.pop("2x4")
    assert list(reference) == list(range(1, 11)) and all(len(set(ids)) == 8 for ids in reference.values())
    for name, layout_steps in steps.items():
        assert layout_steps == reference, name


def test_every_layout_ends_with_the_same_adapter(layout_runs):
    adapters = {name: load_file(folder / "adapter_model.safetensors") for name, folder in layout_runs.items()}
    reference = adapters.pop("2x4")
    differences = {
        name: max((adapter[key] - reference[key]).abs().max().item() for key in reference)
        for name, adapter in adapters.items()
    }
    print(f"max abs difference from the 2x4 adapter: {differences}")
    assert all(difference < ADAPTER_TOLERANCE for difference in differences.values()), differences

"""Run a stage script and record which training examples every micro-batch held, by optimizer step.

    STEP_RECORD_DIR=/tmp/steps python tests/step_recorder.py train.py [flags]
    STEP_RECORD_DIR=/tmp/steps torchrun --nproc_per_node 2 tests/step_recorder.py train.py [flags]

Each process appends one line {"step": n, "ids": [record ids]} per training micro-batch to
STEP_RECORD_DIR/rank-<RANK>.jsonl. An example is recognised by its token ids, registered when the script encodes
its records; the numbers trained are unchanged. A test that runs the script in its own process installs the
same two replacements with `replacements()`.
"""

import json
import os
import runpy
import sys
from pathlib import Path

from lora_summarization import training

real_encode_records = training.encode_records
real_compute_loss = training.SummaryTrainer.compute_loss
record_ids: dict[tuple[int, ...], str] = {}


def encode_and_register(tokenizer, records, *args, **kwargs):
    examples = real_encode_records(tokenizer, records, *args, **kwargs)
    for record, example in zip(records, examples, strict=True):
        record_ids[tuple(example.input_ids)] = record["id"]
    return examples


def compute_loss_recording(self, model, inputs, *args, **kwargs):
    if model.training:
        rows = zip(inputs["input_ids"], inputs["attention_mask"].bool(), strict=True)
        ids = [record_ids[tuple(tokens[mask].tolist())] for tokens, mask in rows]
        record = Path(os.environ["STEP_RECORD_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.jsonl"
        with record.open("a", encoding="utf-8") as lines:
            lines.write(json.dumps({"step": self.state.global_step + 1, "ids": ids}) + "\n")
    return real_compute_loss(self, model, inputs, *args, **kwargs)


def replacements() -> list[tuple[object, str, object]]:
    """(owner, attribute, recording version): install them before the stage script is loaded."""
    return [
        (training, "encode_records", encode_and_register),
        (training.SummaryTrainer, "compute_loss", compute_loss_recording),
    ]


if __name__ == "__main__":
    for owner, name, replacement in replacements():
        setattr(owner, name, replacement)
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")

"""Run a stage script with a non-finite loss injected on one process, for tests that need it under torchrun.

    NAN_ON_RANK=1 NAN_FROM_CALL=5 torchrun --nproc_per_node 2 tests/fault_injection.py train.py [flags]

From its NAN_FROM_CALL-th loss computation on, the process whose RANK is NAN_ON_RANK sees NaN losses.
"""

import os
import runpy
import sys

from lora_summarization import training

real_losses = training.response_token_losses
calls = 0


def losses_turning_nan(*args):
    global calls
    calls += 1
    losses = real_losses(*args)
    return losses * float("nan") if calls >= int(os.environ["NAN_FROM_CALL"]) else losses


if os.environ.get("RANK", "0") == os.environ["NAN_ON_RANK"]:
    training.response_token_losses = losses_turning_nan
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")

"""Run a stage script with faults injected into its loss computation, for tests that need them in a subprocess.

    NAN_ON_RANK=1 NAN_FROM_CALL=5 torchrun --nproc_per_node 2 tests/fault_injection.py train.py [flags]
    SECONDS_PER_CALL=0.2 python tests/fault_injection.py train.py [flags]
    SECONDS_BEFORE_PUBLISH=60 python tests/fault_injection.py train.py [flags]

NAN_ON_RANK/NAN_FROM_CALL: from its NAN_FROM_CALL-th loss computation on, the process whose RANK is NAN_ON_RANK
sees NaN losses. SECONDS_PER_CALL: every loss computation first sleeps this long, so that a test can interrupt
a tiny run in its middle; the numbers are unchanged. SECONDS_BEFORE_PUBLISH: the final save sleeps this long
between writing its staging folder and moving it into --output-dir, so that a test can kill it there.
"""

import os
import runpy
import sys
import time

from lora_summarization import run_folder, training

real_losses = training.response_token_losses
calls = 0


def injected_losses(*args):
    global calls
    calls += 1
    time.sleep(float(os.environ.get("SECONDS_PER_CALL", 0)))
    losses = real_losses(*args)
    nan_here = os.environ.get("RANK", "0") == os.environ.get("NAN_ON_RANK")
    return losses * float("nan") if nan_here and calls >= int(os.environ["NAN_FROM_CALL"]) else losses


def slow_publish(*args):
    time.sleep(float(os.environ.get("SECONDS_BEFORE_PUBLISH", 0)))
    real_publish(*args)


training.response_token_losses = injected_losses
real_publish, run_folder.publish_staged = run_folder.publish_staged, slow_publish
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")

# One image for every stage: CUDA 12 runtime, the base image's PyTorch, and requirements.txt.
#
#   docker build -t lora-summarization .   # --build-arg BASE_IMAGE=pytorch/pytorch:<tag> for another CUDA
#   mkdir -p data finetune_100_model fine_tuned_model results merged_model
#   docker run --gpus all --init --stop-timeout 120 --rm --user "$(id -u):$(id -g)" -v hf-cache:/cache/huggingface \
#     -v "$PWD/data:/workspace/lora_finetuning/data" lora-summarization python data_preparation.py
#
# Then the same `docker run` for each later stage, with the folders it reads and writes mounted as well:
#   python unit_test.py    (data, finetune_100_model)
#   python train.py        (data, fine_tuned_model)
#   python evaluate.py --output-dir results     (data, fine_tuned_model, results)
#   python -m lora_summarization.export         (fine_tuned_model, merged_model)
#   python study.py learning_rate=5e-5,1e-4 --output-dir studies/lr   (data, studies; --gpus all: a run per GPU)
# The hf-cache volume keeps downloaded models and data between runs. --init passes `docker stop`'s SIGTERM on to
# the stage, and --stop-timeout gives train.py time to save its checkpoint (Docker's default: SIGKILL after 10 s).
# The default image needs NVIDIA driver 560.28.03 or newer (CUDA 12.6); pick a tag that matches an older driver.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib

# The requirements get their own layer, so editing the code does not reinstall them. The base image's torch
# is pinned as a constraint: no requirement can replace it with another build, and a conflict fails the build.
COPY requirements.txt /tmp/requirements.txt
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && pip install -c /tmp/torch-constraint.txt -r /tmp/requirements.txt \
    && python -c "import transformers.utils as u; assert u.is_torch_available(), 'transformers rejects this torch'"

# A non-root user; the cache is writable by any user, so `--user "$(id -u):$(id -g)"` works as well.
RUN useradd --create-home --shell /bin/bash trainer \
    && mkdir -p /workspace/lora_finetuning "$HF_HOME" \
    && chown trainer:trainer /workspace/lora_finetuning \
    && chmod 1777 "$HF_HOME"
VOLUME ["/cache/huggingface"]

WORKDIR /workspace/lora_finetuning
COPY --chown=trainer:trainer . .
USER trainer

# No entrypoint: the command is the stage to run, as in `docker run ... lora-summarization python train.py`.
ENTRYPOINT []
CMD ["python", "train.py", "--help"]

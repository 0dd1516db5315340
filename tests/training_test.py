import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from lora_summarization import training
from lora_summarization.evaluation import loss_scores
from lora_summarization.modeling import apply_lora
from lora_summarization.prompts import encode_example
from lora_summarization.synthetic import make_examples


@pytest.fixture
def batch(tokenizer):
    examples = make_examples(6, seed=7)
    encoded = [encode_example(tokenizer, ex["dialogue"], ex["summary"], 512) for ex in examples]
    return training.ResponseCollator(tokenizer.pad_token_id)(training.as_features(encoded))


@pytest.fixture
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(base, config).eval()


def full_logits_loss(model, batch) -> torch.Tensor:
    """The reference computation: logits at every position, HF's shifted cross-entropy."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def test_fast_loss_equals_the_full_logits_loss(lora_model, batch):
    with torch.no_grad():
        hidden = training.model_hidden_states(lora_model, batch)
        fast = training.response_token_losses(hidden, batch["labels"], lora_model.get_output_embeddings()).mean()
        reference = full_logits_loss(lora_model, batch)
        builtin = lora_model(**batch).loss
    assert torch.allclose(fast, reference, atol=1e-5, rtol=0)
    assert torch.allclose(fast, builtin, atol=1e-5, rtol=0)


def test_fast_loss_gradient_equals_the_full_logits_gradient(lora_model, batch):
    lora_model.train()
    parameter = next(p for name, p in lora_model.named_parameters() if "lora_B" in name)
    fast = training.response_token_losses(
        training.model_hidden_states(lora_model, batch), batch["labels"], lora_model.get_output_embeddings()
    ).mean()
    (fast_grad,) = torch.autograd.grad(fast, parameter)
    (reference_grad,) = torch.autograd.grad(full_logits_loss(lora_model, batch), parameter)
    assert torch.allclose(fast_grad, reference_grad, atol=1e-6)


def test_loss_is_normalised_over_the_label_tokens_of_all_micro_batches(lora_model, tokenizer, tmp_path):
    """Summing the micro-batch losses gives the token mean of the whole batch, not a mean of means."""
    summaries = ["Ok.", "Yes.", " ".join(["Tom will bring the cake and Anna the drinks."] * 6), "No.", "Fine.", "Sure."]
    encoded = [encode_example(tokenizer, "Tom: hi\nAnna: hello", summary, 512) for summary in summaries]
    batch = training.ResponseCollator(tokenizer.pad_token_id)(training.as_features(encoded))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = training.SummaryTrainer(model=lora_model, args=args)
    micro_batches = [{key: value[i : i + 2] for key, value in batch.items()} for i in range(0, 6, 2)]
    label_tokens = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        accumulated = sum(trainer.compute_loss(lora_model, mb, num_items_in_batch=label_tokens) for mb in micro_batches)
        per_batch_means = [trainer.compute_loss(lora_model, mb) for mb in micro_batches]
        pooled = full_logits_loss(lora_model, batch)
    assert torch.allclose(accumulated, pooled, atol=1e-5)
    assert not torch.allclose(torch.stack(per_batch_means).mean(), pooled, atol=1e-4)


def realistic_lengths(n: int, seed: int = 0) -> list[int]:
    torch.manual_seed(seed)
    return torch.distributions.LogNormal(5.2, 0.5).sample((n,)).clamp(60, 600).int().tolist()


def test_sampler_order_depends_only_on_seed_and_epoch():
    lengths = realistic_lengths(64)
    first, second = (training.LengthGroupedEpochSampler(lengths, 8, group_steps=2, seed=3) for _ in range(2))
    list(first)  # the first sampler has already served epoch 0 when both move to epoch 1
    first.set_epoch(1)
    second.set_epoch(1)
    epoch_one = list(first)
    assert epoch_one == list(second)
    assert sorted(epoch_one) == list(range(64))
    second.set_epoch(2)
    assert list(second) != epoch_one


def step_length_trend(steps: list[list[int]], lengths: list[int], steps_per_group: int):
    """Mean correlation, over groups, between a step's position in its group and its mean example length."""
    step_means = torch.tensor([sum(lengths[i] for i in step) / len(step) for step in steps])
    groups = step_means[: len(step_means) // steps_per_group * steps_per_group].view(-1, steps_per_group)
    positions = torch.arange(steps_per_group, dtype=torch.float).expand_as(groups)
    return torch.stack(
        [torch.corrcoef(torch.stack([p, g]))[0, 1] for p, g in zip(positions, groups, strict=True)]
    ).mean()


def test_sampler_keeps_steps_similar_in_length_without_a_long_to_short_sweep():
    lengths = realistic_lengths(4000)
    micro, step_size = 2, 8
    steps = training.LengthGroupedEpochSampler(lengths, step_size, group_steps=50, seed=42).steps()
    assert max(lengths[i] for i in steps[0]) == max(lengths)  # out-of-memory shows at the first step
    assert all(len(step) == step_size for step in steps)
    assert abs(step_length_trend(steps[1:], lengths, 50)) < 0.15
    # Each step is sorted longest first, so the micro-batches cut from it keep padding a small share of the tokens.
    assert all([lengths[i] for i in step] == sorted((lengths[i] for i in step), reverse=True) for step in steps)
    micro_batches = [step[start : start + micro] for step in steps for start in range(0, step_size, micro)]
    padded = sum(micro * max(lengths[i] for i in batch) for batch in micro_batches)
    assert sum(lengths) / padded > 0.97
    # The measure can see a sweep: sorting each group longest first, as before, trends strongly.
    groups = torch.tensor(sum(steps, [])).view(-1, 50 * step_size).tolist()
    swept = [sorted(group, key=lambda i: -lengths[i]) for group in groups]
    swept_steps = [group[i : i + step_size] for group in swept for i in range(0, len(group), step_size)]
    assert step_length_trend(swept_steps, lengths, 50) < -0.9


def test_validation_loss_is_a_token_weighted_mean_like_evaluate(lora_model, tokenizer, tmp_path):
    summaries = ["Ok.", " ".join(["Tom will bring the cake and Anna the drinks."] * 6), "No.", "Fine.", "Sure it is."]
    examples = [encode_example(tokenizer, "Tom: hi\nAnna: hello", summary, 512) for summary in summaries]
    args = training.core_training_arguments(output_dir=str(tmp_path), per_device_eval_batch_size=2)
    trainer, _ = training.build_trainer(lora_model, tokenizer, examples, examples, args, tmp_path, tensorboard=False)
    metrics = trainer.evaluate()
    scores = loss_scores(lora_model, tokenizer, examples, batch_size=3)  # what evaluate.py reports
    for key, losses, tokens in [
        ("eval_loss", scores.losses, scores.label_tokens),
        ("eval_content_loss", scores.content_losses, scores.content_tokens),
    ]:
        assert metrics[key] == pytest.approx(float((losses * tokens).sum() / tokens.sum()), abs=1e-6)
        assert metrics[key] != pytest.approx(float(losses.mean()), abs=1e-3)  # not a mean of means


def test_checkpoint_is_never_left_half_written(lora_model, tokenizer, tmp_path, monkeypatch):
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to="none", use_cpu=True)
    trainer = training.SummaryTrainer(model=lora_model, args=args, processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.state.global_step = 5

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Trainer, "_save_rng_state", crash)
    with pytest.raises(OSError):
        trainer._save_checkpoint(lora_model, trial=None)
    assert training.latest_checkpoint(tmp_path / "checkpoints") is None

    monkeypatch.undo()
    training.clear_incomplete_checkpoints(tmp_path / "checkpoints")
    trainer._save_checkpoint(lora_model, trial=None)
    checkpoint = training.latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.endswith("checkpoint-5")
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state.pth"} <= {p.name for p in tmp_path.glob("**/*")}
    assert not (tmp_path / "checkpoints" / training.CHECKPOINT_STAGING).exists()


def test_gradient_checkpointing_still_trains_the_adapter(tiny_model_dir, batch):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), dropout=0.0, gradient_checkpointing=True)
    model.train()
    hidden = training.model_hidden_states(model, batch)
    training.response_token_losses(hidden, batch["labels"], model.get_output_embeddings()).mean().backward()
    lora_grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]  # A gets none while B is 0
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_save_total_limit_keeps_the_newest_checkpoints_by_step(lora_model, tokenizer, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_total_limit=2)
    trainer = training.SummaryTrainer(model=lora_model, args=args, processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    for step in range(1, 7):
        trainer.state.global_step = step
        trainer._save_checkpoint(lora_model, trial=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "checkpoint-6"]

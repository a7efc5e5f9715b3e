"""gkd/trainer.py in this process, on one tiny model: where the fast paths meet, one training step two ways gives the
same loss and gradients (chunked loss against the full-logits one; the static decode loop against transformers'
generate; LoRA's merged generation copies against the adapter), and the loss terms mean what they say."""

import pytest
import torch
from datasets import Dataset
from tiny import load_student_and_teacher

from gkd.config import GKDConfig
from gkd.losses import generalized_jsd
from gkd.steps import STUDENT, TEACHER
from gkd.teachers.live import LiveTeacher
from gkd.trainer import GKDTrainer

STOP = 2  # <|im_end|> in tests/tiny.py's tokenizer
SAMPLES = [{"prompt_ids": [5, 6, 7 + row, 8], "completion_ids": [9, 10 + row, 11, STOP][: 2 + row % 3], "index": row}
           for row in range(4)]


def make_trainer(tiny_models, tmp_path, student=None, teacher=None, peft=False, **options):
    tokenizer, loaded_student, loaded_teacher = load_student_and_teacher(tiny_models)
    args = GKDConfig(output_dir=str(tmp_path), max_new_tokens=6, max_length=32, per_device_train_batch_size=4,
                     max_steps=1, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                     **options)
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                 task_type="CAUSAL_LM")
    teacher = LiveTeacher.from_options(teacher or loaded_teacher, args)
    return GKDTrainer(model=student or loaded_student, teacher=teacher, args=args,
                      stop_token_ids=[STOP], processing_class=tokenizer, peft_config=peft_config,
                      train_dataset=Dataset.from_list(SAMPLES))


def batch_of(trainer, samples=SAMPLES):
    return trainer.data_collator(samples)


def loss_and_gradients(trainer, batch, sft=False):
    trainer._window = {"tokens": None, "sft": sft}
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=batch["completion_mask"].sum())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_step(first, second, rtol=1e-5, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("options", [
    {"beta": 0.5},
    {"beta": 1.0, "loss_temperature": 0.7},
    {"beta": 0.5, "teacher_top_k": 5},  # a live teacher's top-K: the sparse loss
    {"beta": 1.0, "teacher_top_k": 1},  # the sampled token only
    {"beta": 0.0, "teacher_top_k": 5, "topk_renormalize": True},
    {"beta": 0.5, "sft_loss_weight": 0.4},  # KD + SFT
])
def test_chunked_loss_step_equals_the_full_logits_step(tiny_models, tmp_path, options):
    chunked = make_trainer(tiny_models, tmp_path / "a", loss_chunk_size=3, **options)
    reference = make_trainer(tiny_models, tmp_path / "b", loss_chunk_size=0, **options)
    sft = options.get("sft_loss_weight", 0) > 0
    assert_same_step(loss_and_gradients(chunked, batch_of(chunked), sft),
                     loss_and_gradients(reference, batch_of(reference), sft))


def test_the_loss_is_the_per_token_divergence_from_the_reference(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models, tmp_path, beta=0.5, loss_chunk_size=3)
    batch = batch_of(trainer)
    loss, _ = loss_and_gradients(trainer, batch)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].shape[1]
    with torch.no_grad():
        student = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1:-1]
        teacher = trainer.teacher.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1:-1]
    mask = batch["completion_mask"].bool()
    expected = generalized_jsd(student[mask].double(), teacher[mask][:, : student.shape[-1]].double(), 0.5).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_sft_weight_adds_cross_entropy_only_where_it_applies(tiny_models, tmp_path):
    kd_only = make_trainer(tiny_models, tmp_path / "kd", beta=0.5)
    mixed = make_trainer(tiny_models, tmp_path / "mix", beta=0.5, sft_loss_weight=0.4)
    batch = batch_of(kd_only)
    kd_loss, _ = loss_and_gradients(kd_only, batch)
    on_policy, _ = loss_and_gradients(mixed, batch, sft=False)  # the student's own samples: no SFT term
    dataset_step, _ = loss_and_gradients(mixed, batch, sft=True)
    torch.testing.assert_close(on_policy, kd_loss)
    logits = mixed.model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)).logits
    width = batch["completion_ids"].shape[1]
    mask = batch["completion_mask"].bool()
    cross_entropy = torch.nn.functional.cross_entropy(logits[:, -width - 1:-1][mask], batch["completion_ids"][mask])
    torch.testing.assert_close(dataset_step, kd_loss + 0.4 * cross_entropy.detach(), rtol=1e-5, atol=1e-6)


def sampled(trainer, source=STUDENT, seed_step=0):
    trainer.state.global_step = seed_step
    batches = [batch_of(trainer, SAMPLES[:2]), batch_of(trainer, SAMPLES[2:])]
    return trainer._sample_window(batches, source)


@pytest.mark.parametrize("source", [STUDENT, TEACHER])
def test_static_decoding_samples_what_transformers_generate_samples(tiny_models, tmp_path, source):
    static = sampled(make_trainer(tiny_models, tmp_path / "s", generation_backend="static", temperature=1.0), source)
    plain = sampled(make_trainer(tiny_models, tmp_path / "p", generation_backend="plain", temperature=1.0), source)
    for ours, theirs in zip(static, plain):
        torch.testing.assert_close(ours["completion_mask"], theirs["completion_mask"])
        torch.testing.assert_close(ours["completion_ids"], theirs["completion_ids"])
        assert ours["index"].tolist() == theirs["index"].tolist()  # the cache key travels with the samples


def test_lora_samples_the_same_through_merged_copies_and_through_the_adapter(tiny_models, tmp_path):
    merged = make_trainer(tiny_models, tmp_path / "m", peft=True, generation_backend="static", temperature=1.0)
    adapter = make_trainer(tiny_models, tmp_path / "a", peft=True, generation_backend="plain", temperature=1.0)
    for trainer in (merged, adapter):  # a trained adapter, not a zero one: B is zero at initialisation
        torch.manual_seed(0)
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.5)
    for ours, theirs in zip(sampled(merged), sampled(adapter)):
        torch.testing.assert_close(ours["completion_ids"], theirs["completion_ids"])
    assert merged._lora_copies.copies  # the static path did run on merged copies


def test_the_window_logs_its_on_policy_share_and_lmbda(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models, tmp_path, lmbda=1.0, lmbda_schedule="linear", lmbda_warmup_steps=4,
                           lmbda_start=0.25)
    trainer.state.global_step = 2
    iterator = iter(trainer.get_train_dataloader())
    batches, tokens = trainer.get_batch_samples(iterator, 1, trainer.args.device)
    assert trainer._metrics["lmbda"] == [0.625] and tokens.item() == sum(int(b["completion_mask"].sum())
                                                                         for b in batches)

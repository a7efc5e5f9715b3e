"""The teacher's forward runs without autograd and in the training precision, on the chunked (hidden-state) loss path.

Regression: the chunked loss calls the backbones directly, which bypasses the autocast accelerate wraps around
`model.forward`, so `--bf16` with fp32 weights ran student and teacher in fp32 there.
"""

import torch
from datasets import Dataset
from tiny import load_student_and_teacher

from gkd.config import GKDConfig
from gkd.teachers.live import LiveTeacher
from gkd.trainer import GKDTrainer


def test_bf16_autocast_reaches_student_and_teacher_backbones(tiny_models, tmp_path):
    tokenizer, student, teacher = load_student_and_teacher(tiny_models)
    args = GKDConfig(
        output_dir=str(tmp_path), lmbda=0.0, max_new_tokens=4, max_length=16, per_device_train_batch_size=2,
        max_steps=1, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
    )
    # gkd trains in fp32 without a GPU; ask accelerate for bf16 autocast anyway, which CPUs support, to see it used.
    args.bf16, args.mixed_precision = True, "bf16"
    samples = [{"prompt_ids": [5, 6, 7, 8], "completion_ids": [9, 10, 11, 2]}] * 2
    trainer = GKDTrainer(
        model=student, teacher=LiveTeacher.from_options(teacher, args), args=args, stop_token_ids=[2],
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(samples),
    )
    assert trainer._use_chunked_loss(student)
    seen = {}

    def recorder(role):
        def record(module, inputs, output):
            seen.setdefault(role, output)

        return record

    for role, model in (("student", student), ("teacher", teacher)):
        model.model.layers[0].self_attn.q_proj.register_forward_hook(recorder(role))
    trainer.train()
    assert seen["student"].dtype == torch.bfloat16 and seen["student"].requires_grad
    assert seen["teacher"].dtype == torch.bfloat16 and not seen["teacher"].requires_grad

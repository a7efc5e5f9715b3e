"""Tiny models for tests. The builders live in benchmarks/tiny_models.py, where the CPU benchmarks import them too;
this module adds what only tests need."""

from pathlib import Path

import torch

from benchmarks.tiny_models import CHATML_TEMPLATE, make_model, make_student_and_teacher, make_tokenizer

__all__ = ["CHATML_TEMPLATE", "load_student_and_teacher", "make_model", "make_student_and_teacher", "make_tokenizer"]


def load_student_and_teacher(folders: tuple[Path, Path]):
    """(tokenizer, student, teacher) from `make_student_and_teacher`'s folders, in fp32, the teacher frozen as the
    trainer keeps it: what in-process trainer tests start from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_path, teacher_path = folders
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval().requires_grad_(False)
    return tokenizer, student, teacher

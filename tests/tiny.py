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


def make_family_model(folder, tokenizer, config_class, **options):
    """A tiny Qwen2 or Mistral shaped like tiny.make_model's Llama: hidden 32, 4 query heads over 2 key-value heads."""
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **options)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model

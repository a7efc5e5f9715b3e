"""Load the student, the teacher and the tokenizer; refuse a teacher that speaks another vocabulary; build LoRA.

The vocabulary check runs on tokenizers only, so a mismatched teacher is refused in seconds, before any weights load.
"""

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from .errors import ModelError

logger = logging.getLogger(__name__)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The student's tokenizer renders every prompt; it needs a chat template and a pad token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot load a tokenizer ({str(error).splitlines()[0]})") from None
    if not tokenizer.chat_template:
        raise ModelError(f"{path}: the tokenizer has no chat template; gkd renders prompts with it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_vocabulary(student_path: str, teacher_path: str, trust_remote_code: bool = False) -> None:
    """Refuse a teacher whose token->id map differs from the student's.

    Sizes alone are not enough (two tokenizers of equal size can number tokens differently), and sizes can differ
    harmlessly: a model whose embedding matrix is padded beyond its tokenizer is fine, so compare the maps and
    check each model's embedding covers the shared ids.
    """
    student = load_tokenizer(student_path, trust_remote_code).get_vocab()
    try:
        teacher = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code).get_vocab()
    except (OSError, ValueError) as error:
        raise ModelError(f"{teacher_path}: cannot load the teacher's tokenizer ({str(error).splitlines()[0]})") from None
    differing = [token for token, index in student.items() if teacher.get(token) != index]
    if differing:
        sample = ", ".join(repr(token) for token in differing[:3])
        raise ModelError(
            f"{teacher_path}: the teacher's vocabulary differs from the student's ({len(differing)} of "
            f"{len(student)} tokens missing or numbered differently, e.g. {sample}); GKD compares next-token "
            "distributions and needs one shared vocabulary"
        )
    needed = max(student.values()) + 1
    for path in (student_path, teacher_path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        vocab_size = config.get_text_config().vocab_size
        if vocab_size < needed:
            raise ModelError(f"{path}: embedding has {vocab_size} rows but the tokenizer uses ids up to {needed - 1}")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model_path: str) -> list[int]:
    """Every id that ends an assistant turn: tokenizer EOS, generation-config EOS (a list for Llama 3 and ChatML
    models), and the special token the chat template puts right after an assistant message (e.g. <|im_end|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if (Path(model_path) / "generation_config.json").exists():
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    marker = "\x01gkd\x01"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = rendered.split(marker, 1)[-1]
    if after:
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
            ids.add(first[0])
    return sorted(ids)


def _torch_dtype(name: str):
    return name if name == "auto" else getattr(torch, name)


def load_causal_lm(path: str, dtype: str, trust_remote_code: bool, attn_implementation: str | None):
    kwargs = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot load a causal LM ({str(error).splitlines()[0]})") from None


def load_teacher(path: str, dtype: str, trust_remote_code: bool, attn_implementation: str | None):
    """Frozen and in eval mode: the teacher is never in the optimizer and never drops out."""
    teacher = load_causal_lm(path, dtype, trust_remote_code, attn_implementation)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def lora_config(model_args):
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )

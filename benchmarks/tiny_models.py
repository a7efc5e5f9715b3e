"""Tiny, randomly initialised models and a tiny ChatML tokenizer, built offline: the models of the tests
(tests/tiny.py, tests/conftest.py) and of the CPU benchmarks (benchmarks/data_start.py).

The tokenizer mirrors SmolLM2-Instruct's conventions on purpose: ChatML template, and pad == eos == <|im_end|>,
so the tests meet the pad-equals-EOS trap that real chat models set.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? the capital of france is paris.",
    "you are a helpful assistant. answer the question briefly.",
    "two plus two is four. three plus five is eight. numbers: 0 1 2 3 4 5 6 7 8 9",
    "system user assistant hello world how are you today? i am fine, thank you!",
    "name a colour: red green blue yellow. name an animal: cat dog cow horse.",
] * 20


def make_tokenizer(out_dir: str | Path, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus: deterministic, and any text encodes."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def make_model(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    num_layers: int = 2,
    hidden_size: int = 32,
    seed: int = 0,
    vocab_padding: int = 0,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A tiny Llama; `vocab_padding` pads the embedding beyond the tokenizer as many real checkpoints do."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + vocab_padding,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def make_student_and_teacher(root: str | Path) -> tuple[Path, Path]:
    """Student (2 layers) and teacher (3 layers, padded vocabulary) sharing one tokenizer."""
    root = Path(root)
    tokenizer = make_tokenizer(root / "tokenizer")
    student, teacher = root / "student", root / "teacher"
    make_model(student, tokenizer, num_layers=2, seed=0)
    make_model(teacher, tokenizer, num_layers=3, seed=1, vocab_padding=4)
    return student, teacher

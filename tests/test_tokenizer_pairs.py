"""The cross-tokenizer fixtures (tokenizer_pairs.py) are what the alignment tests assume: two tokenizers that load
like downloaded ones, round-trip any text, cut numbers differently, differ in template and BOS habit, and tiny
models that run with them."""

import json

import pytest
import torch
from tokenizer_pairs import KINDS, corpus, end_of_turn_ids, random_texts
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

MESSAGES = [{"role": "user", "content": "What is 12 + 2024? 🙂"}, {"role": "assistant", "content": "2036.\t你好"}]


@pytest.fixture(scope="module")
def tokenizers(tokenizer_pair):
    return {kind: AutoTokenizer.from_pretrained(tokenizer_pair[kind]) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_loads_with_every_byte_and_named_tokens(tokenizers, kind):
    tokenizer = tokenizers[kind]
    vocab = tokenizer.get_vocab()
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    assert 300 <= len(tokenizer) <= 600
    assert tokenizer.pad_token in tokenizer.all_special_tokens
    assert tokenizer.bos_token is not None and tokenizer.eos_token is not None
    assert tokenizer.chat_template


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_on_corpus_and_random_strings(tokenizers, kind):
    tokenizer = tokenizers[kind]
    texts = corpus() + random_texts(200, seed=1)
    assert any("\t" in text for text in texts) and any("👨‍👩‍👧" in text for text in texts)
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_packs_packs_numbers_and_digits_splits_them(tokenizers):
    packs, digits = tokenizers["packs"], tokenizers["digits"]
    for number in ("123", "2024", "12345"):
        assert len(packs.encode(number)) == 1, packs.tokenize(number)
        assert digits.tokenize(number) == list(number)
    text = "year 2024 cost 12345"
    assert len(packs.encode(text)) < len(digits.encode(text, add_special_tokens=False))


def test_chat_templates_differ_and_end_turns_with_their_own_token(tokenizers):
    packs, digits = tokenizers["packs"], tokenizers["digits"]
    rendered = {kind: tokenizers[kind].apply_chat_template(MESSAGES, tokenize=False) for kind in KINDS}
    assert rendered["packs"] != rendered["digits"]
    assert "2036.\t你好<|im_end|>" in rendered["packs"]
    assert "2036.\t你好<|end|>" in rendered["digits"]
    prompt = {kind: tokenizers[kind].apply_chat_template(MESSAGES[:1], add_generation_prompt=True, tokenize=False)
              for kind in KINDS}
    assert prompt["packs"].endswith("<|im_start|>assistant\n") and prompt["digits"].endswith("<|assistant|>\n")
    assert packs.convert_ids_to_tokens(end_of_turn_ids(packs)) == ["<|im_end|>"]
    assert digits.convert_ids_to_tokens(end_of_turn_ids(digits)) == ["<|end|>", "</s>"]


def test_digits_adds_bos_and_packs_does_not(tokenizers):
    packs, digits = tokenizers["packs"], tokenizers["digits"]
    assert digits.encode("hi 7") == [digits.bos_token_id] + digits.encode("hi 7", add_special_tokens=False)
    assert packs.encode("hi 7") == packs.encode("hi 7", add_special_tokens=False)
    assert packs.bos_token_id not in packs.encode("hi 7")
    # The "digits" template writes BOS itself, so rendering then encoding without special tokens holds one BOS.
    ids = digits.apply_chat_template(MESSAGES, tokenize=False)
    assert digits.encode(ids, add_special_tokens=False).count(digits.bos_token_id) == 1


def test_tiny_models_load_with_their_tokenizer_and_run(cross_tokenizer_models, tokenizers):
    for folder, kind in zip(cross_tokenizer_models, ("packs", "digits")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert tokenizer.get_vocab() == tokenizers[kind].get_vocab()
        assert model.config.vocab_size == len(tokenizer)
        assert list(model.generation_config.eos_token_id) == end_of_turn_ids(tokenizer)
        text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
        input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            logits = model(input_ids).logits
        assert logits.shape == (1, input_ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_chat_dataset_exercises_alignment(cross_tokenizer_data):
    records = [json.loads(line) for line in cross_tokenizer_data.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 16
    assert all([m["role"] for m in record["messages"]] == ["user", "assistant"] for record in records)
    answers = " ".join(record["messages"][1]["content"] for record in records)
    for piece in ("2024", "🙂", "你好", "\t", "  ", "\n\n", "“"):
        assert piece in answers or any(piece in r["messages"][0]["content"] for r in records), piece

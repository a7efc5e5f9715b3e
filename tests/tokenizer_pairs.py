"""Two tiny tokenizers of different families, trained offline, and tiny models for each: the fixtures of the
cross-tokenizer tests (issue 27). Nothing here downloads anything.

- "packs": SmolLM2's conventions. ByteLevel BPE whose merges pack numbers ("123", "2024" are one token each),
  ChatML template, no BOS added by `encode`, eos == pad == <|im_end|>.
- "digits": Phi-3's conventions. The same ByteLevel BPE after a `Digits(individual_digits=True)` split, so every
  digit is a token of its own; a <|user|>/<|assistant|> template whose turns end with <|end|>; `encode` adds BOS
  <s> and the template writes it too (so `add_special_tokens=False` is needed after rendering, as gkd does).

Both hold all 256 single-byte tokens, so any text round-trips. `random_texts` gives the strings of the alignment
property tests: ASCII, numbers, emoji (with skin tones and ZWJ sequences), CJK, combining marks, whitespace runs.
"""

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tiny import CHATML_TEMPLATE

KINDS = ("packs", "digits")

PACKS_TEMPLATE = CHATML_TEMPLATE  # SmolLM2's ChatML, as the other tiny models have it
DIGITS_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Per kind: special tokens (in id order, first ids of the vocabulary), the named ones, the end-of-turn tokens a
# model stops on, the template, the vocabulary size, and whether `encode` adds BOS.
SPECS = {
    "packs": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "named": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>"},
        "end_of_turn": ["<|im_end|>"],
        "template": PACKS_TEMPLATE,
        "vocab_size": 560,
        "add_bos": False,
    },
    "digits": {
        # <|system|> beside the five of Phi-3's turns, so a system message renders as a special token too.
        "special": ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "named": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"},
        "end_of_turn": ["<|end|>", "</s>"],
        "template": DIGITS_TEMPLATE,
        "vocab_size": 420,
        "add_bos": True,
    },
}

# Numbers the "packs" merges hold whole: repeated often in the corpus, at line starts, after spaces and after
# punctuation, since ByteLevel's regex makes " 2024" and "2024" different words. ByteLevel's regex cuts "3.14" at
# the dot on every tokenizer, so "packs" makes it "3", ".", "14".
PACKED_NUMBERS = ["123", "2024", "12345", "100", "42", "3.14"]

WORDS = ("the a of to and in is it you that was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man year "
         "came show every good me give our under name very through just form sentence great think say help low line "
         "answer question price total apples shop sold each costs").split()
EMOJI = ["🙂", "😀", "🍕", "☕", "🚀", "❤️", "👍🏽", "👨‍👩‍👧", "🇯🇵", "✨", "🎉", "🤖"]
CJK = ["你好世界", "今天天气很好。", "我有三个苹果", "東京は日本の首都です。", "こんにちは", "ありがとう",
       "서울은 한국의 수도입니다.", "안녕하세요", "数学", "机器学习"]
QUOTES = ['"', "'", "“", "”", "‘", "’", "«", "»", "`"]
WHITESPACE = ["  ", "   ", "\t", "\t\t", "\n", "\n\n", " \t ", "    "]


def _number(rng: random.Random) -> str:
    """1 to 6 digits, sometimes a decimal or a packed favourite."""
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(PACKED_NUMBERS)
    if roll < 0.45:
        return f"{rng.randint(0, 999)}.{rng.randint(0, 99)}"
    return str(rng.randint(0, 10 ** rng.randint(1, 6) - 1))


def _sentence(rng: random.Random) -> str:
    words = rng.sample(WORDS, rng.randint(3, 9))
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", "?", "!", ","])


def _line(rng: random.Random) -> str:
    """One corpus line of a random kind: prose, numbers, emoji, CJK, whitespace runs or quotes."""
    kind = rng.randrange(8)
    if kind == 0:
        return _sentence(rng)
    if kind == 1:
        return f"In {rng.choice(['2024', '1999', '2023'])} the shop sold {_number(rng)} apples at {_number(rng)} each."
    if kind == 2:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"{a} + {b} = {a + b}; 123 * 2 = 246; pi=3.14, year:2024, id={_number(rng)}"
    if kind == 3:
        return f"{_sentence(rng)} {rng.choice(EMOJI)}{rng.choice(EMOJI)} {_sentence(rng)}"
    if kind == 4:
        return f"{rng.choice(CJK)}{rng.choice(CJK)} {_number(rng)} {rng.choice(CJK)}"
    if kind == 5:
        return f"def f(x):\n\treturn x{rng.choice(WHITESPACE)}+{rng.choice(WHITESPACE)}{_number(rng)}\n"
    if kind == 6:
        quote = rng.choice(QUOTES)
        return f"She said {quote}{_sentence(rng)}{quote} and 'left'. “Yes,” he said."
    return f"{_number(rng)}{rng.choice(WHITESPACE)}{_number(rng)}\t{_number(rng)}  2024  123\n12345"


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """The training corpus of both tokenizers: deterministic for a seed."""
    rng = random.Random(seed)
    return [_line(rng) for _ in range(lines)]


def random_texts(count: int, seed: int = 0, max_pieces: int = 12) -> list[str]:
    """Random strings mixing ASCII, digits, emoji, CJK, combining marks and spaces/tabs/newlines: the inputs of the
    round-trip and alignment property tests. Pieces are drawn independently, so most strings are unlike the corpus."""
    rng = random.Random(seed)
    ascii_chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-_()[]{}<>/\\|@#$%^&*+=~'\""

    def piece() -> str:
        kind = rng.randrange(7)
        if kind == 0:
            return "".join(rng.choice(ascii_chars) for _ in range(rng.randint(1, 8)))
        if kind == 1:
            return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 7)))
        if kind == 2:
            return rng.choice(EMOJI)
        if kind == 3:
            return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 4)))
        if kind == 4:
            return "".join(rng.choice(" \t\n") for _ in range(rng.randint(1, 5)))
        if kind == 5:
            return rng.choice(["e\u0301", "ñ", "ß", "Ω", "é", "ü"])
        return rng.choice(WORDS)

    return ["".join(piece() for _ in range(rng.randint(1, max_pieces))) for _ in range(count)]


def train_tokenizer(folder: str | Path, kind: str):
    """Train the tokenizer of `kind` ("packs" or "digits") on `corpus()` and save it to `folder` as a
    PreTrainedTokenizerFast (tokenizer.json, tokenizer_config.json with the chat template). Returns the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[kind]
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec["vocab_size"], special_tokens=spec["special"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus(), trainer=trainer)
    bos = spec["named"]["bos_token"]
    if spec["add_bos"]:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=spec["add_bos"],
                                        add_eos_token=False, clean_up_tokenization_spaces=False,
                                        model_max_length=2048, **spec["named"])
    tokenizer.chat_template = spec["template"]
    tokenizer.save_pretrained(folder)
    return tokenizer


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids a model of this tokenizer stops generating on: <|im_end|> for "packs", <|end|> and </s> for
    "digits" (found by the tokens present, so it works on either tokenizer as loaded from its folder)."""
    vocab = tokenizer.get_vocab()
    tokens = next(SPECS[kind]["end_of_turn"] for kind in KINDS if SPECS[kind]["end_of_turn"][0] in vocab)
    return [vocab[token] for token in tokens]


def tiny_model_for(folder: str | Path, tokenizer_folder: str | Path, seed: int, num_layers: int = 2,
                   hidden_size: int = 32) -> Path:
    """A tiny random Llama (tests/tiny.make_model) whose vocabulary is exactly the tokenizer's, saved with that
    tokenizer into `folder`; its generation config stops on the tokenizer's end-of-turn ids. Returns `folder`."""
    from tiny import make_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    model = make_model(folder, tokenizer, num_layers=num_layers, hidden_size=hidden_size, seed=seed)
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.save_pretrained(folder)
    return Path(folder)


def chat_records(count: int, seed: int = 0) -> list[dict]:
    """`count` chat records {"messages": [user, assistant]} whose texts carry numbers, emoji, CJK, whitespace runs
    and quotes, so both tokenizers cut them differently."""
    rng = random.Random(seed)
    questions = [
        lambda a, b: (f"What is {a} + {b}?", f"{a} + {b} = {a + b}."),
        lambda a, b: ("How many apples did the shop sell in 2024? 🍎", f"It sold {a * 7} apples 🙂, at {b}.5 each."),
        lambda a, b: ("Say hello in Chinese.", f"你好！ That is “hello”. {rng.choice(EMOJI)}"),
        lambda a, b: (f"Indent this:\nx = {a}", f"\tx = {a}\n\t\ty  =  {b}\n"),
        lambda a, b: ("Translate 'thank you' to Japanese.", "ありがとう (arigatou)  ✨"),
        lambda a, b: (f"Is {a} bigger than 3.14?", f"Yes, {a} > 3.14." if a > 3.14 else f"No: {a} < 3.14."),
        lambda a, b: ("Name the capital of Korea.", "서울 (Seoul)   is the capital. 🇰🇷"),
        lambda a, b: (f"Write the year {2000 + a % 30}.", f"{2000 + a % 30}\n\n12345 and 123456."),
    ]
    records = []
    for index in range(count):
        user, assistant = questions[index % len(questions)](rng.randint(0, 999), rng.randint(0, 99999))
        records.append({"messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": assistant}]})
    return records


def write_chat_dataset(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `chat_records(n, seed)` as JSONL to `path`; returns the path."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as handle:
        for record in chat_records(n, seed):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path

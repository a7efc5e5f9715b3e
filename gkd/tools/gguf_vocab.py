"""The tokenizer half of a GGUF export: what llama.cpp needs to tokenize and chat as the Hugging Face tokenizer does.

llama.cpp does not run the tokenizer.json pipeline; it runs its own byte-level BPE over the token list and merges,
after splitting text with one of its named pre-tokenizers (`tokenizer.ggml.pre`). Its converter picks that name by
hashing the token ids of a probe text against a table of known models. We read the pipeline instead: a tokenizer.json
pre-tokenizer whose steps match one of llama.cpp's named splits gets that name, and any other is refused (or taken
from `--tokenizer_pre` when the user knows better), never silently given llama.cpp's default split.
"""

import json
from dataclasses import dataclass

from gkd.errors import ModelError

# llama.cpp's token types (gguf.TokenType), written per token.
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4

# The split regexes of the tokenizer.json files of Llama 3 and Qwen2, which llama.cpp implements as "llama-bpe" and
# "qwen2": the same pattern except how digits group (up to three, or one by one).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class Vocabulary:
    """Everything `tokenizer.*` in the GGUF file says."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_token_ids: dict[str, int]  # bos, eos, unk, pad -> id
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | list | None

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_token_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos_token)
        if self.add_eos_token:  # llama.cpp's default for BPE is False; the key is written only when it is not
            writer.add_add_eos_token(True)
        writer.add_add_space_prefix(False)  # byte-level BPE marks spaces itself (Ġ); no SentencePiece-style prefix
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocabulary(tokenizer, vocab_size: int, tokenizer_pre: str | None, source: str) -> Vocabulary:
    """The GGUF tokenizer of a transformers fast tokenizer whose model has `vocab_size` embedding rows.

    Rows beyond the tokenizer (embeddings padded to a round size) get placeholder tokens `[PAD<id>]` of type UNUSED,
    as llama.cpp's converter writes them, so that the token list and the embedding have the same length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"{source}: the tokenizer is not a fast (tokenizer.json) tokenizer; gkd exports byte-level "
                         "BPE tokenizers only")
    pipeline = json.loads(backend.to_str())
    model = pipeline.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(pipeline):
        raise ModelError(f"{source}: the tokenizer is {model.get('type')} without a byte-level pre-tokenizer; gkd "
                         "exports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style) only")
    normalizer = (pipeline.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # Qwen2's NFC changes no text already composed, which llama.cpp accepts too
        raise ModelError(f"{source}: the tokenizer normalises text ({normalizer}), which "
                         "llama.cpp's byte-level BPE would not do")

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ModelError(f"{source}: the tokenizer has token ids up to {max(vocab.values())} but the model only "
                         f"{vocab_size} embedding rows")
    by_id = {token_id: token for token, token_id in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, token_types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(UNUSED)
        elif token_id in added:
            tokens.append(added[token_id].content)
            token_types.append(CONTROL if added[token_id].special else USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            token_types.append(NORMAL)

    return Vocabulary(
        tokens=tokens,
        token_types=token_types,
        merges=_merges(model, source),
        pre=tokenizer_pre or pre_tokenizer_name(pipeline, source),
        special_token_ids=_special_token_ids(tokenizer, vocab_size),
        **_added_special_tokens(tokenizer),
        chat_template=tokenizer.chat_template,
    )


def pre_tokenizer_name(pipeline: dict, source: str) -> str:
    """llama.cpp's name for the way this tokenizer.json splits text before BPE; refuses one llama.cpp cannot name."""
    pre = pipeline.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    if byte_level.get("add_prefix_space"):
        raise ModelError(f"{source}: the tokenizer adds a space before the text (ByteLevel add_prefix_space), which "
                         "no llama.cpp pre-tokenizer does")
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"  # GPT-2's split after digits one by one (also llama.cpp's "starcoder" and "refact")
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and pattern in (LLAMA3_SPLIT, QWEN2_SPLIT):
            return "llama-bpe" if pattern == LLAMA3_SPLIT else "qwen2"
    raise ModelError(f"{source}: llama.cpp has no pre-tokenizer known to split text as this tokenizer does "
                     f"({' + '.join(kinds) or 'none'}); pass --tokenizer_pre with llama.cpp's name for it if you "
                     "know it")


def _is_byte_level(pipeline: dict) -> bool:
    pre = pipeline.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps)


def _merges(model: dict, source: str) -> list[str]:
    """`a b` strings; tokenizers >= 0.20 stores pairs. Byte-level tokens never hold a space, so the split is safe."""
    merges = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or any(" " in part for part in pair):
            raise ModelError(f"{source}: the BPE merge {merge!r} cannot be written for llama.cpp")
        merges.append(" ".join(pair))
    if not merges:
        raise ModelError(f"{source}: the BPE tokenizer has no merges")
    return merges


def _special_token_ids(tokenizer, vocab_size: int) -> dict[str, int]:
    ids = {}
    for kind, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                       ("pad", "pad_token_id")):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            ids[kind] = token_id
    return ids


def _added_special_tokens(tokenizer) -> dict[str, bool]:
    """Whether encoding adds BOS in front or EOS at the end: observed on a word, whatever the config files claim."""
    plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    return {
        "add_bos_token": start > 0 and full[0] == tokenizer.bos_token_id,
        "add_eos_token": len(full) > start + len(plain) and full[-1] == tokenizer.eos_token_id,
    }

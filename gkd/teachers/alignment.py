"""Two tokenizers made comparable through the bytes of their tokens (`--cross_tokenizer`).

Each side's token ids are read as the UTF-8 bytes they stand for (`token_bytes`), so one completion text tokenized by
both can be cut into chunks at the byte offsets where both sides end a token (`align`): 1:1 where both cut a span the
same way, m:n elsewhere. `VocabularyPair` holds what is computed once per run: both byte tables, and for every
student token the teacher token it is counted under in the sparse loss (`student_group`): the teacher token with
exactly its bytes, or, where the teacher has none, the longest teacher token its bytes start with. So when a teacher
that splits digits puts its mass on "1", a student that packs numbers has "1", "12" and "123" counted there together,
and none of them is pushed down for being a token the teacher cannot write (X-Token's failure of GOLD's exact map).
"""

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import ModelError

SENTENCEPIECE_SPACE = "\u2581"


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted: what ByteLevel BPE writes for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(character): byte for byte, character in zip(printable, characters)}


def _pipeline(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _steps(component: dict | None, sequence_key: str) -> list[dict]:
    component = component or {}
    return component.get(sequence_key, [component]) if component.get("type") == "Sequence" else [component]


def byte_scheme(tokenizer, name: str) -> str:
    """"byte_level" (GPT-2, Llama 3, Qwen, SmolLM) or "sentencepiece" (Llama 2, Gemma, Mistral: '▁' for a space and
    <0xNN> byte tokens); anything else cannot be read as bytes and is refused."""
    pipeline = _pipeline(tokenizer)
    decoders = [step.get("type") for step in _steps(pipeline.get("decoder"), "decoders")]
    if "ByteLevel" in decoders:
        return "byte_level"
    if {"Metaspace", "ByteFallback", "Replace"} & set(decoders):
        return "sentencepiece"
    raise ModelError(f"{name}: cannot read its tokens as bytes (decoder {' + '.join(filter(None, decoders)) or 'none'})"
                     "; text passes between two tokenizers only for byte-level BPE and SentencePiece ones")


def token_bytes(tokenizer, name: str) -> list[bytes | None]:
    """The bytes each id stands for in text, or None for special tokens (BOS, EOS, end of turn...), which stand for
    no text. Ids beyond the tokenizer (a padded embedding) are not listed."""
    scheme = byte_scheme(tokenizer, name)
    specials = set(tokenizer.all_special_ids)
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    specials |= {index for index, token in added.items() if token.special}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table: list[bytes | None] = []
    decoder = _byte_level_decoder()
    for index, piece in enumerate(pieces):
        if index in specials or piece is None:
            table.append(None)
        elif index in added:  # a normal added token: its content, as written
            table.append(added[index].content.encode())
        elif scheme == "byte_level":
            try:
                table.append(bytes(decoder[character] for character in piece))
            except KeyError:  # not a byte-level piece (a stray entry): it stands for no text we can align
                table.append(None)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace(SENTENCEPIECE_SPACE, " ").encode())
    return table


@dataclass
class Chunk:
    """Student tokens [student_start, student_end) and teacher tokens [teacher_start, teacher_end) that cover the
    same bytes of a completion."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int
    shifted: bool = False  # the teacher's token spells a space before these bytes (SentencePiece's first token)

    @property
    def one_to_one(self) -> bool:
        """One token on each side, predicted from the same text: their distributions can be compared."""
        return (self.student_end - self.student_start == 1 and self.teacher_end - self.teacher_start == 1
                and not self.shifted)


def align(student_pieces: list[bytes], teacher_pieces: list[bytes]) -> list[Chunk]:
    """Cut two tokenizations of the same bytes into chunks at every byte offset where both end a token. An empty
    piece (a token standing for no bytes) joins the chunk it sits in. Raises ValueError when the bytes differ."""
    if b"".join(student_pieces) != b"".join(teacher_pieces):
        raise ValueError("the two tokenizations do not spell the same bytes")
    chunks = []
    student, teacher, student_start, teacher_start = 0, 0, 0, 0
    student_offset = teacher_offset = 0
    while student < len(student_pieces) or teacher < len(teacher_pieces):
        # advance whichever side is behind (both when level), then close a chunk where the two meet
        if teacher >= len(teacher_pieces) or (student < len(student_pieces) and student_offset <= teacher_offset):
            student_offset += len(student_pieces[student])
            student += 1
        else:
            teacher_offset += len(teacher_pieces[teacher])
            teacher += 1
        level = student_offset == teacher_offset
        nothing_empty_next = (student >= len(student_pieces) or student_pieces[student]) and \
            (teacher >= len(teacher_pieces) or teacher_pieces[teacher])
        if level and student > student_start and teacher > teacher_start and nothing_empty_next:
            chunks.append(Chunk(student_start, student, teacher_start, teacher))
            student_start, teacher_start = student, teacher
    if student_start < len(student_pieces) or teacher_start < len(teacher_pieces):
        if chunks:
            last = chunks.pop()
            chunks.append(Chunk(last.student_start, len(student_pieces), last.teacher_start, len(teacher_pieces)))
        else:
            chunks.append(Chunk(0, len(student_pieces), 0, len(teacher_pieces)))
    return chunks


def utf8_runs(data: bytes) -> list[tuple[bytes, bool]]:
    """`data` as alternating runs of text (valid UTF-8: True) and bytes that are no text (False): a completion cut
    inside a character, or sampled bytes no character has."""
    runs, start = [], 0
    while start < len(data):
        try:
            data[start:].decode()
        except UnicodeDecodeError as error:
            if error.start:
                runs.append((data[start:start + error.start], True))
            runs.append((data[start + error.start:start + error.end], False))
            start += error.end
            continue
        runs.append((data[start:], True))
        break
    return runs


def byte_token_ids(table: list[bytes | None]) -> dict[int, int]:
    """byte -> the first id of a tokenizer's byte table (`token_bytes`) that stands for that one byte alone."""
    ids: dict[int, int] = {}
    for index, piece in enumerate(table):
        if piece is not None and len(piece) == 1:
            ids.setdefault(piece[0], index)
    return ids


class VocabularyPair:
    """Student and teacher tokenizers, read once: both byte tables, each student id's group (the teacher id it is
    counted under, -1 for none), and the end-of-turn tokens paired across the two, which stand for no bytes."""

    def __init__(self, student, teacher, student_stop_ids: list[int], teacher_stop_ids: list[int],
                 teacher_name: str, teacher_end_of_turn: int | None = None):
        self.student, self.teacher = student, teacher
        self.student_bytes = token_bytes(student, "the student tokenizer")
        self.teacher_bytes = token_bytes(teacher, teacher_name)
        self.student_stop_ids, self.teacher_stop_ids = list(student_stop_ids), list(teacher_stop_ids)
        teacher_by_bytes: dict[bytes, int] = {}
        for index, piece in enumerate(self.teacher_bytes):
            if piece:  # the first id of several with the same bytes speaks for them
                teacher_by_bytes.setdefault(piece, index)
        self.teacher_by_bytes = teacher_by_bytes
        longest = max(map(len, teacher_by_bytes), default=0)
        group, exact = [], 0
        for piece in self.student_bytes:
            owner = -1
            if piece:
                if piece in teacher_by_bytes:
                    owner, exact = teacher_by_bytes[piece], exact + 1
                else:
                    for length in range(min(len(piece) - 1, longest), 0, -1):
                        owner = teacher_by_bytes.get(piece[:length], -1)
                        if owner >= 0:
                            break
            group.append(owner)
        # Special tokens stand for no bytes: one is the teacher's token of the same name where it has one, and an end
        # of turn on one side is the other's end of turn.
        teacher_vocab = teacher.get_vocab()
        teacher_specials = {index for index, piece in enumerate(self.teacher_bytes) if piece is None}
        names = student.convert_ids_to_tokens(list(range(len(self.student_bytes))))
        for index, piece in enumerate(self.student_bytes):
            if piece is None and teacher_vocab.get(names[index]) in teacher_specials:
                group[index] = teacher_vocab[names[index]]
        # Else the token the teacher's template ends a reply with (`teacher_end_of_turn`: <|end|> where its EOS is
        # </s>), or its first stop token.
        end_of_turn = teacher_end_of_turn if teacher_end_of_turn is not None else \
            (self.teacher_stop_ids[0] if self.teacher_stop_ids else None)
        for student_stop in self.student_stop_ids:
            if 0 <= student_stop < len(group) and group[student_stop] < 0 and end_of_turn is not None:
                group[student_stop] = end_of_turn
        self.student_group = torch.tensor(group, dtype=torch.long)
        self.teacher_byte_ids = byte_token_ids(self.teacher_bytes)
        self.student_byte_ids = byte_token_ids(self.student_bytes)
        self.text_tokens = sum(piece is not None and len(piece) > 0 for piece in self.student_bytes)
        self.exact_share = exact / max(self.text_tokens, 1)

    def teacher_stop_for(self, student_stop: int) -> int:
        """The teacher's end of turn where the student's completion ends with `student_stop`."""
        return int(self.student_group[student_stop])

    def teacher_writable(self, data: bytes) -> int:
        """How many leading bytes of `data` the teacher can be given: text, and bytes outside any character where it
        has a token for each (byte-level BPE, SentencePiece's byte fallback)."""
        offset = 0
        for run, is_text in utf8_runs(data):
            if not is_text:
                for byte in run:
                    if byte not in self.teacher_byte_ids:
                        return offset
                    offset += 1
            else:
                offset += len(run)
        return offset

    def describe(self) -> str:
        return (f"{self.exact_share:.1%} of the student's {self.text_tokens} text tokens have a byte-identical teacher "
                "token")

    def student_pieces(self, ids: list[int]) -> list[bytes]:
        return [self.student_bytes[index] or b"" if index < len(self.student_bytes) else b"" for index in ids]

    def teacher_pieces(self, ids: list[int]) -> list[bytes]:
        return [self.teacher_bytes[index] or b"" if index < len(self.teacher_bytes) else b"" for index in ids]


def tokenize_bytes(tokenizer, byte_ids: dict[int, int], datas: list[bytes]) -> list[tuple[list[int], bool]]:
    """Each of `datas` in `tokenizer`'s tokens, as a cross-tokenizer teacher is given a completion: text run by run
    (one batched call; the text of a special token taken as text), bytes outside any character as the tokenizer's
    byte tokens (`byte_ids`, from `byte_token_ids`). For each, the ids and whether they cover all of it (False: they
    stop before the first byte the tokenizer has no token for)."""
    runs = [utf8_runs(data) for data in datas]
    texts = [run.decode() for row in runs for run, is_text in row if is_text]
    tokenized = iter(tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                     if texts else [])
    results = []
    for row in runs:
        pieces = [next(tokenized) if is_text else [byte_ids.get(byte) for byte in run] for run, is_text in row]
        ids, whole = [], True
        for piece in pieces:
            if None in piece:  # a byte without a token: the ids end before it
                ids.extend(piece[:piece.index(None)])
                whole = False
                break
            ids.extend(piece)
        results.append((ids, whole))
    return results

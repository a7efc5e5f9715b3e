"""Byte-span alignment of two tokenizations (gkd/teachers/alignment.py): the chunks tile the bytes, identical
tokenizers give only 1:1 chunks, mapped ids have identical bytes, and bytes outside any character survive."""

import json

import pytest
import torch
from tokenizer_pairs import random_texts
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gkd.errors import ModelError
from gkd.teachers.alignment import VocabularyPair, align, byte_scheme, token_bytes, utf8_runs


@pytest.fixture(scope="module")
def tokenizers(tokenizer_pair):
    return {kind: AutoTokenizer.from_pretrained(folder) for kind, folder in tokenizer_pair.items()}


@pytest.fixture(scope="module")
def pair(tokenizers):
    student, teacher = tokenizers["packs"], tokenizers["digits"]
    return VocabularyPair(student, teacher, [student.convert_tokens_to_ids("<|im_end|>")],
                          [teacher.convert_tokens_to_ids("<|end|>")], "teacher")


def _pieces(pair, text):
    student = pair.student_pieces(pair.student(text, add_special_tokens=False)["input_ids"])
    teacher = pair.teacher_pieces(pair.teacher(text, add_special_tokens=False)["input_ids"])
    return student, teacher


def test_token_bytes_spell_the_text_on_both_sides(pair):
    for text in random_texts(200, seed=3):
        student, teacher = _pieces(pair, text)
        assert b"".join(student) == text.encode() == b"".join(teacher)


def test_chunks_tile_the_bytes_and_each_covers_the_same_bytes_on_both_sides(pair):
    many_to_many = 0
    for text in random_texts(200, seed=4):
        student, teacher = _pieces(pair, text)
        chunks = align(student, teacher)
        assert chunks[0].student_start == 0 and chunks[0].teacher_start == 0
        assert chunks[-1].student_end == len(student) and chunks[-1].teacher_end == len(teacher)
        for before, after in zip(chunks, chunks[1:]):
            assert before.student_end == after.student_start and before.teacher_end == after.teacher_start
        for chunk in chunks:
            assert chunk.student_end > chunk.student_start and chunk.teacher_end > chunk.teacher_start
            assert b"".join(student[chunk.student_start:chunk.student_end]) == \
                b"".join(teacher[chunk.teacher_start:chunk.teacher_end])
        many_to_many += sum(not chunk.one_to_one for chunk in chunks)
    assert many_to_many > 50  # the pair really differs: digits split against packed numbers, emoji, CJK


def test_identical_tokenizers_give_only_one_to_one_chunks(tokenizers):
    tokenizer = tokenizers["packs"]
    same = VocabularyPair(tokenizer, tokenizer, [], [], "teacher")
    for text in random_texts(200, seed=5):
        pieces = same.student_pieces(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert all(chunk.one_to_one for chunk in align(pieces, pieces))
    groups = same.student_group.tolist()
    assert all(group == index for index, group in enumerate(groups) if same.student_bytes[index])
    assert same.exact_share == 1.0


def test_a_student_token_is_counted_under_a_teacher_token_of_its_bytes_or_its_longest_prefix(pair):
    exact = 0
    for student_id, group in enumerate(pair.student_group.tolist()):
        piece = pair.student_bytes[student_id]
        if group < 0 or piece is None:
            continue
        teacher_piece = pair.teacher_bytes[group]
        assert piece.startswith(teacher_piece)
        if piece == teacher_piece:
            exact += 1
        else:  # no teacher token has the student's bytes, nor a longer prefix of them
            assert piece not in pair.teacher_by_bytes
            assert not any(piece[:n] in pair.teacher_by_bytes for n in range(len(teacher_piece) + 1, len(piece)))
    assert exact > 100
    packed = pair.student.convert_tokens_to_ids("123")
    assert pair.teacher_bytes[int(pair.student_group[packed])] == b"1"  # the teacher writes digits one by one
    end = pair.student.convert_tokens_to_ids("<|im_end|>")
    assert int(pair.student_group[end]) == pair.teacher.convert_tokens_to_ids("<|end|>")


def test_special_tokens_stand_for_no_bytes(pair):
    for special in pair.teacher.all_special_ids:
        assert pair.teacher_bytes[special] is None
    assert pair.student_pieces([pair.student.convert_tokens_to_ids("<|im_end|>")]) == [b""]


def test_bytes_outside_any_character_are_runs_of_their_own():
    snowman = "☃".encode()  # three bytes
    data = b"ab" + snowman[:2] + b"c" + snowman
    assert utf8_runs(data) == [(b"ab", True), (snowman[:2], False), (b"c" + snowman, True)]
    assert utf8_runs(b"") == []
    assert utf8_runs(b"\xff\xfe") == [(b"\xff", False), (b"\xfe", False)]


def test_a_byte_level_teacher_writes_any_bytes(pair):
    assert pair.teacher_writable(b"x" + "☃".encode()[:2]) == 3  # a truncated character: byte tokens


def test_an_empty_piece_joins_its_chunk():
    chunks = align([b"ab", b"", b"c"], [b"a", b"bc"])
    assert [(c.student_start, c.student_end, c.teacher_start, c.teacher_end) for c in chunks] == [(0, 3, 0, 2)]
    with pytest.raises(ValueError):
        align([b"ab"], [b"ac"])


def _sentencepiece_tokenizer(folder, prepend: bool = False, byte_fallback: bool = True):
    """A tiny SentencePiece-style tokenizer (Llama 2, Gemma): '▁' for a space, <0xNN> byte fallback; with `prepend`,
    Llama 2's and Mistral's '▁' written before every text."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    if not byte_fallback:
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    letters = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'<>|"))
    for piece in ("▁", "▁the", "t", "h", "e", "▁cat", *letters):
        vocab.setdefault(piece, len(vocab))
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in (("<unk>", 0), ("<s>", 1), ("</s>", 2))],
        "normalizer": {"type": "Sequence", "normalizers": [
            *([{"type": "Prepend", "prepend": "▁"}] if prepend else []),
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": byte_fallback,
                  "ignore_merges": False, "vocab": vocab, "merges": [["▁", "t"], ["h", "e"], ["▁t", "he"]]},
    }
    vocab.setdefault("▁t", len(vocab))
    vocab.setdefault("he", len(vocab))
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def test_sentencepiece_pieces_and_byte_fallback_read_as_bytes(tmp_path):
    tokenizer = _sentencepiece_tokenizer(tmp_path)
    assert byte_scheme(tokenizer, "sp") == "sentencepiece"
    table = token_bytes(tokenizer, "sp")
    assert table[tokenizer.convert_tokens_to_ids("▁the")] == b" the"
    assert table[tokenizer.convert_tokens_to_ids("<0xE2>")] == b"\xe2"
    assert table[tokenizer.convert_tokens_to_ids("</s>")] is None
    ids = tokenizer(" the ☃", add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == " the ☃".encode()


def test_a_tokenizer_that_cannot_be_read_as_bytes_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ModelError, match="cannot read its tokens as bytes"):
        token_bytes(tokenizer, "word-level")


# ---- a cross-tokenizer teacher given whole completions by `fetch` (gkd/teachers/cross.py) ----

def _fetched_alignment(student_tokenizer, teacher_folder, teacher_tokenizer, texts: list[str]) -> dict:
    """The alignment statistics `fetch` reports for one micro-batch of `texts` (each a completion ending in the
    student's end of turn), against a tiny random teacher on `teacher_tokenizer`."""
    from tiny import make_model

    from gkd.batching import pad_batch
    from gkd.teachers.cross import CrossTokenizerTeacher
    from gkd.teachers.live import LiveTeacher

    model = make_model(teacher_folder, teacher_tokenizer, num_layers=1, seed=0).eval()
    end = student_tokenizer.convert_tokens_to_ids("<|im_end|>")
    pair = VocabularyPair(student_tokenizer, teacher_tokenizer, [end], [teacher_tokenizer.eos_token_id], "teacher")
    samples = [{"prompt_ids": [1], "completion_ids": student_tokenizer(text, add_special_tokens=False)["input_ids"]
                + [end], "teacher_prompt_ids": [teacher_tokenizer.bos_token_id]} for text in texts]
    teacher = CrossTokenizerTeacher(LiveTeacher(model, 3, 0.5, 1.0, 0), pair, 3, 0.5, len(teacher_tokenizer))
    (batch,) = teacher.fetch([pad_batch(samples, 0)], len(teacher_tokenizer))
    assert bool(torch.isfinite(batch["aligned_chunk_log_probs"]).all())
    return teacher.pop_timings()


def test_a_teacher_that_writes_a_space_before_every_text_still_aligns(tokenizers, tmp_path):
    """Llama 2's and Mistral's SentencePiece prepends '▁': its first token spells one space too many."""
    teacher_tokenizer = _sentencepiece_tokenizer(tmp_path, prepend=True)
    assert teacher_tokenizer.convert_ids_to_tokens(teacher_tokenizer("the cat", add_special_tokens=False)
                                                   ["input_ids"])[0].startswith("▁")
    stats = _fetched_alignment(tokenizers["packs"], tmp_path / "model", teacher_tokenizer, ["the cat sat", " a cat"])
    assert stats["aligned_completions"] == 1.0 and stats["aligned_byte_share"] > 0


def test_the_text_of_a_special_token_in_a_completion_is_text_to_the_teacher(tokenizers, tmp_path):
    stats = _fetched_alignment(tokenizers["packs"], tmp_path / "model", tokenizers["digits"],
                               ["write <|end|> then <s> ok 42", "plain"])
    assert stats["aligned_completions"] == 1.0


def test_a_character_the_teacher_cannot_write_ends_the_comparison_there(tokenizers, tmp_path):
    teacher_tokenizer = _sentencepiece_tokenizer(tmp_path, byte_fallback=False)  # an emoji is <unk>
    stats = _fetched_alignment(tokenizers["packs"], tmp_path / "model", teacher_tokenizer,
                               ["the cat 🙂 the cat", "🙂 first"])
    assert stats["aligned_completions"] == 0.5  # the first is compared up to the emoji; the second not at all
    assert 0 < stats["aligned_byte_share"] < 0.5


def test_the_students_end_of_turn_is_the_teachers_as_its_template_ends_a_reply(tokenizers, tokenizer_pair):
    """The "digits" teacher stops on </s> and <|end|>; its template ends a reply with <|end|>, so that is what the
    student's <|im_end|> becomes (the lowest stop id, </s>, was taken before)."""
    from gkd import models
    from gkd.teachers import vocabulary_pair

    student = tokenizers["packs"]
    end = student.convert_tokens_to_ids("<|im_end|>")
    ref = models.ModelRef(str(tokenizer_pair["digits"]), flag="--teacher_model_name_or_path")
    teacher_stops = models.stop_token_ids(tokenizers["digits"], ref)
    assert len(teacher_stops) > 1 and tokenizers["digits"].convert_ids_to_tokens(teacher_stops[0]) != "<|end|>"
    pair = vocabulary_pair(student, [end], ref)
    assert pair.teacher.convert_ids_to_tokens(pair.teacher_stop_for(end)) == "<|end|>"


def test_the_teachers_sequence_stays_within_max_length(tokenizers, tmp_path):
    """Digits one by one: the teacher writes a packed number in more tokens than the student. Its prompt and
    completion together stay within the run's --max_length; the comparison ends at the last chunk that fits, without
    the end of turn."""
    from gkd.batching import pad_batch
    from gkd.teachers.cross import TeacherTokens

    student, teacher = tokenizers["packs"], tokenizers["digits"]
    end = student.convert_tokens_to_ids("<|im_end|>")
    pair = VocabularyPair(student, teacher, [end], [teacher.convert_tokens_to_ids("<|end|>")], "teacher")
    completion = student("12345 67890 12345 67890", add_special_tokens=False)["input_ids"] + [end]
    prompt = [teacher.bos_token_id] * 4
    batch = pad_batch([{"prompt_ids": [1], "completion_ids": completion, "teacher_prompt_ids": prompt}], 0)
    (_, (whole,), unbounded) = TeacherTokens(pair).teacher_batch(batch)
    assert unbounded["completion_ids"].shape[1] > len(completion)  # more teacher tokens than student ones
    max_length = 4 + len(completion) + 2
    (_, (plan,), bounded) = TeacherTokens(pair, max_length).teacher_batch(batch)
    assert bounded["prompt_ids"].shape[1] + bounded["completion_ids"].shape[1] <= max_length
    assert 0 < len(plan.chunks) < len(whole.chunks)
    assert plan.teacher_ids[-1] != pair.teacher_stop_for(end)  # cut text: no end of turn compared
    assert plan.chunks[-1].teacher_end <= len(plan.teacher_ids)


def test_a_window_whose_completions_the_teacher_can_compare_none_of_is_said(tokenizers, tmp_path, caplog):
    """Every completion starts with a character the teacher has no token for: nothing trains, and the run says so
    (once) instead of logging loss 0 in silence."""
    import logging

    teacher_tokenizer = _sentencepiece_tokenizer(tmp_path, byte_fallback=False)  # an emoji is <unk>
    with caplog.at_level(logging.WARNING, logger="gkd"):
        stats = _fetched_alignment(tokenizers["packs"], tmp_path / "model", teacher_tokenizer, ["🙂 first", "🙂 again"])
    assert stats["aligned_completions"] == 0
    assert "none of 2 completions could be given to the teacher" in caplog.text

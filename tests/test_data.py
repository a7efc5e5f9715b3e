"""Reading, validating, normalising and encoding datasets (gkd/data/)."""

import json
from pathlib import Path

import pytest
from tiny import make_tokenizer

from gkd.data import Conversation, encode_conversations, load_conversations
from gkd.errors import ConfigError, DataError, ModelError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
SYSTEM = {"role": "system", "content": "Answer briefly."}
QUESTION = {"role": "user", "content": "What is the capital of France?"}
ANSWER = {"role": "assistant", "content": "The capital of France is Paris."}
GOOD = {"messages": [QUESTION, ANSWER]}
GENERATION_HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def fresh_tokenizer(tmp_path):
    """A tokenizer a test may change (its chat template) without touching the session's."""
    return make_tokenizer(tmp_path / "tokenizer")


def write_jsonl(path: Path, records, blank_lines_after: int | None = None) -> Path:
    lines = [json.dumps(record) for record in records]
    if blank_lines_after is not None:
        lines.insert(blank_lines_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def load_one(tmp_path, record) -> Conversation:
    (conversation,) = load_conversations(write_json(tmp_path / "data.json", [record]))
    return conversation


# ------------------------------------------------------------------------------------------------ record formats


def test_messages_single_turn(tmp_path):
    conversation = load_one(tmp_path, GOOD)
    assert conversation.prompt == [QUESTION]
    assert conversation.completion == ANSWER["content"]
    assert conversation.answers is None
    assert conversation.source == f"{tmp_path / 'data.json'}[0]"


def test_messages_multi_turn_trains_on_the_last_assistant_turn(tmp_path):
    follow_up = {"role": "user", "content": "And of Italy?"}
    reply = {"role": "assistant", "content": "Rome."}
    conversation = load_one(tmp_path, {"messages": [SYSTEM, QUESTION, ANSWER, follow_up, reply]})
    assert conversation.prompt == [SYSTEM, QUESTION, ANSWER, follow_up]
    assert conversation.completion == "Rome."


@pytest.mark.parametrize(
    "messages",
    [
        [SYSTEM, QUESTION],
        [QUESTION, {"role": "assistant", "content": ""}],
        [QUESTION, {"role": "assistant", "content": " \n"}],
    ],
    ids=["ends-with-user", "empty-assistant", "whitespace-assistant"],
)
def test_messages_prompt_only(tmp_path, messages):
    conversation = load_one(tmp_path, {"messages": messages})
    assert conversation.prompt == [m for m in messages if m["role"] != "assistant"]
    assert conversation.completion is None


def test_llm_dojo_record(tmp_path):
    empty = {"prompt": [SYSTEM, QUESTION], "messages": [SYSTEM, QUESTION, {"role": "assistant", "content": ""}]}
    answered = {"prompt": [QUESTION], "messages": [QUESTION, ANSWER]}
    ends_with_user = {"prompt": [QUESTION], "messages": [QUESTION]}
    conversations = load_conversations(write_json(tmp_path / "dojo.json", [empty, answered, ends_with_user]))
    assert [c.prompt for c in conversations] == [[SYSTEM, QUESTION], [QUESTION], [QUESTION]]
    assert [c.completion for c in conversations] == [None, ANSWER["content"], None]


@pytest.mark.parametrize("completion", [[ANSWER], ANSWER["content"]], ids=["message-list", "string"])
def test_prompt_completion_pair(tmp_path, completion):
    conversation = load_one(tmp_path, {"prompt": [SYSTEM, QUESTION], "completion": completion})
    assert conversation.prompt == [SYSTEM, QUESTION]
    assert conversation.completion == ANSWER["content"]


def test_prompt_alone_is_prompt_only(tmp_path):
    conversation = load_one(tmp_path, {"prompt": [QUESTION], "id": 7})
    assert (conversation.prompt, conversation.completion) == ([QUESTION], None)


@pytest.mark.parametrize(
    "answers, expected", [("Paris", ["Paris"]), (["Paris", "Rome"], ["Paris", "Rome"]), (None, None)]
)
def test_answers(tmp_path, answers, expected):
    assert load_one(tmp_path, {**GOOD, "answers": answers}).answers == expected


def test_nulls_count_as_absent_and_extra_message_keys_are_dropped(tmp_path):
    record = {"messages": [{**QUESTION, "name": None}, ANSWER], "prompt": None, "completion": None, "answers": None}
    conversation = load_one(tmp_path, record)
    assert conversation.prompt == [QUESTION]
    assert conversation.completion == ANSWER["content"]


# ---------------------------------------------------------------------------------------------------- containers


def test_jsonl_skips_blank_lines_and_sources_name_lines(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"prompt": [QUESTION]}], blank_lines_after=1)
    conversations = load_conversations(str(path))
    assert [c.source for c in conversations] == [f"{path}:1", f"{path}:3"]
    assert [c.completion for c in conversations] == [ANSWER["content"], None]


def test_json_file_holding_json_lines(tmp_path):
    """`datasets.Dataset.to_json` writes JSON Lines into `.json` files by default."""
    path = write_jsonl(tmp_path / "data.json", [GOOD, GOOD])
    assert [c.source for c in load_conversations(path)] == [f"{path}:1", f"{path}:2"]


def test_folder_concatenates_files_in_name_order(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"prompt": [QUESTION]}])
    write_json(folder / "a.json", [GOOD])
    (folder / "README.md").write_text("not data")
    conversations = load_conversations(folder)
    assert [c.source for c in conversations] == [f"{folder / 'a.json'}[0]", f"{folder / 'b.jsonl'}:1"]


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    records = [{"prompt": [QUESTION], "completion": [ANSWER], "answers": ["Paris"]}, {"prompt": [SYSTEM, QUESTION]}]
    dataset = datasets.Dataset.from_list(records)  # Arrow fills the second record's missing columns with nulls
    dataset.save_to_disk(tmp_path / "dataset")
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(tmp_path / "dict")
    for folder in ("dataset", "dict"):
        conversations = load_conversations(tmp_path / folder)
        assert [c.prompt for c in conversations] == [[QUESTION], [SYSTEM, QUESTION]]
        assert [c.completion for c in conversations] == [ANSWER["content"], None]
        assert [c.answers for c in conversations] == [["Paris"], None]
        assert conversations[1].source == f"{tmp_path / folder}[1]"
    datasets.DatasetDict({"test": dataset}).save_to_disk(tmp_path / "no-train")
    with pytest.raises(DataError, match=r"no-train: expected a 'train' split in this DatasetDict, found \['test'\]"):
        load_conversations(tmp_path / "no-train")


def test_example_datasets():
    chat = load_conversations(EXAMPLES / "chat.jsonl")
    assert len(chat) == 10
    assert chat[0] == Conversation(
        prompt=[{"role": "user", "content": "What is the capital of France?"}],
        completion="The capital of France is Paris.",
        answers=["Paris"],
        source=f"{EXAMPLES / 'chat.jsonl'}:1",
    )
    assert any(c.prompt[0]["role"] == "system" for c in chat)
    assert any(sum(m["role"] == "user" for m in c.prompt) > 1 for c in chat)
    dojo = load_conversations(EXAMPLES / "llm_dojo.json")
    assert 6 <= len(dojo) <= 8
    assert all(c.completion is None and c.prompt[-1]["role"] == "user" and c.answers for c in dojo)


# ------------------------------------------------------------------------------------------------ invalid records

EMPTY_LIST = 'expected a non-empty list of messages [{"role": ..., "content": ...}, ...], got an empty list'
BAD_RECORDS = [
    ("not-object", ["a", "list"], None, "expected a JSON object, got a list"),
    ("other-format", {"text": "hi"}, None, "expected a 'messages' list, or a 'prompt' list (prompt/completion or "
     "LLM-Dojo) like the file's first record"),
    ("messages-not-list", {"messages": "hi"}, "messages", "expected a non-empty list of messages"),
    ("messages-empty", {"messages": []}, "messages", EMPTY_LIST),
    ("prompt-not-list", {"prompt": "hi", "completion": "yo"}, "prompt", "expected a non-empty list of messages"),
    ("prompt-empty", {"prompt": [], "completion": "yo"}, "prompt", EMPTY_LIST),
    ("message-not-object", {"messages": [QUESTION, "yo"]}, "messages[1]", "expected a message object"),
    ("role-missing", {"messages": [QUESTION, {"content": "yo"}]}, "messages[1].role",
     "expected one of system, user, assistant, it is missing"),
    ("role-unknown", {"messages": [QUESTION, {"role": "bot", "content": "yo"}]}, "messages[1].role",
     "expected one of system, user, assistant, got 'bot'"),
    ("content-not-string", {"messages": [QUESTION, {"role": "assistant", "content": 7}]}, "messages[1].content",
     "expected a string, got a number"),
    ("content-null", {"messages": [QUESTION, {"role": "assistant", "content": None}]}, "messages[1].content",
     "expected a string, got null"),
    ("content-image-part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages[0].content[0]", "expected a text part {\"type\": \"text\", \"text\": ...}, got 'image_url'"),
    ("content-missing", {"prompt": [{"role": "user"}]}, "prompt[0].content",
     "expected a string or a list of text parts, it is missing"),
    ("no-user-turn", {"messages": [SYSTEM, ANSWER]}, "messages", "expected at least one user turn"),
    ("prompt-no-user-turn", {"prompt": [SYSTEM], "completion": "yo"}, "prompt", "expected at least one user turn"),
    ("prompt-ends-with-assistant", {"messages": [QUESTION, ANSWER, ANSWER]}, "messages[1].role",
     "expected the prompt to end with a user turn, got 'assistant'"),
    ("dojo-messages-invalid", {"prompt": [QUESTION], "messages": [{"role": "user", "content": 3}]},
     "messages[0].content", "expected a string, got a number"),
    ("completion-wrong-role", {"prompt": [QUESTION], "completion": [QUESTION]}, "completion[0].role",
     "expected 'assistant', got 'user'"),
    ("completion-two-messages", {"prompt": [QUESTION], "completion": [ANSWER, ANSWER]}, "completion",
     "expected a string or a list with one assistant message"),
    ("answers-not-list", {**GOOD, "answers": 4}, "answers", "expected a string or a list of strings, got a number"),
    ("answers-not-strings", {**GOOD, "answers": ["Paris", 4]}, "answers[1]", "expected a string, got a number"),
]


def check_message(error: DataError, *parts: str) -> None:
    for part in parts:
        assert part in str(error), f"{part!r} not in {str(error)!r}"


@pytest.mark.parametrize("record, field, expected", [case[1:] for case in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_invalid_record_in_json(tmp_path, record, field, expected):
    path = write_json(tmp_path / "bad.json", [GOOD, record])
    with pytest.raises(DataError) as raised:
        load_conversations(path)
    where = f"{path}: record 1: " + (f"field '{field}': " if field else "")
    check_message(raised.value, where + expected)


@pytest.mark.parametrize(
    "record, field, expected", [case[1:] for case in BAD_RECORDS[:4]], ids=[c[0] for c in BAD_RECORDS[:4]]
)
def test_invalid_record_in_jsonl_names_index_and_line(tmp_path, record, field, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, record], blank_lines_after=1)
    with pytest.raises(DataError) as raised:
        load_conversations(path)
    check_message(raised.value, f"{path}: record 1: ", expected, "(line 3)")
    if field:
        check_message(raised.value, f"field '{field}'")


def test_whole_dataset_is_validated_up_front(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [GOOD] * 3)
    write_jsonl(folder / "b.jsonl", [GOOD, GOOD, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"b\.jsonl: record 2: field 'messages\[0\]\.role'"):
        load_conversations(folder)


# --------------------------------------------------------------------------------------------- invalid containers


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file or folder"):
        load_conversations(tmp_path / "nope.jsonl")


def test_truncated_json_reports_line(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps([GOOD, GOOD], indent=2)[:-30])
    with pytest.raises(DataError) as raised:
        load_conversations(path)
    check_message(raised.value, f"{path}: invalid JSON at line ")


def test_truncated_jsonl_reports_record_and_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD)[:-5] + "\n")
    with pytest.raises(DataError) as raised:
        load_conversations(path)
    check_message(raised.value, f"{path}: record 1: invalid JSON at column", "(line 3)")


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.jsonl", "", "empty file: no records"),
        ("blank.jsonl", "\n  \n", "empty file: no records"),
        ("empty.json", "[]", "empty list: no records"),
        ("object.json", '{"data": [1]}', "expected a list of records"),
        ("latin1.jsonl", b"\xff\xfe{", "cannot read the file as UTF-8 text"),
        ("data.csv", "a,b", "expected a .json, .jsonl or .parquet file"),
    ],
)
def test_bad_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=f"{name}: {expected}"):
        load_conversations(path)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no data here")
    with pytest.raises(DataError, match="empty: empty folder: expected .json, .jsonl or .parquet files"):
        load_conversations(tmp_path / "empty")


def test_broken_saved_dataset(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset_info.json").write_text("{}")
    with pytest.raises(DataError, match="broken: cannot load the dataset saved with save_to_disk"):
        load_conversations(tmp_path / "broken")


def test_empty_file_inside_a_folder_is_named(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD])
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataError, match=r"b\.jsonl: empty file"):
        load_conversations(tmp_path)


# ------------------------------------------------------------------------------------------------------ encoding

IM_END = "<|im_end|>"


def encode(conversations, tokenizer, max_length=256, max_new_tokens=32, stop_token_ids=None):
    stops = [tokenizer.eos_token_id] if stop_token_ids is None else stop_token_ids
    return encode_conversations(conversations, tokenizer, max_length, max_new_tokens, stops)


def conversation(prompt, completion=ANSWER["content"]) -> Conversation:
    return Conversation(prompt=prompt, completion=completion, answers=None, source="test.jsonl:1")


def test_encode_prompt_and_completion(tokenizer):
    items, stats = encode([conversation([SYSTEM, QUESTION])], tokenizer)
    (item,) = items
    assert set(item) == {"prompt_ids", "completion_ids"}
    prompt = tokenizer.decode(item["prompt_ids"])
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert prompt.endswith(QUESTION["content"] + IM_END + "\n" + GENERATION_HEADER)
    # eos == pad == <|im_end|>: exactly one, in last position; the template's "\n" after it is not trained on
    completion_ids = item["completion_ids"]
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in completion_ids[:-1]
    assert tokenizer.decode(completion_ids) == ANSWER["content"] + IM_END
    full = tokenizer.apply_chat_template([SYSTEM, QUESTION, ANSWER], tokenize=False)
    assert item["prompt_ids"] + completion_ids + tokenizer("\n", add_special_tokens=False)["input_ids"] == tokenizer(
        full, add_special_tokens=False
    )["input_ids"]
    assert (stats.num_records, stats.num_prompt_only, stats.num_truncated) == (1, 0, 0)


def test_encode_example_dataset(tokenizer):
    conversations = load_conversations(EXAMPLES / "chat.jsonl") + load_conversations(EXAMPLES / "llm_dojo.json")
    items, stats = encode(conversations, tokenizer)
    assert stats.num_records == len(items) == 17
    assert stats.num_prompt_only == 8
    for item, conversation_ in zip(items, conversations):
        assert tokenizer.decode(item["prompt_ids"]).endswith(GENERATION_HEADER)
        if conversation_.completion is None:
            assert item["completion_ids"] == []
        else:
            assert tokenizer.decode(item["completion_ids"]) == conversation_.completion + IM_END


def test_encode_cuts_after_the_first_stop_token(tokenizer):
    other_stop = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    (item,), _ = encode(
        [conversation([QUESTION], "Paris.<|endoftext|> and then more")],
        tokenizer,
        stop_token_ids=[tokenizer.eos_token_id, other_stop],
    )
    assert tokenizer.decode(item["completion_ids"]) == "Paris.<|endoftext|>"


def test_encode_prompt_only(tokenizer):
    items, stats = encode([conversation([QUESTION], None)], tokenizer)
    assert items[0]["completion_ids"] == []
    assert tokenizer.decode(items[0]["prompt_ids"]).endswith(GENERATION_HEADER)
    assert stats.num_prompt_only == 1


def test_encode_without_chat_template(fresh_tokenizer):
    fresh_tokenizer.chat_template = None
    with pytest.raises(ModelError, match="has no chat template"):
        encode([conversation([QUESTION])], fresh_tokenizer)


@pytest.mark.parametrize("max_length, max_new_tokens", [(32, 32), (32, 40), (32, 0)])
def test_encode_rejects_budgets_without_room(tokenizer, max_length, max_new_tokens):
    with pytest.raises(ConfigError, match="must exceed max_new_tokens"):
        encode([conversation([QUESTION])], tokenizer, max_length, max_new_tokens)


def test_encode_template_rejection_names_the_record(fresh_tokenizer):
    fresh_tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(DataError, match="test.jsonl:1: the student's chat template rejected .* must alternate"):
        encode([conversation([QUESTION])], fresh_tokenizer)


def test_encode_when_prompt_tokens_are_not_a_prefix(fresh_tokenizer):
    """The generation header's last token merges with the reply: the reply's text is tokenized on its own."""
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
    )
    (item,), _ = encode([conversation([QUESTION], "the")], fresh_tokenizer)
    assert item["completion_ids"] == fresh_tokenizer("the<|im_end|>", add_special_tokens=False)["input_ids"]


def test_encode_when_prompt_text_is_not_a_prefix(fresh_tokenizer):
    """A template whose generation header differs from an answered turn's: the bare reply, then a stop token."""
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
    )
    (item,), _ = encode([conversation([QUESTION], "Paris.")], fresh_tokenizer)
    eos = fresh_tokenizer.eos_token_id
    assert item["completion_ids"] == fresh_tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [eos]


# ---------------------------------------------------------------------------------------------------- truncation


def long_chat(turns: int) -> list[dict]:
    messages = [SYSTEM]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"Question {i}: name a colour and an animal."},
            {"role": "assistant", "content": f"Answer {i}: red and cat."},
        ]
    return messages + [{"role": "user", "content": "Final question: what is two plus two?"}]


def test_truncation_drops_oldest_turns_and_keeps_system_and_last_user(tokenizer):
    prompt = long_chat(4)
    full_length = len(encode([conversation(prompt)], tokenizer, max_length=1024)[0][0]["prompt_ids"])
    max_new_tokens = 16
    max_length = full_length + max_new_tokens - 20  # forces dropping about one exchange
    items, stats = encode([conversation(prompt), conversation([QUESTION])], tokenizer, max_length, max_new_tokens)
    cut, untouched = items
    text = tokenizer.decode(cut["prompt_ids"])
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nQuestion 1")
    assert "Question 0" not in text and "Answer 0" not in text
    assert text.endswith("Final question: what is two plus two?<|im_end|>\n" + GENERATION_HEADER)
    assert len(cut["prompt_ids"]) <= max_length - max_new_tokens
    assert len(cut["prompt_ids"]) + len(cut["completion_ids"]) <= max_length
    assert tokenizer.decode(cut["completion_ids"]) == ANSWER["content"] + IM_END
    assert stats.num_truncated == 1
    assert untouched == encode([conversation([QUESTION])], tokenizer)[0][0]


def test_truncation_shortens_the_final_user_turn_from_its_start(tokenizer):
    document = " ".join(f"word{i}" for i in range(200))
    prompt = [SYSTEM, {"role": "user", "content": "old"}, ANSWER, {"role": "user", "content": f"{document} END?"}]
    (item,), stats = encode([conversation(prompt)], tokenizer, max_length=96, max_new_tokens=32)
    text = tokenizer.decode(item["prompt_ids"])
    assert 64 - 8 <= len(item["prompt_ids"]) <= 64  # shortened to about the budget, not far below it
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert "old" not in text and "word0 " not in text
    assert text.endswith("word199 END?<|im_end|>\n" + GENERATION_HEADER)
    assert stats.num_truncated == 1


@pytest.mark.parametrize("budget", [41, 47, 55, 64, 77, 90])
def test_truncation_keeps_the_longest_tail_of_the_final_turn_that_fits(tokenizer, budget):
    """Against a search over every tail length: the kept tail is the longest whose rendered prompt fits."""
    document = " ".join(f"w{i}x" * (i % 3 + 1) for i in range(120))
    (item,), _ = encode([conversation([SYSTEM, {"role": "user", "content": document}])], tokenizer,
                        max_length=budget + 8, max_new_tokens=8)
    content_ids = tokenizer(document, add_special_tokens=False)["input_ids"]

    def prompt_with_last(n):
        content = tokenizer.decode(content_ids[len(content_ids) - n:]) if n else ""
        text = tokenizer.apply_chat_template([SYSTEM, {"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    longest = max(n for n in range(len(content_ids) + 1) if len(prompt_with_last(n)) <= budget)
    assert item["prompt_ids"] == prompt_with_last(longest)


def test_truncation_left_cuts_when_the_system_turn_alone_is_too_long(tokenizer):
    system = {"role": "system", "content": "Be brief. " * 60}
    (item,), stats = encode([conversation([system, QUESTION])], tokenizer, max_length=48, max_new_tokens=16)
    assert len(item["prompt_ids"]) == 32
    assert tokenizer.decode(item["prompt_ids"]).endswith(QUESTION["content"] + IM_END + "\n" + GENERATION_HEADER)
    assert len(item["prompt_ids"]) + len(item["completion_ids"]) <= 48
    assert stats.num_truncated == 1


def test_truncation_shortens_the_completion_to_the_room_left(tokenizer):
    long_answer = "The capital of France is Paris. " * 30
    (item,), stats = encode([conversation([QUESTION], long_answer)], tokenizer, max_length=80, max_new_tokens=8)
    assert len(item["prompt_ids"]) + len(item["completion_ids"]) == 80
    assert tokenizer.eos_token_id not in item["completion_ids"]  # cut before its end: no stop token to learn
    assert stats.num_truncated == 1


# ---------------------------------------------------------------------------------------- more formats and sources


def test_alpaca_records_become_torchtunes_prompt(tmp_path):
    with_input, without = load_conversations(write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "red"},
    ]))
    assert with_input.prompt == [{"role": "user", "content": (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nTranslate to French.\n\n### Input:\n"
        "good morning\n\n### Response:\n")}]
    assert with_input.completion == "bonjour"
    assert "### Input" not in without.prompt[0]["content"] and without.completion == "red"


def test_sharegpt_records_map_their_roles(tmp_path):
    (conversation,) = load_conversations(write_jsonl(tmp_path / "share.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
        {"from": "user", "value": "and?"}, {"from": "assistant", "value": "bye"}]}]))
    assert [m["role"] for m in conversation.prompt] == ["system", "user", "assistant", "user"]
    assert conversation.completion == "bye"


def test_openai_content_parts_are_joined(tmp_path):
    (conversation,) = load_conversations(write_jsonl(tmp_path / "parts.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}]))
    assert conversation.prompt[0]["content"] == "What is 2 + 2?" and conversation.completion == "4"


@pytest.mark.parametrize(
    "records, field, expected",
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}], "instruction", "expected a string"),
        ([{"instruction": "a", "output": "b"}, {"messages": [QUESTION]}], None, "Alpaca's 'instruction'"),
        ([{"conversations": [{"from": "human", "value": "x"}]}, {"conversations": [{"from": "bot", "value": "y"}]}],
         "conversations[0].from", "expected one of system, human"),
        ([{"conversations": [{"from": "human", "value": "x"}]}, {"conversations": [{"from": "human"}]}],
         "conversations[0].value", "it is missing"),
        ([{"text": "a"}, {"text": ""}], "text", "expected some text"),
        ([{"text": "a"}, {"text": ["a"]}], "text", "expected a string, got a list"),
    ],
)
def test_a_record_must_follow_its_files_format(tmp_path, records, field, expected):
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    with pytest.raises(DataError) as raised:
        load_conversations(path)
    check_message(raised.value, f"{path}: record 1: ", expected, *([f"field '{field}'"] if field else []))


def test_plain_text_is_split_into_windows_that_overlap_by_one_token(tokenizer):
    text = "the quick brown fox jumps over the lazy dog. " * 20
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    records = [Conversation(prompt=[], completion=None, answers=None, source="t[0]", text=text)]
    samples, stats = encode_conversations(records, tokenizer, max_length=32, max_new_tokens=8, stop_token_ids=[2])
    assert stats.num_text == len(samples) == -(-(len(ids) - 1) // 31) and stats.num_prompt_only == 0
    trained = [token for sample in samples for token in sample["completion_ids"]]
    assert trained == ids[1:]  # every token but the first is a target exactly once, in order
    assert all(len(s["prompt_ids"]) == 1 and len(s["prompt_ids"]) + len(s["completion_ids"]) <= 32 for s in samples)


def test_parquet_files_and_folders_of_mixed_suffixes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as parquet

    folder = tmp_path / "mixed"
    folder.mkdir()
    parquet.write_table(pa.Table.from_pylist([GOOD, GOOD]), folder / "a.parquet")
    write_jsonl(folder / "b.JSONL", [{"instruction": "x", "output": "y"}])
    conversations = load_conversations(folder)
    assert len(conversations) == 3 and conversations[0].source == f"{folder / 'a.parquet'}[0]"
    assert conversations[2].source == f"{folder / 'b.JSONL'}:1"


def test_the_training_pipeline_encodes_once_and_reuses_the_cache(tmp_path, tokenizer):
    from gkd.data import DataSource, EncodeOptions, prepare_dataset

    data = tmp_path / "train"
    data.mkdir()
    write_jsonl(data / "chat.jsonl", [GOOD, {"messages": [QUESTION]}])
    write_jsonl(data / "text.jsonl", [{"text": "a plain text record"}])  # each file has its own format
    options = EncodeOptions(max_length=64, max_new_tokens=16, stop_token_ids=(tokenizer.eos_token_id,))
    first, stats, key = prepare_dataset(DataSource(str(data)), tokenizer, options, cache_root=tmp_path / "cache")
    assert (stats.num_records, stats.num_samples, stats.num_prompt_only, stats.num_text) == (3, 3, 1, 1)
    assert first.column_names == ["prompt_ids", "completion_ids", "is_text", "truncated", "stop_text", "teacher", "source",
                                  "index"]
    assert first["index"] == [0, 1, 2]
    again, _, same_key = prepare_dataset(DataSource(str(data)), tokenizer, options, cache_root=tmp_path / "cache")
    assert same_key == key and again["prompt_ids"] == first["prompt_ids"]
    write_jsonl(data / "text.jsonl", [{"text": "an edited record"}, {"text": "and another"}])  # another key
    edited, stats, edited_key = prepare_dataset(DataSource(str(data)), tokenizer, options, cache_root=tmp_path / "cache")
    assert edited_key != key and stats.num_records == 4


def test_encoding_with_several_processes_reports_errors_with_their_record(tmp_path, fresh_tokenizer):
    from gkd.data import DataSource, EncodeOptions, prepare_dataset

    fresh_tokenizer.chat_template = "{{ raise_exception('no system turns') if messages[0]['role'] == 'system' }}x"
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 5 + [{"messages": [SYSTEM, QUESTION]}])
    options = EncodeOptions(max_length=64, max_new_tokens=16, stop_token_ids=(fresh_tokenizer.eos_token_id,))
    with pytest.raises(DataError, match=r"train\.jsonl:6: the student's chat template rejected"):
        prepare_dataset(DataSource(str(data)), fresh_tokenizer, options, num_proc=2, batch_size=2,
                        cache_root=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-encoded left to be reused


def test_sub_folders_are_read_and_a_byte_order_mark_is_not_data(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    (folder / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")  # UTF-8 with a BOM
    write_json(folder / "sub" / "b.json", [GOOD, GOOD])
    (folder / "sub" / "c.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    write_jsonl(folder / ".hidden" / "d.jsonl", [GOOD])
    conversations = load_conversations(folder)
    assert [c.source for c in conversations] == [f"{folder / 'a.jsonl'}:1", f"{folder / 'sub' / 'b.json'}[0]",
                                                 f"{folder / 'sub' / 'b.json'}[1]", f"{folder / 'sub' / 'c.json'}[0]"]


def test_plain_text_too_short_for_one_window_is_one_line_naming_the_file(tmp_path, tiny_models, capfd):
    """Texts of one token give no window: one error line before any model loads (was an IndexError deep inside
    `datasets.load_from_disk` of the empty encoding, which was also cached and raised again on every rerun)."""
    import pyarrow as pa
    import pyarrow.parquet as parquet
    from helpers import train_args

    from gkd import train
    from gkd.cli import run

    data = tmp_path / "short.parquet"
    parquet.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), data)
    argv = train_args(*tiny_models, data, tmp_path / "out", "--lmbda", "0")[1:]
    for _ in range(2):  # a rerun says the same: nothing empty was cached
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run(lambda: train.main(argv), process_exit=False)
        stderr = capfd.readouterr().err
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert f"{data}: no record is long enough to train on" in lines[0] and "fewer than 2 tokens" in lines[0]


def corrupted_parquet(tmp_path, damage) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as parquet

    path = tmp_path / "broken.parquet"
    parquet.write_table(pa.Table.from_pylist([{"text": f"record number {i}"} for i in range(4000)]), path,
                        row_group_size=1000)
    data = bytearray(path.read_bytes())
    path.write_bytes(damage(data))
    return path


def flip(start, stop):
    def damage(data):
        for i in range(start if start >= 0 else len(data) + start, stop if stop > 0 else len(data) + stop):
            data[i] ^= 0x5A
        return bytes(data)
    return damage


@pytest.mark.parametrize("damage, expected", [
    (flip(4, 30), "corrupted Parquet data: records from 0 on cannot be read: Couldn't deserialize thrift"),
    (lambda data: bytes(data[: len(data) // 2]), "cannot read it as Parquet: Parquet magic bytes not found"),
    (lambda data: bytes(data[:-20]), "cannot read it as Parquet"),
], ids=["page-header", "truncated-half", "truncated-footer"])
def test_corrupted_or_truncated_parquet_is_one_line_naming_the_file(tmp_path, damage, expected):
    path = corrupted_parquet(tmp_path, damage)
    with pytest.raises(DataError) as raised:
        load_conversations(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: {expected}") and "\n" not in message, message


def test_corrupted_parquet_page_after_good_ones_names_where_reading_stopped(tmp_path):
    """A damaged data page further in: the records before it were read, the error says from where it failed."""
    import pyarrow.parquet as parquet

    path = corrupted_parquet(tmp_path, lambda data: bytes(data))
    metadata = parquet.ParquetFile(path).metadata
    third = metadata.row_group(2).column(0)
    start = third.dictionary_page_offset or third.data_page_offset
    data = bytearray(path.read_bytes())
    path.write_bytes(flip(start + 40, start + 120)(data))
    with pytest.raises(DataError) as raised:
        load_conversations(path)
    assert str(raised.value).startswith(f"{path}: corrupted Parquet data: records from 2000 on cannot be read: ")
    assert "\n" not in str(raised.value)


def test_jsonl_that_is_not_utf8_after_good_lines_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl: cannot read the file as UTF-8 text: .*\(line 2\)"):
        load_conversations(path)


# ------------------------------------------------------------------------------------------ what the data means for a run


def run_args(tmp_path, teacher_kind, *options):
    """The parsed (script, training) options of a run on `tmp_path/data.jsonl` with a live teacher or a cache."""
    from gkd.train import parse_args

    teacher = ["--teacher_logits_path", tmp_path] if teacher_kind == "cache" else ["--teacher_model_name_or_path", "t"]
    argv = ["--model_name_or_path", "s", *teacher, "--dataset_name", tmp_path / "data.jsonl", "--output_dir",
            tmp_path / "out", "--report_to", "none", "--max_length", "64", "--max_new_tokens", "8", *options]
    script_args, _, training_args = parse_args([str(arg) for arg in argv])
    return script_args, training_args


@pytest.mark.parametrize("teacher_kind,options,said,unsaid", [
    ("live", ["--lmbda", "0"], ["1 of 3 samples are prompt-only", "they never train (--lmbda 0", "add --seq_kd"],
     ["on-policy steps (lmbda"]),
    ("live", ["--lmbda", "0.5"], ["they train only on on-policy steps (--lmbda 0.5)", "add --seq_kd",
                                  "on the off-policy steps"], []),
    ("cache", ["--lmbda", "0"], ["they never train (--lmbda 0", "a --teacher_logits_path cache cannot answer them"],
     ["add --seq_kd"]),
])
def test_the_prompt_only_warning_is_true_for_the_teacher_and_lmbda(tmp_path, tokenizer, caplog, teacher_kind,
                                                                   options, said, unsaid):
    """It said "they train only on on-policy steps (lmbda=0.0)" where they never train, and advised --seq_kd with a
    cache, which refuses it."""
    from gkd.data import training_datasets

    write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, {"messages": [QUESTION]}])
    script_args, training_args = run_args(tmp_path, teacher_kind, *options)
    with caplog.at_level("WARNING", logger="gkd.data.pipeline"):
        training_datasets(script_args, training_args, tokenizer, [tokenizer.eos_token_id], teacher_kind)
    (warning,) = [record.getMessage() for record in caplog.records if "prompt-only" in record.getMessage()]
    for text in said:
        assert text in warning, (text, warning)
    for text in unsaid:
        assert text not in warning, (text, warning)


def test_only_prompt_only_records_with_a_cache_are_refused_without_impossible_advice(tmp_path, tokenizer):
    from gkd.data import training_datasets

    write_jsonl(tmp_path / "data.jsonl", [{"messages": [QUESTION]}] * 2)
    script_args, training_args = run_args(tmp_path, "cache", "--lmbda", "0")
    with pytest.raises(ConfigError) as raised:
        training_datasets(script_args, training_args, tokenizer, [tokenizer.eos_token_id], "cache")
    message = str(raised.value)
    assert "every record is prompt-only" in message and "cache cannot answer them" in message, message
    assert "--lmbda 1" not in message and "add --seq_kd" not in message, message


@pytest.mark.parametrize("options,named", [
    (["--lmbda", "0", "--lmbda_schedule", "step", "--lmbda_start", "1", "--lmbda_warmup_steps", "2"],
     ["the student on on-policy steps", "--lmbda_start 1"]),
    (["--lmbda", "0", "--seq_kd", "true"], ["the teacher on --seq_kd steps"]),
])
def test_plain_text_sampled_on_any_step_needs_text_prompt_tokens(tmp_path, tokenizer, options, named):
    """On-policy steps from a schedule's start (at --lmbda 0) sampled from one-token prompts: the check read --lmbda
    alone."""
    from gkd.data import training_datasets

    write_jsonl(tmp_path / "data.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * 3}])
    script_args, training_args = run_args(tmp_path, "live", *options)
    with pytest.raises(ConfigError) as raised:
        training_datasets(script_args, training_args, tokenizer, [tokenizer.eos_token_id], "live")
    message = str(raised.value)
    for text in ["plain-text records", "--text_prompt_tokens", *named]:
        assert text in message, (text, message)
    script_args, training_args = run_args(tmp_path, "live", *options, "--text_prompt_tokens", "4")
    training_datasets(script_args, training_args, tokenizer, [tokenizer.eos_token_id], "live")


# ---------------------------------------------------------------- several teachers: each record routed to its own


def test_records_name_their_teacher_in_every_format_and_are_routed_by_index(tmp_path, tokenizer):
    import pyarrow as pa
    from pyarrow import parquet

    from gkd.data import DataSource, EncodeOptions, prepare_dataset
    from gkd.data.pipeline import route_teachers

    data = tmp_path / "train"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{**GOOD, "teacher": "math"}, GOOD])
    write_jsonl(data / "b.jsonl", [{"instruction": "x", "output": "y", "teacher": "code"}])
    parquet.write_table(pa.Table.from_pylist([{**GOOD, "teacher": "chat"}, {**GOOD, "teacher": None}]),
                        data / "c.parquet")
    options = EncodeOptions(max_length=64, max_new_tokens=16, stop_token_ids=(tokenizer.eos_token_id,))
    encoded, _, _ = prepare_dataset(DataSource(str(data)), tokenizer, options, cache_root=tmp_path / "cache")
    assert encoded["teacher"] == ["math", None, "code", "chat", None]
    routed = route_teachers(encoded, ["chat", "math", "code"], "chat", "train")
    assert routed["teacher_index"] == [1, 0, 2, 0, 0]
    assert route_teachers(encoded, None, None, "train").column_names == encoded.column_names  # one teacher: ignored
    with pytest.raises(DataError) as unknown:
        route_teachers(encoded, ["chat", "math"], "chat", "train")
    check_message(unknown.value, "b.jsonl:1", "field 'teacher'", "'code'", "known: chat, math")
    with pytest.raises(DataError) as missing:
        route_teachers(encoded, ["chat", "math", "code"], None, "train")
    check_message(missing.value, "a.jsonl:2", "names no teacher", "--default_teacher")
    assert route_teachers(encoded.select([1, 4]), ["only"], None, "train")["teacher_index"] == [0, 0]


def test_a_teacher_field_must_be_a_name(tmp_path):
    with pytest.raises(DataError, match="field 'teacher': expected the name of a --teacher, got a number"):
        load_one(tmp_path, {**GOOD, "teacher": 3})


def test_a_reply_that_writes_the_end_of_turn_token_is_counted_not_silently_cut(tokenizer):
    """The template renders "<|im_end|>" in a reply as the token itself: the completion ends there. The count says so
    (the training run warns, naming the first such record)."""
    stop = tokenizer.convert_tokens_to_ids(IM_END)
    written = conversation([QUESTION], f"Here: {IM_END} and the rest.")
    (cut, plain), stats = encode([written, conversation([QUESTION])], tokenizer, stop_token_ids=[stop])
    assert stats.num_stop_text == 1 and "1 replies cut where their text writes an end-of-turn token" in \
        stats.describe("d", 256)
    assert tokenizer.decode(cut["completion_ids"]) == f"Here: {IM_END}"
    assert tokenizer.decode(plain["completion_ids"]).endswith(IM_END)

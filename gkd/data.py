"""Read chat datasets, validate every record, normalise them to `Conversation`s, and encode them for the student.

Accepted containers: a `.json` list of records, a `.jsonl` file (one record per line), a folder of such files (sorted
by name, concatenated), or a folder written by `datasets.Dataset.save_to_disk` (a `DatasetDict` uses its "train" split).
Accepted records:

1. `{"messages": [...]}`: the last assistant turn is the completion, the turns before it are the prompt. A conversation
   ending with a user turn, or with an empty assistant turn, is prompt-only.
2. LLM-Dojo's GKD record `{"prompt": [...], "messages": [..., {"role": "assistant", "content": ""}]}`: `prompt` is the
   context; the final assistant turn of `messages` is the completion when it is not empty.
3. TRL's conversational pair `{"prompt": [...], "completion": [{"role": "assistant", "content": "..."}]}` (the
   completion may also be a plain string); `{"prompt": [...]}` alone is prompt-only.

Every record may carry `answers` (a string or a list of strings) for evaluation. Fields set to null count as absent,
because Arrow fills the columns a record lacks with nulls. Unknown fields are ignored.

The whole dataset is validated before anything is returned, so the trainer can fail in seconds, before loading models.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from jinja2 import TemplateError

from gkd.errors import ConfigError, DataError, ModelError

ROLES = ("system", "user", "assistant")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")  # written by `save_to_disk`


@dataclass
class Conversation:
    """One record in the internal shape, whatever format it came in."""

    prompt: list[dict]  # [{"role", "content"}, ...]: system/user/assistant turns, ending with a user turn
    completion: str | None  # the assistant reply to train on (teacher-forced steps); None for prompt-only records
    answers: list[str] | None  # reference answers for evaluation, when the record has them
    source: str  # where the record came from: "file.jsonl:LINE" for JSON Lines, "file.json[INDEX]" otherwise


@dataclass
class EncodeStats:
    num_records: int
    num_prompt_only: int
    num_truncated: int  # samples cut in any way: prompt turns dropped or shortened, completion shortened
    max_prompt_tokens: int
    mean_completion_tokens: float  # over the records that have a completion; 0.0 when none has


# ---------------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Location:
    """A record's place in its file, to build `DataError`s and `Conversation.source`."""

    file: Path
    index: int  # 0-based record index within the file, as the file orders them
    line: int | None = None  # 1-based line number, JSON Lines only

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}" if self.line else f"{self.file}[{self.index}]"

    def error(self, field: str | None, message: str) -> DataError:
        if self.line:
            message = f"{message} (line {self.line})"
        return DataError(self.file, message, record=self.index, field=field)


def load_conversations(path: str | Path) -> list[Conversation]:
    """Read, validate and normalise a whole dataset; raise `DataError` at the first problem."""
    path = Path(path).expanduser()
    conversations = [_normalise(record, where) for where, record in _read_records(path)]
    if not conversations:
        raise DataError(path, "no records found")
    return conversations


def _read_records(path: Path) -> Iterator[tuple[_Location, Any]]:
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if path.is_dir():
        if any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
            yield from _read_saved_dataset(path)
            return
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise DataError(path, "empty folder: expected .json or .jsonl files, or a folder written by save_to_disk")
        for file in files:
            yield from _read_file(file)
    elif path.suffix.lower() in (".json", ".jsonl"):
        yield from _read_file(path)
    else:
        raise DataError(path, "expected a .json or .jsonl file, a folder of them, or a folder written by save_to_disk")


def _read_file(file: Path) -> Iterator[tuple[_Location, Any]]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(file, f"cannot read the file as UTF-8 text: {error}") from None
    if not text.strip():
        raise DataError(file, "empty file: no records")
    if file.suffix.lower() == ".jsonl":
        yield from _parse_json_lines(file, text)
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            # `datasets.Dataset.to_json` writes JSON Lines even into a `.json` file.
            yield from _parse_json_lines(file, text)
            return
        raise DataError(file, f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(records, list):
        raise DataError(file, f"expected a list of records [{{...}}, ...] or one record per line, got {_kind(records)}")
    if not records:
        raise DataError(file, "empty list: no records")
    for index, record in enumerate(records):
        yield _Location(file, index), record


def _parse_json_lines(file: Path, text: str) -> Iterator[tuple[_Location, Any]]:
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON allows unescaped inside strings.
    index = 0
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = _Location(file, index, line_number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise where.error(None, f"invalid JSON at column {error.colno}: {error.msg}") from None
        yield where, record
        index += 1


def _read_saved_dataset(folder: Path) -> Iterator[tuple[_Location, Any]]:
    import datasets  # heavy (pyarrow, pandas): imported only for folders that need it

    try:
        dataset = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as error:
        raise DataError(folder, f"cannot load the dataset saved with save_to_disk: {error}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(folder, f"expected a 'train' split in this DatasetDict, found {sorted(dataset)}")
        dataset = dataset["train"]
    if len(dataset) == 0:
        raise DataError(folder, "empty dataset: no records")
    for index, record in enumerate(dataset):
        yield _Location(folder, index), record


# ---------------------------------------------------------------------------------------------------- normalising


def _normalise(record: Any, where: _Location) -> Conversation:
    if not isinstance(record, dict):
        raise where.error(None, f"expected a JSON object, got {_kind(record)}")
    fields = {name: value for name, value in record.items() if value is not None}
    answers = _answers(fields.get("answers"), where)
    if "prompt" in fields:
        prompt = _messages(fields["prompt"], "prompt", where)
        if "completion" in fields:
            completion = _pair_completion(fields["completion"], where)
        elif "messages" in fields:  # LLM-Dojo: `messages` repeats the prompt and ends with the (often empty) reply
            messages = _messages(fields["messages"], "messages", where)
            completion = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        else:
            completion = None
        _check_prompt(prompt, "prompt", where)
    elif "messages" in fields:
        messages = _messages(fields["messages"], "messages", where)
        if messages[-1]["role"] == "assistant":
            prompt, completion = messages[:-1], messages[-1]["content"]
        else:
            prompt, completion = messages, None
        _check_prompt(prompt, "messages", where)
    else:
        raise where.error(
            None,
            "expected a 'messages' list (chat format) or a 'prompt' list (prompt/completion or LLM-Dojo format), "
            f"found fields {sorted(record)}",
        )
    if completion is not None and not completion.strip():
        completion = None  # an empty reply is a placeholder, never a target to train on
    return Conversation(prompt=prompt, completion=completion, answers=answers, source=where.source)


def _messages(value: Any, field: str, where: _Location) -> list[dict]:
    expected = 'expected a non-empty list of messages [{"role": ..., "content": ...}, ...]'
    if not isinstance(value, list):
        raise where.error(field, f"{expected}, got {_kind(value)}")
    if not value:
        raise where.error(field, f"{expected}, got an empty list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            expected_message = 'expected a message object {"role": ..., "content": ...}'
            raise where.error(f"{field}[{i}]", f"{expected_message}, got {_kind(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            got = "it is missing" if "role" not in message else f"got {_kind(role) if role is None else repr(role)}"
            raise where.error(f"{field}[{i}].role", f"expected one of {', '.join(ROLES)}, {got}")
        if not isinstance(content, str):
            got = "it is missing" if "content" not in message else f"got {_kind(content)}"
            raise where.error(f"{field}[{i}].content", f"expected a string, {got}")
        _check_text(content, f"{field}[{i}].content", where)
        messages.append({"role": role, "content": content})
    return messages


def _check_text(text: str, field: str, where: _Location) -> None:
    """JSON allows escaped lone surrogates ("\\ud800"); no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise where.error(field, f"contains an unpaired surrogate {text[error.start]!r} at character {error.start}, "
                                 "which is not valid Unicode text") from None


def _check_prompt(prompt: list[dict], field: str, where: _Location) -> None:
    if not any(message["role"] == "user" for message in prompt):
        raise where.error(field, "expected at least one user turn before the reply")
    if prompt[-1]["role"] != "user":
        raise where.error(
            f"{field}[{len(prompt) - 1}].role",
            f"expected the prompt to end with a user turn, got {prompt[-1]['role']!r}",
        )


def _pair_completion(value: Any, where: _Location) -> str:
    if isinstance(value, str):
        _check_text(value, "completion", where)
        return value
    expected = 'expected a string or a list with one assistant message [{"role": "assistant", "content": ...}]'
    if not isinstance(value, list) or len(value) != 1:
        got = f"a list of {len(value)} messages" if isinstance(value, list) else _kind(value)
        raise where.error("completion", f"{expected}, got {got}")
    message = _messages(value, "completion", where)[0]
    if message["role"] != "assistant":
        raise where.error("completion[0].role", f"expected 'assistant', got {message['role']!r}")
    return message["content"]


def _answers(value: Any, where: _Location) -> list[str] | None:
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    if not isinstance(value, list):
        raise where.error("answers", f"expected a string or a list of strings, got {_kind(value)}")
    for i, answer in enumerate(value):
        if not isinstance(answer, str):
            raise where.error(f"answers[{i}]", f"expected a string, got {_kind(answer)}")
    return list(value)


def _kind(value: Any) -> str:
    """The JSON name of a value's type, as a user reading their file would call it."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# ------------------------------------------------------------------------------------------------------- encoding


def encode_conversations(
    conversations: list[Conversation],
    tokenizer,
    max_length: int,
    max_new_tokens: int,
    stop_token_ids: list[int],
) -> tuple[list[dict], EncodeStats]:
    """Encode with the student's chat template: one `{"prompt_ids", "completion_ids"}` per conversation, in order.

    The prompt ends with the assistant generation header and has at most `max_length - max_new_tokens` tokens, so
    on-policy generation always has room. The completion is the assistant turn's tokens up to and including the first
    stop token (the student must learn to emit it, and nothing after it); prompt + completion fit in `max_length`.
    Prompt-only conversations get `completion_ids == []`.
    """
    prompt_budget = max_length - max_new_tokens
    if max_new_tokens < 1 or prompt_budget < 1:
        raise ConfigError(
            f"max_length ({max_length}) must exceed max_new_tokens ({max_new_tokens}), and max_new_tokens must be "
            "at least 1: the prompt gets max_length - max_new_tokens tokens"
        )
    if not stop_token_ids:
        raise ConfigError("stop_token_ids is empty: completions need a token that ends the assistant turn")
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"the student tokenizer ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) has no chat "
            "template; use an instruct/chat model or set tokenizer.chat_template"
        )
    items, completion_lengths, num_truncated, max_prompt_tokens = [], [], 0, 0
    for conversation in conversations:
        chat = _ChatEncoder(tokenizer, conversation.source)
        prompt_ids = chat.encode(conversation.prompt, generation_prompt=True)
        completion_ids = []
        if conversation.completion is not None:
            completion_ids = chat.completion_ids(
                conversation.prompt, prompt_ids, conversation.completion, stop_token_ids
            )
        prompt_ids, prompt_cut = _fit_prompt(chat, conversation.prompt, prompt_ids, prompt_budget)
        room = max_length - len(prompt_ids)
        num_truncated += prompt_cut or len(completion_ids) > room
        completion_ids = completion_ids[:room]
        items.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids})
        max_prompt_tokens = max(max_prompt_tokens, len(prompt_ids))
        if conversation.completion is not None:
            completion_lengths.append(len(completion_ids))
    stats = EncodeStats(
        num_records=len(items),
        num_prompt_only=len(items) - len(completion_lengths),
        num_truncated=num_truncated,
        max_prompt_tokens=max_prompt_tokens,
        mean_completion_tokens=sum(completion_lengths) / len(completion_lengths) if completion_lengths else 0.0,
    )
    return items, stats


class _ChatEncoder:
    """Renders with the chat template, then tokenizes the text without adding special tokens.

    Rendering to text first (instead of `apply_chat_template(tokenize=True)`, which returns a BatchEncoding in
    transformers 5) lets templates that write their own BOS keep exactly one.
    """

    def __init__(self, tokenizer, source: str):
        self.tokenizer, self.source = tokenizer, source

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=False
            )
        except TemplateError as error:
            raise DataError(self.source, f"the student's chat template rejected this conversation: {error}") from None

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        return self.tokenize(self.render(messages, generation_prompt))

    def completion_ids(
        self, prompt: list[dict], prompt_ids: list[int], completion: str, stop_ids: list[int]
    ) -> list[int]:
        """The assistant turn's tokens as the template writes them, cut right after the first stop token."""
        reply = {"role": "assistant", "content": completion}
        full_text = self.render(prompt + [reply], generation_prompt=False)
        full_ids = self.tokenize(full_text)
        prompt_text = None if full_ids[: len(prompt_ids)] == prompt_ids else self.render(prompt, True)
        if prompt_text is None:
            ids = full_ids[len(prompt_ids) :]
        elif full_text.startswith(prompt_text):  # tokens merged across the boundary: tokenize the reply on its own
            ids = self.tokenize(full_text[len(prompt_text) :])
        else:  # the template rewrites the prompt once answered: fall back to the bare reply text
            ids = self.tokenize(completion)
        stops = set(stop_ids)
        for position, token in enumerate(ids):
            if token in stops:
                return ids[: position + 1]
        # The template ends the turn with a token generation would not stop on: append one it stops on.
        return ids + [stop_ids[0]]


def _fit_prompt(chat: _ChatEncoder, prompt: list[dict], prompt_ids: list[int], budget: int) -> tuple[list[int], bool]:
    """Cut an over-long prompt so the system turns and the most recent turns survive.

    First drop the oldest non-system turns (never the final user turn), keeping the first remaining non-system turn a
    user turn, since many templates reject a conversation that opens with the assistant. Then shorten the final user
    turn from its start (documents usually come before the question). Last resort, when the system turns alone do not
    fit: the last `budget` tokens. Returns the prompt's tokens and whether anything was cut.
    """
    if len(prompt_ids) <= budget:
        return prompt_ids, False
    droppable = [i for i, message in enumerate(prompt[:-1]) if message["role"] != "system"]
    for count in range(1, len(droppable) + 1):
        dropped = set(droppable[:count])
        kept = [message for i, message in enumerate(prompt) if i not in dropped]
        if next(message for message in kept if message["role"] != "system")["role"] != "user":
            continue
        ids = chat.encode(kept, generation_prompt=True)
        if len(ids) <= budget:
            return ids, True
    system, final = [m for m in prompt[:-1] if m["role"] == "system"], prompt[-1]
    content_ids = chat.tokenize(final["content"])

    def with_last(n: int) -> list[int]:
        content = chat.tokenizer.decode(content_ids[len(content_ids) - n :]) if n else ""
        return chat.encode(system + [{"role": "user", "content": content}], generation_prompt=True)

    best = with_last(0)
    if len(best) > budget:
        return prompt_ids[-budget:], True
    low, high = 0, len(content_ids)  # largest n whose prompt fits: with_last(low) fits, with_last(high + 1) does not
    while low < high:
        middle = (low + high + 1) // 2
        ids = with_last(middle)
        if len(ids) <= budget:
            low, best = middle, ids
        else:
            high = middle - 1
    return best, True


def encode_for_training(conversations: list[Conversation], tokenizer, training_args, stop_token_ids: list[int],
                        name: str):
    """The encoded `datasets.Dataset` a run trains on, with its statistics logged and what they imply said."""
    import logging

    from datasets import Dataset

    logger = logging.getLogger(__name__)
    samples, stats = encode_conversations(
        conversations, tokenizer, training_args.max_length, training_args.max_new_tokens, stop_token_ids
    )
    logger.info("%s: %d records (%d prompt-only), %d cut to fit max_length=%d", name, stats.num_records,
                stats.num_prompt_only, stats.num_truncated, training_args.max_length)
    if stats.num_prompt_only and training_args.lmbda < 1 and not training_args.seq_kd:
        logger.warning("%d prompt-only records have no response: they train only on on-policy steps (lmbda=%s); "
                       "add --seq_kd to have the teacher answer them on the other steps",
                       stats.num_prompt_only, training_args.lmbda)
    return Dataset.from_list(samples), stats

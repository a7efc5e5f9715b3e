"""Every accepted record format, validated and normalised to one `Conversation` shape.

A file's format is detected from its first record, and every later record must follow it:
- chat: `{"messages": [...]}`: the last assistant turn is the completion, the turns before it the prompt (a
  conversation ending with a user turn, or an empty assistant turn, is prompt-only); LLM-Dojo's
  `{"prompt": [...], "messages": [..., {"role": "assistant", "content": ""}]}`; TRL's pairs
  `{"prompt": [...], "completion": [{"role": "assistant", ...}] or "..."}`. Message `content` may be OpenAI's list
  of parts `[{"type": "text", "text": ...}]`, whose text parts are joined.
- Alpaca: `{"instruction", "input" (optional), "output"}`; the user turn is torchtune's Alpaca prompt.
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value": ...}]}`.
- plain text: `{"text": ...}`, for pretraining-style logit distillation (no chat template; see encoding.py).
Every record may carry `answers` (a string or a list of strings) for evaluation, and `teacher` (the name of the
`--teacher NAME=SOURCE` that teaches it, in a run with several teachers). Fields set to null count as absent,
because Arrow fills the columns a record lacks with nulls. Unknown fields are ignored.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# torchtune's AlpacaToMessages: the user turn of an Alpaca record.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FORMATS = {
    "chat": "a 'messages' list, or a 'prompt' list (prompt/completion or LLM-Dojo)",
    "sharegpt": "ShareGPT's 'conversations' list of {'from', 'value'}",
    "alpaca": "Alpaca's 'instruction' and 'output' (and optional 'input')",
    "text": "plain 'text'",
}


@dataclass
class Conversation:
    """One record in the internal shape, whatever format it came in."""

    prompt: list[dict]  # [{"role", "content"}, ...] ending with a user turn; empty for plain text
    completion: str | None  # the assistant reply to train on; None for prompt-only records and plain text
    answers: list[str] | None  # reference answers for evaluation, when the record has them
    source: str  # where the record came from: "file.jsonl:LINE" for JSON Lines, "file.json[INDEX]" otherwise
    text: str | None = None  # a plain-text document (then prompt is empty)
    teacher: str | None = None  # the `--teacher NAME` this record learns from (runs with several teachers)

    @property
    def is_text(self) -> bool:
        return self.text is not None


@dataclass(frozen=True)
class Location:
    """A record's place in its file, to build `DataError`s and `Conversation.source`."""

    file: Path | str
    index: int  # 0-based record index within the file, as the file orders them
    line: int | None = None  # 1-based line number, JSON Lines only

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}" if self.line else f"{self.file}[{self.index}]"

    def error(self, field: str | None, message: str) -> DataError:
        if self.line:
            message = f"{message} (line {self.line})"
        return DataError(self.file, message, record=self.index, field=field)


def detect_format(record: Any, where: Location) -> str:
    """The format a file's records follow, from its first record."""
    if not isinstance(record, dict):
        raise where.error(None, f"expected a JSON object, got {kind(record)}")
    present = {name for name, value in record.items() if value is not None}
    for name, fields in (("chat", ("messages", "prompt")), ("sharegpt", ("conversations",)),
                         ("alpaca", ("instruction",)), ("text", ("text",))):
        if present & set(fields):
            return name
    raise where.error(None, f"expected {'; or '.join(FORMATS.values())}; found fields {sorted(record)}")


def normalise(record: Any, where: Location, file_format: str) -> Conversation:
    """Validate one record of a file whose format is `file_format`, and return it as a `Conversation`."""
    if not isinstance(record, dict):
        raise where.error(None, f"expected a JSON object, got {kind(record)}")
    fields = {name: value for name, value in record.items() if value is not None}
    answers = _answers(fields.get("answers"), where)
    teacher = _teacher(fields.get("teacher"), where)
    if file_format == "chat" and ("messages" in fields or "prompt" in fields):
        prompt, completion = _chat(fields, where)
    elif file_format == "sharegpt" and "conversations" in fields:
        prompt, completion = _split_reply(_sharegpt(fields["conversations"], where), "conversations", where)
    elif file_format == "alpaca" and "instruction" in fields:
        prompt, completion = _alpaca(fields, where)
    elif file_format == "text" and "text" in fields:
        text = _string(fields["text"], "text", where)
        if not text.strip():
            raise where.error("text", "expected some text, got an empty string")
        return Conversation(prompt=[], completion=None, answers=answers, source=where.source, text=text,
                            teacher=teacher)
    else:
        raise where.error(None, f"expected {FORMATS[file_format]} like the file's first record; found fields "
                                f"{sorted(record)}")
    if completion is not None and not completion.strip():
        completion = None  # an empty reply is a placeholder, never a target to train on
    return Conversation(prompt=prompt, completion=completion, answers=answers, source=where.source, teacher=teacher)


def _chat(fields: dict, where: Location) -> tuple[list[dict], str | None]:
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
        return prompt, completion
    return _split_reply(_messages(fields["messages"], "messages", where), "messages", where)


def _split_reply(messages: list[dict], field: str, where: Location) -> tuple[list[dict], str | None]:
    """The last assistant turn is the completion; the turns before it are the prompt."""
    if messages[-1]["role"] == "assistant":
        prompt, completion = messages[:-1], messages[-1]["content"]
    else:
        prompt, completion = messages, None
    _check_prompt(prompt, field, where)
    return prompt, completion


def _messages(value: Any, field: str, where: Location) -> list[dict]:
    expected = 'expected a non-empty list of messages [{"role": ..., "content": ...}, ...]'
    if not isinstance(value, list):
        raise where.error(field, f"{expected}, got {kind(value)}")
    if not value:
        raise where.error(field, f"{expected}, got an empty list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise where.error(f"{field}[{i}]", f'expected a message object {{"role": ..., "content": ...}}, got '
                                               f"{kind(message)}")
        role = message.get("role")
        if role not in ROLES:
            got = "it is missing" if "role" not in message else f"got {kind(role) if role is None else repr(role)}"
            raise where.error(f"{field}[{i}].role", f"expected one of {', '.join(ROLES)}, {got}")
        content = _content(message, f"{field}[{i}].content", where)
        messages.append({"role": role, "content": content})
    return messages


def _content(message: dict, field: str, where: Location) -> str:
    """A message's text: a string, or OpenAI's list of parts whose text parts are joined (other parts refused)."""
    if "content" not in message:
        raise where.error(field, "expected a string or a list of text parts, it is missing")
    content = message["content"]
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            part_type = part.get("type") if isinstance(part, dict) else None
            if part_type != "text" or not isinstance(part.get("text"), str):
                got = repr(part_type) if part_type else kind(part)
                raise where.error(f"{field}[{j}]", f'expected a text part {{"type": "text", "text": ...}}, got '
                                                   f"{got}; gkd trains on text only")
            texts.append(part["text"])
        content = "".join(texts)
    return _string(content, field, where)


def _string(value: Any, field: str, where: Location) -> str:
    if not isinstance(value, str):
        raise where.error(field, f"expected a string, got {kind(value)}")
    try:
        value.encode("utf-8")  # JSON allows escaped lone surrogates ("\ud800"); no tokenizer can encode them
    except UnicodeEncodeError as error:
        raise where.error(field, f"contains an unpaired surrogate {value[error.start]!r} at character "
                                 f"{error.start}, which is not valid Unicode text") from None
    return value


def _check_prompt(prompt: list[dict], field: str, where: Location) -> None:
    if not any(message["role"] == "user" for message in prompt):
        raise where.error(field, "expected at least one user turn before the reply")
    if prompt[-1]["role"] != "user":
        raise where.error(f"{field}[{len(prompt) - 1}].role",
                          f"expected the prompt to end with a user turn, got {prompt[-1]['role']!r}")


def _pair_completion(value: Any, where: Location) -> str:
    if isinstance(value, str):
        return _string(value, "completion", where)
    expected = 'expected a string or a list with one assistant message [{"role": "assistant", "content": ...}]'
    if not isinstance(value, list) or len(value) != 1:
        got = f"a list of {len(value)} messages" if isinstance(value, list) else kind(value)
        raise where.error("completion", f"{expected}, got {got}")
    message = _messages(value, "completion", where)[0]
    if message["role"] != "assistant":
        raise where.error("completion[0].role", f"expected 'assistant', got {message['role']!r}")
    return message["content"]


def _sharegpt(value: Any, where: Location) -> list[dict]:
    expected = 'expected a non-empty list of turns [{"from": "human", "value": ...}, ...]'
    if not isinstance(value, list) or not value:
        raise where.error("conversations", f"{expected}, got {kind(value) if value else 'an empty list'}")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise where.error(f"conversations[{i}]", f'expected a turn {{"from": ..., "value": ...}}, got {kind(turn)}')
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            got = "it is missing" if speaker is None else f"got {speaker!r}"
            raise where.error(f"conversations[{i}].from", f"expected one of {', '.join(SHAREGPT_ROLES)}, {got}")
        if "value" not in turn:
            raise where.error(f"conversations[{i}].value", "expected a string, it is missing")
        content = _string(turn["value"], f"conversations[{i}].value", where)
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": content})
    return messages


def _alpaca(fields: dict, where: Location) -> tuple[list[dict], str | None]:
    instruction = _string(fields["instruction"], "instruction", where)
    extra = _string(fields.get("input", ""), "input", where)
    output = _string(fields["output"], "output", where) if "output" in fields else None
    prompt = (ALPACA_PROMPT.format(instruction=instruction, input=extra) if extra.strip()
              else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
    return [{"role": "user", "content": prompt}], output


def _answers(value: Any, where: Location) -> list[str] | None:
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    if not isinstance(value, list):
        raise where.error("answers", f"expected a string or a list of strings, got {kind(value)}")
    for i, answer in enumerate(value):
        if not isinstance(answer, str):
            raise where.error(f"answers[{i}]", f"expected a string, got {kind(answer)}")
    return list(value)


def _teacher(value: Any, where: Location) -> str | None:
    """A record's teacher: a name given with `--teacher NAME=SOURCE` (checked against the run's names when it
    starts: the encoded data does not depend on them)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else kind(value)
        raise where.error("teacher", f"expected the name of a --teacher, got {got}")
    return value


def kind(value: Any) -> str:
    """The JSON name of a value's type, as a user reading their file would call it."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)

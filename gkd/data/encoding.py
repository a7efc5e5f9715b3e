"""Encode normalised records for the student: token ids of a prompt and of the completion to train on.

Chat records are rendered with the student tokenizer's chat template. The prompt ends with the assistant generation
header and has at most `max_length - max_new_tokens` tokens, so on-policy generation always has room; over-long
prompts lose their oldest turns first, the system message and the latest turns survive. The completion is the
assistant turn's tokens up to and including the first stop token (the student must learn to emit it, and nothing
after it); prompt + completion fit in `max_length`. Prompt-only records get no completion.

Plain text has no template: it is tokenized as is and split into windows of `max_length` tokens that overlap by one,
so that every token but a document's first is trained on exactly once (each window's first token is its prompt).

Encoding works on batches of rows (`encode_rows`), as `datasets.map(batched=True)` hands them: the tokenizer's
batched call does the work of thousands of single calls.
"""

from dataclasses import dataclass

from jinja2 import TemplateError

from ..errors import ConfigError, DataError, ModelError
from .records import Conversation

# `stop_text`: the reply writes the text of an end-of-turn token ("<|im_end|>"), which the template's rendering turns
# into that token, so the completion ends there (counted and said, not silently cut).
ENCODED_COLUMNS = ("prompt_ids", "completion_ids", "is_text", "truncated", "stop_text")
# Carried from each sample's record: its teacher's name (routed to a `--teacher` when a run starts) and where it came
# from (to name the record in a routing error).
RECORD_COLUMNS = ("teacher", "source")
MIN_TEXT_TOKENS = 2  # a plain-text window: its first token is the prompt, the rest are predicted


@dataclass(frozen=True)
class EncodeOptions:
    max_length: int
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.max_length - self.max_new_tokens < 1:
            raise ConfigError(
                f"max_length ({self.max_length}) must exceed max_new_tokens ({self.max_new_tokens}), and "
                "max_new_tokens must be at least 1: the prompt gets max_length - max_new_tokens tokens"
            )
        if not self.stop_token_ids:
            raise ConfigError("stop_token_ids is empty: completions need a token that ends the assistant turn")


@dataclass
class EncodeStats:
    num_records: int
    num_samples: int  # records, plus the extra windows long texts are split into
    num_prompt_only: int
    num_truncated: int  # samples cut in any way: prompt turns dropped or shortened, completion shortened
    num_text: int  # samples from plain-text records
    num_stop_text: int = 0  # replies cut where their text writes an end-of-turn token

    def describe(self, name: str, max_length: int) -> str:
        text = f", {self.num_text} plain-text windows" if self.num_text else ""
        stop_text = f", {self.num_stop_text} replies cut where their text writes an end-of-turn token" \
            if self.num_stop_text else ""
        return (f"{name}: {self.num_records} records -> {self.num_samples} samples ({self.num_prompt_only} "
                f"prompt-only{text}), {self.num_truncated} cut to fit max_length={max_length}{stop_text}")


def encode_rows(rows: dict[str, list], tokenizer, options: EncodeOptions, role: str = "student") -> dict[str, list]:
    """Encode a batch of normalised rows (columns of `Conversation` fields) into `ENCODED_COLUMNS` and
    `RECORD_COLUMNS`. `role` names whose tokenizer it is in errors (a --cross_tokenizer teacher's has its own)."""
    size = len(rows["source"])
    chats = [i for i in range(size) if rows["text"][i] is None]
    if chats and not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"the {role} tokenizer ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) has no chat "
            "template, and the data has chat records; use an instruct/chat model, or plain-text records"
        )
    chat = ChatEncoder(tokenizer, role)
    prompts = {i: chat.render(rows["prompt"][i], True, rows["source"][i]) for i in chats}
    fulls = {i: chat.render(rows["prompt"][i] + [{"role": "assistant", "content": rows["completion"][i]}], False,
                            rows["source"][i])
             for i in chats if rows["completion"][i] is not None}
    texts = {i: rows["text"][i] for i in range(size) if rows["text"][i] is not None}
    order = [("prompt", i) for i in prompts] + [("full", i) for i in fulls] + [("text", i) for i in texts]
    tokenized = chat.tokenize_many([{"prompt": prompts, "full": fulls, "text": texts}[kind][i] for kind, i in order])
    ids = {key: value for key, value in zip(order, tokenized)}
    encoded = {column: [] for column in (*ENCODED_COLUMNS, *RECORD_COLUMNS)}
    teachers = rows.get("teacher") or [None] * size
    for i in range(size):
        if i in texts:
            samples = [{**window, "stop_text": False} for window in _text_windows(ids[("text", i)], options.max_length)]
        else:
            completion = rows["completion"][i]
            samples = [chat.sample(rows["prompt"][i], completion, prompts[i], ids[("prompt", i)], fulls.get(i),
                                   ids.get(("full", i)), options, rows["source"][i])]
        for sample in samples:
            for column in ENCODED_COLUMNS:
                encoded[column].append(sample[column])
            encoded["teacher"].append(teachers[i])
            encoded["source"].append(rows["source"][i])
    return encoded


def encode_conversations(conversations: list[Conversation], tokenizer, max_length: int, max_new_tokens: int,
                         stop_token_ids: list[int]) -> tuple[list[dict], EncodeStats]:
    """`encode_rows` for a list in memory (evaluation prompts, tests): one dict of ids per sample, and statistics."""
    options = EncodeOptions(max_length, max_new_tokens, tuple(stop_token_ids))
    rows = {"prompt": [c.prompt for c in conversations], "completion": [c.completion for c in conversations],
            "text": [c.text for c in conversations], "source": [c.source for c in conversations],
            "teacher": [c.teacher for c in conversations]}
    encoded = encode_rows(rows, tokenizer, options)
    samples = [dict(zip(ENCODED_COLUMNS, values)) for values in zip(*(encoded[c] for c in ENCODED_COLUMNS))]
    return [{"prompt_ids": s["prompt_ids"], "completion_ids": s["completion_ids"]} for s in samples], \
        stats_of(len(conversations), encoded)


def stats_of(num_records: int, encoded: dict[str, list]) -> EncodeStats:
    return EncodeStats(
        num_records=num_records,
        num_samples=len(encoded["prompt_ids"]),
        num_prompt_only=sum(not ids for ids in encoded["completion_ids"]),
        num_truncated=sum(encoded["truncated"]),
        num_text=sum(encoded["is_text"]),
        num_stop_text=sum(encoded["stop_text"]),
    )


def _text_windows(ids: list[int], max_length: int) -> list[dict]:
    stride = max_length - 1
    windows = []
    for start in range(0, max(len(ids) - 1, 1), stride):
        window = ids[start:start + max_length]
        if len(window) >= MIN_TEXT_TOKENS:
            windows.append({"prompt_ids": window[:1], "completion_ids": window[1:], "is_text": True,
                            "truncated": False})
    return windows


class ChatEncoder:
    """Renders with the chat template, then tokenizes the text without adding special tokens.

    Rendering to text first (instead of `apply_chat_template(tokenize=True)`, which returns a BatchEncoding in
    transformers 5) lets templates that write their own BOS keep exactly one."""

    def __init__(self, tokenizer, role: str = "student"):
        self.tokenizer, self.role = tokenizer, role

    def render(self, messages: list[dict], generation_prompt: bool, source: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        except TemplateError as error:
            raise DataError(source, f"the {self.role}'s chat template rejected this conversation: {error}") from None

    def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(self, prompt, completion, prompt_text, prompt_ids, full_text, full_ids, options, source) -> dict:
        completion_ids = []
        if completion is not None:
            completion_ids = self._completion_ids(completion, prompt_text, prompt_ids, full_text, full_ids,
                                                  options.stop_token_ids)
        prompt_ids, prompt_cut = self._fit_prompt(prompt, prompt_ids, options.max_length - options.max_new_tokens,
                                                  source)
        room = options.max_length - len(prompt_ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids[:room], "is_text": False,
                "truncated": bool(prompt_cut or len(completion_ids) > room),
                "stop_text": completion is not None and any(text in completion for text in
                                                            self._stop_texts(options.stop_token_ids))}

    def _stop_texts(self, stop_ids) -> list[str]:
        """How each end-of-turn token is written as text ("<|im_end|>"), for a reply that writes one."""
        return [text for text in self.tokenizer.convert_ids_to_tokens(list(stop_ids)) if text]

    def _completion_ids(self, completion, prompt_text, prompt_ids, full_text, full_ids, stop_ids) -> list[int]:
        """The assistant turn's tokens as the template writes them, cut right after the first stop token."""
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids[len(prompt_ids):]
        elif full_text.startswith(prompt_text):  # tokens merged across the boundary: tokenize the reply on its own
            ids = self.tokenize(full_text[len(prompt_text):])
        else:  # the template rewrites the prompt once answered: fall back to the bare reply text
            ids = self.tokenize(completion)
        stops = set(stop_ids)
        for position, token in enumerate(ids):
            if token in stops:
                return ids[: position + 1]
        # The template ends the turn with a token generation would not stop on: append one it stops on.
        return ids + [stop_ids[0]]

    def encode(self, messages: list[dict], source: str) -> list[int]:
        return self.tokenize(self.render(messages, True, source))

    def _fit_prompt(self, prompt: list[dict], prompt_ids: list[int], budget: int, source: str):
        """Cut an over-long prompt so the system turns and the most recent turns survive.

        First drop the oldest non-system turns (never the final user turn), keeping the first remaining non-system
        turn a user turn, since many templates reject a conversation that opens with the assistant. Then shorten the
        final user turn from its start (documents usually come before the question). Last resort, when the system
        turns alone do not fit: the last `budget` tokens. Returns the prompt's tokens and whether anything was cut."""
        if len(prompt_ids) <= budget:
            return prompt_ids, False
        droppable = [i for i, message in enumerate(prompt[:-1]) if message["role"] != "system"]
        for count in range(1, len(droppable) + 1):
            dropped = set(droppable[:count])
            kept = [message for i, message in enumerate(prompt) if i not in dropped]
            if next(message for message in kept if message["role"] != "system")["role"] != "user":
                continue
            ids = self.encode(kept, source)
            if len(ids) <= budget:
                return ids, True
        system, final = [m for m in prompt[:-1] if m["role"] == "system"], prompt[-1]
        content_ids = self.tokenize(final["content"])

        def with_last(n: int) -> list[int]:
            content = self.tokenizer.decode(content_ids[len(content_ids) - n:]) if n else ""
            return self.encode(system + [{"role": "user", "content": content}], source)

        best = with_last(0)
        if len(best) > budget:
            return prompt_ids[-budget:], True
        # The largest n whose prompt fits. Tokens nearly add up, so the first guess is the room the empty turn leaves:
        # step down by the overshoot until it fits, then up while the next fits (three encodes where a bisection
        # took seven; the same n wherever a longer tail never takes fewer tokens).
        n = min(len(content_ids), budget - len(best))
        while n > 0:
            ids = with_last(n)
            if len(ids) <= budget:
                best = ids
                break
            n = max(0, n - max(1, len(ids) - budget))
        while n < len(content_ids):
            ids = with_last(n + 1)
            if len(ids) > budget:
                break
            n, best = n + 1, ids
        return best, True

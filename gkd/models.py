"""Find, check and load the student, the teacher and the tokenizer; refuse a teacher that speaks another vocabulary;
build LoRA.

A model is a folder or a Hugging Face Hub id, resolved as `from_pretrained` resolves it (the HF cache, the Hub, or
the cache alone with `HF_HUB_OFFLINE=1`). Everything here that can fail on the user's input fails before any weight
is read: a folder without config.json, a LoRA run folder given as a model, a truncated safetensors file, an id that
is neither a folder nor on the Hub, a teacher with another vocabulary, LoRA target modules the model lacks.
"""

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from .errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it: a folder or a Hub id, and for Hub ids a revision."""

    name: str
    revision: str = "main"
    trust_remote_code: bool = False
    flag: str = "--model_name_or_path"

    @property
    def is_folder(self) -> bool:
        return os.path.isdir(self.name)

    def kwargs(self) -> dict:
        """What `from_pretrained` needs besides the name."""
        kwargs = {"trust_remote_code": self.trust_remote_code}
        if not self.is_folder:
            kwargs["revision"] = self.revision
        return kwargs


def check_model(ref: ModelRef) -> None:
    """Refuse, in one line and before any weight loads, what `from_pretrained` would fail on with a traceback."""
    path = Path(ref.name).expanduser()
    if path.is_dir():
        _check_folder(path, ref.flag)
        return
    if path.exists():
        raise ModelError(f"{ref.flag} {ref.name}: is a file; expected a model folder or a Hub model id")
    if not _looks_like_hub_id(ref.name):
        raise ModelError(f"{ref.flag} {ref.name}: no such folder (and not a Hub model id like org/name)")
    try:
        AutoConfig.from_pretrained(ref.name, **ref.kwargs())
    except (OSError, ValueError) as error:
        raise ModelError(f"{ref.flag} {ref.name}: not a folder, and not a model the Hub (or, offline, the HF cache) "
                         f"has at revision {ref.revision}: {_first_line(error)}") from None


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`: what from_pretrained would look up on the Hub rather than as a local path."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith(".") and ".." not in name


def _check_folder(folder: Path, flag: str) -> None:
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise ModelError(f"{flag} {folder}: holds a LoRA adapter (a --use_peft run), not a model; merge it first "
                             f"(scripts/merge_lora.py --adapter_path {folder} --output_dir MERGED) or give its base")
        raise ModelError(f"{flag} {folder}: no config.json, so not a Hugging Face model folder")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{flag} {folder}: config.json is not valid JSON ({_first_line(error)})") from None
    weights = [path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern)]
    if not weights:
        raise ModelError(f"{flag} {folder}: has config.json but no weights (*.safetensors or *.bin)")
    for path in weights:
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
            if problem:
                raise ModelError(f"{flag} {folder}: {path.name} {problem}")


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole (cut short by a crash or a copy), read from its header alone."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_size > size - 8:
                return "is truncated (its header runs past the end of the file)"
            header = json.loads(handle.read(header_size))
    except (OSError, ValueError) as error:
        return f"is unreadable ({_first_line(error)})"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    needed = 8 + header_size + max(ends, default=0)
    if size < needed:
        return f"is truncated ({size} bytes, its header describes {needed})"
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_tokenizer(ref: ModelRef) -> PreTrainedTokenizerBase:
    """A model's tokenizer, with a pad token (EOS when the model has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.name, **ref.kwargs())
    except (OSError, ValueError) as error:
        raise ModelError(f"{ref.flag} {ref.name}: cannot load a tokenizer ({_first_line(error)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_vocabulary(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, teacher_name: str,
                          embedding_sizes: dict[str, int] | None = None, remedy: str = "") -> None:
    """Refuse a teacher whose token->id map differs from the student's.

    Sizes alone are not enough (two tokenizers of equal size can number tokens differently), and sizes can differ
    harmlessly: a model whose embedding matrix is padded beyond its tokenizer is fine, so compare the maps and check
    each model's embedding covers the shared ids."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    differing = [token for token, index in student_vocab.items() if teacher_vocab.get(token) != index]
    if differing:
        sample = ", ".join(repr(token) for token in differing[:3])
        raise ModelError(
            f"{teacher_name}: the teacher's vocabulary differs from the student's ({len(differing)} of "
            f"{len(student_vocab)} tokens missing or numbered differently, e.g. {sample}); GKD compares next-token "
            f"distributions and needs one shared vocabulary{remedy}"
        )
    needed = max(student_vocab.values()) + 1
    for name, vocab_size in (embedding_sizes or {}).items():
        if vocab_size < needed:
            raise ModelError(f"{name}: embedding has {vocab_size} rows but the tokenizer uses ids up to {needed - 1}")


# Model types whose positions are a learned table: a sequence longer than it fails inside the forward (an IndexError
# traceback), where rotary and ALiBi models only degrade.
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt")


def check_context(ref: ModelRef, max_length: int) -> None:
    """Refuse a --max_length beyond a model's learned position table, before any weight loads."""
    config = AutoConfig.from_pretrained(ref.name, **ref.kwargs()).get_text_config()
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if config.model_type in LEARNED_POSITIONS and positions and max_length > positions:
        raise ModelError(f"{ref.flag} {ref.name}: --max_length {max_length} is more than its {positions} learned "
                         f"positions; give --max_length {positions} or less")


def embedding_size(ref: ModelRef) -> int:
    """Rows of the model's embedding, from its config (no weights read)."""
    return AutoConfig.from_pretrained(ref.name, **ref.kwargs()).get_text_config().vocab_size


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, ref: ModelRef) -> list[int]:
    """Every id that ends an assistant turn: tokenizer EOS, generation-config EOS (a list for Llama 3 and ChatML
    models), and the special token the chat template puts right after an assistant message (e.g. <|im_end|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        eos = GenerationConfig.from_pretrained(ref.name, **ref.kwargs()).eos_token_id
    except (OSError, ValueError):  # no generation_config.json
        eos = None
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    end_of_turn = template_end_of_turn(tokenizer)
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return sorted(ids)


def template_end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant message (<|im_end|>, <|eot_id|>,
    <end_of_turn>, <|end|>): what a reply of this model family ends with; None without a template or such a token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x01gkd\x01"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = rendered.split(marker, 1)[-1]
    if after:
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
            return first[0]
    return None


def check_lora_targets(ref: ModelRef, target_modules: list[str] | None) -> None:
    """`--lora_target_modules` must name modules the student has: checked on a weightless copy built from its
    config, so a typo fails in seconds rather than after both models load (peft's own error is a traceback)."""
    if not target_modules:
        return
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(ref.name, **ref.kwargs())
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=ref.trust_remote_code)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    missing = [name for name in target_modules if name not in names]
    if missing:
        raise ConfigError(f"--lora_target_modules {' '.join(missing)}: the student has no such linear module; it has "
                          f"{', '.join(sorted(names))}")


def _torch_dtype(name: str):
    return name if name == "auto" else getattr(torch, name)


def load_causal_lm(ref: ModelRef, dtype: str, attn_implementation: str | None = None):
    kwargs = {"dtype": _torch_dtype(dtype), **ref.kwargs()}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(ref.name, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"{ref.flag} {ref.name}: cannot load a causal LM ({_first_line(error)})") from None


def load_frozen(ref: ModelRef, dtype: str, attn_implementation: str | None = None):
    """A teacher (or a model under evaluation): frozen and in eval mode, never in an optimizer, never dropping out."""
    model = load_causal_lm(ref, dtype, attn_implementation)
    model.eval()
    model.requires_grad_(False)
    return model


def lora_config(model_args):
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )

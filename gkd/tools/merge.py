"""Merge a LoRA adapter from a `--use_peft` run into its base model and write one standalone checkpoint.

The output is what vLLM, llama.cpp's converter and `AutoModelForCausalLM.from_pretrained` expect: safetensors
without adapter keys or `base_model.model.` prefixes, a config without peft leftovers, and the tokenizer, chat
template and generation config of the run (from the adapter folder when the trainer saved them there, else from
the base).

Choices, and where we differ from calling peft's `merge_and_unload` and `save_pretrained` by hand:
- The merge runs in float32 and is cast to the output dtype once at the end: W + BA is rounded a single time, instead
  of adding a rounded delta to rounded weights. It costs 4 bytes per parameter of CPU memory while merging.
- Verification reloads the written folder with transformers alone, so it checks what a server will load, not the
  in-memory model. It runs in float32, so the only difference it sees is the weights' rounding to the output dtype.
- The folder is written under a hidden temporary sibling and renamed into place when complete (and verified): an
  interrupted or failed merge never leaves a folder that looks finished, and `--overwrite` replaces the old folder
  only after the new one is complete.
- The checks on paths and on the output folder run before torch is even imported, so those mistakes are reported in
  a fraction of a second; the adapter's shapes are checked against the base before peft loads it (peft only warns
  about adapter tensors the base has no place for, and merges the rest).
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gkd.errors import ConfigError, ModelError
from gkd.folders import check_output_folder, staged_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FULL_MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
RUN_CONFIG = "run_config.json"
CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")
PEFT_PREFIX = "base_model.model."

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Largest accepted |merged - (base + adapter)| logit difference, as a fraction of the logit scale (the reference's
# largest |logit|, at least 1). Verification computes in float32 on both sides, so what remains is the rounding of
# the merged weights to the output dtype. Measured on a random 12-layer Llama (hidden 512, LoRA r=16 on all linear
# layers): 4e-6 in float32, 2e-3 in float16, 1.4e-2 in bfloat16; the tolerances leave room for deeper models while
# still catching an adapter lost or scaled wrongly whenever it moves logits by more than the tolerance (the log
# says when it does not).
VERIFY_TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain knowledge distillation in one sentence.",
)


@dataclass
class MergeConfig:
    """Options of `scripts/merge_lora.py`."""

    adapter_path: str = field(
        metadata={"help": "Folder with the LoRA adapter: a `--use_peft` run's output_dir or one of its checkpoint-N."}
    )
    output_dir: str = field(metadata={"help": "Where to write the merged model (a plain Hugging Face checkpoint)."})
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base model to merge into. Default: the one in adapter_config.json, or, if that path does not "
            "exist, model_name_or_path from the run's run_config.json."
        },
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto", metadata={"help": "Dtype of the merged weights; auto keeps the base model's dtype."}
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard, e.g. 5GB or 500MB."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty output_dir (once the new one is complete)."}
    )
    verify: bool = field(
        default=True,
        metadata={
            "help": "Compare the logits of base+adapter and of the merged model on a few prompts, and fail if they "
            "differ by more than the dtype's tolerance (--no-verify skips it)."
        },
    )
    verify_tolerance: float | None = field(
        default=None,
        metadata={
            "help": "Tolerance as a fraction of the logit scale. Default per output dtype: "
            + ", ".join(f"{name} {tol:g}" for name, tol in VERIFY_TOLERANCE.items())
            + "."
        },
    )

    def __post_init__(self):
        if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]?i?B", self.max_shard_size, flags=re.IGNORECASE):
            raise ConfigError(f"--max_shard_size must look like 5GB or 500MB, got '{self.max_shard_size}'")
        if self.verify_tolerance is not None and self.verify_tolerance < 0:
            raise ConfigError(f"--verify_tolerance must be >= 0, got {self.verify_tolerance}")


@dataclass
class Verification:
    """Largest logit differences on the verification prompts, all in float32."""

    max_diff: float  # merged vs base+adapter
    tolerance: float  # absolute, already scaled
    logit_scale: float
    adapter_effect: float  # base+adapter vs base alone: how much there was to merge

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance

    def describe(self, dtype: str) -> str:
        text = (
            f"max |logit difference| merged vs base+adapter: {self.max_diff:.2e} "
            f"(tolerance {self.tolerance:.2e} for {dtype} at logit scale {self.logit_scale:.3g}); "
            f"the adapter itself moves logits by up to {self.adapter_effect:.2e}"
        )
        if self.adapter_effect <= self.tolerance:
            text += " (within the tolerance, so this check cannot tell a merged adapter from a missing one)"
        return text


# ---------------------------------------------------------------------------------------------------------------
# Resolving the inputs: cheap checks on paths and JSON only, before torch is imported.


def find_adapter(adapter_path: str | Path) -> Path:
    """The adapter folder, checked: adapter_config.json and its weights (DeepSpeed `global_step*` folders ignored)."""
    folder = Path(adapter_path)
    if not folder.exists():
        raise ConfigError(f"adapter path {folder} does not exist")
    if not folder.is_dir():
        raise ConfigError(f"adapter path {folder} is not a folder")
    if not (folder / ADAPTER_CONFIG).is_file():
        if (folder / "config.json").is_file() and any((folder / name).is_file() for name in FULL_MODEL_WEIGHTS):
            raise ModelError(
                f"{folder} holds a full model, not a LoRA adapter: this is a full fine-tuning run, there is nothing "
                "to merge; load it directly"
            )
        hint = ""
        checkpoints = sorted(
            (p.name for p in folder.iterdir() if CHECKPOINT_DIR.fullmatch(p.name) and (p / ADAPTER_CONFIG).is_file()),
            key=lambda name: int(name.split("-")[1]),
        )
        if checkpoints:
            hint = f"; it has adapter checkpoints, pass one of them: {', '.join(checkpoints)}"
        elif any(p.name.startswith("global_step") for p in folder.iterdir()):
            hint = "; it holds only DeepSpeed shards (global_step*), no adapter saved with save_pretrained"
        raise ModelError(f"no LoRA adapter in {folder}: {ADAPTER_CONFIG} is missing{hint}")
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ModelError(f"{folder} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return folder


def read_adapter_config(adapter_dir: Path) -> dict:
    try:
        adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read it ({error})") from None
    peft_type = adapter_config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ModelError(f"{adapter_dir / ADAPTER_CONFIG}: peft_type is {peft_type}; only LoRA adapters are merged")
    return adapter_config


def read_run_model_name(adapter_dir: Path) -> tuple[str, Path] | None:
    """`model_name_or_path` from the run's run_config.json (beside the adapter, or one up for checkpoint-N)."""
    folders = [adapter_dir]
    if CHECKPOINT_DIR.fullmatch(adapter_dir.resolve().name):
        folders.append(adapter_dir.resolve().parent)
    for folder in folders:
        path = folder / RUN_CONFIG
        if not path.is_file():
            continue
        try:
            run_config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a broken run_config only costs the fallback; the adapter's own base path is still tried
        sections = [run_config] + [value for value in run_config.values() if isinstance(value, dict)]
        for section in sections:
            if isinstance(section.get("model_name_or_path"), str):
                return section["model_name_or_path"], path
    return None


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`: something from_pretrained would look up on the Hub rather than a local path."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith(".") and ".." not in name


def _check_local_model(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"base model {path} is not a folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"base model folder {path} has no config.json")


def resolve_base(adapter_dir: Path, adapter_config: dict, explicit: str | None) -> tuple[str, str]:
    """The base model to merge into, and where that choice came from (for the log).

    Order: --base_model_name_or_path; the adapter's recorded base if it exists locally; the run's run_config.json
    `model_name_or_path` if it exists locally (the recorded path is often relative to where training ran); then a
    recorded name that looks like a Hub id, which from_pretrained resolves from the cache or the Hub.
    """
    if explicit is not None:
        if Path(explicit).exists():
            _check_local_model(Path(explicit))
        elif not _looks_like_hub_id(explicit):
            raise ModelError(f"base model path {explicit} does not exist")
        return explicit, "--base_model_name_or_path"
    candidates = []
    if adapter_config.get("base_model_name_or_path"):
        candidates.append((adapter_config["base_model_name_or_path"], f"{ADAPTER_CONFIG} base_model_name_or_path"))
    run_model = read_run_model_name(adapter_dir)
    if run_model is not None:
        candidates.append((run_model[0], f"{run_model[1]} model_name_or_path"))
    for name, source in candidates:
        if Path(name).exists():
            _check_local_model(Path(name))
            return name, source
    for name, source in candidates:
        if _looks_like_hub_id(name):
            return name, source
    if not candidates:
        raise ModelError(
            f"{adapter_dir / ADAPTER_CONFIG} records no base model and there is no {RUN_CONFIG}; "
            "pass --base_model_name_or_path"
        )
    tried = "; ".join(f"{source} is {name}" for name, source in candidates)
    raise ModelError(f"base model path does not exist ({tried}); pass --base_model_name_or_path")


# ---------------------------------------------------------------------------------------------------------------
# Loading, checking that adapter and base fit, merging and verifying.


def read_adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every saved adapter tensor, read from the file header when it is safetensors."""
    safetensors_file = adapter_dir / ADAPTER_WEIGHTS[0]
    if safetensors_file.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(safetensors_file), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error type for a damaged header
            raise ModelError(f"{safetensors_file}: cannot read it ({str(error).splitlines()[0]})") from None
    import torch

    state = torch.load(adapter_dir / ADAPTER_WEIGHTS[1], map_location="cpu", weights_only=True)
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _in_out_features(module) -> tuple[int, int] | None:
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return tuple(module.weight.shape)
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def check_adapter_fits(base_model, adapter_shapes: dict[str, tuple[int, ...]], adapter_dir: Path, base: str) -> None:
    """Every adapter tensor must land on a base module of the right shape.

    peft itself only warns about adapter keys the base lacks (say, an adapter for a deeper model) and merges the
    rest, which would export a silently wrong model; so we check each key before loading.
    """
    empty = [key for key, shape in adapter_shapes.items() if 0 in shape]
    if empty:
        raise ModelError(
            f"{adapter_dir}: {len(empty)} adapter tensors are empty (e.g. {empty[0]}): it was saved from ZeRO-3 "
            "shards without gathering them; save it again with the trainer's save_model"
        )
    modules = dict(base_model.named_modules())
    parameters = {name: tuple(p.shape) for name, p in base_model.named_parameters()}
    problems = []
    for key, shape in adapter_shapes.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_" not in name:  # modules_to_save or saved embedding layers: a whole parameter replacing the base's
            name = name.replace(".modules_to_save", "").replace(".base_layer", "")
            if not name.endswith((".weight", ".bias")) or ".token_adapter." in name:
                continue  # peft's own tensors (trainable token deltas), which peft's loading checks
            if name not in parameters:
                problems.append(f"the base has no parameter {name}")
            elif parameters[name] != shape:
                problems.append(f"{name} is {list(parameters[name])} in the base but {list(shape)} in the adapter")
            continue
        module_name, kind = name.split(".lora_", 1)
        if module_name not in modules:
            problems.append(f"the base has no module {module_name}")
            continue
        features = _in_out_features(modules[module_name])
        if features is None:
            continue  # a layer type we do not know the shapes of; peft's own loading checks it
        in_features, out_features = features
        expected = {
            "A.weight": (shape[0], in_features),
            "B.weight": (out_features, shape[-1]),
            "embedding_A": (shape[0], in_features),
            "embedding_B": (out_features, shape[-1]),
            "magnitude_vector": (out_features,),
            "magnitude_vector.weight": (out_features,),
        }.get(kind)
        if expected is not None and len(shape) == len(expected) and tuple(shape) != expected:
            problems.append(
                f"{module_name} is {in_features}->{out_features} in the base but the adapter's lora_{kind} is "
                f"{list(shape)}"
            )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelError(
            f"the adapter in {adapter_dir} does not match base model {base}: {problems[0]}{more}; "
            "was it trained on another model?"
        )


def check_adapter_covers(base_model, adapter_shapes: dict, adapter_config: dict, adapter_dir: Path, base: str):
    """An adapter of every block (no `layers_to_transform`) must adapt every block of the base: one that adapts
    blocks 0-1 of a 3-block base was trained on another, shallower model, and its shapes alone fit."""
    if adapter_config.get("layers_to_transform") is not None:
        return
    pattern = re.compile(r"\.layers\.(\d+)\.")
    adapted = {int(m.group(1)) for key in adapter_shapes if (m := pattern.search(key))}
    blocks = {int(m.group(1)) for name, _ in base_model.named_modules() if (m := pattern.search(name + "."))}
    if adapted and blocks and adapted != blocks:
        raise ModelError(f"the adapter in {adapter_dir} adapts {len(adapted)} blocks, base model {base} has "
                         f"{len(blocks)}: it was trained on another model; pass its own base")


def _load_error(what: str, name: str, error: Exception) -> ModelError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ModelError(f"cannot load {what} {name}: {first_line}")


def config_dtype(base: str) -> str:
    """The dtype recorded in the base's config.json (`dtype`, or `torch_dtype` before transformers 5), else float32."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise _load_error("base model", base, error) from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in VERIFY_TOLERANCE else "float32"


def load_adapted_model(base: str, adapter_dir: Path):
    """base (float32) with the adapter applied but not merged: the reference the merged model must reproduce."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_shapes = read_adapter_shapes(adapter_dir)
    try:
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise _load_error("base model", base, error) from None
    check_adapter_fits(base_model, adapter_shapes, adapter_dir, base)
    check_adapter_covers(base_model, adapter_shapes, read_adapter_config(adapter_dir), adapter_dir, base)
    try:
        return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError) as error:
        raise _load_error("adapter", str(adapter_dir), error) from None


def load_tokenizer(adapter_dir: Path, base: str):
    """The run's tokenizer (the trainer saves it beside the adapter), else the base's; with the base's chat template
    when the run's tokenizer has none."""
    from transformers import AutoTokenizer

    sources = [str(adapter_dir)] if (adapter_dir / "tokenizer_config.json").is_file() else []
    sources.append(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(sources[0])
    except (OSError, ValueError) as error:
        raise _load_error("tokenizer from", sources[0], error) from None
    if tokenizer.chat_template is None and len(sources) > 1:
        try:
            tokenizer.chat_template = AutoTokenizer.from_pretrained(base).chat_template
        except (OSError, ValueError):
            pass  # the base has no tokenizer of its own: keep the run's, without a template
    return tokenizer, sources[0]


def verification_inputs(tokenizer) -> list:
    """Token ids of a few short chat prompts (plain text when the tokenizer has no chat template)."""
    inputs = []
    for prompt in VERIFY_PROMPTS:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        inputs.append(tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids)
    return inputs


def compute_logits(model, inputs: list) -> list:
    import torch

    with torch.inference_mode():
        return [model(input_ids=input_ids).logits.float() for input_ids in inputs]


def _max_abs_diff(first: list, second: list) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second))


def reference_logits(model, prompts: list) -> tuple[list, float]:
    """Logits of base+adapter (unmerged), and how far the adapter moves them from the base's."""
    reference = compute_logits(model, prompts)
    with model.disable_adapter():
        adapter_effect = _max_abs_diff(reference, compute_logits(model, prompts))
    return reference, adapter_effect


def write_merged(model, tokenizer, adapter_dir: Path, folder: Path, dtype: str, max_shard_size: str) -> None:
    """Merge in float32, cast once to `dtype`, and save a plain checkpoint with the run's tokenizer."""
    import torch
    from transformers import GenerationConfig

    merged = model.merge_and_unload()
    if (adapter_dir / "generation_config.json").is_file():
        merged.generation_config = GenerationConfig.from_pretrained(adapter_dir)
    merged.to(getattr(torch, dtype))
    merged.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)


def check_saved_keys(folder: Path) -> None:
    """The written safetensors must hold plain transformers keys: no LoRA tensors, no peft prefix."""
    from safetensors import safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            leftovers = [key for key in handle.keys() if "lora_" in key or key.startswith(PEFT_PREFIX)]
        if leftovers:
            raise RuntimeError(f"merged checkpoint {shard} still holds adapter keys, e.g. {leftovers[0]}")


def verify_merged(
    folder: Path, inputs: list, reference: list, adapter_effect: float, dtype: str, tolerance: float | None
) -> Verification:
    """Reload the written folder with transformers alone (float32) and compare its logits with base+adapter's."""
    import torch
    from transformers import AutoModelForCausalLM

    check_saved_keys(folder)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    max_diff = _max_abs_diff(compute_logits(merged, inputs), reference)
    logit_scale = max(1.0, max(logits.abs().max().item() for logits in reference))
    fraction = VERIFY_TOLERANCE[dtype] if tolerance is None else tolerance
    return Verification(max_diff, fraction * logit_scale, logit_scale, adapter_effect)


def merge_lora(config: MergeConfig, log: Callable[[str], None] = print) -> Path:
    """Resolve the inputs, merge, write `config.output_dir` atomically and return it. Raises GKDError on bad input."""
    adapter_dir = find_adapter(config.adapter_path)
    adapter_config = read_adapter_config(adapter_dir)
    base, base_source = resolve_base(adapter_dir, adapter_config, config.base_model_name_or_path)
    output_dir = Path(config.output_dir)
    check_output_folder(output_dir, config.overwrite, [adapter_dir, base])
    log(f"adapter: {adapter_dir}")
    log(f"base model: {base} (from {base_source})")

    with staged_folder(output_dir, config.overwrite, "merging") as staging:
        dtype = DTYPE_NAMES.get(config.dtype) or config_dtype(base)
        model = load_adapted_model(base, adapter_dir)
        tokenizer, tokenizer_source = load_tokenizer(adapter_dir, base)
        if config.verify:
            prompts = verification_inputs(tokenizer)
            reference, adapter_effect = reference_logits(model, prompts)
        write_merged(model, tokenizer, adapter_dir, staging, dtype, config.max_shard_size)
        del model  # free it before verification loads the written copy
        log(f"merged into {dtype}; tokenizer and chat template from {tokenizer_source}")

        if config.verify:
            verification = verify_merged(staging, prompts, reference, adapter_effect, dtype, config.verify_tolerance)
            log(f"verify: {verification.describe(dtype)}")
            if not verification.passed:
                raise ModelError(
                    f"verification failed: merged logits differ from base+adapter by {verification.max_diff:.2e}, "
                    f"more than the {dtype} tolerance {verification.tolerance:.2e}; nothing was written (if this is "
                    "rounding in a deep model, compare with --dtype fp32 or raise --verify_tolerance)"
                )
    log(f"wrote {output_dir}")
    return output_dir



def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse, quiet_libraries

    (config,) = parse(MergeConfig, argv, description=__doc__.splitlines()[0])
    quiet_libraries()
    merge_lora(config)  # an interruption removes the partial output on its way out: the runner says it in one line
    return 0


if __name__ == "__main__":  # `python -m gkd.tools.merge`; `gkd-merge` runs gkd.cli.command
    from gkd.cli import run

    run(main)

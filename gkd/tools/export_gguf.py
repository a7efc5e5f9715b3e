"""Export a gkd student (or any Llama, Qwen2 or Mistral folder) to one GGUF file for llama.cpp, Ollama and LM Studio.

    gkd-export-gguf --model_name_or_path runs/my-student --output_file student.Q8_0.gguf --quantization q8_0

The exporter is written on the `gguf` package (its writer and NumPy quantizers), following what llama.cpp's own
convert_hf_to_gguf.py and llama-quantize write, so that llama.cpp reads the file as it reads theirs:
- Tensors get llama.cpp's names; for the `llama` architecture (Llama and Mistral) the rows of q_proj and k_proj are
  reordered within each head, because transformers rotates the two halves of a head and llama.cpp adjacent pairs.
- Norms (and biases) stay float32, as both of llama.cpp's tools keep them. For q4_0, q4_1, q5_0 and q5_1 the output
  head (the embedding when tied) is stored in Q8_0: llama-quantize asks Q6_K for it, which `gguf` cannot write, and
  itself falls back to Q8_0 when a row is not a multiple of 256 (SmolLM2's 576). A matrix whose rows do not split
  into 32-value blocks (a student pruned to a hidden size like 28) stays F16, as the converter does.
- Width-pruned students keep head_dim while the hidden size shrinks: `attention.key_length` / `value_length` say so
  whenever head_dim is not hidden_size / num_attention_heads.
- The tokenizer (gkd/tools/gguf_vocab.py): tokens, merges, special tokens, whether BOS is added, the chat template,
  and the llama.cpp pre-tokenizer that splits text as the tokenizer does.
- A `--use_peft` run folder is merged into its base first, with gkd-merge's code, into a temporary folder.
- The file is written under a hidden name beside the target and renamed into place when complete; `--overwrite` moves
  an existing file aside to `<name>.replaced-N` first, it never deletes it.
docs/export.md lists what differs from the original SmolLM2 GGUF when its conversion is exported back.
"""

import json
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gkd.errors import ConfigError, ModelError
from gkd.folders import check_writable, move_aside

# --quantization -> (gguf.GGMLQuantizationType name of the matrices, gguf.LlamaFileType name of the file).
QUANTIZATIONS = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")  # their output head is kept in Q8_0
# model_type -> llama.cpp architecture. Mistral is a Llama to llama.cpp (its converter writes it as one).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
ADAPTER_CONFIG = "adapter_config.json"

# Hugging Face parameter names (after `model.`) -> llama.cpp tensor names.
GLOBAL_TENSORS = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass
class ExportConfig:
    """Options of `gkd-export-gguf`."""

    model_name_or_path: str = field(
        metadata={"help": "The model folder: a gkd run's output_dir (a `--use_peft` run is merged first), one of its "
                  "checkpoint-N, or any Llama, Qwen2 or Mistral Hugging Face folder."}
    )
    output_file: str = field(metadata={"help": "The GGUF file to write, e.g. student.Q8_0.gguf."})
    quantization: str = field(
        default="q8_0",
        metadata={"help": "Weight type of the matrices: " + ", ".join(QUANTIZATIONS) + ". Norms stay float32; "
                  "for q4_*/q5_* the output head is Q8_0."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing output_file (moved aside to <name>.replaced-N)."}
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "For a LoRA run: the base model to merge into (default: the one recorded)."}
    )
    tokenizer_pre: str | None = field(
        default=None,
        metadata={"help": "llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), for a tokenizer whose split gkd "
                  "cannot name; default: read from tokenizer.json (gpt-2, smollm, llama-bpe, qwen2)."},
    )

    def __post_init__(self):
        self.quantization = self.quantization.lower()
        if self.quantization not in QUANTIZATIONS:
            hint = "; for K-quants run llama.cpp's llama-quantize on an f16 export" if "_k" in self.quantization else ""
            raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got "
                              f"'{self.quantization}'{hint}")


# ---------------------------------------------------------------------------------------------------------------
# Checks on paths and config.json, before torch is imported.


def check_inputs(config: ExportConfig) -> tuple[Path, Path, dict]:
    """(model folder, output file, config.json) checked; a LoRA folder's config.json is its base's."""
    model_dir, output_file = Path(config.model_name_or_path), Path(config.output_file)
    if not model_dir.is_dir():
        raise ConfigError(f"--model_name_or_path {model_dir} is not a folder" if model_dir.exists()
                          else f"--model_name_or_path {model_dir} does not exist")
    inputs = [model_dir]
    if (model_dir / ADAPTER_CONFIG).is_file():
        from gkd.tools.merge import find_adapter, read_adapter_config, resolve_base

        base, _ = resolve_base(find_adapter(model_dir), read_adapter_config(model_dir), config.base_model_name_or_path)
        if not Path(base).is_dir():
            raise ModelError(f"{model_dir}: its base model {base} is not a local folder; pass "
                             "--base_model_name_or_path")
        inputs.append(Path(base))
        model_config = read_model_config(Path(base))
    else:
        model_config = read_model_config(model_dir)
    check_output_file(output_file, config.overwrite, inputs)
    return model_dir, output_file, model_config


def read_model_config(folder: Path) -> dict:
    """config.json of a causal LM of a supported architecture, or one line saying which it is not."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} is not a model folder: it has no config.json")
    try:
        model_config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot read it ({error})") from None
    architectures = model_config.get("architectures") or []
    if architectures and not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        raise ModelError(f"{folder} holds a {architectures[0]}, not a causal language model")
    model_type = model_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(f"{folder}: architecture {architectures[0] if architectures else model_type} is not "
                         f"supported; gkd exports {', '.join(ARCHITECTURES)} (the ones gkd-prune supports)")
    for option in ("attention_bias", "mlp_bias"):
        if model_type != "qwen2" and model_config.get(option):
            raise ModelError(f"{folder}: {option} is true, which llama.cpp's llama architecture has no place for")
    rope = model_config.get("rope_parameters") or model_config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear"):
        raise ModelError(f"{folder}: rope type {rope.get('rope_type', rope.get('type'))} is not supported by gkd's "
                         "export (default and linear are)")
    return model_config


def check_output_file(output_file: Path, overwrite: bool, inputs: list[Path]) -> None:
    if output_file.is_dir():
        raise ConfigError(f"--output_file {output_file} is a folder; name the .gguf file to write")
    target = output_file.resolve()
    for folder in inputs:
        if folder.resolve() in target.parents:
            raise ConfigError(f"--output_file {output_file} is inside the model folder {folder}; write it elsewhere "
                              "(a model folder holding a GGUF confuses loaders)")
    if output_file.exists() and not overwrite:
        raise ConfigError(f"--output_file {output_file} exists; pass --overwrite to move it aside and replace it")
    check_writable(output_file.parent, "--output_file")


# ---------------------------------------------------------------------------------------------------------------
# Tensors.


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a parameter of LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM."""
    if hf_name == "lm_head.weight":
        return "output.weight"
    name = hf_name.removeprefix("model.")
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) >= 4:
        module, kind = ".".join(parts[2:-1]), parts[-1]
        if module in BLOCK_TENSORS:
            return f"blk.{parts[1]}.{BLOCK_TENSORS[module]}.{kind}"
    return None


def interleave_rotary_halves(weight, heads: int):
    """Rows of q_proj or k_proj in llama.cpp's order. transformers rotates dimension i of a head with i + d/2 (its
    checkpoints store each head as [first halves | second halves]); llama.cpp's `llama` rope rotates 2i with 2i + 1.
    Within each head, row (half, i) moves to (i, half)."""
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_type(name: str, shape: tuple, quantization: str, output_head: str):
    """The GGML type of one tensor (see the module docstring for the rules)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1:
        return GGMLQuantizationType.F32
    kind = GGMLQuantizationType[QUANTIZATIONS[quantization][0]]
    if quantization in LOW_BIT and name == output_head:
        kind = GGMLQuantizationType.Q8_0
    block_size = GGML_QUANT_SIZES[kind][0]
    if shape[-1] % block_size:
        return GGMLQuantizationType.F16
    return kind


def encode_tensor(array, kind):
    """The tensor's bytes (or float array) in GGML type `kind`, from float32."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if kind == GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if kind == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return quants.quantize(array, kind)


# ---------------------------------------------------------------------------------------------------------------
# Writing.


def write_metadata(writer, model_config, vocabulary, config: ExportConfig, arch: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType, RopeScalingType

    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    rope = getattr(model_config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(model_config, "rope_theta", None))
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(model_config.num_hidden_layers)
    writer.add_context_length(model_config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(model_config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(model_config.num_key_value_heads)
    if rope_theta is not None:
        writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(model_config.rms_norm_eps)
    writer.add_file_type(LlamaFileType[QUANTIZATIONS[config.quantization][1]])
    writer.add_vocab_size(model_config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != hidden:  # llama.cpp otherwise derives n_embd / n_head
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    vocabulary.add_to(writer)


def export_gguf(config: ExportConfig, log=print) -> Path:
    """Write `config.output_file`; returns its path. Raises GKDError on bad input."""
    model_dir, output_file, _ = check_inputs(config)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gkd-export-") as scratch:
        source = model_dir
        if (model_dir / ADAPTER_CONFIG).is_file():
            from gkd.tools.merge import MergeConfig, merge_lora

            log(f"{model_dir} is a LoRA run: merging it into its base first (in float32)")
            source = merge_lora(MergeConfig(adapter_path=str(model_dir), output_dir=str(Path(scratch) / "merged"),
                                            base_model_name_or_path=config.base_model_name_or_path, dtype="fp32"),
                                log=log)
        output_file.parent.mkdir(parents=True, exist_ok=True)
        staging = output_file.parent / f".{output_file.name}.exporting-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            write_gguf(source, staging, config, name=_model_name(model_dir), log=log)
            aside = None
            if output_file.exists():
                if not config.overwrite:  # appeared while we were writing
                    raise ConfigError(f"--output_file {output_file} exists; pass --overwrite to replace it")
                aside = move_aside(output_file, "replaced")
            try:
                staging.rename(output_file)
            except BaseException:
                if aside is not None:
                    aside.rename(output_file)
                raise
            if aside is not None:
                log(f"--overwrite: moved the previous {output_file} to {aside} (delete it when you no longer need it)")
        finally:
            staging.unlink(missing_ok=True)
    return output_file


def write_gguf(source: Path, path: Path, config: ExportConfig, name: str, log=print) -> None:
    import gguf
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gkd.tools.gguf_vocab import read_vocabulary

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model_config = model.config
    arch = ARCHITECTURES[model_config.model_type]
    vocabulary = read_vocabulary(tokenizer, model_config.vocab_size, config.tokenizer_pre, str(source))
    log(f"{source}: {arch} architecture, {model_config.num_hidden_layers} blocks; tokenizer pre-tokenizer "
        f"{vocabulary.pre}, add_bos_token {vocabulary.add_bos_token}")

    state = model.state_dict()
    tied = bool(model_config.tie_word_embeddings)
    if tied:
        state.pop("lm_head.weight", None)
    output_head = "token_embd.weight" if tied else "output.weight"
    writer = gguf.GGUFWriter(path, arch)
    write_metadata(writer, model_config, vocabulary, config, arch, name)
    fallbacks = []
    for hf_name in tqdm(sorted(state), desc=f"exporting {config.quantization}", unit="tensor", file=sys.stderr):
        gguf_name = gguf_tensor_name(hf_name)
        if gguf_name is None:
            raise ModelError(f"{source}: no llama.cpp tensor for the parameter {hf_name}")
        array = state[hf_name].numpy()
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = model_config.num_attention_heads if ".attn_q." in gguf_name else model_config.num_key_value_heads
            array = interleave_rotary_halves(array, heads)
        kind = tensor_type(gguf_name, array.shape, config.quantization, output_head)
        wanted = QUANTIZATIONS[config.quantization][0]
        if array.ndim > 1 and kind.name == "F16" and wanted not in ("F16", "F32", "BF16"):
            fallbacks.append(gguf_name)
        writer.add_tensor(gguf_name, encode_tensor(array, kind), raw_dtype=kind)
    if fallbacks:
        log(f"{len(fallbacks)} matrices kept in F16: their rows do not split into blocks of 32 (e.g. {fallbacks[0]})")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _model_name(model_dir: Path) -> str:
    resolved = model_dir.resolve()
    return resolved.parent.name if resolved.name.startswith("checkpoint-") else resolved.name


def run_instructions(output_file: Path, quantization: str) -> str:
    size = output_file.stat().st_size
    path = output_file.resolve()
    stem = output_file.name.removesuffix(".gguf").split(".")[0] or "student"
    return "\n".join([
        f"wrote {output_file} ({size / 2**20:.1f} MiB, {quantization})",
        f"run it with llama.cpp:  llama-cli -m {path} -cnv",
        f"or with Ollama: a Modelfile holding the line  FROM {path}  then  ollama create {stem} -f Modelfile && "
        f"ollama run {stem}",
    ])


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse, quiet_libraries

    (config,) = parse(ExportConfig, argv, description=__doc__.splitlines()[0])
    check_inputs(config)  # path mistakes in a fraction of a second, before torch loads
    quiet_libraries()
    output_file = export_gguf(config)
    print(run_instructions(output_file, config.quantization))
    return 0


if __name__ == "__main__":  # `python -m gkd.tools.export_gguf`; `gkd-export-gguf` runs gkd.cli.command
    from gkd.cli import run

    run(main)

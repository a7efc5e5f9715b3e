"""Every option of a gkd run: one dataclass field each, with help text, parsed from the CLI or a YAML `--config`.

Three groups, as TRL's scripts have them: what to read (`ScriptArguments`), which models (`ModelArguments`), and how
to train (`GKDConfig`, a `transformers.TrainingArguments`). Names follow TRL's GKD and LLM-Dojo's `train_gkd.py`, so
their command lines keep working; legacy spellings are aliases, not second fields.
"""

import importlib.util
import logging
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .errors import ConfigError
from .generation import BACKENDS
from .launch import cpu_deepspeed_backend

logger = logging.getLogger(__name__)

DTYPES = ["auto", "bfloat16", "float16", "float32"]
GENERATION_BACKENDS = ["auto", *BACKENDS]


@dataclass
class ScriptArguments:
    """What to train on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a JSON file (list of records), a JSONL file, a folder of such files, or a folder "
            "written by `datasets.save_to_disk`. Records are chat conversations (`messages`), LLM-Dojo records "
            "(`prompt` list + `messages` with an empty assistant turn) or `prompt`/`completion` pairs."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Optional validation data in the same formats; evaluated every `eval_steps`."},
    )
    dataset_batch_size: int | None = field(
        default=None,
        metadata={"help": "Accepted for LLM-Dojo compatibility; has no effect (tokenization is not batched)."},
    )

    def __post_init__(self):
        if not self.dataset_name:
            raise ConfigError("--dataset_name is required: a JSON/JSONL file or folder of chat records")
        for name in (self.dataset_name, self.eval_dataset_name):
            if name and not os.path.exists(name):
                raise ConfigError(f"dataset not found: {name}")
        if self.dataset_batch_size is not None:
            logger.warning("--dataset_batch_size is accepted for LLM-Dojo compatibility and has no effect")


@dataclass
class ModelArguments:
    """Which student and teacher, in which precision, with or without LoRA."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The student: a local Hugging Face model folder. It is the model trained."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The teacher: a local Hugging Face model folder sharing the student's vocabulary. Frozen."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision the student and teacher are loaded in ('auto' = as stored). `--torch_dtype` is an alias.",
            "choices": DTYPES,
            "aliases": ["--torch_dtype"],
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model folders that ship their own modelling code."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel passed to `from_pretrained` (e.g. sdpa, eager)."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all student weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names LoRA adapts (e.g. q_proj v_proj); default: all linear layers but lm_head."},
    )

    def __post_init__(self):
        for flag, path in (
            ("--model_name_or_path", self.model_name_or_path),
            ("--teacher_model_name_or_path", self.teacher_model_name_or_path),
        ):
            if not path:
                raise ConfigError(f"{flag} is required: a local Hugging Face model folder")
            if not os.path.isdir(path):
                raise ConfigError(f"{flag}: no model folder at {path} (models are local folders; the Hub is not used)")
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ConfigError("--lora_r and --lora_alpha must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class GKDConfig(TrainingArguments):
    """How to train: TrainingArguments plus the GKD objective and on-policy sampling."""

    lmbda: float = field(
        default=0.5,
        metadata={
            "help": "Share of optimizer steps trained on completions the student samples itself (on-policy). The "
            "draw is made once per optimizer step from the seed and the step, identically on every rank."
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "Generalized JSD interpolation: 0 = forward KL(teacher||student), 0.5 = JSD, "
            "1 = reverse KL(student||teacher)."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "On steps that are not on-policy, train on completions the teacher samples instead of the "
            "dataset's responses (sequence-level KD)."
        },
    )
    objective: str = field(
        default="gkd",
        metadata={
            "help": "'gkd': the generalized JSD to the teacher (the method). 'sft': cross-entropy on the completions "
            "trained on, the teacher's distribution unused; with --seq_kd --lmbda 0 it is SFT on teacher responses, "
            "the baseline scripts/compare_objectives.py compares against.",
            "choices": ["gkd", "sft"],
        },
    )
    temperature: float = field(
        default=0.9,
        metadata={"help": "Sampling temperature of student and teacher completions. It does not change the loss."},
    )
    loss_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature of both distributions inside the divergence (1 = the models' own)."},
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold for completions (1 = off)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest sampled completion, in tokens."})
    generation_backend: str = field(
        default="auto",
        metadata={
            "help": "How student and teacher completions are sampled. 'plain': transformers' generate with a dynamic "
            "KV cache (the reference path). 'static': gkd's own decode loop over a static KV cache sized for "
            "max_length, LoRA adapters merged into generation copies of the adapted weights (faster than plain on "
            "CPU). 'compiled': that loop with its decode step torch.compile'd (CUDA graphs on GPU), built in the first "
            "on-policy step; if compiling fails the run warns and goes on uncompiled. 'auto': compiled on a CUDA GPU, "
            "static elsewhere; DeepSpeed ZeRO-3 always uses plain.",
            "choices": GENERATION_BACKENDS,
        },
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "DeepSpeed ZeRO-3 only (TRL's name): gather the sampling model's full weights (the student, or the "
            "teacher under --seq_kd) on every rank while it generates. Fast, but that model must fit on one GPU. "
            "False samples from the shards, all ranks stepping token by token together: slower, for a teacher "
            "larger than one GPU."
        },
    )
    max_length: int = field(
        default=1024,
        metadata={
            "help": "Longest prompt + completion in tokens. Prompts keep `max_length - max_new_tokens` tokens at "
            "most: older turns are dropped first, the system message and the latest turns survive."
        },
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Turn off dropout in the student."})
    loss_chunk_size: int = field(
        default=512,
        metadata={
            "help": "Completion tokens projected to vocabulary logits at a time by the memory-lean loss (about 1.2 "
            "GiB of float32 buffers per 512 at a 150k vocabulary); 0 uses the plain full-logits loss (the reference "
            "path)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into an output_dir that already holds a run's results."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Continue a run: a checkpoint folder, or 'last' for the newest complete checkpoint in output_dir "
            "(checkpoints whose save was interrupted are skipped). Data order, learning-rate schedule and on-policy "
            "sampling continue as if the run had not stopped."
        },
    )
    max_nonfinite_steps: int = field(
        default=5,
        metadata={
            "help": "Optimizer steps with a non-finite loss or gradient are skipped; after this many in a row the run "
            "saves a checkpoint and stops."
        },
    )
    # Defaults that differ from TrainingArguments: distillation runs are short and users want to see them move.
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(
        default="auto",
        metadata={"help": "Metric sinks (tensorboard, wandb, none...). 'auto' = tensorboard when installed."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs the prompt and completion columns."}
    )

    def __post_init__(self):
        if self.report_to == "auto" or self.report_to == ["auto"]:
            self.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"--lmbda must be in [0, 1], got {self.lmbda}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"--beta must be in [0, 1], got {self.beta}")
        if self.objective not in ("gkd", "sft"):
            raise ConfigError(f"--objective must be gkd or sft, got {self.objective!r}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.loss_temperature <= 0:
            raise ConfigError(f"--loss_temperature must be > 0, got {self.loss_temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"--max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.generation_backend not in GENERATION_BACKENDS:
            raise ConfigError(
                f"--generation_backend must be one of {', '.join(GENERATION_BACKENDS)}, got {self.generation_backend!r}"
            )
        if self.max_length <= self.max_new_tokens:
            raise ConfigError(
                f"--max_length ({self.max_length}) must exceed --max_new_tokens ({self.max_new_tokens}) "
                "to leave room for the prompt"
            )
        if self.loss_chunk_size < 0:
            raise ConfigError(f"--loss_chunk_size must be >= 0, got {self.loss_chunk_size}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"--max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if not self.output_dir:
            raise ConfigError("--output_dir is required")
        self.remove_unused_columns = False
        has_accelerator = _has_accelerator()
        if (self.bf16 or self.fp16) and not has_accelerator:
            # LLM-Dojo commands carry --bf16; TrainingArguments refuses it without a GPU unless use_cpu is set, and
            # use_cpu would break DeepSpeed on CPU ranks. Train in fp32 instead and say so.
            logger.warning("--bf16/--fp16 ignored: no GPU on this machine, training in float32")
            self.bf16 = self.fp16 = False
        if not has_accelerator:
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns on every dataloader
        if self.ddp_backend is None:
            # Must be set before TrainingArguments sets up the devices: see gkd/launch.py.
            self.ddp_backend = cpu_deepspeed_backend(has_accelerator)
        super().__post_init__()


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())

"""Every option of a gkd run: one dataclass field each, with help text, parsed from the CLI or a YAML `--config`.

Three groups, as TRL's scripts have them: what to read (`ScriptArguments`), which models (`ModelArguments`), and how
to train (`GKDConfig`, a `transformers.TrainingArguments`). Names follow TRL and LLM-Dojo's `train_gkd.py`, so their
command lines keep working; legacy spellings are aliases, not second fields. Each group checks its own values in
`__post_init__`; `check_together` checks what spans groups. All of it runs before any model or dataset loads.
"""

import importlib.util
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .errors import ConfigError, GKDError, check_finite
from .sampling import BACKENDS
from .steps import LMBDA_SCHEDULES, lmbda_bounds

logger = logging.getLogger(__name__)

DTYPES = ["auto", "bfloat16", "float16", "float32"]
GENERATION_BACKENDS = ["auto", *BACKENDS]


class Default(float):
    """A float option's default, told apart from the same number given on the command line, in YAML or to the
    constructor (which arrive as plain floats): a shorthand sets only what the user left out."""


# Options that set others, each pair named once: (option, the option it sets, the value it sets or None, why). An
# option left at its `Default` takes the value; given with another value, the run is refused naming both, where
# argparse would keep one and drop the other without a word. `--objective sft` is torchtune's `--kd_ratio 0` at
# `--lmbda 0`.
SHORTHANDS = (
    ("objective", "kd_ratio", lambda args: 0.0 if args.objective == "sft" else None, ""),
    ("objective", "lmbda", lambda args: 0.0 if args.objective == "sft" else None,
     " (cross-entropy alone never trains on the student's own samples, which on-policy steps are)"),
    ("kd_ratio", "kd_loss_weight", lambda args: args.kd_ratio, ""),
    ("kd_ratio", "sft_loss_weight", lambda args: None if args.kd_ratio is None else 1.0 - args.kd_ratio, ""),
)


@dataclass
class ScriptArguments:
    """What to train on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a JSON, JSONL or Parquet file, a folder of them, a folder written by "
            "`datasets.save_to_disk`, or a Hugging Face Hub dataset id. Records: chat `messages`, LLM-Dojo's "
            "`prompt` list, `prompt`/`completion` pairs, Alpaca, ShareGPT or plain `text` (README, Data)."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of a Hub dataset (the `name` of `load_dataset`)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (Hub and saved datasets)."})
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "Split to evaluate on when --eval_strategy is set and no --eval_dataset_name is given."},
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Optional validation data in the same forms; evaluated every `eval_steps`."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes that tokenize the data (`datasets.map`); default: one."}
    )
    dataset_batch_size: int | None = field(
        default=None,
        metadata={"help": "Records tokenized per batch (LLM-Dojo's and TRL's name); default 1000."},
    )

    def __post_init__(self):
        check_finite(self)
        if not self.dataset_name:
            raise ConfigError("--dataset_name is required: a JSON/JSONL/Parquet file or folder, or a Hub dataset id")
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ConfigError(f"--dataset_num_proc must be at least 1, got {self.dataset_num_proc}")
        if self.dataset_batch_size is not None and self.dataset_batch_size < 1:
            raise ConfigError(f"--dataset_batch_size must be at least 1, got {self.dataset_batch_size}")


@dataclass
class ModelArguments:
    """Which student and teacher, in which precision, with or without LoRA."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The student, the model trained: a Hugging Face model folder or a Hub model id."},
    )
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of a Hub student (ignored for folders)."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher, frozen, sharing the student's vocabulary: a model folder or a Hub model id. "
            "Not needed with --teacher_logits_path or --teacher_server_url."
        },
    )
    teacher_model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of a Hub teacher (ignored for folders)."}
    )
    teacher_logits_path: str | None = field(
        default=None,
        metadata={
            "help": "Train from a cache of the teacher's top-K log-probabilities (scripts/cache_teacher_logits.py) "
            "instead of a live teacher: the teacher never loads. Dataset steps only (--lmbda 0, no --seq_kd)."
        },
    )
    teacher_server_url: str | None = field(
        default=None,
        metadata={
            "help": "A teacher served on its own machines through vLLM's OpenAI-compatible API (e.g. "
            "http://host:8000): gkd sends token ids and reads the teacher's top-K log-probabilities."
        },
    )
    teacher_tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "With --teacher_server_url: the tokenizer to check the served model's vocabulary against the "
            "student's (with --cross_tokenizer: the teacher's own, which renders its prompts; or a cache's). Default: "
            "the model the server reports (`root` of /v1/models)."
        },
    )
    cross_tokenizer: bool = field(
        default=False,
        metadata={
            "help": "The teacher has a tokenizer of its own (another model family): it keeps its own chat template "
            "and tokens, completions are aligned to the student's by bytes, and the loss compares next-token "
            "distributions where both sides cut a span into one token the same way and sampled chunk likelihoods "
            "elsewhere (docs/cross_tokenizer.md). A live or served teacher, a cache built with "
            "gkd-cache-teacher --cross_tokenizer, or several of them (--teacher); chat records."
        },
    )
    teacher: list[str] | None = field(
        default=None,
        metadata={
            "help": "Several teachers, each record learning from its own: NAME=SOURCE, repeated (--teacher "
            "math=MODEL --teacher chat=http://host:8000 --teacher code=CACHE_FOLDER), a list in YAML. SOURCE is what "
            "one teacher takes: a model folder or Hub id, a top-K cache folder (holding cache.json), or a served "
            "teacher's http(s):// URL. A record names its teacher in a `teacher` field. Instead of "
            "--teacher_model_name_or_path, --teacher_logits_path and --teacher_server_url.",
            "action": "append",
        },
    )
    default_teacher: str | None = field(
        default=None, metadata={"help": "With --teacher: the NAME that teaches records without a `teacher` field."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision the student and teacher are loaded in ('auto' = as stored). `--torch_dtype` is an "
            "alias.",
            "choices": DTYPES,
            "aliases": ["--torch_dtype"],
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models that ship their own modelling code."}
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
    rollout_server_url: str | None = field(
        default=None,
        metadata={
            "help": "With --use_peft: on-policy completions are sampled by this vLLM server (OpenAI API) serving the "
            "student's base model with LoRA enabled (--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); the "
            "adapter is saved and loaded into it before each on-policy step (gkd/rollouts.py)."
        },
    )
    rollout_adapter_dir: str | None = field(
        default=None,
        metadata={"help": "Where the adapter is saved for --rollout_server_url to load (the server must read this "
                          "path); default: <output_dir>/rollout_adapter. Only the latest step's adapter is kept."},
    )

    def __post_init__(self):
        check_finite(self)
        if not self.model_name_or_path:
            raise ConfigError("--model_name_or_path is required: the student's model folder or Hub id")
        teachers = [flag for flag, value in (
            ("--teacher_model_name_or_path", self.teacher_model_name_or_path),
            ("--teacher_logits_path", self.teacher_logits_path),
            ("--teacher_server_url", self.teacher_server_url),
        ) if value]
        self.teacher = _flat_teachers(self.teacher)
        if self.teacher and teachers:
            raise ConfigError(f"give several teachers (--teacher NAME=SOURCE) or one ({teachers[0]}), not both")
        if self.teacher:
            self.teacher_specs  # noqa: B018 -- parsed now, so a malformed --teacher is refused here
        elif self.default_teacher is not None:
            raise ConfigError("--default_teacher names one of several teachers: give them with --teacher NAME=SOURCE")
        if not teachers and not self.teacher:
            raise ConfigError("a teacher is required: --teacher_model_name_or_path (a model folder or Hub id), "
                              "--teacher_logits_path (a top-K cache), --teacher_server_url (a served teacher), or "
                              "several as --teacher NAME=SOURCE")
        if len(teachers) > 1:
            raise ConfigError(f"give one teacher, not {' and '.join(teachers)}")
        if self.teacher_server_url and not self.teacher_server_url.startswith(("http://", "https://")):
            raise ConfigError("--teacher_server_url must start with http:// or https://, got "
                              f"{self.teacher_server_url}")
        if self.rollout_server_url and not self.rollout_server_url.startswith(("http://", "https://")):
            raise ConfigError("--rollout_server_url must start with http:// or https://, got "
                              f"{self.rollout_server_url}")
        if self.rollout_server_url and not self.use_peft:
            raise ConfigError("--rollout_server_url needs --use_peft: vLLM's HTTP API loads LoRA adapters at run time "
                              "but has no route to reload a fully fine-tuned model's weights")
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ConfigError("--lora_r and --lora_alpha must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ConfigError("--lora_target_modules needs at least one module name")

    @property
    def teacher_kind(self) -> str:
        """'live' (a model beside the student), 'cache' (top-K log-probabilities on disk) or 'server' (HTTP). With
        several teachers: 'cache' if any is one (what a cache cannot do, the run cannot), else 'server' if any is."""
        if self.teacher:
            kinds = {spec.kind for spec in self.teacher_specs}
            return next(kind for kind in ("cache", "server", "live") if kind in kinds)
        if self.teacher_logits_path:
            return "cache"
        return "server" if self.teacher_server_url else "live"

    @property
    def teacher_specs(self) -> list["TeacherSpec"]:
        """The `--teacher NAME=SOURCE` options, in the order given (a sample's `teacher_index` counts in it)."""
        specs = [TeacherSpec.parse(value) for value in self.teacher or ()]
        names = [spec.name for spec in specs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"--teacher {repeated[0]} is given twice: each teacher needs its own NAME")
        if self.default_teacher is not None and self.default_teacher not in names:
            raise ConfigError(f"--default_teacher {self.default_teacher} is none of the teachers ({', '.join(names)})")
        return specs

    def for_teacher(self, spec: "TeacherSpec") -> "ModelArguments":
        """These options with `spec` as the run's one teacher: what a single teacher of its kind is checked and opened
        from."""
        import dataclasses

        return dataclasses.replace(
            self, teacher=None, default_teacher=None,
            teacher_model_name_or_path=spec.source if spec.kind == "live" else None,
            teacher_logits_path=spec.source if spec.kind == "cache" else None,
            teacher_server_url=spec.source if spec.kind == "server" else None)


@dataclass(frozen=True)
class TeacherSpec:
    """One `--teacher NAME=SOURCE`: its kind read from SOURCE (an http(s):// URL is a server, a folder holding
    cache.json a top-K cache, anything else a model folder or Hub id)."""

    name: str
    source: str
    kind: str

    @classmethod
    def parse(cls, value: str) -> "TeacherSpec":
        import os
        import re

        name, _, source = value.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not source:
            raise ConfigError(f"--teacher {value}: expected NAME=SOURCE, NAME of letters, digits, '_', '-' or '.', "
                              "e.g. --teacher math=Qwen/Qwen3-8B")
        if source.startswith(("http://", "https://")):
            kind = "server"
        elif os.path.isfile(os.path.join(source, "cache.json")):
            kind = "cache"
        else:
            kind = "live"
        return cls(name, source, kind)


def _flat_teachers(values) -> list[str] | None:
    """`--teacher` values as one list: repeated flags arrive as a list per flag (argparse's append), a YAML list as
    strings. Flags given on the command line replace the file's list, as every other option does."""
    if not values:
        return None
    flags = [value for value in values if isinstance(value, list)]
    return [item for value in flags for item in value] if flags else list(values)


@dataclass
class GKDConfig(TrainingArguments):
    """How to train: TrainingArguments plus the GKD objective and on-policy sampling."""

    lmbda: float = field(
        default=Default(0.5),
        metadata={
            "help": "Share of optimizer steps trained on completions the student samples itself (on-policy). The "
            "draw is made once per optimizer step from the seed and the step, identically on every rank. With a "
            "schedule, the share reached after --lmbda_warmup_steps. 0 with --objective sft."
        },
    )
    lmbda_schedule: str = field(
        default="constant",
        metadata={
            "help": "How the on-policy share moves over the run. 'constant': --lmbda throughout. 'linear': from "
            "--lmbda_start to --lmbda over --lmbda_warmup_steps optimizer steps. 'step': --lmbda_start (off-policy) "
            "for --lmbda_warmup_steps steps, then --lmbda.",
            "choices": list(LMBDA_SCHEDULES),
        },
    )
    lmbda_warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps the 'linear' or 'step' lmbda schedule takes to reach --lmbda (refused "
                          "without --lmbda_schedule)."},
    )
    lmbda_start: float = field(
        default=0.0,
        metadata={"help": "On-policy share at step 0 of a 'linear' or 'step' lmbda schedule (refused without "
                          "--lmbda_schedule)."},
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
            "help": "'gkd': the generalized JSD to the teacher (the method). 'sft': cross-entropy only, shorthand for "
            "--kd_ratio 0 (--kd_loss_weight 0 --sft_loss_weight 1) at --lmbda 0; with --seq_kd it is SFT on teacher "
            "responses.",
            "choices": ["gkd", "sft"],
        },
    )
    kd_loss_weight: float = field(
        default=Default(1.0),
        metadata={"help": "Weight of the distillation term (NeMo-Aligner's kd_loss_weight); 0 with --objective sft, r "
                          "with --kd_ratio r."},
    )
    sft_loss_weight: float = field(
        default=Default(0.0),
        metadata={
            "help": "Weight of a cross-entropy term on the completions (NeMo-Aligner's sft_loss_weight), applied on "
            "steps whose completions come from the dataset or the teacher, never on the student's own samples; "
            "1 with --objective sft, 1-r with --kd_ratio r."
        },
    )
    kd_ratio: float | None = field(
        default=None,
        metadata={"help": "torchtune's shorthand: --kd_loss_weight r --sft_loss_weight 1-r; a weight given with "
                          "another value is refused."},
    )
    teacher_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Distil on the teacher's K most likely tokens plus one bucket for the rest (a sparse generalized "
            "JSD). Default: the full vocabulary with a live teacher, the cache's K with --teacher_logits_path; "
            "required with --teacher_server_url. K = 1 with --beta 1 uses the sampled token (tinker's estimator)."
        },
    )
    topk_renormalize: bool = field(
        default=False,
        metadata={
            "help": "NeMo-Aligner's top-K loss instead: both distributions renormalised over the teacher's top-K, "
            "no tail bucket (forward KL at --beta 0)."
        },
    )
    teacher_server_timeout: float = field(
        default=120.0,
        metadata={
            "help": "Seconds one request to --teacher_server_url may take, end to end (connecting, sending, reading "
            "the whole answer), however slowly the server sends; then it counts as failed and is retried."
        },
    )
    teacher_server_retries: int = field(
        default=5,
        metadata={
            "help": "Retries of a failed teacher request, with exponential backoff; then the run saves a checkpoint "
            "and stops."
        },
    )
    teacher_server_concurrency: int = field(
        default=8, metadata={"help": "Requests in flight to --teacher_server_url at once, per rank."}
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
            "KV cache (the reference path). 'static': gkd's own decode loop over a static KV cache, LoRA adapters "
            "merged into generation copies of the adapted weights (faster than plain on CPU). 'compiled': that loop "
            "with its decode step torch.compile'd (CUDA graphs on GPU); if compiling fails the run warns and goes on "
            "uncompiled. 'auto': compiled on a CUDA GPU, static elsewhere; DeepSpeed ZeRO-3 always uses plain.",
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
            "most: older turns are dropped first, the system message and the latest turns survive. Plain text is "
            "split into windows of this many tokens."
        },
    )
    text_prompt_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Plain-text data on steps that sample: the first N tokens of a window are the prompt the student "
            "(or, with --seq_kd, the teacher) continues. Required with plain text when any step samples; N + "
            "--max_new_tokens must fit in --max_length."
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
        metadata={
            "help": "Start anew in an output_dir that holds a run's results: the old folder is moved aside to "
            "<output_dir>.replaced-N, not deleted."
        },
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
        check_finite(self)
        if self.report_to == "auto" or self.report_to == ["auto"]:
            self.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
        self._check_objective()
        self._check_sampling()
        self._check_steps()
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
        try:
            super().__post_init__()
        except ValueError as error:  # TrainingArguments' own checks: one line, like ours
            raise ConfigError(" ".join(str(error).split())) from None

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates during training (any --eval_strategy but no)."""
        return str(self.eval_strategy).split(".")[-1].lower() != "no"

    @property
    def has_on_policy_steps(self) -> bool:
        """Whether any step of the run may train on the student's own samples (every check of it asks this)."""
        return lmbda_bounds(self.lmbda, self.lmbda_schedule, self.lmbda_warmup_steps, self.lmbda_start)[1] > 0

    @property
    def has_off_policy_steps(self) -> bool:
        """Whether any step of the run may train on the dataset's (or, with --seq_kd, the teacher's) completions."""
        return lmbda_bounds(self.lmbda, self.lmbda_schedule, self.lmbda_warmup_steps, self.lmbda_start)[0] < 1

    @property
    def lmbda_options(self) -> str:
        """The options that decide the on-policy share, as a user types them (for messages)."""
        if self.lmbda_schedule == "constant":
            return f"--lmbda {self.lmbda:g}"
        return (f"--lmbda_schedule {self.lmbda_schedule} from --lmbda_start {self.lmbda_start:g} to --lmbda "
                f"{self.lmbda:g}")

    def _check_objective(self):
        if self.objective not in ("gkd", "sft"):
            raise ConfigError(f"--objective must be gkd or sft, got {self.objective!r}")
        if self.kd_ratio is not None and not 0.0 <= self.kd_ratio <= 1.0:
            raise ConfigError(f"--kd_ratio must be in [0, 1], got {self.kd_ratio}")
        self._apply_shorthands()
        for name in ("lmbda", "lmbda_start", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        self._check_lmbda_schedule()
        if self.kd_loss_weight < 0 or self.sft_loss_weight < 0:
            raise ConfigError("--kd_loss_weight and --sft_loss_weight must be >= 0")
        if self.kd_loss_weight == 0 and self.sft_loss_weight == 0:
            raise ConfigError("--kd_loss_weight and --sft_loss_weight are both 0: the run would train on nothing")
        if self.kd_loss_weight == 0 and self.has_on_policy_steps:
            weighed_by = ("--objective sft" if self.objective == "sft" else
                          f"--kd_ratio {self.kd_ratio:g}" if self.kd_ratio is not None else "--kd_loss_weight 0")
            raise ConfigError(
                f"{self.lmbda_options} gives on-policy steps, which train only the distillation term (the SFT term "
                f"never trains on the student's own samples), and its weight is 0 ({weighed_by}): train without "
                "on-policy steps (--lmbda 0), or give the KD term a weight"
            )
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ConfigError(f"--teacher_top_k must be at least 1, got {self.teacher_top_k}")

    def _apply_shorthands(self):
        """Each option of `SHORTHANDS` the user left out takes what the shorthand sets; one given with another value
        is refused, naming both. Idempotent: a resolved config resolves to itself."""
        set_by = {}  # option -> the shorthand, as the user typed it, that set it
        for option, target, implied, why in SHORTHANDS:
            value = implied(self)
            if value is None:
                continue
            by = set_by.get(option, f"--{option} {_typed(getattr(self, option))}")
            given = getattr(self, target)
            if given is None or isinstance(given, Default):
                setattr(self, target, value)
                set_by[target] = by
            elif not math.isclose(given, value, abs_tol=1e-9):
                raise ConfigError(f"{by} sets --{target} {_typed(value)}, and --{target} {_typed(given)} is given "
                                  f"too{why}: give one of the two")
        for option in ("lmbda", "kd_loss_weight", "sft_loss_weight"):  # plain floats from here on
            setattr(self, option, float(getattr(self, option)))

    def _check_lmbda_schedule(self):
        if self.lmbda_schedule not in LMBDA_SCHEDULES:
            raise ConfigError(f"--lmbda_schedule must be one of {', '.join(LMBDA_SCHEDULES)}, got "
                              f"{self.lmbda_schedule!r}")
        if self.lmbda_warmup_steps < 0:
            raise ConfigError(f"--lmbda_warmup_steps must be >= 0, got {self.lmbda_warmup_steps}")
        if self.lmbda_schedule != "constant" and self.lmbda_warmup_steps == 0:
            raise ConfigError(f"--lmbda_schedule {self.lmbda_schedule} needs --lmbda_warmup_steps > 0")
        shaping = [f"--{name} {_typed(getattr(self, name))}" for name in ("lmbda_warmup_steps", "lmbda_start")
                   if getattr(self, name) != 0]
        if self.lmbda_schedule == "constant" and shaping:
            raise ConfigError(f"{' '.join(shaping)} without --lmbda_schedule: the share would be --lmbda "
                              f"{self.lmbda:g} from the first step; add --lmbda_schedule linear or step")

    def _check_sampling(self):
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
        if self.text_prompt_tokens is not None and self.text_prompt_tokens < 1:
            raise ConfigError(f"--text_prompt_tokens must be at least 1, got {self.text_prompt_tokens}")
        if self.text_prompt_tokens is not None and self.text_prompt_tokens + self.max_new_tokens > self.max_length:
            raise ConfigError(
                f"--text_prompt_tokens {self.text_prompt_tokens} + --max_new_tokens {self.max_new_tokens} = "
                f"{self.text_prompt_tokens + self.max_new_tokens} is more than --max_length {self.max_length}: a "
                "sampled prompt and completion must fit in --max_length"
            )
        if self.teacher_server_timeout <= 0 or self.teacher_server_retries < 0 or self.teacher_server_concurrency < 1:
            raise ConfigError("--teacher_server_timeout must be > 0, --teacher_server_retries >= 0 and "
                              "--teacher_server_concurrency >= 1")

    def _check_steps(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        for name in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name} must be > 0 (a number of steps, or below 1 a share of the run), got "
                                  f"{value}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError(f"--max_steps {self.max_steps} and --num_train_epochs {self.num_train_epochs}: the run "
                              "would train on nothing; give a positive --max_steps or --num_train_epochs")
        if self.learning_rate < 0:
            raise ConfigError(f"--learning_rate must be >= 0, got {self.learning_rate}")
        if self.loss_chunk_size < 0:
            raise ConfigError(f"--loss_chunk_size must be >= 0, got {self.loss_chunk_size}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"--max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")


def check_together(script_args: ScriptArguments, model_args: ModelArguments, training_args: GKDConfig,
                   one_of_several: bool = False) -> None:
    """What no single group can check: the options that depend on each other across groups. With several teachers,
    each is checked as if it were the run's one (`one_of_several`)."""
    if model_args.cross_tokenizer:
        _check_cross_tokenizer(model_args, training_args)
    if model_args.teacher_tokenizer_name_or_path and model_args.teacher_kind == "live" and not one_of_several:
        raise ConfigError("--teacher_tokenizer_name_or_path names a served teacher's tokenizer (or a cache's): a live "
                          "teacher (--teacher_model_name_or_path) reads its own; drop the option")
    if model_args.teacher:
        for spec in model_args.teacher_specs:
            with named_teacher(spec.name):
                check_together(script_args, model_args.for_teacher(spec), training_args, one_of_several=True)
        return
    kind = model_args.teacher_kind
    evaluates = training_args.evaluates
    if evaluates and not script_args.eval_dataset_name and _is_local(script_args.dataset_name):
        strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
        raise ConfigError(f"--eval_strategy {strategy} needs evaluation data: give --eval_dataset_name")
    if kind == "cache" and (script_args.eval_dataset_name or evaluates):
        raise ConfigError("--teacher_logits_path holds the teacher's view of the training data only: evaluate with a "
                          "live teacher or a server, or drop --eval_strategy / --eval_dataset_name")
    if kind == "cache" and (training_args.has_on_policy_steps or training_args.seq_kd):
        cannot = ("write completions (--seq_kd)" if training_args.seq_kd else
                  f"score the student's samples ({training_args.lmbda_options} gives on-policy steps)")
        raise ConfigError(f"--teacher_logits_path holds the teacher's view of the dataset's responses only: it cannot "
                          f"{cannot}; use a live teacher or a server")
    if kind in ("cache", "server") and training_args.loss_temperature != 1.0:
        raise ConfigError(f"--loss_temperature must be 1 with a {kind} teacher: its top-K log-probabilities are "
                          "at temperature 1, and the rest of its distribution is unknown")
    if kind == "server" and training_args.teacher_top_k is None and training_args.kd_loss_weight > 0:
        raise ConfigError("--teacher_server_url needs --teacher_top_k K: how many log-probabilities to ask for")
    if training_args.topk_renormalize and training_args.teacher_top_k is None and kind == "live":
        raise ConfigError("--topk_renormalize needs --teacher_top_k with a live teacher")


def _check_cross_tokenizer(model_args: ModelArguments, training_args: GKDConfig) -> None:
    """What the cross-tokenizer path does not do yet, refused before anything loads."""
    if model_args.teacher and model_args.teacher_tokenizer_name_or_path:
        raise ConfigError("--teacher_tokenizer_name_or_path names one teacher's tokenizer: with several teachers and "
                          "--cross_tokenizer each reads its own (a model's, a cache's, the one a server names); drop "
                          "the option")
    from .launch import uses_deepspeed

    if model_args.teacher and uses_deepspeed(training_args):
        raise ConfigError("--cross_tokenizer with several teachers does not run under DeepSpeed yet (each rank's rows "
                          "reach different teachers, whose forwards are collectives there); use one teacher, or "
                          "DDP")
    if training_args.topk_renormalize:
        raise ConfigError("--topk_renormalize does not apply with --cross_tokenizer: the teacher's top-K is compared "
                          "with a tail bucket")


@contextmanager
def named_teacher(name: str):
    """A refusal about one of several teachers, prefixed `--teacher NAME: ` (the same error type, one line)."""
    try:
        yield
    except GKDError as error:
        if str(error).startswith("--teacher "):
            raise
        try:
            named = type(error)(f"--teacher {name}: {error}")
        except TypeError:  # an error type with more arguments (DataError): a ConfigError says the same
            named = ConfigError(f"--teacher {name}: {error}")
        raise named from None


def _typed(value) -> str:
    """An option's value as a user types it: 0.5, 0, sft."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _is_local(name: str | None) -> bool:
    import os

    return bool(name) and os.path.exists(name)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())

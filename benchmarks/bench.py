"""Benchmark gkd's GKDTrainer against TRL 1.16's two distillation trainers on identical configurations.

    python -m benchmarks.bench --preset cpu-tiny --output_json bench.json

Every system trains the same random-init student and teacher (Qwen2-shaped, seeded), on the same synthetic prompts of
a fixed length, for `warmup + steps` optimizer steps through the trainer's own `train()`; only the last `steps` are
timed. The systems:

| system | trainer | completions |
|---|---|---|
| gkd/lmbda0, gkd/lmbda1, gkd/lmbda1-lora | `gkd.trainer.GKDTrainer` (what `gkd/train.py` builds) | dataset / student |
| trl-gkd/lmbda0, trl-gkd/lmbda1 | `trl.experimental.gkd.GKDTrainer` | dataset / student |
| trl-distill/lmbda1, trl-distill/lmbda1-lora | `trl.DistillationTrainer` (always on-policy, chunked loss) | student |

Fairness: every completion is exactly `completion_length` tokens. Dataset completions are that long and contain no
stop token; sampled ones are forced by `min_new_tokens = max_new_tokens` (the EOS logit is masked until the length is
reached): on the student's `generation_config` for gkd, on the trainer's `generation_config` for TRL's GKDTrainer, and
through `DistillationConfig.generation_kwargs` for DistillationTrainer. The bench records the generated widths and
refuses a run where they differ. Same beta (0.5), sampling temperature (1.0), learning rate, optimizer, precision,
gradient checkpointing (off unless asked), dropout off, no logging or saving.

Phases (timed by benchmarks/profiling.py) are exclusive wall times per optimizer step (a nested phase pauses the one around
it, so they add up to the step): `generation` (any `generate` call), `teacher_forward` (the teacher's forward, hooked
on the model and its backbone), `student_forward_backward` (the rest of `training_step`: student forward, divergence,
backward), `optimizer` (`optimizer.step()`), `other` (data, gradient clipping, zero_grad, scheduler). On GPU every
boundary synchronises. Memory: `torch.cuda.max_memory_allocated` on GPU; on CPU the process's peak resident set
(VmHWM, reset when training starts), so it includes Python and the libraries. Each system runs in its own forked
process, so peaks, compile caches and patches never leak from one system to the next.
"""

import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

from gkd.config import GENERATION_BACKENDS
from gkd.errors import ConfigError

from .profiling import PHASES, Probe, run_in_child


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class Preset:
    student: Shape
    teacher: Shape
    vocab_size: int
    prompt_length: int
    completion_length: int
    batch_size: int
    steps: int
    warmup: int
    bf16: bool  # weights in bfloat16 and bf16 autocast, as `--dtype bfloat16 --bf16` gives gkd/train.py


PRESETS = {
    # Small enough for the whole comparison (7 systems) in under two minutes on 2 CPU cores; the 32k vocabulary keeps
    # the logits a real share of the work, as they are for chat models.
    "cpu-tiny": Preset(
        student=Shape(4, 128, 512, 4, 2),
        teacher=Shape(6, 192, 768, 6, 2),
        vocab_size=32_000,
        prompt_length=64,
        completion_length=32,
        batch_size=4,
        steps=3,
        warmup=1,
        bf16=False,
    ),
    # For tests/test_bench.py: every system, one step, seconds each.
    "smoke": Preset(
        student=Shape(2, 64, 128, 4, 2),
        teacher=Shape(2, 96, 192, 4, 2),
        vocab_size=4096,
        prompt_length=16,
        completion_length=8,
        batch_size=2,
        steps=1,
        warmup=0,
        bf16=False,
    ),
    # The shapes: Qwen2-0.5B-like student, Qwen2-1.5B-like teacher, 151,936 tokens; batch 8 per GPU.
    "h100": Preset(
        student=Shape(24, 896, 4864, 14, 2),
        teacher=Shape(28, 1536, 8960, 12, 2),
        vocab_size=151_936,
        prompt_length=300,
        completion_length=256,
        batch_size=8,
        steps=5,
        warmup=2,
        bf16=True,
    ),
}


@dataclass(frozen=True)
class System:
    trainer: str  # "gkd", "trl-gkd" or "trl-distill"
    lmbda: float
    lora: bool = False


SYSTEMS = {
    "gkd/lmbda0": System("gkd", 0.0),
    "trl-gkd/lmbda0": System("trl-gkd", 0.0),
    "gkd/lmbda1": System("gkd", 1.0),
    "trl-gkd/lmbda1": System("trl-gkd", 1.0),
    "trl-distill/lmbda1": System("trl-distill", 1.0),
    "gkd/lmbda1-lora": System("gkd", 1.0, lora=True),
    "trl-distill/lmbda1-lora": System("trl-distill", 1.0, lora=True),
}
# (ours, TRL's) pairs whose ratio the report gives: < 1 means ours is faster or smaller.
COMPARISONS = [
    ("gkd/lmbda0", "trl-gkd/lmbda0"),
    ("gkd/lmbda1", "trl-gkd/lmbda1"),
    ("gkd/lmbda1", "trl-distill/lmbda1"),
    ("gkd/lmbda1-lora", "trl-distill/lmbda1-lora"),
]
BETA, TEMPERATURE, LEARNING_RATE = 0.5, 1.0, 1e-5
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}  # gkd's defaults


@dataclass
class BenchArguments:
    """Options of benchmarks/bench.py. Unset numbers come from the preset."""

    preset: str = field(default="cpu-tiny", metadata={"help": "Shapes to run.", "choices": list(PRESETS)})
    systems: list[str] = field(
        default_factory=lambda: list(SYSTEMS),
        metadata={"help": f"Which systems to run, any of: {', '.join(SYSTEMS)}."},
    )
    steps: int | None = field(default=None, metadata={"help": "Timed optimizer steps (after the warm-up)."})
    warmup: int | None = field(
        default=None, metadata={"help": "Untimed optimizer steps first (allocations, compiles)."}
    )
    batch_size: int | None = field(default=None, metadata={"help": "Per-device batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Gradient checkpointing for every system (TRL's DistillationConfig defaults "
                                         "to on; it is set explicitly here so all systems match)."}
    )
    generation_backend: str = field(
        default="auto",
        metadata={"help": "gkd's --generation_backend.", "choices": GENERATION_BACKENDS},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the models, the prompts and the trainers."})
    threads: int | None = field(
        default=None,
        metadata={"help": "torch intra-op threads of each system's process (default: torch's, one per core). On a "
                          "CPU other jobs share, 1 avoids OpenMP oversubscription, which can slow a step tenfold."},
    )
    output_json: str | None = field(default=None, metadata={"help": "Also write the results to this JSON file."})
    dry_run: bool = field(
        default=False,
        metadata={"help": "Build the model configs and every trainer's config, count parameters on the meta device, "
                          "and stop: checks a preset without allocating it."},
    )

    def __post_init__(self):
        unknown = [name for name in self.systems if name not in SYSTEMS]
        if unknown:
            raise ConfigError(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")
        for name in ("steps", "warmup", "batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "warmup" else 1):
                raise ConfigError(f"--{name} must be {'>= 0' if name == 'warmup' else '>= 1'}, got {value}")

    def resolved_preset(self) -> Preset:
        preset = PRESETS[self.preset]
        overrides = {name: getattr(self, name) for name in ("steps", "warmup", "batch_size")}
        return replace(preset, **{name: value for name, value in overrides.items() if value is not None})


# ---------------------------------------------------------------------------------------------- models and data


def model_config(shape: Shape, preset: Preset):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=preset.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=max(4096, preset.prompt_length + preset.completion_length),
        tie_word_embeddings=True,  # as Qwen2-0.5B and -1.5B
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def build_model(shape: Shape, preset: Preset, seed: int, device):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if preset.bf16 else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape, preset), dtype=dtype)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


def word_tokenizer(vocab_size: int):
    """One word per id ("w17" -> 17), so a prompt of N words is exactly N tokens for every trainer.

    TRL's DistillationTrainer tokenizes prompt text itself; a word-level vocabulary makes that tokenization exact
    without touching its code. pad == eos == <|im_end|>, as chat models have it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate(specials)}
    vocab.update({f"w{index}": index for index in range(len(specials), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )
    return tokenizer


def synthetic_samples(preset: Preset, count: int, seed: int) -> list[dict]:
    """`count` prompts of exactly `prompt_length` tokens and completions of exactly `completion_length`, no specials."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    width = preset.prompt_length + preset.completion_length
    ids = torch.randint(3, preset.vocab_size, (count, width), generator=generator).tolist()
    return [{"prompt_ids": row[: preset.prompt_length], "completion_ids": row[preset.prompt_length :]} for row in ids]


def words(ids: list[int]) -> str:
    return " ".join(f"w{index}" for index in ids)


# --------------------------------------------------------------------------------------------------- the systems


def common_args(preset: Preset, bench: BenchArguments, output_dir: str, cuda: bool) -> dict:
    """TrainingArguments every system shares."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": preset.batch_size,
        "gradient_accumulation_steps": bench.gradient_accumulation_steps,
        "max_steps": preset.warmup + preset.steps,
        "learning_rate": LEARNING_RATE,
        "optim": "adamw_torch_fused" if cuda else "adamw_torch",
        "bf16": preset.bf16 and cuda,
        "activation_checkpointing": bench.gradient_checkpointing,  # transformers 5.23 name; the old one warns
        "seed": bench.seed,
        "logging_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "disable_dropout": True,
    }


def training_config(system: System, preset: Preset, bench: BenchArguments, output_dir: str, cuda: bool):
    """The system's own config class, with the shared arguments and the same GKD settings."""
    common = common_args(preset, bench, output_dir, cuda)
    max_length = preset.prompt_length + preset.completion_length
    if system.trainer == "gkd":
        from gkd.config import GKDConfig

        return GKDConfig(
            **common,
            lmbda=system.lmbda,
            beta=BETA,
            temperature=TEMPERATURE,
            max_new_tokens=preset.completion_length,
            max_length=max_length,
            generation_backend=bench.generation_backend,
        )
    if system.trainer == "trl-gkd":
        from trl.experimental.gkd import GKDConfig

        return GKDConfig(
            **common,
            lmbda=system.lmbda,
            beta=BETA,
            temperature=TEMPERATURE,
            max_new_tokens=preset.completion_length,
            max_length=max_length,
        )
    from trl import DistillationConfig

    return DistillationConfig(
        **common,
        beta=BETA,
        temperature=TEMPERATURE,
        max_completion_length=preset.completion_length,
        generation_kwargs={"min_new_tokens": preset.completion_length},
    )


def lora_config():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **LORA)


def build_trainer(system: System, args, preset: Preset, student, teacher, tokenizer, samples: list[dict]):
    """Each trainer fed the same token ids, in the input format it reads."""
    from datasets import Dataset

    peft_config = lora_config() if system.lora else None
    if system.trainer == "gkd":
        # As gkd/train.py builds it; the samples are what `data.encode_conversations` returns.
        from gkd.teachers.live import LiveTeacher
        from gkd.trainer import GKDTrainer

        trainer = GKDTrainer(
            model=student,
            teacher=LiveTeacher.from_options(teacher, args),
            args=args,
            stop_token_ids=[tokenizer.eos_token_id],
            processing_class=tokenizer,
            peft_config=peft_config,
            train_dataset=Dataset.from_list(samples),
        )
        trainer.sampling = trainer.sampling.but(min_new_tokens=preset.completion_length)
        return trainer
    if system.trainer == "trl-gkd":
        # Pre-tokenized rows, the `input_ids` + `completion_mask` path of TRL's DataCollatorForChatML.
        from trl.experimental.gkd import GKDTrainer

        rows = [
            {
                "prompt": words(sample["prompt_ids"]),
                "input_ids": sample["prompt_ids"] + sample["completion_ids"],
                "attention_mask": [1] * (preset.prompt_length + preset.completion_length),
                "completion_mask": [0] * preset.prompt_length + [1] * preset.completion_length,
            }
            for sample in samples
        ]
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        trainer.generation_config.min_new_tokens = preset.completion_length
        return trainer
    # Prompt text that DistillationTrainer's own tokenization turns back into exactly our ids.
    from trl import DistillationTrainer

    prompts = [words(sample["prompt_ids"]) for sample in samples]
    if tokenizer(text=prompts[:1])["input_ids"][0] != samples[0]["prompt_ids"]:
        raise RuntimeError("the word tokenizer does not round-trip the synthetic prompts")
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in prompts]),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


# ------------------------------------------------------------------------------------------------------ running


def run_system(name: str, bench: BenchArguments) -> dict:
    """Build and train one system in this process; returns its timings and memory."""
    import torch

    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    if bench.threads:
        torch.set_num_threads(bench.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    system, preset = SYSTEMS[name], bench.resolved_preset()
    steps = preset.warmup + preset.steps
    samples = synthetic_samples(preset, steps * preset.batch_size * bench.gradient_accumulation_steps, bench.seed)
    tokenizer = word_tokenizer(preset.vocab_size)
    student = build_model(preset.student, preset, bench.seed, device)
    teacher = build_model(preset.teacher, preset, bench.seed + 1, device)
    teacher.eval().requires_grad_(False)
    output_dir = tempfile.mkdtemp(prefix="gkd-bench-")
    try:
        args = training_config(system, preset, bench, output_dir, cuda)
        trainer = build_trainer(system, args, preset, student, teacher, tokenizer, samples)
        probe = Probe(trainer, teacher, cuda)
        try:
            trainer.train()
        finally:
            probe.remove()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    if system.lmbda > 0 and set(probe.generated_widths) != {preset.completion_length}:
        raise RuntimeError(f"{name}: generated widths {sorted(set(probe.generated_widths))}, expected only "
                           f"{preset.completion_length}: the fixed completion length was not enforced")
    timed = probe.clock.steps[preset.warmup :]
    if len(timed) != preset.steps:
        raise RuntimeError(f"{name}: {len(probe.clock.steps)} optimizer steps ran, expected {steps}")
    step_s = statistics.mean(step["step"] for step in timed)
    samples_per_step = preset.batch_size * bench.gradient_accumulation_steps
    return {
        "system": name,
        **asdict(system),
        "step_s": step_s,
        "step_cpu_s": statistics.mean(step["cpu"] for step in timed),
        "phases_s": {phase: statistics.mean(step[phase] for step in timed) for phase in PHASES},
        "steps_s": [step["step"] for step in timed],
        "warmup_step_s": [step["step"] for step in probe.clock.steps[: preset.warmup]],
        "samples_per_s": samples_per_step / step_s,
        "tokens_per_s": samples_per_step * (preset.prompt_length + preset.completion_length) / step_s,
        "peak_memory_gib": probe.peak_memory(),
        "memory_at_start_gib": probe.memory_at_start,
        "generation_backend": getattr(trainer, "generation_backend", None),
    }


def run_forked(name: str, bench: BenchArguments) -> dict:
    """`run_system` in a forked child: its own memory peak, compile cache and patches. The parent never touches CUDA
    or runs a torch kernel before forking, so the child starts clean."""
    status, payload = run_in_child(run_system, name, bench)
    if status == "error":
        raise RuntimeError(f"{name} failed:\n{payload}")
    if status == "out of memory":  # a result, not a failure: TRL's GKDTrainer does not fit batch 8 on an H100
        return {"system": name, **asdict(SYSTEMS[name]), "error": "out of memory", "detail": payload}
    return payload


def compare(results: dict[str, dict]) -> list[dict]:
    rows = []
    for ours, theirs in COMPARISONS:
        if ours in results and theirs in results and "error" not in results[ours] and "error" not in results[theirs]:
            rows.append(
                {
                    "ours": ours,
                    "trl": theirs,
                    "step_time_ratio": results[ours]["step_s"] / results[theirs]["step_s"],
                    "cpu_time_ratio": results[ours]["step_cpu_s"] / results[theirs]["step_cpu_s"],
                    "peak_memory_ratio": results[ours]["peak_memory_gib"] / results[theirs]["peak_memory_gib"],
                }
            )
    return rows


def device_description(threads: int | None) -> dict:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        memory = "cuda max_memory_allocated"
    else:
        name = f"CPU: {_cpu_model()}, {os.cpu_count()} cores"
        memory = "process peak RSS (VmHWM)"
    return {"device": name, "memory": memory, "torch_threads": threads or torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0]}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "trl", "accelerate", "peft")}


# ------------------------------------------------------------------------------------------------------ reports


def markdown_table(results: list[dict], comparisons: list[dict]) -> str:
    """Per-system phases (seconds per optimizer step) and throughput, then the ours / TRL ratios."""
    lines = [
        "| system | s/step | CPU s/step | generation | teacher fwd | student fwd+bwd | optimizer | other | samples/s "
        "| tokens/s | peak GiB |",
        "|---|" + "---:|" * 10,
    ]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['system']} | {result['error']} |" + " |" * 9)
            continue
        phases = result["phases_s"]
        lines.append(
            f"| {result['system']} | {result['step_s']:.3f} | {result['step_cpu_s']:.3f} | "
            + " | ".join(f"{phases[phase]:.3f}" for phase in PHASES)
            + f" | {result['samples_per_s']:.2f} | {result['tokens_per_s']:.0f} | {result['peak_memory_gib']:.2f} |"
        )
    if comparisons:
        lines += ["", "| ours / TRL | step time | CPU time | peak memory |", "|---|---:|---:|---:|"]
        for row in comparisons:
            lines.append(
                f"| {row['ours']} / {row['trl']} | {row['step_time_ratio']:.2f} | {row['cpu_time_ratio']:.2f} "
                f"| {row['peak_memory_ratio']:.2f} |"
            )
    return "\n".join(lines)


def dry_run(bench: BenchArguments) -> dict:
    """Every config the run would build, and parameter counts from meta-device models: nothing is allocated.

    Without a GPU the training configs are built as the CPU would run them (bf16 and the fused optimizer off)."""
    import torch
    from transformers import AutoModelForCausalLM

    preset = bench.resolved_preset()
    cuda = torch.cuda.is_available()
    report = {"preset": bench.preset, "shapes": asdict(preset), "models": {}, "systems": {}}
    for role, shape in (("student", preset.student), ("teacher", preset.teacher)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(shape, preset))
        report["models"][role] = {"parameters": sum(parameter.numel() for parameter in model.parameters())}
    with tempfile.TemporaryDirectory() as output_dir:
        for name in bench.systems:
            args = training_config(SYSTEMS[name], preset, bench, output_dir, cuda)
            report["systems"][name] = {"config": type(args).__module__ + "." + type(args).__name__, "bf16": args.bf16}
    return report


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse

    (bench,) = parse(BenchArguments, argv, description=__doc__.splitlines()[0])
    if bench.dry_run:
        report = dry_run(bench)
        print(json.dumps(report, indent=2))
        _write_json(bench.output_json, report)
        return 0
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    _preload()
    results = {}
    for name in bench.systems:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_forked(name, bench)
        outcome = results[name].get("error") or f"{results[name]['step_s']:.3f} s/step"
        print(f"[bench] {name}: {outcome}", file=sys.stderr, flush=True)
    comparisons = compare(results)
    report = {
        "command": " ".join(["python", "-m", "benchmarks.bench", *(argv if argv is not None else sys.argv[1:])]),
        "preset": bench.preset,
        "shapes": asdict(bench.resolved_preset()),
        "options": {k: v for k, v in asdict(bench).items() if k not in ("preset", "output_json", "dry_run")},
        **device_description(bench.threads),
        "load_average_1m_at_start": load_at_start,  # other jobs on the machine: wall times suffer, CPU times less
        "versions": versions(),
        "results": list(results.values()),
        "comparisons": comparisons,
        "wall_s": time.perf_counter() - started,
    }
    print(markdown_table(report["results"], comparisons))
    _write_json(bench.output_json, report)
    return 0


def _preload() -> None:
    """Import every trainer's modules once, before forking: each child would otherwise spend seconds importing them.
    Imports only: no torch kernel runs and CUDA is not touched, so forking stays safe."""
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from tokenizers import Tokenizer  # noqa: F401
    from transformers import Qwen2ForCausalLM  # noqa: F401
    from trl import DistillationTrainer  # noqa: F401
    from trl.experimental.gkd import GKDTrainer  # noqa: F401

    import gkd.trainer  # noqa: F401


def _write_json(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=2, default=_jsonable)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    from gkd.cli import run

    run(main)

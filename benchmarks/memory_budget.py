"""Peak accelerator memory of one gkd training step at a bench preset's shapes, estimated from its parts on any machine.

    python -m benchmarks.memory_budget --preset h100                         # the issue's shapes, batch 8
    python -m benchmarks.memory_budget --preset h100 --gradient_checkpointing --lora

Why: the issue's memory target is set on an H100, and the sessions that built gkd had none. Every part of the peak is
either counted (weights, gradients, AdamW state, KV caches, merged LoRA copies: bytes of models built on the meta
device) or measured on CPU, where the kernels save what their CUDA counterparts save: the student's saved activations
come from a real forward of a one-layer and a two-layer copy of it (same width, dtype, autocast, sequence length,
LoRA and dropout settings as the trainer's), counted through autograd's saved-tensor hooks and scaled to every layer
and the whole batch. The loss's buffers follow `losses._fused_linear_jsd`. Checked against real runs: see
docs/performance.md.

Weights, optimizer state and caches are held for the whole step; on top of them the peak is the largest of four
moments: the teacher's forward (no autograd: one layer's intermediates at a time, over the student's saved
activations), the fused loss (its saved gradients and chunk buffers), the start of backward (the lm_head gradient is
made while every activation is still alive) and its end (every gradient, no activation: backward frees activations
as it makes gradients, so the moments between lie under these two), which lasts through the optimizer step (fused
AdamW, transformers' default, makes no temporaries). Gradient accumulation over several micro-batches keeps the
gradients alive through the next forward too, which this does not add. Allocator slack and the CUDA context are not
counted (`torch.cuda.max_memory_allocated` does not count them either).
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gkd.config import GKDConfig

from . import bench

GIB = 2**30
FP32 = 4


@dataclass
class BudgetArguments:
    preset: str = field(default="h100", metadata={"help": "Shapes (benchmarks/bench.py's presets).",
                                                   "choices": list(bench.PRESETS)})
    batch_size: int | None = field(default=None, metadata={"help": "Per-device batch (default: the preset's)."})
    lora: bool = field(default=False, metadata={"help": "LoRA with gkd's defaults (r 16, all linear layers)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "As --gradient_checkpointing trains."})
    loss_chunk_size: int = field(
        default=GKDConfig.loss_chunk_size, metadata={"help": "As gkd/train.py's --loss_chunk_size."}
    )
    on_policy: bool = field(default=True, metadata={"help": "Count the student's generation cache (lmbda > 0)."})
    live_teachers: int = field(default=1, metadata={
        "help": "Teachers loaded beside the student, each of the preset's teacher shape (several: --teacher "
                "NAME=MODEL, repeated); 0 when every teacher is served or cached."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the budget here."})

    def __post_init__(self):
        from gkd.errors import ConfigError

        if self.live_teachers < 0:
            raise ConfigError(f"--live_teachers must be 0 or more, got {self.live_teachers}")


def _student(preset: bench.Preset, device: str, lora: bool, num_layers: int | None = None):
    """The student as the trainer holds it: LoRA-wrapped if asked, dropout off (gkd's --disable_dropout default)."""
    from trl.trainer.utils import disable_dropout_in_model

    shape = preset.student if num_layers is None else replace(preset.student, num_layers=num_layers)
    model = bench.build_model(shape, preset, seed=0, device=device)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **bench.LORA))
    disable_dropout_in_model(model)
    return model.train()


def saved_activation_bytes(preset: bench.Preset, num_layers: int, lora: bool) -> int:
    """Bytes autograd keeps from one sample's student forward (backbone only: the loss projects from hidden states)."""
    model = _student(preset, "cpu", lora, num_layers)
    parameters = {parameter.untyped_storage()._cdata for parameter in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        key = tensor.untyped_storage()._cdata  # views of one storage count once; weights are not activations
        if key not in parameters:
            saved.setdefault(key, tensor.untyped_storage().nbytes())
        return tensor

    width = preset.prompt_length + preset.completion_length
    input_ids = torch.randint(3, preset.vocab_size, (1, width))
    from gkd.teachers.live import last_hidden_state

    # Under bf16 autocast, as the trainer runs a bf16 preset (--bf16): PEFT keeps LoRA weights in float32, and the
    # inputs their matmuls save are autocast's bf16 copies rather than float32 ones.
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=preset.bf16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        last_hidden_state(model, input_ids, torch.ones_like(input_ids))
    return sum(saved.values())


def _bytes(tensors) -> int:
    """Bytes of the tensors in their own dtypes (PEFT keeps LoRA weights in float32 next to bf16 bases)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def estimate(args: BudgetArguments) -> dict:
    """The parts of the peak, in bytes, and the peak itself."""
    preset = bench.PRESETS[args.preset]
    if args.batch_size is not None:
        preset = replace(preset, batch_size=args.batch_size)
    dtype = torch.bfloat16 if preset.bf16 else torch.float32
    size = dtype.itemsize
    batch, width = preset.batch_size, preset.prompt_length + preset.completion_length
    student = _student(preset, "meta", args.lora)
    teacher = bench.build_model(preset.teacher, preset, seed=0, device="meta")
    trainable = _bytes(p for p in student.parameters() if p.requires_grad)  # AdamW's state takes their dtype
    held = {
        "student weights": _bytes(student.parameters()),
        "AdamW state (2 per trainable weight)": 2 * trainable,
        "teacher weights" if args.live_teachers == 1 else f"teacher weights ({args.live_teachers} live)":
            args.live_teachers * _bytes(teacher.parameters()),
    }
    if args.on_policy:  # the decoder's static cache lives for the run: keys and values of every layer
        shape = preset.student
        head_dim = shape.hidden_size // shape.num_attention_heads
        cache_elements = 2 * shape.num_layers * batch * shape.num_key_value_heads * head_dim * width
        held["generation KV cache"] = cache_elements * size
        if args.lora:  # merged copies of every LoRA layer's weight, swapped in for generation
            bases = [m.get_base_layer().weight for m in student.modules() if hasattr(m, "lora_A")]
            held["merged LoRA copies"] = _bytes(bases)

    one_layer = saved_activation_bytes(preset, 1, args.lora)
    per_layer = saved_activation_bytes(preset, 2, args.lora) - one_layer
    outside_layers = one_layer - per_layer
    layers = preset.student.num_layers
    if args.gradient_checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        layer_inputs = layers * width * preset.student.hidden_size * size
        activations = batch * (outside_layers + layer_inputs + per_layer)
    else:
        activations = batch * (outside_layers + layers * per_layer)

    rows, vocab, hidden = batch * preset.completion_length, preset.vocab_size, preset.student.hidden_size
    head_trainable = not args.lora  # LoRA leaves lm_head (tied to the embedding here) frozen
    head_gradient = vocab * hidden * size if head_trainable else 0
    # Saved for backward: the hidden-state gradient in the projection dtype, the weight gradient in float32.
    loss_saved = rows * hidden * size + (vocab * hidden * FP32 if head_trainable else 0)
    chunk = min(args.loss_chunk_size or rows, rows)
    # At most 4 float32 [chunk, V] buffers at once; with bf16 weights the weight gradient's bf16 product per chunk
    # ([V, H]) is added to the float32 one while the chunk's gradient is alive (`losses._fused_linear_jsd`).
    loss_buffers = 4 * chunk * vocab * FP32 + (head_gradient if size < FP32 else 0)
    # gate, up and their product of one teacher layer, for the whole batch (no autograd keeps anything).
    # Several live teachers answer one after another: one layer of one teacher at a time.
    teacher_layer = 3 * batch * width * preset.teacher.intermediate_size * size if args.live_teachers else 0
    phases = {
        "teacher forward": {"student activations": activations, "one teacher layer's intermediates": teacher_layer},
        "loss": {"student activations": activations, "loss: saved gradients": loss_saved,
                 "loss: chunk buffers": loss_buffers},
        "start of backward": {"student activations": activations, "loss: saved gradients": loss_saved,
                              "lm_head gradient": head_gradient},
        # transformers' default optimizer, fused AdamW, updates in place; `adamw_torch` would add temporaries here
        # (foreach on CUDA: one weight-sized copy; on CPU: two copies of the largest weight).
        # The embedding's backward makes a dense [V, H] gradient before adding it into the (tied) weight's.
        "end of backward, optimizer step": {"gradients": trainable, "embedding gradient": head_gradient},
    }
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    return {
        "preset": args.preset,
        "batch_size": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "lora": args.lora,
        "gradient_checkpointing": args.gradient_checkpointing,
        "loss_chunk_size": args.loss_chunk_size,
        "activations_per_sample_per_layer": per_layer,
        "held": held,
        "phases": phases,
        "peak_phase": peak_phase,
        "peak_bytes": sum(held.values()) + sum(phases[peak_phase].values()),
    }


def markdown(budget: dict) -> str:
    unit, scale = ("GiB", GIB) if budget["peak_bytes"] >= GIB else ("MiB", 2**20)
    lines = [
        f"preset {budget['preset']}, batch {budget['batch_size']}, {budget['dtype']}, "
        f"{'LoRA' if budget['lora'] else 'full fine-tuning'}, gradient checkpointing "
        f"{'on' if budget['gradient_checkpointing'] else 'off'}, loss chunk {budget['loss_chunk_size']}",
        "",
        f"| held for the whole step | {unit} |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value / scale:.2f} |" for name, value in budget["held"].items()]
    lines += [f"| **total** | **{sum(budget['held'].values()) / scale:.2f}** |", "",
              f"| on top of that, by phase | {unit} |", "|---|---:|"]
    for phase, parts in budget["phases"].items():
        detail = " + ".join(f"{name} {value / scale:.2f}" for name, value in parts.items())
        lines.append(f"| {phase}: {detail} | {sum(parts.values()) / scale:.2f} |")
    lines.append(f"| **estimated peak** (held + {budget['peak_phase']}) | **{budget['peak_bytes'] / scale:.2f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse

    (args,) = parse(BudgetArguments, argv, description=__doc__.splitlines()[0])
    budget = estimate(args)
    print(markdown(budget))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(budget, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from gkd.cli import run

    run(main)

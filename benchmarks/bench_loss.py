"""Time and measure the memory of one GKD loss call (forward + backward): full logits against the chunked fused loss.

    python -m benchmarks.bench_loss                                   # CPU defaults, well under a minute
    python -m benchmarks.bench_loss --rows 2048 --hidden_student 896 --hidden_teacher 896 --vocab 151936 \
        --chunk_size 1024 --variants chunked --output_json loss.json
    python -m benchmarks.bench_loss --device cuda --dtype float32 --autocast    # what the trainer does with --bf16

Variants (`VARIANTS`): `reference` is the plain autograd path, `generalized_jsd(F.linear(h, W), F.linear(h_t, W_t))`
on full [N, V] logits (the teacher projection without autograd, as the trainer does it); `chunked` is
`gkd.losses.chunked_generalized_jsd`. Every call starts with the student's gradients set to None, so both pay for
allocating them. Time: the median of `--repeats` calls after 1 warm-up call. Memory: one more call after a warm-up,
above what was alive before it (inputs, weights, libraries): on CUDA `torch.cuda.max_memory_allocated()` minus the
memory allocated before; on CPU, in a fresh process whose allocator returns freed blocks to the system (see
`_MEMORY_CHILD_ENV`), the peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set before.
On CPU every measurement of every variant runs in a process of its own.
"""

import ctypes
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gkd import losses
from gkd.errors import ConfigError

from .profiling import proc_status_gib, run_in_child


@dataclass
class BenchLossArguments:
    rows: int = field(default=512, metadata={"help": "N: completion tokens in the batch (rows of hidden states)."})
    hidden_student: int = field(default=256, metadata={"help": "The student's hidden size H_s."})
    hidden_teacher: int = field(default=256, metadata={"help": "The teacher's hidden size H_t."})
    vocab: int = field(default=32_000, metadata={"help": "Vocabulary size V shared by student and teacher."})
    chunk_size: int = field(default=128, metadata={"help": "Rows per chunk for the chunked loss."})
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype of hidden states and lm_head weights.", "choices": ["float32", "bfloat16", "float16"]},
    )
    device: str = field(default="cpu", metadata={"help": "Where to run: cpu, cuda, cuda:1, ..."})
    autocast: bool = field(
        default=False,
        metadata={"help": "Run inside torch.autocast(device, bfloat16), as the trainer does with --bf16 (use with "
                          "--dtype float32 to get fp32 weights and bf16 matmuls)."},
    )
    frozen_lm_head: bool = field(
        default=False, metadata={"help": "The student's lm_head needs no gradient, as with LoRA (hidden states only)."}
    )
    beta: float = field(default=0.5, metadata={"help": "Generalized JSD beta (0 forward KL, 1 reverse KL)."})
    temperature: float = field(default=1.0, metadata={"help": "Loss temperature."})
    repeats: int = field(default=3, metadata={"help": "Timed forward+backward calls per variant (after 1 warm-up)."})
    variants: str = field(
        default="reference,chunked",
        metadata={"help": "Comma-separated variants to run, from: reference, chunked. Leave out `reference` where "
                          "full [N, V] logits would not fit."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random hidden states and weights."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results to this JSON file."})


def make_inputs(args: BenchLossArguments) -> dict[str, torch.Tensor]:
    """Random hidden states and lm_heads, scaled so the logits have unit-order spread like a trained model's."""
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)

    def randn(*shape, scale):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype) * scale

    return dict(
        student_hidden=randn(args.rows, args.hidden_student, scale=1.0).requires_grad_(),
        student_weight=randn(args.vocab, args.hidden_student, scale=args.hidden_student**-0.5).requires_grad_(
            not args.frozen_lm_head
        ),
        teacher_hidden=randn(args.rows, args.hidden_teacher, scale=1.0),
        teacher_weight=randn(args.vocab, args.hidden_teacher, scale=args.hidden_teacher**-0.5),
    )


def reference_loss(inputs: dict, args: BenchLossArguments) -> torch.Tensor:
    student_logits = F.linear(inputs["student_hidden"], inputs["student_weight"])
    with torch.no_grad():
        teacher_logits = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"])
    return losses.generalized_jsd(student_logits, teacher_logits, args.beta, args.temperature).sum()


def chunked_loss(inputs: dict, args: BenchLossArguments) -> torch.Tensor:
    return losses.chunked_generalized_jsd(
        beta=args.beta, temperature=args.temperature, chunk_size=args.chunk_size, **inputs
    )


# A scratch script may add entries (say, an older implementation) before calling `main`.
VARIANTS: dict[str, Callable[[dict, BenchLossArguments], torch.Tensor]] = {
    "reference": reference_loss,
    "chunked": chunked_loss,
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(name: str, args: BenchLossArguments) -> Callable[[], float]:
    """Inputs built and one warm-up call made; returns the forward+backward call, which leaves no gradients behind."""
    device = torch.device(args.device)
    inputs, loss_fn = make_inputs(args), VARIANTS[name]

    def call() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            loss = loss_fn(inputs, args)
        loss.backward()
        _synchronize(device)
        for tensor in inputs.values():
            tensor.grad = None
        return loss.item()

    call()
    return call


def time_calls(name: str, args: BenchLossArguments) -> dict:
    call = _prepare(name, args)
    seconds, value = [], None
    for _ in range(args.repeats):
        started = time.perf_counter()
        value = call()
        seconds.append(time.perf_counter() - started)
    return {"loss": value, "seconds_per_call": statistics.median(seconds), "seconds_min": min(seconds)}


def peak_memory(name: str, args: BenchLossArguments) -> dict:
    """Memory one call needs above what is alive before it (inputs, weights, libraries), in MiB."""
    call = _prepare(name, args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        return {"peak_memory_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20}
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        handle.write("5")
    before = proc_status_gib("VmRSS")
    call()
    return {"peak_memory_mib": (proc_status_gib("VmHWM") - before) * 1024}


# glibc keeps freed heap blocks resident and, as large blocks are freed, raises its mmap threshold up to 32 MiB, so
# even [chunk, V] buffers end up on the heap: the resident set then counts pages touched, not tensors alive
# (fragmentation and reuse make it err either way). With a fixed threshold every block of 64 KiB or more is its own
# mapping, returned on free. glibc reads this only at process start, hence a spawned process for memory; timing keeps
# the default allocator.
_MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def _in_child(measurement: Callable, name: str, args: BenchLossArguments, **how) -> dict:
    status, payload = run_in_child(measurement, name, args, **how)
    if status == "ok":
        return payload
    return {"error": payload if status == "out of memory" else payload.strip().splitlines()[-1]}


def run_variant(name: str, args: BenchLossArguments) -> dict:
    """On CUDA in this process; on CPU each measurement in a process of its own, so no variant's peak resident set can
    hide another's: timing in a forked one, memory in a spawned one (see `_MEMORY_CHILD_ENV`)."""
    if torch.device(args.device).type == "cuda":
        result = {**time_calls(name, args), **peak_memory(name, args)}
        torch.cuda.empty_cache()
        return {"variant": name, **result}
    timing = _in_child(time_calls, name, args)
    memory = _in_child(peak_memory, name, args, start_method="spawn", environment=_MEMORY_CHILD_ENV)
    errors = [result["error"] for result in (timing, memory) if "error" in result]
    return {"variant": name, **timing, **memory, **({"error": "; ".join(errors)} if errors else {})}


def markdown_table(results: list[dict]) -> str:
    lines = ["| variant | seconds / call (median) | min | peak memory (MiB) | loss |", "|---|---|---|---|---|"]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['variant']} | {result['error']} | | | |")
        else:
            lines.append(
                f"| {result['variant']} | {result['seconds_per_call']:.4f} | {result['seconds_min']:.4f} "
                f"| {result['peak_memory_mib']:.1f} | {result['loss']:.6g} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse

    (args,) = parse(BenchLossArguments, argv, description=__doc__.splitlines()[0])
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    results = [run_variant(name, args) for name in names]
    threads = torch.get_num_threads()
    print(
        f"N={args.rows} H_s={args.hidden_student} H_t={args.hidden_teacher} V={args.vocab} chunk={args.chunk_size} "
        f"dtype={args.dtype} autocast={args.autocast} frozen_lm_head={args.frozen_lm_head} device={args.device} "
        f"threads={threads} repeats={args.repeats}\n"
    )
    print(markdown_table(results))
    report = {"options": asdict(args), "torch": torch.__version__, "threads": threads, "results": results}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0



if __name__ == "__main__":
    from gkd.cli import run

    run(main)

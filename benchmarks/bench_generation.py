"""Time on-policy sampling alone: gkd's generation backends against transformers' `generate`, on one student.

    python -m benchmarks.bench_generation --preset cpu-tiny
    python -m benchmarks.bench_generation --preset h100 --output_json generation-h100.json   # on one GPU

The student of a `gkd.bench` preset (random init, seeded, bf16 on GPU for the h100 preset) samples `batch_size`
completions of exactly `completion_length` tokens (stop ids held back by `min_new_tokens`, as the training bench
does) after left-padded synthetic prompts of `prompt_length` tokens, at temperature 1. Backends:

| backend | what runs |
|---|---|
| `plain` | `gkd.generation.generate(backend="plain")`: transformers' `generate`, dynamic KV cache |
| `hf-compiled` | transformers' `generate` with `cache_implementation="static"` and its compiled decode step (CUDA graphs on GPU): what gkd's compiled backend replaced |
| `static` | gkd's own decode loop over a static KV cache, uncompiled |
| `compiled` | the same loop with its decode step `torch.compile`d (CUDA graphs on GPU) |

Each backend gets one untimed first call (the compiled ones build their graphs there; its time is reported as
`first call s`), then `--repeats` timed calls; the table gives the median. Memory is the peak allocated on GPU
during the timed calls (`torch.cuda.max_memory_allocated`), not measured on CPU.
"""

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from gkd.errors import ConfigError

from .bench import PRESETS, build_model, device_description, versions

BACKENDS = ["plain", "hf-compiled", "static", "compiled"]


@dataclass
class GenerationBenchArguments:
    """Options of benchmarks/bench_generation.py. Unset numbers come from the preset."""

    preset: str = field(default="cpu-tiny", metadata={"help": "Student shape and lengths.", "choices": list(PRESETS)})
    backends: list[str] = field(
        default_factory=lambda: ["plain", "static"],
        metadata={"help": f"Which to time, any of: {', '.join(BACKENDS)}. The compiled ones compile in their first "
                          "call (tens of seconds on CPU)."},
    )
    batch_size: int | None = field(default=None, metadata={"help": "Completions per call."})
    completion_length: int | None = field(default=None, metadata={"help": "Tokens per completion."})
    repeats: int = field(default=3, metadata={"help": "Timed calls per backend, after one untimed first call."})
    seed: int = field(default=0, metadata={"help": "Seed of the model, the prompts and the sampling."})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's)."})
    models: list[str] | None = field(
        default=None,
        metadata={"help": "Time real model folders instead of the preset's random student (NAME=PATH each), in "
                          "their stored dtype, with the preset's lengths: how fast a pruned student samples."},
    )
    output_json: str | None = field(default=None, metadata={"help": "Also write the results to this JSON file."})

    def __post_init__(self):
        unknown = [name for name in self.backends if name not in BACKENDS]
        if unknown:
            raise ConfigError(f"--backends: unknown backends {unknown}; choose from {BACKENDS}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {self.repeats}")


def prompts(batch_size: int, prompt_length: int, vocab_size: int, seed: int, device):
    """Left-padded prompts: every other row a quarter shorter, so padding is exercised as in training."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, prompt_length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1::2, : prompt_length // 4] = 0
    ids[mask == 0] = 2
    return ids.to(device), mask.to(device)


def sampler(backend: str, model, max_new_tokens: int, max_cache_len: int):
    """A function of (prompt_ids, prompt_mask) that samples with `backend`; returns the completion width."""
    from gkd.decoding import StaticDecoder
    from gkd.generation import default_compile_options, generate
    from gkd.sampling import Sampling

    if backend == "hf-compiled":
        from transformers import CompileConfig

        def transformers_compiled(prompt_ids, prompt_mask):
            compile_config = CompileConfig(mode="reduce-overhead" if prompt_ids.is_cuda else "default")
            compile_config._compile_all_devices = True
            sequences = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens, do_sample=True,
                temperature=1.0, top_k=0, eos_token_id=[2], pad_token_id=2, cache_implementation="static",
                max_cache_len=max_cache_len, compile_config=compile_config,
            )
            return sequences.shape[1] - prompt_ids.shape[1]

        return transformers_compiled
    decoder = None
    if backend in ("static", "compiled"):
        device = model.device
        decoder = StaticDecoder(default_compile_options(device) if backend == "compiled" else None)

    sampling = Sampling(max_new_tokens, (2,), 2, temperature=1.0, min_new_tokens=max_new_tokens, backend=backend,
                        max_cache_len=max_cache_len)

    def gkd_generate(prompt_ids, prompt_mask):
        completion_ids, _ = generate(model, prompt_ids, prompt_mask, sampling, decoder=decoder)
        return completion_ids.shape[1]

    return gkd_generate


def run_backend(backend: str, model, prompt_ids, prompt_mask, max_new_tokens: int, repeats: int, seed: int) -> dict:
    import torch

    cuda = prompt_ids.is_cuda
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    sample = sampler(backend, model, max_new_tokens, prompt_ids.shape[1] + max_new_tokens)
    torch.manual_seed(seed)
    started = time.perf_counter()
    widths = [sample(prompt_ids, prompt_mask)]
    synchronize()
    first_call = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        widths.append(sample(prompt_ids, prompt_mask))
        synchronize()
        times.append(time.perf_counter() - started)
    if set(widths) != {max_new_tokens}:
        raise RuntimeError(f"{backend}: completion widths {widths}, expected {max_new_tokens} (min_new_tokens unmet)")
    seconds = statistics.median(times)
    tokens = prompt_ids.shape[0] * max_new_tokens
    return {
        "backend": backend,
        "s_per_call": seconds,
        "first_call_s": first_call,
        "new_tokens_per_s": tokens / seconds,
        "ms_per_decode_step": 1000 * seconds / max_new_tokens,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "times_s": times,
    }


def _models(bench, preset, device):
    """(name, model) to time: the preset's random student, or each of --models loaded from its folder."""
    if not bench.models:
        yield "preset", build_model(preset.student, preset, bench.seed, device).eval()
        return
    from transformers import AutoModelForCausalLM

    for item in bench.models:
        name, path = item.split("=", 1) if "=" in item else (item, item)
        yield name, AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()


def markdown_table(results: list[dict]) -> str:
    lines = ["| model | backend | s / call | ms / decode step | new tokens / s | first call s | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in results:
        peak = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        lines.append(f"| {row['model']} | {row['backend']} | {row['s_per_call']:.3f} | "
                     f"{row['ms_per_decode_step']:.2f} | {row['new_tokens_per_s']:.0f} | {row['first_call_s']:.1f} | "
                     f"{peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from gkd.cli import parse

    (bench,) = parse(GenerationBenchArguments, argv, description=__doc__.splitlines()[0])
    if bench.threads:
        torch.set_num_threads(bench.threads)
    preset = PRESETS[bench.preset]
    batch_size = bench.batch_size or preset.batch_size
    max_new_tokens = bench.completion_length or preset.completion_length
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for name, model in _models(bench, preset, device):
        model.generation_config.min_new_tokens = max_new_tokens  # for transformers-compiled; gkd passes Sampling
        vocab_size = model.get_input_embeddings().weight.shape[0]
        prompt_ids, prompt_mask = prompts(batch_size, preset.prompt_length, vocab_size, bench.seed, device)
        for backend in bench.backends:
            print(f"[bench_generation] {name} {backend} ...", file=sys.stderr, flush=True)
            result = run_backend(backend, model, prompt_ids, prompt_mask, max_new_tokens, bench.repeats, bench.seed)
            results.append({"model": name, **result})
    report = {
        "command": " ".join(["python", "-m", "benchmarks.bench_generation",
                             *(argv if argv is not None else sys.argv[1:])]),
        "preset": bench.preset,
        "student": asdict(preset.student),
        "vocab_size": preset.vocab_size,
        "batch_size": batch_size,
        "prompt_length": preset.prompt_length,
        "completion_length": max_new_tokens,
        **device_description(bench.threads),
        "versions": versions(),
        "results": results,
    }
    print(markdown_table(results))
    if bench.output_json:
        with open(bench.output_json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0



if __name__ == "__main__":
    from gkd.cli import run

    run(main)

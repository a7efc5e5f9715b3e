#!/usr/bin/env bash
# The H100 measurements of docs/performance.md, for a session that is lent a GPU through the device tool.
#
# Here (with registry access):   bash benchmarks/gpu_bench.sh wheels
#   downloads into .whl/ (git-ignored, about 16 MB) the pinned packages the GPU image lacks or has at other versions.
# There, one device `run` per part, each with carry [".whl"] and well inside the 10-minute limit of a call:
#   bash benchmarks/gpu_bench.sh generation-loss   # sampling backends + the loss alone (about 5 min)
#   bash benchmarks/gpu_bench.sh steps-gkd         # gkd's three systems at the issue's shapes
#   bash benchmarks/gpu_bench.sh steps-trl         # TRL 1.16's four systems at the same shapes
# Each part checks the versions and the GPU first, then writes JSON and a log to $OUT (./gpu-results without it).
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: benchmarks/gpu_bench.sh wheels|generation-loss|steps-gkd|steps-trl}

if [[ $part == wheels ]]; then
    # The image has torch 2.11, accelerate 1.15, tokenizers 0.23.2 and huggingface_hub 1.33, which these accept;
    # dill and multiprocess are datasets' own pins, as requirements.txt's environment resolves them.
    pins=$(grep -E '^(transformers|trl|datasets|peft)==' requirements.txt)
    rm -rf .whl && mkdir .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pins dill==0.4.1 multiprocess==0.70.19
    ls -l .whl
    exit 0
fi

out=${OUT:-gpu-results}
mkdir -p "$out"
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 - <<'EOF' | tee "$out/environment.txt"
import accelerate, datasets, peft, torch, transformers, trl
print({m.__name__: m.__version__ for m in (torch, transformers, trl, accelerate, peft, datasets)})
assert torch.cuda.is_available(), "no GPU visible"
print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$out/environment.txt"

case $part in
generation-loss)
    python3 -m benchmarks.bench_generation --preset h100 --backends plain hf-compiled static compiled \
        --output_json "$out/generation.json" 2>&1 | tee "$out/generation.log"
    # The trainer's loss at the issue's shapes: 8 x 256 completion rows, bf16 weights, Qwen2-1.5B's teacher width,
    # gkd's default --loss_chunk_size.
    python3 -m benchmarks.bench_loss --device cuda --dtype bfloat16 --rows 2048 --hidden_student 896 \
        --hidden_teacher 1536 --vocab 151936 --chunk_size 512 --output_json "$out/loss.json" 2>&1 | tee "$out/loss.log"
    ;;
steps-gkd)
    python3 -m benchmarks.bench --preset h100 --systems gkd/lmbda0 gkd/lmbda1 gkd/lmbda1-lora \
        --output_json "$out/steps-gkd.json" 2>&1 | tee "$out/steps-gkd.log"
    ;;
steps-trl)
    python3 -m benchmarks.bench --preset h100 --systems trl-gkd/lmbda0 trl-gkd/lmbda1 trl-distill/lmbda1 \
        trl-distill/lmbda1-lora --output_json "$out/steps-trl.json" 2>&1 | tee "$out/steps-trl.log"
    ;;
*)
    echo "unknown part: $part (wheels, generation-loss, steps-gkd, steps-trl)" >&2
    exit 2
    ;;
esac

"""DeepSpeed ZeRO through `accelerate launch`, with real ranks: 2 CPU processes over gloo, as CI runs them.

Each launch costs ~30 s of start-up on two cores, so each one proves several things:
- zero3_full and zero2_full (2 records, batch 1 per rank, SGD, lmbda 0.5 with seed 2: step 1 off-policy, step 2
  on-policy, a checkpoint every step) are the full fine-tuning runs, the equivalence runs against one process, and
  (ZeRO-3) the resume source.
- zero3_peft adds --seq_kd, so the sharded teacher generates too, and a teacher whose padded vocabulary rows dominate.
  Its student is width-pruned (hidden size, heads, MLP), and its adapter is merged afterwards.
- zero2_peft: LoRA under ZeRO-2.
- the uneven-lengths run also checks, from inside the ranks, that the teacher is sharded and not in the optimizer.
Never `--cpu`: with a DeepSpeed config it starts one plain process (test_cpu_flag_with_deepspeed_config_warns).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLI_ENV, REPO, assert_ok, metrics, run_config, train_args

pytestmark = pytest.mark.distributed

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
SEED = "2"  # completion_source(2, step, 0.5): step 0 -> dataset, step 1 -> student (tests/test_steps.py)


def launch(config: str, args: list, processes=2, timeout=300, launcher_flags=()) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file ds_configs/<config>`; on timeout the launcher and every rank it started are
    killed (torchrun puts each rank in a session of its own): a hung rank must fail the test, not outlive it."""
    command = [
        *LAUNCH, "--config_file", f"ds_configs/{config}", "--num_processes", str(processes),
        "--main_process_port", "0", *launcher_flags, *[str(arg) for arg in args],
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        launcher = psutil.Process(process.pid)
        for started in [*launcher.children(recursive=True), launcher]:
            started.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"launch did not finish in {timeout} s (a rank hung?):\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def state_dict(folder, name="model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / name))


# ---------------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def two_records(chat_data, tmp_path_factory):
    """The global batch is the whole dataset, so 2 ranks x 1 and 1 process x 2 see the same records whatever the
    sampler's order."""
    path = tmp_path_factory.mktemp("two") / "two.jsonl"
    path.write_text("".join(chat_data.read_text().splitlines(keepends=True)[:2]))
    return path


def equivalence_args(tiny_models, data, out, batch_size: int, *extra) -> list:
    student, teacher = tiny_models
    args = train_args(student, teacher, data, out, "--lmbda", "0.5", "--seed", SEED, *extra)
    # SGD, not Adam: Adam's first step is lr * sign(gradient) and would hide a wrongly scaled gradient.
    args += ["--per_device_train_batch_size", str(batch_size), "--optim", "sgd", "--learning_rate", "5.0"]
    return args


@pytest.fixture(scope="module")
def zero3_full(tiny_models, two_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_full") / "run"
    args = equivalence_args(tiny_models, two_records, out, 1, "--save_strategy", "steps", "--save_steps", "1")
    return launch("zero3.yaml", args), out


@pytest.fixture(scope="module")
def zero2_full(tiny_models, two_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2_full") / "run"
    args = equivalence_args(tiny_models, two_records, out, 1, "--save_strategy", "steps", "--save_steps", "1")
    return launch("zero2.yaml", args), out


@pytest.fixture(scope="module")
def one_process(tiny_models, two_records, tmp_path_factory):
    """The reference: plain `python gkd/train.py`, no accelerate, one process with both records in its batch."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    result = subprocess.run(
        [sys.executable, *equivalence_args(tiny_models, two_records, out, 2, "--max_steps", "1")],
        cwd=REPO, env=CLI_ENV, capture_output=True, text=True, timeout=300,
    )
    assert_ok(result)
    return out


@pytest.fixture(scope="module")
def padded_vocab_teacher(tiny_models, tmp_path_factory):
    """The tiny teacher with 4 padded vocabulary rows (ids 300-303, beyond the tokenizer and the student's embedding)
    that always win: real ids get logit 0, padded rows +-c*v give one of them a large logit for any hidden state.
    Real checkpoints pad too (Qwen: 151936 rows, 151665 tokens); untrained rows get sampled now and then."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, teacher_path = tiny_models
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path)
    tokens = len(AutoTokenizer.from_pretrained(teacher_path))
    with torch.no_grad():
        head = teacher.lm_head.weight
        assert head.shape[0] == tokens + 4
        head[:tokens] = 0
        directions = torch.randn(2, head.shape[1], generator=torch.Generator().manual_seed(0))
        head[tokens:] = 100 * torch.cat([directions, -directions])[[0, 2, 1, 3]]
    out = tmp_path_factory.mktemp("padded_teacher")
    teacher.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_path).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def width_pruned_student(tiny_models, tmp_path_factory):
    """The tiny student cut in width (hidden 32 -> 24, 4 -> 2 query heads, MLP 64 -> 40; head_dim stays 8, so the
    attention projections are no longer square): a pruned student must train under ZeRO-3 with LoRA and merge."""
    from gkd.tools.prune import PruneConfig, prune

    student, _ = tiny_models
    out = tmp_path_factory.mktemp("width_pruned") / "student"
    prune(PruneConfig(model_name_or_path=str(student), output_dir=str(out), hidden_size=24, num_attention_heads=2,
                      mlp_hidden_size=40, sample_max_new_tokens=0))
    return out


@pytest.fixture(scope="module")
def zero3_peft(width_pruned_student, chat_data, padded_vocab_teacher, tmp_path_factory):
    student = width_pruned_student
    out = tmp_path_factory.mktemp("zero3_peft") / "run"
    extra = ["--lmbda", "0.5", "--seed", SEED, "--use_peft", "--seq_kd", "true"]
    args = train_args(student, padded_vocab_teacher, chat_data, out, *extra)
    return launch("zero3.yaml", args), out


@pytest.fixture(scope="module")
def zero2_peft(tiny_models, chat_data, tmp_path_factory):
    student, teacher = tiny_models
    out = tmp_path_factory.mktemp("zero2_peft") / "run"
    args = train_args(student, teacher, chat_data, out, "--lmbda", "0.5", "--seed", SEED, "--use_peft")
    return launch("zero2.yaml", args), out


# ------------------------------------------------------------------------------------------------- the claims


@pytest.mark.parametrize("run", ["zero2_full", "zero2_peft", "zero3_full", "zero3_peft"])
def test_zero_run_finishes_records_world_and_saves_a_loadable_result(request, tiny_models, run):
    """Both ranks finish (the launcher exits 0 only then), run_config.json says 2 ranks and the stage, and the
    consolidated result loads with plain from_pretrained / peft, with trained, non-empty weights."""
    from transformers import AutoModelForCausalLM

    result, out = request.getfixturevalue(run)
    assert_ok(result)
    stage, use_peft = int(run[4]), run.endswith("peft")
    config = run_config(out)
    assert config["world_size"] == 2 and config["distributed_type"] == "DEEPSPEED"
    assert config["zero_stage"] == stage and config["launch_problems"] == []
    logged = metrics(out)
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    assert [m["on_policy"] for m in logged] == [0.0, 1.0]  # one step of each kind, same draw on both ranks

    original = AutoModelForCausalLM.from_pretrained(config["model_name_or_path"])  # zero3_peft's is width-pruned
    if use_peft:
        from peft import PeftModel

        adapter = state_dict(out, "adapter_model.safetensors")
        assert adapter and all(tensor.numel() > 0 for tensor in adapter.values())  # ZeRO-3 shards are gathered
        assert any(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)  # trained
        model = PeftModel.from_pretrained(original, out)
        loaded = {name: p for name, p in model.named_parameters() if "lora_B" in name}
        assert loaded and any(p.abs().sum() > 0 for p in loaded.values())
    else:
        trained = AutoModelForCausalLM.from_pretrained(out)
        before, after = original.state_dict(), trained.state_dict()
        assert before.keys() == after.keys()
        assert all(after[name].shape == before[name].shape for name in before)
        assert any(not torch.equal(after[name], before[name]) for name in before)


def test_a_width_pruned_student_trained_under_zero3_with_lora_merges_into_one_loadable_model(
        zero3_peft, width_pruned_student, tmp_path):
    """Prune, distil (ZeRO-3, LoRA), merge: the merged folder loads with plain from_pretrained, keeps the pruned
    shapes and head_dim, and computes what the base plus adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gkd.tools.merge import MergeConfig, merge_lora

    result, out = zero3_peft
    assert_ok(result)
    assert run_config(out)["model_name_or_path"] == str(width_pruned_student)
    merge_lora(MergeConfig(adapter_path=str(out), output_dir=str(tmp_path / "merged")), log=lambda line: None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    config = merged.config
    assert (config.hidden_size, config.num_attention_heads, config.head_dim, config.intermediate_size) == (24, 2, 8, 40)
    assert merged.model.layers[0].self_attn.q_proj.weight.shape == (16, 24)
    base = AutoModelForCausalLM.from_pretrained(width_pruned_student)
    unmerged = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[3, 17, 42, 8, 99, 5]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-5)


def test_zero3_teacher_generates_within_the_shared_vocabulary(zero3_peft):
    """--seq_kd under ZeRO-3: the sharded teacher samples step 1's completions. Its padded rows (ids the student
    cannot embed) always win, so before the fix the student's forward failed with `index out of range`."""
    result, out = zero3_peft
    assert_ok(result)
    logged = metrics(out)
    assert logged[0]["teacher_generated"] == 1.0 and logged[0]["completion_tokens"] > 0


@pytest.mark.parametrize("run", ["zero2_full", "zero3_full"])
def test_first_step_matches_one_process(request, tiny_models, one_process, run):
    """Same global batch (2 ranks x 1 record vs 1 process x 2 records), step 1 off-policy (lmbda draw): the logged
    loss, the gradient norm and the SGD-updated weights match a plain single-process run. fp32 on CPU; measured
    differences are ~1e-8 relative, the tolerances below are 100x that or more."""
    result, out = request.getfixturevalue(run)
    assert_ok(result)
    sharded_step, single_step = metrics(out)[0], metrics(one_process)[0]
    assert sharded_step["on_policy"] == single_step["on_policy"] == 0.0
    assert sharded_step["loss"] == pytest.approx(single_step["loss"], rel=1e-6)
    assert sharded_step["grad_norm"] == pytest.approx(single_step["grad_norm"], rel=1e-5)

    original = state_dict(tiny_models[0])
    sharded, single = state_dict(out / "checkpoint-1"), state_dict(one_process)
    largest_update = max((single[name] - original[name]).abs().max() for name in original)
    assert largest_update > 1e-3  # the step moved the weights measurably
    for name in original:
        # Every weight's update agrees to 1e-4 of the largest update (a wrongly scaled gradient is off by 100%).
        torch.testing.assert_close(
            sharded[name] - original[name], single[name] - original[name], rtol=0, atol=1e-4 * largest_update
        )


def test_zero3_resume_from_checkpoint(tiny_models, two_records, zero3_full, tmp_path):
    """Resuming a ZeRO-3 run from checkpoint-1's DeepSpeed shards replays step 2 (on-policy) as the first run did."""
    result, out = zero3_full
    assert_ok(result)
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / "global_step1").is_dir() and (checkpoint / "model.safetensors").exists()
    resumed = tmp_path / "resumed"
    args = equivalence_args(tiny_models, two_records, resumed, 1, "--resume_from_checkpoint", checkpoint)
    assert_ok(launch("zero3.yaml", args))
    first, again = metrics(out)[1], metrics(resumed)
    assert [m["step"] for m in again] == [2] and again[0]["on_policy"] == 1.0
    assert again[0]["loss"] == pytest.approx(first["loss"], rel=1e-5)
    finished, replayed = state_dict(out), state_dict(resumed)
    for name in finished:
        torch.testing.assert_close(replayed[name], finished[name], rtol=1e-5, atol=1e-7)


UNEVEN = """
import json, os, runpy, sys
import torch
from transformers.generation.utils import GenerationMixin

from gkd.trainer import GKDTrainer

LOG = {log_dir!r}
generate, train = GenerationMixin.generate, GKDTrainer.train


def record(name, value):
    with open(os.path.join(LOG, f"{{name}}-rank{{torch.distributed.get_rank()}}.jsonl"), "a") as handle:
        handle.write(json.dumps(value) + "\\n")


def uneven(self, *args, **kwargs):
    # Rank 0 stops after one token, rank 1 may write all of max_new_tokens: different lengths on purpose.
    if torch.distributed.get_rank() == 0:
        kwargs["max_new_tokens"] = 1
    sequences = generate(self, *args, **kwargs)
    record("new_tokens", sequences.shape[1] - kwargs["input_ids"].shape[1])
    return sequences


def probed_train(self, *args, **kwargs):
    # After training: what this rank holds of the teacher, and whether the optimizer ever saw it.
    result = train(self, *args, **kwargs)
    teacher = list(self.teacher.model.module.parameters())
    optimized = {{id(p) for group in self.model_wrapped.optimizer.fp16_groups for p in group}}
    record("teacher", {{
        "local": sum(p.ds_tensor.numel() for p in teacher),
        "total": sum(p.ds_numel for p in teacher),
        "trainable": any(p.requires_grad for p in teacher),
        "in_optimizer": any(id(p) in optimized for p in teacher),
        "optimized": len(optimized),
    }})
    return result


GenerationMixin.generate, GKDTrainer.train = uneven, probed_train
sys.argv[0] = "gkd/train.py"
runpy.run_path("gkd/train.py", run_name="__main__")
"""


def read_records(folder, name, rank) -> list:
    return [json.loads(line) for line in (Path(folder) / f"{name}-rank{rank}.jsonl").read_text().splitlines()]


def test_zero3_uneven_completion_lengths_do_not_hang(tiny_models, chat_data, tmp_path):
    """lmbda 1 under ZeRO-3 with the student sampled from its shards (no gather), where rank 0's completions end
    after one token and rank 1's run on: every rank keeps stepping until the longest is done, no deadlock.
    Also, from inside the ranks: each holds about half of the teacher, which is frozen and not in the optimizer."""
    student, teacher = tiny_models
    script = tmp_path / "uneven_train.py"
    script.write_text(UNEVEN.format(log_dir=str(tmp_path)))
    out = tmp_path / "run"
    args = train_args(student, teacher, chat_data, out, "--lmbda", "1", "--ds3_gather_for_generation", "false")
    result = launch("zero3.yaml", [script, *args[1:]], timeout=240)
    assert_ok(result)
    short, long = read_records(tmp_path, "new_tokens", 0), read_records(tmp_path, "new_tokens", 1)
    assert len(short) == len(long) == 2  # both ranks sampled at both steps: the draw agreed
    assert short == [1, 1] and max(long) > 1
    assert [m["on_policy"] for m in metrics(out)] == [1.0, 1.0]
    for rank in (0, 1):
        (held,) = read_records(tmp_path, "teacher", rank)
        assert held["local"] < 0.6 * held["total"], held  # a shard, not a copy
        assert not held["trainable"] and not held["in_optimizer"] and held["optimized"] > 0, held


def test_cpu_flag_with_deepspeed_config_warns(tiny_models, chat_data, tmp_path):
    """`accelerate launch --cpu` with a DeepSpeed config and 2 processes starts one plain process: say so, loudly."""
    student, teacher = tiny_models
    out = tmp_path / "run"
    args = train_args(student, teacher, chat_data, out, "--max_steps", "1", "--lmbda", "0")
    result = launch("zero3.yaml", args, launcher_flags=["--cpu"], timeout=240)
    assert_ok(result)
    assert "LAUNCH MISMATCH" in result.stderr
    assert "--cpu" in result.stderr and "DeepSpeed is not active" in result.stderr
    config = run_config(out)
    assert config["world_size"] == 1 and config["zero_stage"] is None
    assert len(config["launch_problems"]) == 2


# ------------------------------------------------------------------------------------- fast checks, no launch


def test_launch_problems(monkeypatch):
    from gkd.launch import cpu_deepspeed_backend, launch_problems

    for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    assert launch_problems(1, "NO", []) == []
    assert cpu_deepspeed_backend(has_accelerator=False) is None  # not launched: nothing to choose

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launch_problems(2, "DEEPSPEED", []) == []
    assert cpu_deepspeed_backend(has_accelerator=False) == "gloo"
    assert cpu_deepspeed_backend(has_accelerator=True) is None  # GPUs: accelerate's own nccl
    (alone,) = launch_problems(1, "DEEPSPEED", [])
    assert "world size 1" in alone
    assert len(launch_problems(2, "MULTI_CPU", [])) == 1  # DeepSpeed asked for, not active

    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    zero3 = ["accelerate", "launch", "--cpu", "--config_file", str(REPO / "ds_configs/zero3.yaml"), "gkd/train.py"]
    assert len(launch_problems(1, "NO", zero3)) == 2
    plain = ["accelerate", "launch", "--cpu", "--config_file", str(REPO / "ds_configs/multi_gpu.yaml")]
    assert len(launch_problems(1, "NO", plain)) == 1


def test_ds_configs_point_at_their_json_and_leave_the_trainer_its_values():
    import yaml

    folder = REPO / "ds_configs"
    for name, stage in [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)]:
        launch_config = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert launch_config["distributed_type"] == "DEEPSPEED" and not launch_config.get("use_cpu")
        json_path = launch_config["deepspeed_config"]["deepspeed_config_file"]
        assert json_path == f"ds_configs/{name}.json"  # relative to the repo root, where users launch
        ds = json.loads((REPO / json_path).read_text())
        assert ds["zero_optimization"]["stage"] == stage
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert ds[key] == "auto", key  # filled from --per_device_train_batch_size etc.
        assert ds["bf16"]["enabled"] == "auto"  # follows --bf16, so the same file serves GPUs and CPUs
        if stage == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    offload = json.loads((folder / "zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"
    ddp = yaml.safe_load((folder / "multi_gpu.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU" and "deepspeed_config" not in ddp
    assert (folder / "README.md").exists()


def test_zero3_several_teachers_each_ranks_rows_with_another_teacher(tiny_models, second_teacher, two_records,
                                                                     tmp_path):
    """Two live teachers, sharded, and each rank's one record taught by another one: a sharded teacher's forward and
    generation are collectives, so every rank runs every teacher (it hung or died when each rank asked only its
    own). Dataset, on-policy and --seq_kd steps all finish, each teacher's loss logged."""
    student, teacher = tiny_models
    data = tmp_path / "routed.jsonl"
    records = [json.loads(line) for line in two_records.read_text().splitlines()]
    data.write_text("".join(json.dumps({**record, "teacher": name}) + "\n"
                            for record, name in zip(records, ("math", "chat"))))
    args = equivalence_args(tiny_models, data, tmp_path / "run", 1, "--seq_kd", "--max_steps", "3")
    position = args.index("--teacher_model_name_or_path")
    args = args[:position] + args[position + 2:] + ["--teacher", f"math={teacher}", "--teacher",
                                                     f"chat={second_teacher}"]
    assert_ok(launch("zero3.yaml", args))
    logged = metrics(tmp_path / "run")
    assert {m["on_policy"] for m in logged} == {0.0, 1.0}
    assert all(m["kd_tokens/math"] > 0 and m["kd_tokens/chat"] > 0 for m in logged)

"""Runs that survive clusters and users, through the real CLI on tiny models.

Bad input is refused before any model loads; non-finite steps are skipped, then stop the run with a checkpoint;
SIGTERM saves a checkpoint and a resumed run logs the uninterrupted run's losses; a checkpoint whose save was cut
short is never resumed from.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CLI_ENV, REPO, assert_ok, assert_user_error, default_signals, run_cli, train_args

pytestmark = pytest.mark.subprocess
from safetensors.torch import load_file, save_file

from gkd.checkpoints import COMPLETE_MARKER, checkpoint_problem

# fp32 on CPU, same kernels, same inputs: resumed losses agree to rounding (measured: bit-identical).
RESUME_RTOL = 1e-5


def logged_steps(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def poisoned_copy(model, folder, poison) -> Path:
    """A copy of a model folder whose saved weights `poison(tensors)` edited in place (e.g. a NaN)."""
    shutil.copytree(model, folder)
    tensors = weights(folder)
    poison(tensors)
    save_file(tensors, Path(folder) / "model.safetensors", metadata={"format": "pt"})
    return Path(folder)


# ------------------------------------------------------------------------------------------- non-finite steps


def test_nonfinite_steps_are_skipped_then_stop_the_run_with_a_checkpoint(tiny_models, chat_data, tmp_path):
    """A teacher with a NaN weight makes every loss NaN: each step is skipped (the student is untouched), and the
    third in a row saves a checkpoint and stops with one error line. On-policy sampling (the student) still runs."""
    student, teacher = tiny_models

    def nan_in_one_layer(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")

    broken = poisoned_copy(teacher, tmp_path / "nan_teacher", nan_in_one_layer)
    out = tmp_path / "out"
    extra = ["--lmbda", "0.5", "--max_steps", "10", "--max_nonfinite_steps", "3"]
    result = run_cli(train_args(student, broken, chat_data, out, *extra))
    line = assert_user_error(result)
    assert "3 optimizer steps in a row" in line and "non-finite" in line and str(out / "checkpoint-3") in line
    logged = logged_steps(out)
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert all(m["nonfinite_skipped"] == 1 and math.isnan(m["loss"]) for m in logged)
    assert checkpoint_problem(out / "checkpoint-3") is None
    assert not (out / "model.safetensors").exists()  # no final model: the run did not finish
    original, saved = weights(student), weights(out / "checkpoint-3")
    assert all(torch.equal(original[name], saved[name]) for name in original)  # no update was applied


def test_a_nonfinite_step_is_skipped_and_training_goes_on(tiny_models, tmp_path):
    """Only the record with '~' meets the teacher's NaN embedding row: its step (one per epoch) is skipped, the others
    train, and the weights stay finite."""
    from transformers import AutoTokenizer

    student, teacher = tiny_models
    words = ["one", "two", "red", "blue", "cat", "dog", "hello", "~"]
    conversations = [[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}] for w in words]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))
    tokenizer = AutoTokenizer.from_pretrained(student)
    ids = [set(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in conversations]
    only_in_last = sorted(ids[-1] - set().union(*ids[:-1]))
    assert only_in_last

    def nan_rows(tensors):
        tensors["model.embed_tokens.weight"][only_in_last] = float("nan")

    broken = poisoned_copy(teacher, tmp_path / "teacher", nan_rows)
    out = tmp_path / "out"
    result = run_cli(train_args(student, broken, data, out, "--lmbda", "0", "--max_steps", "8"))
    assert_ok(result)
    logged = logged_steps(out)
    assert len(logged) == 8
    skipped = [m for m in logged if m["nonfinite_skipped"]]
    assert len(skipped) == 2  # the '~' record once per epoch (4 steps of 2 records)
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in logged if not m["nonfinite_skipped"])
    trained, original = weights(out), weights(student)
    assert all(torch.isfinite(tensor).all() for tensor in trained.values())
    assert any(not torch.equal(trained[name], original[name]) for name in original)


# ------------------------------------------------------------------------------ preemption and exact resumption


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches_the_uninterrupted_one(tiny_models, chat_data, tmp_path):
    """SIGTERM mid-run: a complete checkpoint at the current step, exit 0, no final model. Resumed with `last` into the
    same output_dir, the run logs the uninterrupted run's losses (on-policy steps included) and ends on its weights."""
    student, teacher = tiny_models
    steps = 16
    extra = ["--lmbda", "0.5", "--max_steps", steps, "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2"]
    full = tmp_path / "full"
    assert_ok(run_cli(train_args(student, teacher, chat_data, full, *extra)))

    out = tmp_path / "preempted"
    command = [sys.executable, *map(str, train_args(student, teacher, chat_data, out, *extra))]
    with open(tmp_path / "preempted.log", "w") as log:  # a file, not a pipe nobody reads while we wait
        process = subprocess.Popen(command, cwd=REPO, env=CLI_ENV, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=default_signals)
        deadline = time.monotonic() + 240
        while not any(m["step"] >= 2 for m in logged_steps(out)):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before step 2"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=240)
    stderr = (tmp_path / "preempted.log").read_text()
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-4000:]
    stopped = logged_steps(out)[-1]["step"]
    assert 2 <= stopped < steps
    assert "SIGTERM" in stderr and "--resume_from_checkpoint last" in stderr
    assert checkpoint_problem(out / f"checkpoint-{stopped}") is None
    assert not (out / "model.safetensors").exists()
    forgot = run_cli(train_args(student, teacher, chat_data, out, *extra), timeout=120)  # requeued without resuming
    assert_user_error(forgot, str(out), "--resume_from_checkpoint", "--overwrite_output_dir")

    resumed = run_cli(train_args(student, teacher, chat_data, out, *extra, "--resume_from_checkpoint", "last"))
    assert_ok(resumed)
    assert (out / f"checkpoint-{stopped}").is_dir()  # resuming into the output_dir wiped nothing
    expected = {m["step"]: m for m in logged_steps(full)}
    logged = logged_steps(out)
    assert [m["step"] for m in logged] == list(range(1, stopped + 1)) + list(range(stopped + 1, steps + 1))
    after = logged[stopped:]
    assert any(m["on_policy"] == 1 for m in after)  # sampling after the resumption is exercised
    for m in after:
        reference = expected[m["step"]]
        assert m["on_policy"] == reference["on_policy"]
        assert m["learning_rate"] == pytest.approx(reference["learning_rate"], rel=1e-12)
        assert m["completion_tokens"] == reference["completion_tokens"]
        assert m["loss"] == pytest.approx(reference["loss"], rel=RESUME_RTOL), m["step"]
    final, reference_final = weights(out), weights(full)
    for name, tensor in reference_final.items():
        torch.testing.assert_close(final[name], tensor, rtol=RESUME_RTOL, atol=1e-7)


def _rank_process(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's child worker with RANK=`rank` (Linux /proc; torch elastic gives each its session)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if parent == launcher else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not (REPO / "ds_configs/zero2.yaml").exists(), reason="needs ds_configs/ (the DeepSpeed launch)")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_models, chat_data, tmp_path):
    """2 real ranks (DeepSpeed ZeRO-2 on CPU, gloo): only rank 1 gets SIGTERM; both agree at the step end, save one
    complete checkpoint (with both ranks' RNG states and the ZeRO shards) and exit 0."""
    student, teacher = tiny_models
    out = tmp_path / "out"
    args = train_args(student, teacher, chat_data, out, "--lmbda", "0.5", "--max_steps", "40")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds_configs/zero2.yaml",
               "--num_processes", "2", "--main_process_port", "0", *map(str, args)]
    with open(tmp_path / "launch.log", "w") as log:
        launcher = subprocess.Popen(command, cwd=REPO, env=CLI_ENV, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not any(m["step"] >= 2 for m in logged_steps(out)):
                assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before step 2"
                time.sleep(0.05)
            os.kill(_rank_process(launcher.pid, 1), signal.SIGTERM)
            launcher.wait(timeout=240)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    output = (tmp_path / "launch.log").read_text()
    assert launcher.returncode == 0 and "Traceback" not in output, output[-4000:]
    stopped = logged_steps(out)[-1]["step"]
    assert stopped < 40 and "another rank got a stop signal" in output
    checkpoint = out / f"checkpoint-{stopped}"
    assert checkpoint_problem(checkpoint) is None
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [checkpoint.name]


def test_resume_last_skips_checkpoints_whose_save_was_cut_short(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    out = tmp_path / "out"
    saving = ["--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "3", "--lmbda", "0.5"]
    assert_ok(run_cli(train_args(student, teacher, chat_data, out, *saving, "--max_steps", "4")))
    first_run = {m["step"]: m for m in logged_steps(out)}
    # Rotation counted complete checkpoints only, and each marker lists every file of its folder: it was written last.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    for folder in out.glob("checkpoint-*"):
        listed = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER}
        assert set(listed) == on_disk and "model.safetensors" in listed and "optimizer.pt" in listed

    # Killed mid-save, twice: checkpoint-4's weights cut short; checkpoint-5 has every file but no marker yet.
    model_file = out / "checkpoint-4" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-5")
    (out / "checkpoint-5" / COMPLETE_MARKER).unlink()

    explicit = run_cli(
        train_args(student, teacher, chat_data, out, *saving, "--resume_from_checkpoint", out / "checkpoint-5"),
        timeout=120,
    )
    assert_user_error(explicit, "checkpoint-5", "not a complete checkpoint", str(out / "checkpoint-3"))

    resumed = run_cli(
        train_args(student, teacher, chat_data, out, *saving, "--max_steps", "6", "--resume_from_checkpoint", "last")
    )
    assert_ok(resumed)
    assert "skipping incomplete checkpoint" in resumed.stderr and "checkpoint-5" in resumed.stderr
    assert f"resuming from {out / 'checkpoint-3'}" in resumed.stderr
    logged = logged_steps(out)
    # The resumed run logs steps 4-6 again; metrics.jsonl drops the first run's lines after step 3, so it reads as one.
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[3]["loss"] == pytest.approx(first_run[4]["loss"], rel=RESUME_RTOL)
    # The linear schedule of 6 steps from step 4 on (3/6 of the rate), not the checkpoint's rate of a 4-step run (1/4)
    assert logged[3]["learning_rate"] == pytest.approx(first_run[1]["learning_rate"] * 3 / 6)
    assert logged[4]["learning_rate"] == pytest.approx(first_run[1]["learning_rate"] * 2 / 6)
    # Steps 4 and 5 were saved again over the broken folders, complete this time; rotation kept the newest three.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    assert all(checkpoint_problem(folder) is None for folder in out.glob("checkpoint-*"))


# ------------------------------------------------------------------------------------------ in-process, fast

"""benchmarks/ end to end on the `smoke` preset: every system runs and reports sane numbers. Not timing tests."""

import json
import math

import pytest
from helpers import run_cli

from benchmarks import bench
from benchmarks.memory_budget import BudgetArguments, estimate, saved_activation_bytes

pytestmark = pytest.mark.bench

PHASES = {"generation", "teacher_forward", "student_forward_backward", "optimizer", "other"}
SYSTEMS = {
    "gkd/lmbda0", "trl-gkd/lmbda0", "gkd/lmbda1", "trl-gkd/lmbda1", "trl-distill/lmbda1", "gkd/lmbda1-lora",
    "trl-distill/lmbda1-lora",
}


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_system_reports_every_phase(tmp_path):
    output = tmp_path / "bench.json"
    result = run_cli(["-m", "benchmarks.bench", "--preset", "smoke", "--threads", "1", "--output_json", output], timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert {row["system"] for row in report["results"]} == SYSTEMS
    for row in report["results"]:
        name, phases = row["system"], row["phases_s"]
        assert set(phases) == PHASES, name
        assert all(math.isfinite(value) for value in phases.values()), name
        for key in ("step_s", "step_cpu_s", "samples_per_s", "tokens_per_s", "peak_memory_gib"):
            assert positive(row[key]), (name, key)
        for phase in ("teacher_forward", "student_forward_backward", "optimizer"):
            assert positive(phases[phase]), (name, phase)
        # Only on-policy systems generate; the phases add up to the step (exclusive times).
        assert positive(phases["generation"]) == (row["lmbda"] > 0), name
        assert phases["other"] > -1e-6 and sum(phases.values()) <= row["step_s"] * 1.000001, name
    assert len(report["comparisons"]) == 4
    for row in report["comparisons"]:
        assert all(positive(row[key]) for key in ("step_time_ratio", "cpu_time_ratio", "peak_memory_ratio")), row
    assert "| gkd/lmbda1 |" in result.stdout and "ours / TRL" in result.stdout  # the Markdown table


def test_h100_preset_builds_without_allocating(tmp_path):
    """The GPU preset cannot run here; its model and trainer configs must still build (meta-device models)."""
    output = tmp_path / "dry.json"
    result = run_cli(["-m", "benchmarks.bench", "--preset", "h100", "--dry_run", "--output_json", output], timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["shapes"]["vocab_size"] == 151_936 and report["shapes"]["batch_size"] == 8
    # Qwen2-0.5B and -1.5B have 494M and 1.54B parameters; the bench's shapes must match them.
    assert abs(report["models"]["student"]["parameters"] / 494e6 - 1) < 0.01
    assert abs(report["models"]["teacher"]["parameters"] / 1.544e9 - 1) < 0.01
    assert set(report["systems"]) == SYSTEMS


def test_generation_bench_times_each_backend_at_the_forced_length(tmp_path):
    """benchmarks/bench_generation.py on the smoke preset: every completion is forced to the full length, or it fails."""
    output = tmp_path / "generation.json"
    result = run_cli(
        ["-m", "benchmarks.bench_generation", "--preset", "smoke", "--backends", "plain", "static", "--repeats", "2",
         "--threads", "1", "--output_json", output],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert [row["backend"] for row in report["results"]] == ["plain", "static"]
    assert report["completion_length"] == 8 and report["batch_size"] == 2
    for row in report["results"]:
        assert len(row["times_s"]) == 2 and all(positive(value) for value in row["times_s"]), row
        assert positive(row["s_per_call"]) and positive(row["new_tokens_per_s"]), row
    assert "| static |" in result.stdout


def test_generation_bench_refuses_an_unknown_backend():
    result = run_cli(["-m", "benchmarks.bench_generation", "--preset", "smoke", "--backends", "vllm"], timeout=120)
    assert result.returncode != 0 and "unknown backends ['vllm']" in result.stderr
    assert "Traceback" not in result.stderr


def test_loss_bench_runs_both_variants_and_they_agree(tmp_path):
    """benchmarks/bench_loss.py at a toy size: both variants report a time and a memory peak, and the same loss value."""
    output = tmp_path / "loss.json"
    result = run_cli(
        ["-m", "benchmarks.bench_loss", "--rows", "64", "--vocab", "2000", "--hidden_student", "32", "--hidden_teacher",
         "48", "--chunk_size", "16", "--repeats", "2", "--output_json", output],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {row["variant"]: row for row in json.loads(output.read_text())["results"]}
    assert set(rows) == {"reference", "chunked"}
    for row in rows.values():
        assert "error" not in row and positive(row["seconds_per_call"]) and row["peak_memory_mib"] >= 0, row
    assert math.isclose(rows["chunked"]["loss"], rows["reference"]["loss"], rel_tol=1e-5)


def test_rollout_bench_reports_both_modes_and_the_served_costs(tiny_models, chat_data, tmp_path):
    """benchmarks/bench_rollouts.py at a toy size: one local and one served run (the shipped server started by the
    bench), each step timed, the served run's save, load and sampling costs read back from metrics.jsonl."""
    student, teacher = tiny_models
    output = tmp_path / "rollouts.json"
    result = run_cli(
        ["-m", "benchmarks.bench_rollouts", "--student", student, "--teacher", teacher, "--train_data", chat_data,
         "--steps", "2", "--rounds", "1", "--batch_size", "2", "--max_new_tokens", "8", "--max_length", "96",
         "--lora_r", "4", "--work_dir", tmp_path / "work", "--output_json", output],
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(output.read_text())
    assert [run["mode"] for run in report["runs"]] == ["local", "served"]
    local, served = report["summary"]["local"], report["summary"]["served"]
    assert local["timed_steps"] == served["timed_steps"] == 1
    for key in ("step_seconds", "rollout_save_seconds", "rollout_load_seconds", "rollout_sampling_seconds"):
        assert positive(served[key]), key
    assert positive(local["step_seconds"]) and "rollout_sampling_seconds" not in local
    assert math.isfinite(served["rest_seconds"]) and positive(served["step_time_vs_local"])
    assert "| served |" in result.stdout


def test_child_runner_returns_values_errors_and_deaths():
    """Both benches run each measurement through `run_in_child`; a failure must come back, not hang or vanish."""
    import os

    from benchmarks.profiling import run_in_child

    assert run_in_child(divmod, 7, 2) == ("ok", (3, 1))
    status, detail = run_in_child(int, "seven")
    assert status == "error" and "ValueError: invalid literal" in detail and "Traceback" in detail
    status, detail = run_in_child(os._exit, 3)
    assert status == "error" and "exit code 3" in detail
    # A spawned child gets the extra variables (read at start, as glibc's malloc settings are); the parent keeps its.
    key = "GKD_TEST_CHILD_VARIABLE"
    assert run_in_child(os.getenv, key, start_method="spawn", environment={key: "set"}) == ("ok", "set")
    assert key not in os.environ


# ---------------------------------------------------------------- memory budget (benchmarks/memory_budget.py)


def test_cli_writes_parts_that_add_up_to_the_peak(tmp_path):
    output = tmp_path / "budget.json"
    result = run_cli(["-m", "benchmarks.memory_budget", "--preset", "smoke", "--output_json", output], timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    budget = json.loads(output.read_text())
    assert "estimated peak" in result.stdout
    on_top = {phase: sum(parts.values()) for phase, parts in budget["phases"].items()}
    assert on_top[budget["peak_phase"]] == max(on_top.values())
    assert budget["peak_bytes"] == sum(budget["held"].values()) + on_top[budget["peak_phase"]]


def test_activations_are_measured_per_layer_and_scale_with_the_batch():
    preset = bench.PRESETS["smoke"]
    width, shape = preset.prompt_length + preset.completion_length, preset.student
    per_layer = saved_activation_bytes(preset, 2, lora=False) - saved_activation_bytes(preset, 1, lora=False)
    # The MLP alone keeps gate, silu(gate), up and their product for backward: 4 x [width, intermediate] in fp32.
    assert per_layer >= 4 * width * shape.intermediate_size * 4
    assert per_layer < 40 * width * max(shape.hidden_size, shape.intermediate_size) * 4

    one = estimate(BudgetArguments(preset="smoke", batch_size=1))
    two = estimate(BudgetArguments(preset="smoke", batch_size=2))
    assert two["phases"]["loss"]["student activations"] == 2 * one["phases"]["loss"]["student activations"]
    assert two["held"]["student weights"] == one["held"]["student weights"]
    checkpointed = estimate(BudgetArguments(preset="smoke", batch_size=2, gradient_checkpointing=True))
    assert checkpointed["phases"]["loss"]["student activations"] < two["phases"]["loss"]["student activations"]


def test_lora_trades_optimizer_state_for_merged_copies():
    full = estimate(BudgetArguments(preset="smoke"))
    lora = estimate(BudgetArguments(preset="smoke", lora=True))
    adamw = "AdamW state (2 per trainable weight)"
    assert lora["held"][adamw] < full["held"][adamw] / 5
    assert "merged LoRA copies" in lora["held"] and "merged LoRA copies" not in full["held"]
    # A frozen lm_head: the loss keeps no [V, H] weight gradient.
    preset = bench.PRESETS["smoke"]
    saved = "loss: saved gradients"
    assert full["phases"]["loss"][saved] - lora["phases"]["loss"][saved] == (
        preset.vocab_size * preset.student.hidden_size * 4
    )


def test_smaller_loss_chunks_shrink_the_loss_buffers():
    preset = bench.PRESETS["smoke"]
    rows = preset.batch_size * preset.completion_length
    whole = estimate(BudgetArguments(preset="smoke", loss_chunk_size=rows))
    half = estimate(BudgetArguments(preset="smoke", loss_chunk_size=rows // 2))
    buffers = "loss: chunk buffers"
    assert half["phases"]["loss"][buffers] == whole["phases"]["loss"][buffers] / 2


def test_each_live_teacher_adds_its_weights_and_a_served_one_nothing():
    one = estimate(BudgetArguments(preset="smoke"))
    two = estimate(BudgetArguments(preset="smoke", live_teachers=2))
    served = estimate(BudgetArguments(preset="smoke", live_teachers=0))
    weights = one["held"]["teacher weights"]
    assert weights > 0 and two["held"]["teacher weights (2 live)"] == 2 * weights
    assert served["held"]["teacher weights (0 live)"] == 0
    assert two["peak_bytes"] - one["peak_bytes"] == weights == one["peak_bytes"] - served["peak_bytes"]
    result = run_cli(["-m", "benchmarks.memory_budget", "--preset", "smoke", "--live_teachers", "-1"], timeout=120)
    assert result.returncode == 2 and "error: --live_teachers must be 0 or more" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr

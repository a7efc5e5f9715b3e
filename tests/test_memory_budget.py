"""scripts/memory_budget.py: the parts of a training step's peak add up, and each responds to what it depends on."""

import json

from conftest import run_cli

from gkd import bench
from gkd.memory_budget import BudgetArguments, estimate, saved_activation_bytes


def test_cli_writes_parts_that_add_up_to_the_peak(tmp_path):
    output = tmp_path / "budget.json"
    result = run_cli(["scripts/memory_budget.py", "--preset", "smoke", "--output_json", output], timeout=120)
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

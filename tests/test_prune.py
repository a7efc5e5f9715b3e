"""scripts/prune.py end to end on a tiny Llama, and examples/build_prompts.py.

The tiny source model is rigged so that importance has a right answer: block 2 adds nothing to the residual stream
(o_proj and down_proj are zero, so its Block Influence is exactly 0), and MLP channels 0-9 of block 0 never fire
(their up_proj rows are zero). Depth pruning must drop block 2, width pruning must drop those channels.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli
from tiny import make_model, make_tokenizer
from transformers import AutoModelForCausalLM

IDENTITY_BLOCK = 2
DEAD_CHANNELS = range(10)  # in block 0


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune_source")
    model = make_model(folder, make_tokenizer(folder), num_layers=4, hidden_size=32)
    with torch.no_grad():
        model.model.layers[IDENTITY_BLOCK].self_attn.o_proj.weight.zero_()
        model.model.layers[IDENTITY_BLOCK].mlp.down_proj.weight.zero_()
        model.model.layers[0].mlp.up_proj.weight[list(DEAD_CHANNELS)] = 0
    model.save_pretrained(folder)
    return folder


def prune(source, output_dir, *options):
    result = run_cli(["scripts/prune.py", "--model_name_or_path", source, "--output_dir", output_dir,
                      "--sample_max_new_tokens", "4", *options], timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((Path(output_dir) / "pruning.json").read_text())


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def assert_same_block(student_layer, source_layer):
    student_weights, source_weights = student_layer.state_dict(), source_layer.state_dict()
    assert student_weights.keys() == source_weights.keys()
    for name, weight in source_weights.items():
        assert torch.equal(student_weights[name], weight), name


def assert_same_outside_blocks(student, source_model):
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.state_dict()[name], source_model.state_dict()[name]), name


@torch.no_grad()
def assert_cached_generation_matches_full_forward(model):
    """Greedy tokens generated with the KV cache are the argmax of one cache-free forward over the whole sequence:
    a block whose layer_idx was not renumbered would read or write another block's cache entry."""
    prompt = torch.tensor([[3, 17, 42, 8, 99, 5]])
    output = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True)
    logits = model(output, use_cache=False).logits
    assert torch.equal(logits[0, prompt.shape[1] - 1:-1].argmax(-1), output[0, prompt.shape[1]:])


def assert_mlp_channels_taken_from(pruned_mlp, original_mlp) -> list[int]:
    """The source channel each kept row came from, checked consistent across gate, up and down; in source order."""
    matches = (pruned_mlp.gate_proj.weight[:, None, :] == original_mlp.gate_proj.weight[None]).all(-1)
    assert (matches.sum(-1) == 1).all()
    channels = matches.int().argmax(-1)
    assert (channels.diff() > 0).all()
    assert torch.equal(pruned_mlp.up_proj.weight, original_mlp.up_proj.weight[channels])
    assert torch.equal(pruned_mlp.down_proj.weight, original_mlp.down_proj.weight[:, channels])
    return channels.tolist()


def test_num_layers_and_mlp_width_drop_the_least_important(source, tmp_path):
    report = prune(source, tmp_path / "student", "--num_layers", "2", "--mlp_hidden_size", "40")
    depth = report["depth"]
    assert depth["block_importance"][IDENTITY_BLOCK] == pytest.approx(0.0, abs=1e-6)
    assert IDENTITY_BLOCK in depth["dropped_layers"]
    assert depth["dropped_layers"] == sorted(depth["ranking_least_important_first"][:2])
    assert depth["kept_layers"] == [i for i in range(4) if i not in depth["dropped_layers"]]
    assert report["width"]["intermediate_size_after"] == 40
    assert set(report["width"]["kept_importance_fraction"]) == {str(i) for i in depth["kept_layers"]}
    assert "reply" in report["sample"]

    student, source_model = load(tmp_path / "student"), load(source)
    assert student.config.num_hidden_layers == len(student.model.layers) == 2
    assert student.config.intermediate_size == 40
    for new_index, old_index in enumerate(depth["kept_layers"]):
        pruned, original = student.model.layers[new_index], source_model.model.layers[old_index]
        assert pruned.mlp.gate_proj.weight.shape == (40, 32) and pruned.mlp.down_proj.weight.shape == (32, 40)
        channels = assert_mlp_channels_taken_from(pruned.mlp, original.mlp)
        if old_index == 0:
            assert not set(channels) & set(DEAD_CHANNELS)
        assert_same_block(pruned.self_attn, original.self_attn)
        assert_same_block(pruned.input_layernorm, original.input_layernorm)
        assert_same_block(pruned.post_attention_layernorm, original.post_attention_layernorm)
    assert_same_outside_blocks(student, source_model)
    assert_cached_generation_matches_full_forward(student)
    assert (tmp_path / "student" / "tokenizer.json").exists()
    assert student.generation_config.eos_token_id == source_model.generation_config.eos_token_id


def test_drop_layers_into_non_empty_dir_with_overwrite(source, tmp_path):
    output_dir = tmp_path / "student"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("kept")
    report = prune(source, output_dir, "--drop_layers", "1", "--overwrite")
    assert report["depth"]["dropped_layers"] == [1] and report["depth"]["selection"] == "given"
    assert report["width"] is None

    student, source_model = load(output_dir), load(source)
    assert student.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    for new_index, old_index in enumerate([0, 2, 3]):
        assert_same_block(student.model.layers[new_index], source_model.model.layers[old_index])
    assert_same_outside_blocks(student, source_model)
    assert_cached_generation_matches_full_forward(student)


@pytest.mark.subprocess
def test_refuses_non_empty_output_dir(source, tmp_path):
    (tmp_path / "existing.txt").write_text("do not touch")
    result = run_cli(["scripts/prune.py", "--model_name_or_path", source, "--output_dir", tmp_path,
                      "--num_layers", "2"], timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--overwrite" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing.txt"]


# ------------------------------------------------------------------------------------------- examples/build_prompts.py


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.mark.subprocess
def test_build_prompts_is_deterministic_disjoint_and_valid(tmp_path):
    for name in ("first", "second"):
        result = run_cli(["examples/build_prompts.py", "--output_dir", tmp_path / name], timeout=60)
        assert result.returncode == 0, result.stderr
    committed = REPO / "examples/data/prompts"
    for split in ("train.jsonl", "val.jsonl"):
        first = (tmp_path / "first" / split).read_bytes()
        assert first == (tmp_path / "second" / split).read_bytes()
        assert first == (committed / split).read_bytes(), f"regenerate {committed / split}"

    train, val = read_jsonl(tmp_path / "first/train.jsonl"), read_jsonl(tmp_path / "first/val.jsonl")
    assert (len(train), len(val)) == (600, 60)
    for record in train + val:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"].strip() and assistant["content"].strip()
        assert set(record) <= {"messages", "answers"}
        if "answers" in record:
            assert record["answers"] and all(isinstance(a, str) and a.strip() for a in record["answers"])
            assert record["answers"][0].lower() in assistant["content"].lower()
    questions = [[r["messages"][0]["content"] for r in split] for split in (train, val)]
    assert len(set(questions[0])) == 600 and len(set(questions[1])) == 60
    assert not set(questions[0]) & set(questions[1])
    # Splits are disjoint by fact: the phrasings of one fact share a reference answer.
    assert not {r["messages"][1]["content"] for r in train} & {r["messages"][1]["content"] for r in val}
    assert sum("answers" in r for r in train) > 400  # most questions are checkable

    from gkd.data import load_conversations  # the trainer's own validation accepts every record

    assert len(load_conversations(committed / "train.jsonl")) == 600

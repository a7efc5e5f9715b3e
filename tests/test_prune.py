"""scripts/prune.py end to end on a tiny Llama, and examples/build_prompts.py.

The tiny source model is rigged so that importance has a right answer: block 2 adds nothing to the residual stream
(o_proj and down_proj are zero, so its Block Influence is exactly 0), and MLP channels 0-9 of block 0 never fire
(their up_proj rows are zero). Depth pruning must drop block 2, width pruning must drop those channels.

The hidden-size and head tests (in process, for speed) use tiny Llama, Qwen2 and Mistral models, one of them rigged:
hidden channels DEAD_HIDDEN are zero in the embedding and in every norm's weight, so every norm outputs exactly 0
there; key-value head DEAD_GROUP has zero v_proj rows, so its query heads' attention outputs are exactly 0.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_user_error, run_cli
from tiny import make_family_model, make_model, make_tokenizer
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from gkd.errors import ConfigError
from gkd.tools import width
from gkd.tools.prune import PruneConfig
from gkd.tools.prune import prune as prune_in_process

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
def test_refuses_to_replace_the_folder_holding_its_calibration_data(source, tmp_path):
    """`--calibration_data d/calib.jsonl --output_dir d --overwrite` moved d (the data, the user's notes) to
    d.replaced-1: every input of the command is protected, not only the model."""
    data = tmp_path / "d"
    data.mkdir()
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]}
    (data / "calib.jsonl").write_text(json.dumps(record) + "\n")
    (data / "NOTES.txt").write_text("mine")
    result = run_cli(["scripts/prune.py", "--model_name_or_path", source, "--calibration_data", data / "calib.jsonl",
                      "--output_dir", data, "--overwrite", "--num_layers", "2"], timeout=120)
    assert_user_error(result, "would replace the input", "calib.jsonl")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d"]
    assert sorted(path.name for path in data.iterdir()) == ["NOTES.txt", "calib.jsonl"]


@pytest.mark.subprocess
def test_refuses_non_empty_output_dir(source, tmp_path):
    (tmp_path / "existing.txt").write_text("do not touch")
    result = run_cli(["scripts/prune.py", "--model_name_or_path", source, "--output_dir", tmp_path,
                      "--num_layers", "2"], timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--overwrite" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing.txt"]


# ----------------------------------------------------------------------------------------- hidden size, heads, groups

DEAD_HIDDEN = [3, 7, 20, 31]
DEAD_GROUP = 1  # of 2 key-value heads; query heads 2 and 3 read it
HEAD_DIM = 8  # 32 hidden / 4 heads in every tiny model here
PROMPT = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 2]])


def rig_width(model):
    with torch.no_grad():
        model.model.embed_tokens.weight[:, DEAD_HIDDEN] = 0
        model.model.norm.weight[DEAD_HIDDEN] = 0
        for layer in model.model.layers:
            layer.input_layernorm.weight[DEAD_HIDDEN] = 0
            layer.post_attention_layernorm.weight[DEAD_HIDDEN] = 0
            layer.self_attn.v_proj.weight[DEAD_GROUP * HEAD_DIM:(DEAD_GROUP + 1) * HEAD_DIM] = 0


@pytest.fixture(scope="module")
def width_sources(tmp_path_factory):
    """Folders of tiny models by family: a rigged untied Llama, a tied Llama, a tied Qwen2 (q/k/v biases, no
    head_dim in its config) and an untied Mistral."""
    root = tmp_path_factory.mktemp("width_sources")
    tokenizer = make_tokenizer(root / "tokenizer")
    folders = {name: root / name for name in ("llama", "llama-tied", "qwen2", "mistral")}
    rigged = make_model(folders["llama"], tokenizer, num_layers=2)
    rig_width(rigged)
    rigged.save_pretrained(folders["llama"])
    make_model(folders["llama-tied"], tokenizer, num_layers=2, seed=1, tie_word_embeddings=True)
    qwen2 = make_family_model(folders["qwen2"], tokenizer, Qwen2Config, tie_word_embeddings=True)
    assert "head_dim" not in qwen2.config.to_dict()
    make_family_model(folders["mistral"], tokenizer, MistralConfig, tie_word_embeddings=False)
    return folders


def prune_here(source, output_dir, **options) -> dict:
    """prune() in this process (seconds less than the CLI); returns pruning.json."""
    options.setdefault("sample_max_new_tokens", 0)
    prune_in_process(PruneConfig(model_name_or_path=str(source), output_dir=str(output_dir), **options))
    return json.loads((Path(output_dir) / "pruning.json").read_text())


def widths(config) -> tuple[int, int, int, int]:
    return config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim


@torch.no_grad()
def logits(model):
    return model(PROMPT, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen2", "mistral"])
def test_keeping_every_width_reproduces_the_logits(width_sources, tmp_path, family):
    report = prune_here(width_sources[family], tmp_path / "student", hidden_size=32, num_attention_heads=4,
                        num_key_value_heads=2, mlp_hidden_size=64)
    assert report["hidden"]["kept_channels"] == list(range(32))
    assert all(layer["kept_heads"] == [0, 1, 2, 3] for layer in report["heads"]["layers"].values())
    assert report["parameters"]["student"] == report["parameters"]["teacher"]
    student, source = load(tmp_path / "student"), load(width_sources[family])
    assert student.dtype == torch.float32
    assert torch.equal(logits(student), logits(source))


def test_rigged_hidden_channels_and_key_value_group_are_dropped(width_sources, tmp_path):
    report = prune_here(width_sources["llama"], tmp_path / "student", hidden_size=28, num_key_value_heads=1,
                        sample_max_new_tokens=4)
    kept = [channel for channel in range(32) if channel not in DEAD_HIDDEN]
    hidden, heads = report["hidden"], report["heads"]
    assert hidden["kept_channels"] == kept and (hidden["hidden_size_before"], hidden["hidden_size_after"]) == (32, 28)
    assert [hidden["importance"][channel] for channel in DEAD_HIDDEN] == [0.0] * 4
    assert min(hidden["importance"][channel] for channel in kept) > 0
    assert (heads["num_attention_heads_after"], heads["num_key_value_heads_after"], heads["head_dim"]) == (2, 1, 8)
    for layer in heads["layers"].values():
        assert layer["kept_key_value_heads"] == [0] and layer["kept_heads"] == [0, 1]
        assert layer["head_importance"][2:] == [0.0, 0.0] and min(layer["head_importance"][:2]) > 0
    assert "reply" in report["sample"]

    student, source = load(tmp_path / "student"), load(width_sources["llama"])
    config = student.config
    assert widths(config) == (28, 2, 1, 8)
    assert not config.tie_word_embeddings
    queries, keys = list(range(2 * HEAD_DIM)), list(range(HEAD_DIM))  # heads 0 and 1, key-value head 0
    assert torch.equal(student.model.embed_tokens.weight, source.model.embed_tokens.weight[:, kept])
    assert torch.equal(student.lm_head.weight, source.lm_head.weight[:, kept])
    assert torch.equal(student.model.norm.weight, source.model.norm.weight[kept])
    for pruned, original in zip(student.model.layers, source.model.layers, strict=True):
        attention, original_attention = pruned.self_attn, original.self_attn
        assert torch.equal(attention.q_proj.weight, original_attention.q_proj.weight[queries][:, kept])
        assert torch.equal(attention.k_proj.weight, original_attention.k_proj.weight[keys][:, kept])
        assert torch.equal(attention.v_proj.weight, original_attention.v_proj.weight[keys][:, kept])
        assert torch.equal(attention.o_proj.weight, original_attention.o_proj.weight[kept][:, queries])
        assert torch.equal(pruned.mlp.gate_proj.weight, original.mlp.gate_proj.weight[:, kept])
        assert torch.equal(pruned.mlp.down_proj.weight, original.mlp.down_proj.weight[kept])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(getattr(pruned, norm).weight, getattr(original, norm).weight[kept])
    assert report["parameters"]["student"]["total"] == sum(p.numel() for p in student.parameters())
    assert_cached_generation_matches_full_forward(student)


def test_heads_kept_within_each_group_with_a_tied_lm_head(width_sources, tmp_path):
    report = prune_here(width_sources["llama-tied"], tmp_path / "student", hidden_size=24, num_attention_heads=2)
    for layer in report["heads"]["layers"].values():
        scores = torch.tensor(layer["head_importance"]).view(2, 2)  # 2 groups of 2 query heads
        assert layer["kept_heads"] == (scores.argmax(dim=1) + torch.tensor([0, 2])).tolist()
        assert layer["kept_key_value_heads"] == [0, 1]

    student, source = load(tmp_path / "student"), load(width_sources["llama-tied"])
    config = student.config
    # head_dim stays 8 although 24 / 2 heads would make it 12
    assert widths(config) == (24, 2, 2, 8)
    assert config.tie_word_embeddings and student.lm_head.weight is student.model.embed_tokens.weight
    hidden = report["hidden"]["kept_channels"]
    assert torch.equal(student.lm_head.weight, source.lm_head.weight[:, hidden])
    for pruned, original, layer in zip(student.model.layers, source.model.layers, report["heads"]["layers"].values(),
                                       strict=True):
        queries = width.head_channels(torch.tensor(layer["kept_heads"]), HEAD_DIM)
        assert torch.equal(pruned.self_attn.q_proj.weight, original.self_attn.q_proj.weight[queries][:, hidden])
        assert torch.equal(pruned.self_attn.k_proj.weight, original.self_attn.k_proj.weight[:, hidden])
    assert_cached_generation_matches_full_forward(student)


def test_qwen2_keeps_head_dim_explicit(width_sources, tmp_path):
    """Qwen2Config has no head_dim field (the model derives hidden_size // heads) and no divisibility rule; its q/k/v
    projections have biases, cut with their rows."""
    report = prune_here(width_sources["qwen2"], tmp_path / "student", hidden_size=30, num_key_value_heads=1)
    assert json.loads((tmp_path / "student" / "config.json").read_text())["head_dim"] == HEAD_DIM
    student, source = load(tmp_path / "student"), load(width_sources["qwen2"])
    assert widths(student.config) == (30, 2, 1, HEAD_DIM) and student.model.layers[0].self_attn.head_dim == HEAD_DIM
    for pruned, original, layer in zip(student.model.layers, source.model.layers, report["heads"]["layers"].values(),
                                       strict=True):
        queries = width.head_channels(torch.tensor(layer["kept_heads"]), HEAD_DIM)
        keys = width.head_channels(torch.tensor(layer["kept_key_value_heads"]), HEAD_DIM)
        assert torch.equal(pruned.self_attn.q_proj.bias, original.self_attn.q_proj.bias[queries])
        assert torch.equal(pruned.self_attn.k_proj.bias, original.self_attn.k_proj.bias[keys])
        assert pruned.self_attn.q_proj.weight.shape == (16, 30) and pruned.self_attn.v_proj.weight.shape == (8, 30)
    assert torch.isfinite(logits(student)).all()
    assert_cached_generation_matches_full_forward(student)


def test_select_heads_keeps_the_best_groups_then_the_best_heads_within():
    before = width.Width(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.25])  # group 0: heads 0-2, group 1: heads 3-5
    groups, heads = width.select_heads(scores, before, width.Width(48, 2, 1, 8))
    assert groups.tolist() == [0] and heads.tolist() == [1, 2]
    groups, heads = width.select_heads(scores, before, width.Width(48, 2, 2, 8))
    assert groups.tolist() == [0, 1] and heads.tolist() == [1, 4]
    groups, heads = width.select_heads(scores, before, before)
    assert groups.tolist() == [0, 1] and heads.tolist() == list(range(6))


@pytest.mark.parametrize("options, message", [
    ({"hidden_size": 40}, "--hidden_size 40 is larger than"),
    ({"num_attention_heads": 8}, "--num_attention_heads 8 is larger than"),
    ({"num_key_value_heads": 3}, "--num_key_value_heads 3 is larger than"),
    ({"num_attention_heads": 3}, "cannot be split evenly over 2 key-value groups"),
    ({"num_attention_heads": 4, "num_key_value_heads": 1}, "is 4 query heads per group, but"),
    ({"hidden_size": 30}, "transformers' LlamaConfig refuses to save"),
    ({"mlp_hidden_size": 65}, "--mlp_hidden_size 65 is larger than"),
    ({"num_key_value_heads": 0}, "--num_key_value_heads must be at least 1"),
])
def test_refuses_widths_it_cannot_cut(width_sources, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message) as error:
        prune_here(width_sources["llama"], tmp_path / "student", **options)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "student").exists()


@pytest.mark.subprocess
def test_depth_mlp_hidden_and_heads_in_one_command(source, tmp_path):
    result = run_cli(["scripts/prune.py", "--model_name_or_path", source, "--output_dir", tmp_path / "student",
                      "--sample_max_new_tokens", "0", "--num_layers", "2", "--mlp_hidden_size", "40",
                      "--hidden_size", "24", "--num_attention_heads", "2"], timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "student" / "pruning.json").read_text())
    assert IDENTITY_BLOCK in report["depth"]["dropped_layers"]
    kept_layers = report["depth"]["kept_layers"]
    assert list(report["heads"]["layers"]) == [str(index) for index in kept_layers]
    assert list(report["width"]["kept_importance_fraction"]) == [str(index) for index in kept_layers]
    parameters = report["parameters"]
    assert parameters["student"]["non_embedding"] < parameters["teacher"]["non_embedding"]
    assert f"non-embedding parameters: student {parameters['student']['non_embedding']:,} of the teacher's" \
        in result.stdout

    student = load(tmp_path / "student")
    config = student.config
    assert (config.num_hidden_layers, config.intermediate_size) == (2, 40) and widths(config) == (24, 2, 2, 8)
    assert parameters["student"]["total"] == sum(p.numel() for p in student.parameters())
    assert_cached_generation_matches_full_forward(student)


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

"""Cut the width of a Llama-family model in place: MLP channels, residual-stream (hidden) channels, query heads and
key-value groups. gkd/tools/prune.py measures importance and explains the method; this module checks a request
against the model and slices every weight that touches a cut dimension with one index set, in source order, so that
keeping everything reproduces the model exactly."""

import copy
from dataclasses import dataclass

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from gkd.errors import ConfigError, ModelError

# Model types whose hidden size and heads we know how to cut: transformers implements them alike (pre-norm blocks of
# q/k/v/o attention and a gated MLP, RMSNorm weights only, head_dim read from the config).
WIDTH_MODEL_TYPES = ("llama", "qwen2", "mistral")
# The two norms of a block whose outputs score the hidden channels (Megatron's input_layernorm and pre_mlp_layernorm).
BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class Width:
    """The attention and residual-stream widths of a model, as its config states them."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def model_width(config) -> Width:
    heads = config.num_attention_heads
    return Width(config.hidden_size, heads, getattr(config, "num_key_value_heads", None) or heads,
                 getattr(config, "head_dim", None) or config.hidden_size // heads)


def target_width(before: Width, hidden_size: int | None, num_attention_heads: int | None,
                 num_key_value_heads: int | None, name: str) -> Width:
    """The widths the student will have. Unless given, the hidden size stays, and so does the number of query heads
    per key-value group. Refuses, in one line, what cannot be cut."""
    for flag, size, current in (("hidden_size", hidden_size, before.hidden_size),
                                ("num_attention_heads", num_attention_heads, before.num_attention_heads),
                                ("num_key_value_heads", num_key_value_heads, before.num_key_value_heads)):
        if size is not None and size > current:
            raise ConfigError(f"--{flag} {size} is larger than {name}'s {flag} {current}")
    groups = num_key_value_heads or before.num_key_value_heads
    heads = num_attention_heads or groups * before.heads_per_group
    if heads % groups:
        hint = "" if num_key_value_heads else " (give --num_key_value_heads to drop whole groups)"
        raise ConfigError(f"--num_attention_heads {heads} cannot be split evenly over {groups} key-value groups "
                          f"(num_key_value_heads): every group keeps the same number of query heads{hint}")
    if heads // groups > before.heads_per_group:
        raise ConfigError(f"--num_attention_heads {heads} over {groups} key-value groups is {heads // groups} query "
                          f"heads per group, but {name}'s groups have {before.heads_per_group}")
    return Width(hidden_size or before.hidden_size, heads, groups, before.head_dim)


def check_config_accepts(model_config, after: Width) -> None:
    """Refuse sizes the model's config class will not save. transformers' LlamaConfig requires hidden_size to be a
    multiple of num_attention_heads even when head_dim is explicit; Qwen2Config and MistralConfig do not."""
    config = copy.deepcopy(model_config)
    try:
        set_width(config, after)
        if hasattr(config, "validate"):
            config.validate()
    except (ValueError, TypeError, StrictDataclassError) as error:
        kind = type(config).__name__
        if after.hidden_size % after.num_attention_heads:
            raise ConfigError(
                f"hidden size {after.hidden_size} is not a multiple of {after.num_attention_heads} attention heads: "
                f"transformers' {kind} refuses to save such a config even with head_dim ({after.head_dim}) explicit; "
                f"choose a hidden size divisible by {after.num_attention_heads}") from None
        raise ConfigError(f"transformers' {kind} refuses the pruned sizes: {' '.join(str(error).split())}") from None


def set_width(config, width: Width) -> None:
    config.hidden_size = width.hidden_size
    config.num_attention_heads = width.num_attention_heads
    config.num_key_value_heads = width.num_key_value_heads
    config.head_dim = width.head_dim  # explicit: Qwen2Config has no head_dim and would derive hidden_size // heads


def check_model_type(model_config, name: str) -> None:
    model_type = getattr(model_config, "model_type", None)
    if model_type not in WIDTH_MODEL_TYPES:
        raise ModelError(f"{name}: cutting the hidden size or attention heads supports {', '.join(WIDTH_MODEL_TYPES)} "
                         f"models, not {model_type!r}")


def check_weight_shapes(model, before: Width, name: str) -> None:
    """The loaded model's attention and norms have the shapes its config implies (what the slicing relies on)."""
    hidden = before.hidden_size
    queries, keys = before.num_attention_heads * before.head_dim, before.num_key_value_heads * before.head_dim
    expected = {"self_attn.q_proj": (hidden, queries), "self_attn.k_proj": (hidden, keys),
                "self_attn.v_proj": (hidden, keys), "self_attn.o_proj": (queries, hidden)}
    for index, layer in enumerate(model.model.layers):
        for path, (inputs, outputs) in expected.items():
            linear = layer.get_submodule(path)
            if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != (inputs, outputs):
                raise ModelError(f"{name}: block {index}'s {path} is not the {inputs} -> {outputs} linear layer its "
                                 "config implies")
        for norm in BLOCK_NORMS:
            if tuple(getattr(getattr(layer, norm, None), "weight", torch.empty(0)).shape) != (hidden,):
                raise ModelError(f"{name}: block {index} has no {norm} with a weight of size {hidden}")


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-scoring indices, in source order (the order every sliced weight keeps)."""
    return torch.topk(scores, count).indices.sort().values


def select_heads(head_scores: torch.Tensor, before: Width, after: Width) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's kept key-value groups and query heads, in source order: the groups whose query heads' scores have
    the largest L2 norm, then in each kept group its highest-scoring query heads. Query head h reads key-value head
    h // heads_per_group (transformers' repeat_kv)."""
    per_group = head_scores.view(before.num_key_value_heads, before.heads_per_group)
    groups = top_indices(per_group.norm(dim=1), after.num_key_value_heads)
    within = torch.topk(per_group[groups], after.heads_per_group, dim=1).indices.sort(dim=1).values
    return groups, (within + groups[:, None] * before.heads_per_group).flatten()


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The projection rows (or columns) of the given heads: head h owns h * head_dim ... (h + 1) * head_dim - 1."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def shrink_mlps(model, channel_importance: list[torch.Tensor], size: int) -> list[float]:
    """Keep the `size` most important MLP channels of each block (`channel_importance` lists the blocks in order);
    returns, per block, the share of its total channel importance that was kept (1.0 means nothing active was cut)."""
    kept_fraction = []
    for layer, scores in zip(model.model.layers, channel_importance, strict=True):
        channels = top_indices(scores, size)
        kept_fraction.append((scores[channels].sum() / scores.sum().clamp_min(1e-12)).item())
        mlp = layer.mlp
        take(mlp.gate_proj, channels, dim=0)
        take(mlp.up_proj, channels, dim=0)
        take(mlp.down_proj, channels, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = size
    model.config.intermediate_size = size
    return kept_fraction


def shrink_attention(attention, groups: torch.Tensor, heads: torch.Tensor, head_dim: int) -> None:
    """Keep the given key-value heads (k_proj and v_proj rows) and query heads (q_proj rows, o_proj columns)."""
    queries, keys = head_channels(heads, head_dim), head_channels(groups, head_dim)
    take(attention.q_proj, queries, dim=0)
    take(attention.k_proj, keys, dim=0)
    take(attention.v_proj, keys, dim=0)
    take(attention.o_proj, queries, dim=1)
    attention.num_key_value_groups = len(heads) // len(groups)  # what repeat_kv expands each key-value head to


def shrink_hidden(model, channels: torch.Tensor) -> None:
    """Keep `channels` of the residual stream in every weight that reads or writes it: embedding columns, lm_head
    columns (once, when tied), every norm's weight, the input columns of q/k/v/gate/up and the output rows of
    o/down. Norm weights are sliced, not rescaled: the RMS is then taken over the kept channels, as in ModelOpt."""
    embedding, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = lm_head.weight is embedding.weight
    embedding.weight = nn.Parameter(embedding.weight.index_select(1, channels.to(embedding.weight.device)).clone())
    embedding.embedding_dim = len(channels)
    if tied:
        lm_head.weight = embedding.weight
        lm_head.in_features = len(channels)
    else:
        take(lm_head, channels, dim=1)
    take_norm(model.model.norm, channels)
    for layer in model.model.layers:
        for norm in BLOCK_NORMS:
            take_norm(getattr(layer, norm), channels)
        attention, mlp = layer.self_attn, layer.mlp
        for reader in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
            take(reader, channels, dim=1)
        for writer in (attention.o_proj, mlp.down_proj):
            take(writer, channels, dim=0)
        for module in (layer, mlp):
            if hasattr(module, "hidden_size"):
                module.hidden_size = len(channels)
    model.config.hidden_size = len(channels)


def take(linear: nn.Linear, channels: torch.Tensor, dim: int) -> None:
    """Keep `channels` of a linear layer's outputs (dim 0, bias included) or inputs (dim 1)."""
    channels = channels.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(dim, channels).clone())
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[channels].clone())
        linear.out_features = len(channels)
    else:
        linear.in_features = len(channels)


def take_norm(norm: nn.Module, channels: torch.Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight[channels.to(norm.weight.device)].clone())

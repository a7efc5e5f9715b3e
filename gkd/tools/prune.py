"""Minitron-style structured pruning: cut a student out of a Llama-family teacher before distilling into it.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"; Sreenivas et
al. 2024, "LLM Pruning and Distillation in Practice: The Minitron Approach") prunes once, from importance scores
measured on a small calibration set, then recovers quality by distillation from the unpruned model. We do both of
its structured cuts, with weights copied, never re-initialised:

- depth: drop whole decoder blocks. A block's importance is ShortGPT's Block Influence (Men et al. 2024):
  1 - cos(block input, block output), averaged over calibration tokens; a block that barely turns the residual
  stream is the cheapest to remove. `independent` selection drops the k least important blocks wherever they are
  (ShortGPT); `contiguous` drops the run of k consecutive blocks whose combined input and output are most alike
  (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"), which scores the blocks together
  rather than assuming each one's removal leaves the others' inputs unchanged. Both scores come from one pass.
- width, MLP (`--mlp_hidden_size`): keep per block the channels with the largest mean |act_fn(gate_proj(x)) *
  up_proj(x)| over calibration tokens (Minitron's activation importance, with a plain mean for its aggregation):
  rows of gate_proj and up_proj, the same columns of down_proj.
- width, hidden size (`--hidden_size`): keep one set of residual-stream channels everywhere (embedding and lm_head
  columns, tied or not, every norm's weight, the inputs of q/k/v/gate/up, the outputs of o/down). A channel's score
  is Minitron's embedding importance as NVIDIA ModelOpt computes it: at the output of every kept block's
  input_layernorm and post_attention_layernorm, |x| averaged over each text's tokens, L2 over texts, summed over the
  norms. Norm weights are sliced, not rescaled; distillation absorbs the changed RMS, as in Minitron.
- width, heads (`--num_attention_heads`): a query head's score is the L2 norm over its head_dim channels of the same
  score taken at o_proj's input (its attention output). Each block keeps its best heads within each key-value group,
  the same number per group and block, so GQA stays regular and every key and value head is kept (ModelOpt's rule).
- key-value groups (`--num_key_value_heads`), our extension: ModelOpt no longer prunes query groups (since 0.41). A
  group's score is the L2 norm of its query heads' scores; each block keeps its best groups, their k_proj and
  v_proj rows and their query heads, then the best heads within them if `--num_attention_heads` asks for fewer.

head_dim never changes (RoPE pairs channels within a head) and is written to the config explicitly: Qwen2Config has
no head_dim field and would otherwise derive hidden_size // num_attention_heads. Cuts compose: blocks are dropped
first, then the remaining ones are sliced (gkd/tools/width.py).

Importance is measured once on the unpruned model, as Minitron does (it found iterative re-scoring no better).

`independent` is the default: it kept far more of the model in our measurement (docs/design-notes.md).
"""

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from gkd.data import load_conversations
from gkd.errors import ConfigError, ModelError
from gkd.folders import check_output_folder, staged_folder
from gkd.models import ModelRef, check_model, load_causal_lm, load_tokenizer
from gkd.tools import width

logger = logging.getLogger(__name__)

DEPTH_SELECTIONS = ("independent", "contiguous")
# The input of o_proj: every query head's attention output, head_dim channels each.
ATTENTION_OUTPUT = "self_attn.o_proj"
# Config fields holding one entry per decoder layer, cut along with the layers (Qwen2/3 layer_types, SmolLM3 no_rope).
PER_LAYER_CONFIG_FIELDS = ("layer_types", "no_rope_layers")
SAMPLE_PROMPT = "What is the capital of France?"

# Short chat exchanges covering the kinds of text a small chat model meets: facts, arithmetic, code, writing,
# advice, reasoning. Used when no --calibration_data is given.
BUILTIN_CALIBRATION = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 17 + 25?", "17 + 25 = 42."),
    ("Write a Python function that returns the square of a number.", "def square(x):\n    return x * x"),
    ("Give me three tips for sleeping better.",
     "1. Go to bed at the same time every night.\n2. Avoid screens before sleep.\n3. Keep your room cool and dark."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
    ("Why is the sky blue?",
     "Sunlight is scattered by the air, and blue light is scattered much more than red light, so the sky looks blue."),
    ("Write a haiku about autumn leaves.",
     "Red leaves drift and fall,\nwhispering to the cold ground,\nsummer says goodbye."),
    ("Summarise the story of Cinderella in one sentence.",
     "A kind young woman mistreated by her stepfamily attends a royal ball with a fairy godmother's help, loses a "
     "glass slipper, and is found and married by the prince."),
    ("If a train travels 60 km in one hour, how far does it go in 3 hours?",
     "It travels 60 km each hour, so in 3 hours it goes 3 x 60 = 180 km."),
    ("What is the opposite of 'generous'?", "The opposite of 'generous' is 'stingy' or 'selfish'."),
    ("Explain what photosynthesis is to a child.",
     "Plants make their own food from sunlight, water and air. That is called photosynthesis, and it also gives us "
     "the oxygen we breathe."),
    ("Name four animals that live in the ocean.", "Dolphins, sharks, octopuses and whales live in the ocean."),
    ("How do I reverse a list in JavaScript?", "Use the reverse method: `const reversed = [1, 2, 3].reverse();`"),
    ("Write a short, polite email declining a meeting invitation.",
     "Hello Sam,\n\nThank you for the invitation. Unfortunately I cannot attend the meeting on Thursday. Could you "
     "share the notes afterwards?\n\nBest regards,\nAlex"),
    ("Is 91 a prime number?", "No. 91 = 7 x 13, so it is not prime."),
    ("Who wrote 'Romeo and Juliet'?", "'Romeo and Juliet' was written by William Shakespeare."),
]


@dataclass
class PruneConfig:
    """Options of scripts/prune.py. Give --num_layers or --drop_layers for depth; --mlp_hidden_size, --hidden_size,
    --num_attention_heads or --num_key_value_heads for width; any combination."""

    model_name_or_path: str = field(
        metadata={"help": "The Llama-family model to prune: a Hugging Face model folder or a Hub model id."}
    )
    output_dir: str = field(metadata={"help": "Folder for the pruned model; refused if it exists and is not empty."})
    num_layers: int | None = field(
        default=None, metadata={"help": "Decoder blocks to keep; the least important ones are dropped."}
    )
    drop_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Exact 0-based indices of the decoder blocks to drop (instead of --num_layers)."},
    )
    depth_selection: str = field(
        default="independent",
        metadata={
            "help": "How --num_layers picks blocks: 'independent' drops the least important blocks wherever they "
            "are; 'contiguous' drops the run of consecutive blocks that changes the hidden state least.",
            "choices": list(DEPTH_SELECTIONS),
        },
    )
    mlp_hidden_size: int | None = field(
        default=None, metadata={"help": "New MLP intermediate size; keeps the most active channels of each layer."}
    )
    hidden_size: int | None = field(
        default=None, metadata={"help": "New hidden (embedding) size; keeps the channels the blocks' norms output most "
                                "strongly, one set for the whole model."}
    )
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "Query heads to keep per block, the most active ones, the same number in "
                                "every key-value group; default: as many per group as now."}
    )
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "Key-value groups to keep per block, the most active ones with their query "
                                "heads; default: all."}
    )
    calibration_data: str | None = field(
        default=None,
        metadata={"help": "Chat dataset to measure importance on (any format gkd trains on, e.g. JSONL of "
                  "{'messages': [...]}); default: 16 built-in conversations."},
    )
    calibration_samples: int = field(default=128, metadata={"help": "Use at most this many calibration records."})
    calibration_max_length: int = field(
        default=512, metadata={"help": "Truncate calibration texts to this many tokens."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty --output_dir (once the new model is complete)."}
    )
    device: str | None = field(default=None, metadata={"help": "Device for calibration; default: cuda if available."})
    sample_max_new_tokens: int = field(
        default=24, metadata={"help": "Greedy tokens the saved student generates as a smoke test; 0 skips it."}
    )

    def __post_init__(self):
        if self.num_layers is not None and self.drop_layers is not None:
            raise ConfigError("give --num_layers or --drop_layers, not both")
        if self.drop_layers is not None and self.depth_selection != "independent":
            raise ConfigError("--depth_selection chooses the blocks --num_layers drops; --drop_layers names them")
        if self.num_layers is None and self.drop_layers is None and not self.width_options():
            raise ConfigError("nothing to prune: give --num_layers, --drop_layers, --mlp_hidden_size, --hidden_size, "
                              "--num_attention_heads or --num_key_value_heads")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"--num_layers must be at least 1, got {self.num_layers}")
        if self.drop_layers is not None and len(set(self.drop_layers)) != len(self.drop_layers):
            raise ConfigError(f"--drop_layers names a block twice: {self.drop_layers}")
        for flag, size in self.width_options().items():
            if size < 1:
                raise ConfigError(f"--{flag} must be at least 1, got {size}")
        if self.depth_selection not in DEPTH_SELECTIONS:
            raise ConfigError(f"--depth_selection must be one of {DEPTH_SELECTIONS}, got {self.depth_selection!r}")
        if self.calibration_samples < 1 or self.calibration_max_length < 2:
            raise ConfigError("--calibration_samples must be >= 1 and --calibration_max_length >= 2")

    def width_options(self) -> dict[str, int]:
        """The width flags given, by name."""
        names = ("mlp_hidden_size", "hidden_size", "num_attention_heads", "num_key_value_heads")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def cuts_heads(self) -> bool:
        return self.num_attention_heads is not None or self.num_key_value_heads is not None

    def cuts_hidden_or_heads(self) -> bool:
        return self.hidden_size is not None or self.cuts_heads()


@dataclass
class Importance:
    """What one calibration pass over the unpruned model measured."""

    block: list[float]  # Block Influence of each decoder block: 1 - mean cos(input, output)
    window: list[float] | None  # same for each run of `window_size` blocks, indexed by its first block
    window_size: int
    channels: list[torch.Tensor]  # per layer, mean |act_fn(gate) * up| of each MLP channel
    loss: float  # mean next-token loss on the calibration texts
    num_tokens: int
    # Minitron's score of each channel of a block's module output (norms) or input (o_proj), keyed by (layer, module):
    # sqrt of the sum over texts of (mean |x| over the text's tokens)^2.
    activations: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def hidden_channels(self, layers: list[int]) -> torch.Tensor:
        """Each residual-stream channel's score, summed over both norms of the given blocks (ModelOpt's sum)."""
        return sum(self.activations[index, norm] for index in layers for norm in width.BLOCK_NORMS)

    def heads(self, layer: int, head_dim: int) -> torch.Tensor:
        """Each query head's score in one block: the L2 norm of its head_dim channels at o_proj's input."""
        return self.activations[layer, ATTENTION_OUTPUT].view(-1, head_dim).norm(dim=1)


def prune(config: PruneConfig) -> dict:
    """Prune `config.model_name_or_path` into `config.output_dir`; returns the report also saved as pruning.json."""
    source, output_dir, name = Path(config.model_name_or_path), Path(config.output_dir), config.model_name_or_path
    check_output_folder(output_dir, config.overwrite, [source, config.calibration_data])  # every input
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref = ModelRef(name, config.model_revision, config.trust_remote_code, "--model_name_or_path")
    check_model(ref)
    widths = _check_width_request(load_config(ref), config, name)  # (before, after), or None: hidden and heads kept
    tokenizer = load_tokenizer(ref)
    calibration = calibration_texts(tokenizer, config.calibration_data, config.calibration_samples)
    model = load_model(ref)
    layers = decoder_layers(model, name)
    drop = _layers_to_drop_given(config, len(layers))
    if widths:
        width.check_weight_shapes(model, widths[0], name)
    teacher_parameters = parameter_counts(model)
    batches = tokenize_calibration(tokenizer, calibration, config.calibration_max_length)
    window_size = len(layers) - config.num_layers if config.num_layers is not None else 0
    model.to(device)
    importance = measure_importance(model, batches, window_size)
    logger.info("block importance (1 - cos), least important first: %s",
                ", ".join(f"{i}:{importance.block[i]:.4f}" for i in _ranking(importance.block)))

    if drop is None and config.num_layers is not None:
        drop = select_layers_to_drop(importance, config.num_layers, config.depth_selection)
    drop = sorted(drop or [])
    kept = [i for i in range(len(layers)) if i not in drop]
    if drop:
        drop_decoder_layers(model, drop)
    logger.info("dropped blocks %s, kept %d", drop, len(kept))
    report = _report(config, importance, len(calibration), drop, kept)
    report.update(cut_width(model, importance, kept, config, widths))
    pruned_loss = calibration_loss(model, batches)
    logger.info("calibration loss: %.3f before, %.3f after pruning", importance.loss, pruned_loss)
    report["calibration"]["loss_after"] = pruned_loss
    report["parameters"] = {"teacher": teacher_parameters, "student": parameter_counts(model)}

    model.to("cpu")
    with staged_folder(output_dir, config.overwrite, "pruning") as staging:
        model.save_pretrained(staging)  # config, weights (tied lm_head stored once) and generation_config
        tokenizer.save_pretrained(staging)
        if config.sample_max_new_tokens > 0:
            reply = sample_reply(staging, SAMPLE_PROMPT, config.sample_max_new_tokens)
            logger.info("pruned model: %r -> %r", SAMPLE_PROMPT, reply)
            report["sample"] = {"prompt": SAMPLE_PROMPT, "reply": reply}
        (staging / "pruning.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def cut_width(model, importance: Importance, kept: list[int], config: PruneConfig,
              widths: tuple[width.Width, width.Width] | None) -> dict:
    """Slice the kept blocks (already the only ones in `model`) to the requested widths; returns the report's
    "width" (MLP), "heads" and "hidden" sections, None for a width not cut."""
    sections = {"width": None, "heads": None, "hidden": None}
    if config.mlp_hidden_size is not None:
        channels = [importance.channels[index] for index in kept]
        kept_fraction = width.shrink_mlps(model, channels, config.mlp_hidden_size)
        sections["width"] = _mlp_report(channels[0].numel() if channels else 0, config.mlp_hidden_size, kept,
                                        kept_fraction)
    if widths is None:
        return sections
    before, after = widths
    if config.cuts_heads():
        sections["heads"] = cut_heads(model, importance, kept, before, after)
    if config.hidden_size is not None:
        scores = importance.hidden_channels(kept)
        channels = width.top_indices(scores, after.hidden_size)
        width.shrink_hidden(model, channels)
        sections["hidden"] = _hidden_report(scores, channels)
    width.set_width(model.config, after)
    return sections


def cut_heads(model, importance: Importance, kept: list[int], before: width.Width, after: width.Width) -> dict:
    """Keep, in each block, the best key-value groups and the best query heads within them; returns the report."""
    per_layer = {}
    for layer, index in zip(model.model.layers, kept, strict=True):
        scores = importance.heads(index, before.head_dim)
        groups, heads = width.select_heads(scores, before, after)
        width.shrink_attention(layer.self_attn, groups, heads, before.head_dim)
        per_layer[str(index)] = {
            "head_importance": scores.tolist(),
            "group_importance": scores.view(before.num_key_value_heads, -1).norm(dim=1).tolist(),
            "kept_key_value_heads": groups.tolist(),
            "kept_heads": heads.tolist(),
        }
    logger.info("kept %d of %d query heads and %d of %d key-value heads per block", after.num_attention_heads,
                before.num_attention_heads, after.num_key_value_heads, before.num_key_value_heads)
    return {
        "importance_metric": "per query head: L2 norm over its head_dim channels of the o_proj input's channel "
                             "scores (per text mean |x| over tokens, then L2 over texts)",
        "group_importance_metric": "L2 norm of the group's query-head scores",
        "num_attention_heads_before": before.num_attention_heads,
        "num_attention_heads_after": after.num_attention_heads,
        "num_key_value_heads_before": before.num_key_value_heads,
        "num_key_value_heads_after": after.num_key_value_heads,
        "head_dim": before.head_dim,
        "layers": per_layer,
    }


def _report(config: PruneConfig, importance: Importance, num_records: int, drop: list[int], kept: list[int]) -> dict:
    """What pruning.json records: the options, every measured score, and what was cut. The width sections (MLP
    "width", "heads", "hidden"), the loss after pruning and the parameter counts are added by prune()."""
    return {
        "source": str(config.model_name_or_path),
        "options": asdict(config),
        "calibration": {
            "data": config.calibration_data or "built-in",
            "records": num_records,
            "tokens": importance.num_tokens,
            "loss_before": importance.loss,
            "loss_after": None,
        },
        "depth": {
            "importance_metric": "1 - mean over calibration tokens of cos(block input, block output)",
            "selection": "given" if config.drop_layers is not None else (
                config.depth_selection if config.num_layers is not None else "none"),
            "block_importance": importance.block,
            "ranking_least_important_first": _ranking(importance.block),
            "window_size": importance.window_size,
            "window_importance": importance.window,
            "num_layers_before": len(importance.block),
            "num_layers_after": len(kept),
            "dropped_layers": drop,
            "kept_layers": kept,
        },
    }


def _mlp_report(size_before: int, size_after: int, kept: list[int], kept_fraction: list[float]) -> dict:
    return {
        "importance_metric": "mean over calibration tokens of |act_fn(gate_proj(x)) * up_proj(x)| per channel",
        "intermediate_size_before": size_before,
        "intermediate_size_after": size_after,
        "kept_importance_fraction": dict(zip(map(str, kept), kept_fraction)),
    }


def _hidden_report(scores: torch.Tensor, channels: torch.Tensor) -> dict:
    kept_fraction = (scores[channels].sum() / scores.sum().clamp_min(1e-12)).item()
    logger.info("kept %d of %d hidden channels (%.1f%% of their importance)", len(channels), len(scores),
                100 * kept_fraction)
    return {
        "importance_metric": "per channel, summed over the kept blocks' input_layernorm and post_attention_layernorm "
                             "outputs: L2 over texts of the mean |x| over the text's tokens",
        "hidden_size_before": len(scores),
        "hidden_size_after": len(channels),
        "importance": scores.tolist(),
        "kept_channels": channels.tolist(),
        "kept_importance_fraction": kept_fraction,
    }


def parameter_counts(model) -> dict[str, int]:
    """Parameters in all (a tied lm_head counted once) and outside the embedding and lm_head."""
    total = sum(parameter.numel() for parameter in model.parameters())
    embeddings = {id(module.weight): module.weight.numel()
                  for module in (model.get_input_embeddings(), model.get_output_embeddings()) if module is not None}
    return {"total": total, "non_embedding": total - sum(embeddings.values())}


def load_config(ref: ModelRef):
    try:
        return AutoConfig.from_pretrained(ref.name, **ref.kwargs())
    except (OSError, ValueError) as error:
        raise ModelError(f"{ref.flag} {ref.name}: cannot read its config ({' '.join(str(error).split())})") from None


def load_model(ref: ModelRef):
    model = load_causal_lm(ref, "auto")
    model.eval()
    return model


def decoder_layers(model, name: str) -> nn.ModuleList:
    """The decoder blocks, after checking they have the Llama shape this module knows how to cut."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(f"{name}: {type(model).__name__} has no model.layers; only Llama-family models are supported")
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if not all(isinstance(getattr(mlp, proj, None), nn.Linear) for proj in ("gate_proj", "up_proj", "down_proj")):
            raise ModelError(f"{name}: block {index} has no gated MLP (gate_proj, up_proj, down_proj); "
                             "mixture-of-experts and other MLPs are not supported")
    return layers


def calibration_texts(tokenizer, path: str | None, limit: int) -> list[str]:
    """The first `limit` calibration conversations rendered with the model's chat template, reference answers
    included, so importance is measured on the kind of tokens distillation trains on (template tokens too).
    `path` is any dataset gkd trains on (see gkd.data)."""
    if path is None:
        conversations = [[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                         for question, answer in BUILTIN_CALIBRATION]
    else:
        records = load_conversations(path)[:limit]
        texts = [record.text for record in records if record.is_text]  # plain text calibrates as it is
        conversations = [
            record.prompt + ([{"role": "assistant", "content": record.completion}] if record.completion else [])
            for record in records if not record.is_text
        ]
        if not conversations:
            return texts
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the tokenizer has no chat template to render calibration conversations with")
    rendered = [
        tokenizer.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=messages[-1]["role"] != "assistant")
        for messages in conversations[:limit]
    ]
    return rendered if path is None else texts + rendered


def tokenize_calibration(tokenizer, texts: list[str], max_length: int) -> list[torch.Tensor]:
    # add_special_tokens=False: the chat template already wrote every special token the model expects.
    return [
        tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length,
                  return_tensors="pt")["input_ids"]
        for text in texts
    ]


@torch.no_grad()
def measure_importance(model, batches: list[torch.Tensor], window_size: int = 0) -> Importance:
    """Block Influence of every decoder block (and of every run of `window_size` blocks when > 0), the activation
    importance of every MLP channel, and Minitron's scores of hidden channels and heads, from one forward pass per
    calibration text.

    Texts run one at a time so that no padding enters the averages. Hooks see the residual stream at each block
    boundary: boundary[i] enters block i, boundary[L] leaves the last block (before the final norm).
    """
    layers = decoder_layers(model, "model")
    num_layers = len(layers)
    boundary: list[torch.Tensor | None] = [None] * (num_layers + 1)
    channel_sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    block_sums = torch.zeros(num_layers, dtype=torch.float64)
    windows = num_layers - window_size + 1 if 0 < window_size < num_layers else 0
    window_sums = torch.zeros(windows, dtype=torch.float64)

    def record_block(index):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            boundary[index] = hidden_in.float()
            boundary[index + 1] = hidden_out.float()
        return hook

    def record_channels(index):
        def hook(module, args):  # the input of down_proj is act_fn(gate_proj(x)) * up_proj(x)
            channel_sums[index] += args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).sum(0).double().cpu()
        return hook

    def record_activations(key):
        def hook(module, args, output=None):  # a norm's output, or o_proj's input
            activations = args[0] if output is None else output
            # Minitron's aggregation, batch by batch: |x| averaged over the sequence, squared, summed over the batch.
            total = activations.detach().float().abs().mean(dim=1).pow(2).sum(dim=0).double().cpu()
            activation_sums[key] = activation_sums.get(key, 0) + total
        return hook

    handles = []
    activation_sums: dict[tuple[int, str], torch.Tensor] = {}
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(record_block(index), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(record_channels(index)))
        for name, module in _width_modules(layer).items():
            hook = record_activations((index, name))
            handles.append(module.register_forward_pre_hook(hook) if name == ATTENTION_OUTPUT
                           else module.register_forward_hook(hook))
    device = next(model.parameters()).device
    num_tokens, loss_sum, loss_tokens = 0, 0.0, 0
    try:
        for input_ids in batches:
            input_ids = input_ids.to(device)
            output = model(input_ids=input_ids, labels=input_ids, use_cache=False)
            loss_sum += output.loss.item() * (input_ids.shape[1] - 1)
            loss_tokens += input_ids.shape[1] - 1
            num_tokens += input_ids.numel()
            for index in range(num_layers):
                block_sums[index] += _cosine_sum(boundary[index], boundary[index + 1])
            for start in range(windows):
                window_sums[start] += _cosine_sum(boundary[start], boundary[start + window_size])
    finally:
        for handle in handles:
            handle.remove()
    return Importance(
        block=(1 - block_sums / num_tokens).tolist(),
        window=(1 - window_sums / num_tokens).tolist() if windows else None,
        window_size=window_size if windows else 0,
        channels=[sums.div(num_tokens).float() for sums in channel_sums],
        loss=loss_sum / max(loss_tokens, 1),
        num_tokens=num_tokens,
        activations={key: total.sqrt().float() for key, total in activation_sums.items()},
    )


def _width_modules(layer) -> dict[str, nn.Module]:
    """The modules of a block whose activations score hidden channels and heads, those the block has."""
    modules = {name: getattr(layer, name, None) for name in width.BLOCK_NORMS}
    modules[ATTENTION_OUTPUT] = getattr(getattr(layer, "self_attn", None), "o_proj", None)
    return {name: module for name, module in modules.items() if module is not None}


def _cosine_sum(before: torch.Tensor, after: torch.Tensor) -> float:
    return F.cosine_similarity(before, after, dim=-1).sum().item()


@torch.no_grad()
def calibration_loss(model, batches: list[torch.Tensor]) -> float:
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for input_ids in batches:
        input_ids = input_ids.to(device)
        loss_sum += model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item() * (input_ids.shape[1] - 1)
        tokens += input_ids.shape[1] - 1
    return loss_sum / max(tokens, 1)


def select_layers_to_drop(importance: Importance, num_layers: int, selection: str) -> list[int]:
    """The blocks to drop so that `num_layers` remain, by the chosen selection (see the module docstring)."""
    total = len(importance.block)
    count = total - num_layers
    if selection == "independent":
        return sorted(_ranking(importance.block)[:count])
    start = min(range(len(importance.window)), key=importance.window.__getitem__)
    return list(range(start, start + count))


def drop_decoder_layers(model, drop: list[int]) -> None:
    """Remove blocks in place and renumber the rest: attention modules index the KV cache by their `layer_idx`."""
    layers = model.model.layers
    kept = [i for i in range(len(layers)) if i not in set(drop)]
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    for name in PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == len(layers):
            setattr(config, name, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


@torch.no_grad()
def sample_reply(folder: Path, question: str, max_new_tokens: int) -> str:
    """Greedy reply of the saved model, reloaded with from_pretrained: proves the folder loads and the KV cache
    works with the renumbered blocks."""
    ref = ModelRef(str(folder))
    model, tokenizer = load_model(ref), load_tokenizer(ref)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    # Special tokens kept: a pruned model often answers <|im_end|> at once, which an empty string would hide.
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=False).strip()


def _ranking(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=scores.__getitem__)


def _layers_to_drop_given(config: PruneConfig, total: int) -> list[int] | None:
    if config.num_layers is not None and config.num_layers >= total:
        raise ConfigError(f"--num_layers {config.num_layers} keeps every block: the model has {total}")
    if config.drop_layers is None:
        return None
    outside = [i for i in config.drop_layers if not 0 <= i < total]
    if outside:
        raise ConfigError(f"--drop_layers {outside}: the model's blocks are numbered 0 to {total - 1}")
    if len(config.drop_layers) == total:
        raise ConfigError("--drop_layers names every block; at least one must remain")
    return list(config.drop_layers)


def _check_width_request(model_config, config: PruneConfig, name: str) -> tuple[width.Width, width.Width] | None:
    """Refuse, before any weight loads, widths the model cannot be cut to; returns the hidden and attention widths
    before and after, or None when neither the hidden size nor the heads are cut."""
    if config.mlp_hidden_size is not None and config.mlp_hidden_size > model_config.intermediate_size:
        raise ConfigError(f"--mlp_hidden_size {config.mlp_hidden_size} is larger than {name}'s intermediate_size "
                          f"{model_config.intermediate_size}")
    if not config.cuts_hidden_or_heads():
        return None
    width.check_model_type(model_config, name)
    before = width.model_width(model_config)
    after = width.target_width(before, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                               name)
    width.check_config_accepts(model_config, after)
    return before, after


def main(argv: list[str] | None = None) -> int:
    import sys

    from gkd.cli import parse, quiet_libraries

    (config,) = parse(PruneConfig, argv, description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    quiet_libraries()
    report = prune(config)
    depth = report["depth"]
    print(f"saved {depth['num_layers_after']}-layer student to {config.output_dir} (dropped {depth['dropped_layers']})")
    print(parameter_summary(report["parameters"]))
    return 0


def parameter_summary(parameters: dict) -> str:
    teacher, student = parameters["teacher"], parameters["student"]
    return "; ".join(
        f"{label} parameters: student {student[key]:,} of the teacher's {teacher[key]:,} "
        f"({student[key] / max(teacher[key], 1):.1%})"
        for key, label in (("total", "total"), ("non_embedding", "non-embedding"))
    )


if __name__ == "__main__":  # `python -m gkd.tools.prune`; `gkd-prune` runs gkd.cli.command
    from gkd.cli import run

    run(main)

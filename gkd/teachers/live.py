"""The teacher as a model beside the student: its hidden states feed the dense loss, or its top-K the sparse one, and
it samples completions through the trainer's own decode loop (`--seq_kd`)."""

import torch

from ..losses import DenseTeacher
from .base import CompletionPositions, SampleRequest, Teacher
from .targets import top_k_of_logits, top_k_targets


def last_hidden_state(model, input_ids, attention_mask):
    """The backbone's output, without running lm_head (PEFT-wrapped or not)."""
    if hasattr(model, "peft_config"):
        model = model.base_model.model
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def has_plain_head(model) -> bool:
    """Whether a loss may project hidden states with the model's lm_head itself: a plain, whole Linear, and no logit
    transform (softcapping, scaling) between it and the logits."""
    config = model.config.get_text_config()
    transforms = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                  "lm_head_multiplier")
    return (type(model.get_output_embeddings()) is torch.nn.Linear
            and all(getattr(config, name, None) in (None, 1, 1.0) for name in transforms))


class LiveTeacher(Teacher):
    """A frozen model beside the student: `model`, or `ref` loaded when the trainer starts (after the student, and
    after the output folder is prepared). `top_k` None for the full vocabulary. `loss_temperature` softens its top-K
    as the loss softens both sides; `beta` picks the sampled-token support at K = 1, beta = 1."""

    can_sample = True

    def __init__(self, model, top_k: int | None, beta: float, loss_temperature: float, chunk_size: int,
                 ref=None, dtype: str = "auto", attn_implementation: str | None = None):
        self.model, self.top_k, self.beta = model, top_k, beta
        self.loss_temperature, self.chunk_size = loss_temperature, chunk_size
        self._load = (ref, dtype, attn_implementation)
        self._accelerator = None
        if model is not None:
            self.vocab_size = model.config.get_text_config().vocab_size

    @classmethod
    def from_options(cls, model, training_args, ref=None, model_args=None) -> "LiveTeacher":
        """K is `--teacher_top_k` (None: the full vocabulary, the dense loss). Without `model`, `ref` loads at start
        in `--dtype` with `--attn_implementation`."""
        loading = {} if model_args is None else {"dtype": model_args.dtype,
                                                 "attn_implementation": model_args.attn_implementation}
        return cls(model, training_args.teacher_top_k, training_args.beta, training_args.loss_temperature,
                   training_args.loss_chunk_size, ref=ref, **loading)

    def start(self, accelerator, deepspeed: bool) -> None:
        if self.model is None:
            from ..models import load_frozen

            self.model = load_frozen(*self._load)
            self.vocab_size = self.model.config.get_text_config().vocab_size
        if deepspeed:
            from trl.models.utils import prepare_deepspeed

            self.model = prepare_deepspeed(self.model, accelerator)
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)
        self.model.eval()
        self._accelerator = accelerator

    def _unwrapped(self):
        return self.model if self._accelerator is None else self._accelerator.unwrap_model(self.model)

    @torch.no_grad()
    def targets(self, positions: CompletionPositions, as_logits: bool, vocab_size: int):
        p = positions
        if as_logits:  # the full-logits loss (ZeRO-3's sharded heads): logits at the completion columns only
            keep = p.batch["completion_ids"].shape[1] + 1
            logits = self.model(input_ids=p.input_ids, attention_mask=p.attention_mask,
                                logits_to_keep=keep).logits[:, :-1][p.mask]
            if self.top_k is None:
                return logits
            targets = top_k_of_logits(logits, self.top_k, self.loss_temperature, vocab_size, p.labels)
        else:
            model = self._unwrapped()
            hidden = last_hidden_state(model, p.input_ids, p.attention_mask)[:, p.columns][p.mask]
            head = model.get_output_embeddings()
            if self.top_k is None:
                return DenseTeacher(hidden, head.weight, head.bias)
            targets = top_k_targets(hidden, head, self.top_k, self.loss_temperature, vocab_size, p.labels,
                                    self.chunk_size or 512)
        return targets.for_loss(self.top_k, self.beta, p.labels)

    @torch.no_grad()
    def lookup(self, batch: dict, vocab_size: int):
        """The top-K (all of `vocab_size` when K is unset) at every completion position of one padded micro-batch in
        the teacher's own tokens: what a cross-tokenizer teacher asks, as it asks a cache or a server."""
        device = self._accelerator.device if self._accelerator is not None else self.model.device
        mask = batch["completion_mask"].bool().to(device)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1).to(device)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).to(device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            logits_to_keep=mask.shape[1] + 1).logits[:, :-1][mask]
        labels = batch["completion_ids"].to(device)[mask]
        k = min(self.top_k or vocab_size, vocab_size)
        return top_k_of_logits(logits.float(), k, self.loss_temperature, vocab_size, labels)

    def sample(self, request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        return request.decode(self.model, request.prompt_ids, request.prompt_mask)

    def chunked_loss_ok(self) -> bool:
        return has_plain_head(self._unwrapped())


"""The GKD step, as hooks on `transformers.Trainer` (the loop, saving, resuming and logging stay the library's).

Where and why this differs from TRL 1.16's experimental `GKDTrainer`:
- The on-policy coin is flipped once per optimizer step, from the seed and the step, so every rank and every
  micro-batch of a gradient-accumulation window agree (TRL flips `random.random()` per micro-batch and per rank:
  under ZeRO-3 a rank that generates waits forever for one that does not).
- Completions for the whole window are sampled in one batched decode, before the window's first forward.
- The loss is normalised by the completion tokens actually trained on in the whole window, on all ranks (TRL
  counts the dataset's label tokens even when it trains on freshly generated completions).
- The divergence is computed in fp32, from hidden states projected chunk by chunk, never as [batch, length, vocab].
"""

import logging
from collections import defaultdict

import torch
from transformers import Trainer
from trl.models.utils import _ForwardRedirection, unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model

from . import losses
from .batching import left_pad_prompts, pad_batch
from .checkpoints import complete_checkpoint
from .decoding import StaticDecoder
from .generation import MergedLoraCopies, default_compile_options, generate, resolve_backend
from .guards import NonFiniteGuard
from .run_folder import MetricsFileCallback
from .signals import StopOnSignal
from .steps import DATASET, STUDENT, TEACHER, completion_source, lmbda_at, sampling_rng

logger = logging.getLogger(__name__)


class PromptCompletionCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(samples, self.pad_token_id)


class GKDTrainer(Trainer):
    def __init__(self, model, teacher, args, stop_token_ids, processing_class, peft_config=None, **kwargs):
        if peft_config is not None:
            from peft import get_peft_model
            from transformers import set_seed

            set_seed(args.seed)  # LoRA's initial A matrices are random: the same seed must give the same adapter

            if args.activation_checkpointing:
                model.enable_input_require_grads()
            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        super().__init__(
            model=model,
            args=args,
            processing_class=processing_class,
            data_collator=PromptCompletionCollator(processing_class.pad_token_id),
            **kwargs,
        )
        self.add_callback(MetricsFileCallback())
        # Preemption, non-finite steps, complete checkpoints: gkd/signals.py, gkd/guards.py, gkd/checkpoints.py.
        self.nonfinite_guard = NonFiniteGuard(self)
        self.stop_on_signal = StopOnSignal(self)
        self.add_callback(self.nonfinite_guard)
        self.add_callback(self.stop_on_signal)
        # Our compute_loss divides by the window's token count itself; Trainer must not divide again by the number
        # of accumulation steps.
        self.loss_is_scaled_for_ga = True
        self.stop_token_ids = stop_token_ids
        self.pad_token_id = processing_class.pad_token_id
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            self.teacher = prepare_deepspeed(teacher, self.accelerator)
        else:
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.teacher.eval()
        self._metrics = defaultdict(list)
        self._forward_redirection = _ForwardRedirection()
        zero3 = self.is_deepspeed_enabled and _zero_stage(self.accelerator) == 3
        if args.generation_backend in ("static", "compiled") and zero3:
            logger.warning("--generation_backend %s is not supported under DeepSpeed ZeRO-3; using plain",
                           args.generation_backend)
        self.generation_backend = resolve_backend(args.generation_backend, args.device, zero3)
        # Built once per run and reused by every generation, so the static caches, the decode graph and the merged
        # LoRA copies keep their addresses (CUDA graphs replay on fixed addresses): one decoder per sampling model.
        # The plain backend (transformers' generate) needs none.
        self._decoders = {}
        if self.generation_backend != "plain":
            options = default_compile_options(args.device) if self.generation_backend == "compiled" else None
            self._decoders = {STUDENT: StaticDecoder(options), TEACHER: StaticDecoder(options)}
        self._lora_copies = MergedLoraCopies()  # generation copies of the student's LoRA layers
        # Samples may only hold ids that both models embed and the tokenizer knows. A padded embedding's extra rows
        # (the teacher's or the student's) are untrained and get sampled now and then; the other model's forward
        # then indexes past its embedding. TRL's GKD samples from the whole padded vocabulary.
        self.shared_vocab_size = min(len(processing_class), _vocab_size(model), _vocab_size(teacher))

    # ---- one optimizer step's data: who writes the completions, and how many tokens the window trains on ----

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        args = self.args
        step = self.state.global_step
        lmbda = lmbda_at(step, args.lmbda, args.lmbda_schedule, args.lmbda_warmup_steps, args.lmbda_start)
        source = completion_source(args.seed, step, lmbda, args.seq_kd)
        if source != DATASET:
            batches = self._sample_window(batches, source)
        local_tokens = sum(batch["completion_mask"].sum() for batch in batches).to(device)
        window_tokens = self.accelerator.gather(local_tokens.reshape(1)).sum()
        rows = torch.tensor([sum(batch["completion_mask"].shape[0] for batch in batches)], device=device)
        window_rows = self.accelerator.gather(rows).sum()
        self._metrics["lmbda"].append(lmbda)
        self._metrics["on_policy"].append(float(source == STUDENT))
        self._metrics["teacher_generated"].append(float(source == TEACHER))
        self._metrics["completion_tokens"].append(window_tokens.item() / max(window_rows.item(), 1))
        return batches, window_tokens

    def _sample_window(self, batches: list[dict], source: str) -> list[dict]:
        """One batched decode for every prompt of the window; each micro-batch keeps its prompts and rows."""
        device = self.args.device
        model = self.model_wrapped if source == STUDENT else self.teacher
        prompt_ids, prompt_mask = left_pad_prompts(batches, self.pad_token_id)
        # Seeded from the step, not drawn from the global RNG: a resumed run samples what the first run did.
        seeded = sampling_rng(self.args.seed, self.state.global_step, self.args.process_index, device)
        # Under ZeRO-3 every rank runs this (the draw is the same on all ranks), and transformers' generate keeps them
        # in step (`synced_gpus`) until the longest completion of any rank ends, gathered or not.
        with unwrap_model_for_generation(
            model,
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=self.args.activation_checkpointing_kwargs,
        ) as generator, seeded:
            completion_ids, completion_mask = generate(
                generator,
                prompt_ids.to(device),
                prompt_mask.to(device),
                max_new_tokens=self.args.max_new_tokens,
                temperature=self.args.temperature,
                top_p=self.args.top_p,
                stop_token_ids=self.stop_token_ids,
                pad_token_id=self.pad_token_id,
                backend=self.generation_backend,
                max_cache_len=self.args.max_length,
                decoder=self._decoders.get(source),
                lora_copies=self._lora_copies if source == STUDENT else None,
                suppress_ids=_ids_beyond(generator, self.shared_vocab_size),
            )
        sampled, start = [], 0
        for batch in batches:
            rows = slice(start, start + batch["prompt_ids"].shape[0])
            start = rows.stop
            width = max(1, int(completion_mask[rows].sum(dim=1).max().item()))
            sampled.append(
                {
                    "prompt_ids": batch["prompt_ids"],
                    "prompt_mask": batch["prompt_mask"],
                    "completion_ids": completion_ids[rows, :width],
                    "completion_mask": completion_mask[rows, :width],
                }
            )
        return sampled

    # ---- the loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        divergence_sum = self._divergence_sum(model, inputs)
        if num_items_in_batch is None:
            num_items_in_batch = self.accelerator.gather(inputs["completion_mask"].sum().reshape(1)).sum()
        # Gradients are averaged over ranks by DDP/DeepSpeed; the window's token count is global, so scale back up.
        loss = divergence_sum / num_items_in_batch.clamp(min=1).to(divergence_sum.device)
        loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _divergence_sum(self, model, inputs) -> torch.Tensor:
        """Sum over completion tokens of the generalized JSD between student and teacher next-token distributions."""
        prompt_width = inputs["prompt_ids"].shape[1]
        completion_width = inputs["completion_ids"].shape[1]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"].bool()
        # Logits at column prompt_width - 1 + t predict completion token t.
        columns = slice(prompt_width - 1, prompt_width - 1 + completion_width)
        if self.args.objective == "sft":
            return self._nll_sum(model, input_ids, attention_mask, inputs["completion_ids"], mask)
        unwrapped = self.accelerator.unwrap_model(model)
        if self._use_chunked_loss(unwrapped):
            # Calling the backbones directly bypasses the autocast that accelerate wraps around `model.forward`
            # (TRL's DistillationTrainer has the same gap): without this, --bf16 with fp32 weights would run student
            # and teacher in fp32 here, while the logits path and generation run in bf16.
            return self._chunked_divergence_sum(model, unwrapped, input_ids, attention_mask, columns, mask)
        keep = completion_width + 1
        student_logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        student_logits, teacher_logits = losses.align_vocab(student_logits[:, :-1], teacher_logits[:, :-1])
        per_token = losses.generalized_jsd(
            student_logits, teacher_logits, beta=self.args.beta, temperature=self.args.loss_temperature
        )
        return losses.masked_sum(per_token, mask)

    def _nll_sum(self, model, input_ids, attention_mask, completion_ids, mask) -> torch.Tensor:
        """The SFT baseline: cross-entropy of the completion tokens, the teacher unused (see --objective)."""
        keep = completion_ids.shape[1] + 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), completion_ids, reduction="none")
        return losses.masked_sum(nll, mask)

    def _chunked_divergence_sum(self, model, unwrapped, input_ids, attention_mask, columns, mask) -> torch.Tensor:
        """The chunked loss from hidden states, under the run's mixed-precision autocast (teacher without autograd)."""
        with self.accelerator.autocast():
            student_hidden = self._redirected_hidden_state(model, unwrapped, input_ids, attention_mask)
            student_hidden = student_hidden[:, columns][mask]
            teacher_model = self.accelerator.unwrap_model(self.teacher)
            with torch.no_grad():
                teacher_hidden = _last_hidden_state(teacher_model, input_ids, attention_mask)[:, columns][mask]
            student_head = unwrapped.get_output_embeddings()
            teacher_head = teacher_model.get_output_embeddings()
            return losses.chunked_generalized_jsd(
                student_hidden,
                student_head.weight,
                teacher_hidden,
                teacher_head.weight,
                beta=self.args.beta,
                temperature=self.args.loss_temperature,
                chunk_size=self.args.loss_chunk_size,
                student_bias=student_head.bias,
                teacher_bias=teacher_head.bias,
            )

    def _redirected_hidden_state(self, model, unwrapped, input_ids, attention_mask):
        """The student backbone's output, called through the wrapper's forward (DDP/DeepSpeed hooks run).

        TRL's `_ForwardRedirection` restores `forward` by assigning the bound method to the instance, which leaves a
        `forward` entry in the module's `__dict__` for good; the compiled decode step guards on that dict and would be
        captured a second time after the first training step. So the entry is removed again unless it was there."""
        had_instance_forward = "forward" in vars(unwrapped)
        try:
            return self._forward_redirection(model, unwrapped, _last_hidden_state, unwrapped, input_ids, attention_mask)
        finally:
            if not had_instance_forward:
                vars(unwrapped).pop("forward", None)

    def _use_chunked_loss(self, unwrapped) -> bool:
        """The chunked loss reads lm_head weights directly, so only where they are whole, plain, unscaled Linears.

        Under ZeRO-3 the weights are shards outside their module's forward, so the loss takes the logits path
        there (it still only projects the completion columns)."""
        if self.args.loss_chunk_size == 0 or self.is_deepspeed_enabled and _zero_stage(self.accelerator) == 3:
            return False
        teacher = self.accelerator.unwrap_model(self.teacher)
        for model in (unwrapped, teacher):
            head = model.get_output_embeddings()
            config = model.config.get_text_config()
            if type(head) is not torch.nn.Linear or _has_logit_transform(config):
                return False
        return True

    # ---- evaluation and logging ----

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss: per-token divergence on the dataset's responses (teacher-forced)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            total = self._divergence_sum(model, inputs)
        tokens = inputs["completion_mask"].sum().clamp(min=1)
        return (total / tokens).detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe_loss(loss)
        return loss

    def _save_checkpoint(self, model, trial):
        with complete_checkpoint(self, trial):  # a marker written last says the checkpoint is whole
            super()._save_checkpoint(model, trial)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # one `on_policy` entry per optimizer step since the last log
            self.nonfinite_guard.add_to_log(logs, steps=len(self._metrics.get("on_policy", ())))
        if self._metrics and "loss" in logs:
            for key, values in self._metrics.items():
                logs[key] = sum(values) / len(values)
            self._metrics.clear()
        super().log(logs, start_time)


def _last_hidden_state(model, input_ids, attention_mask):
    """The backbone's output, without running lm_head (PEFT-wrapped or not)."""
    if hasattr(model, "peft_config"):
        model = model.base_model.model
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _has_logit_transform(config) -> bool:
    return any(
        getattr(config, name, None) not in (None, 1, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
    )


def _vocab_size(model) -> int:
    return model.config.get_text_config().vocab_size


def _ids_beyond(model, vocab_size: int) -> list[int]:
    """Ids from `vocab_size` up to the model's embedding size: a padded embedding's untrained rows, never sampled."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT generates with the base
    return list(range(vocab_size, _vocab_size(base)))


def _zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0

"""The GKD step, as hooks on `transformers.Trainer` (the loop, saving, resuming and logging stay the library's).

Where and why this differs from TRL 1.16's experimental `GKDTrainer`:
- The on-policy coin is flipped once per optimizer step, from the seed and the step, so every rank and every
  micro-batch of a gradient-accumulation window agree (TRL flips `random.random()` per micro-batch and per rank:
  under ZeRO-3 a rank that generates waits forever for one that does not).
- Completions for the whole window are sampled in one batched decode, before the window's first forward; a teacher
  that answers over the network (a cache or a server) is asked for the whole window then too.
- The loss is normalised by the completion tokens actually trained on in the whole window, on all ranks (TRL
  counts the dataset's label tokens even when it trains on freshly generated completions).
- The divergence is computed in fp32, from hidden states projected chunk by chunk, never as [batch, length, vocab].
"""

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer
from trl.models.utils import _ForwardRedirection, unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model

from . import losses
from .batching import ROW_KEYS, TEACHER_PROMPT_KEYS, left_pad_prompts, pad_batch, text_prompts
from .checkpoints import complete_checkpoint, only_tied_weights_missing
from .cross_tokenizer_loss import AlignedTeacher, aligned_distillation
from .decoding import StaticDecoder
from .errors import GKDError
from .generation import MergedLoraCopies, default_compile_options, generate, resolve_backend
from .guards import NonFiniteGuard, any_rank
from .run_folder import MetricsFileCallback
from .sampling import Sampling
from .signals import StopOnSignal
from .steps import DATASET, STUDENT, TEACHER, completion_source, lmbda_at, sampling_rng, step_seed
from .teachers import CompletionPositions, SampleRequest, Teacher, TeacherUnavailable
from .teachers.live import has_plain_head, last_hidden_state

logger = logging.getLogger(__name__)


class PromptCompletionCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(samples, self.pad_token_id)


class GKDTrainer(Trainer):
    """`teacher` is a `gkd.teachers.Teacher`: whichever source answers (a model beside the student, a top-K cache, a
    server), the trainer asks it the same questions and never which kind it is."""

    def __init__(self, model, teacher: Teacher, args, stop_token_ids, processing_class, peft_config=None,
                 rollouts=None, **kwargs):
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
        self.pad_token_id = processing_class.pad_token_id
        self.teacher = teacher
        self.rollouts = rollouts  # gkd.rollouts.RolloutServer: the student samples on a server (--rollout_server_url)
        teacher.start(self.accelerator, self.is_deepspeed_enabled)
        self._metrics = defaultdict(list)
        self._part_sums = defaultdict(float)  # this rank's kd / sft per-token sums since the last log
        self._window = {"tokens": None, "sft": False}  # the current window's token count and whether SFT applies
        self._forward_redirection = _ForwardRedirection()
        zero3 = self.is_deepspeed_enabled and _zero_stage(self.accelerator) == 3
        if rollouts is not None and zero3:
            raise GKDError("--rollout_server_url is not supported under DeepSpeed ZeRO-3: each rank saves the adapter "
                           "it holds, and ZeRO-3 shards it; use ZeRO-2 or DDP")
        if args.generation_backend in ("static", "compiled") and zero3:
            logger.warning("--generation_backend %s is not supported under DeepSpeed ZeRO-3; using plain",
                           args.generation_backend)
        self.generation_backend = resolve_backend(args.generation_backend, args.device, zero3)
        # Built once per run and reused by every generation, so the static caches, the decode graph and the merged
        # LoRA copies keep their addresses (CUDA graphs replay on fixed addresses): one decoder per sampling model
        # (the student, and each teacher model that samples under --seq_kd, keyed by the model: several teachers have
        # caches of other shapes). The plain backend (transformers' generate) needs none.
        self._decoders = {}
        if self.generation_backend != "plain":
            options = default_compile_options(args.device) if self.generation_backend == "compiled" else None
            self._decoders = {STUDENT: StaticDecoder(options)}
            self._decoder_options = options
        self._lora_copies = MergedLoraCopies()  # generation copies of the student's LoRA layers
        # Samples may only hold ids that both models embed and the tokenizer knows. A padded embedding's extra rows
        # (the teacher's or the student's) are untrained and get sampled now and then; the other model's forward
        # then indexes past its embedding. TRL's GKD samples from the whole padded vocabulary.
        embeddings = [_vocab_size(model)] + ([teacher.vocab_size] if teacher.vocab_size else [])
        self.shared_vocab_size = min([len(processing_class), *embeddings])
        self.sampling = Sampling.from_options(args, stop_token_ids, self.pad_token_id, self.generation_backend,
                                              suppress_ids=range(self.shared_vocab_size, max(embeddings)))

    # ---- one optimizer step's data: who writes the completions, and how many tokens the window trains on ----

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        args = self.args
        step = self.state.global_step
        lmbda = lmbda_at(step, args.lmbda, args.lmbda_schedule, args.lmbda_warmup_steps, args.lmbda_start)
        source = completion_source(args.seed, step, lmbda, args.seq_kd)
        failure = None
        try:
            if source != DATASET:
                batches = self._sample_window(batches, source)
            if args.kd_loss_weight > 0:
                batches = self.teacher.fetch(batches, self.shared_vocab_size)
        except TeacherUnavailable as error:
            failure = error
        self._stop_if_the_teacher_is_lost(failure)
        for name, value in self.teacher.pop_timings().items():
            self._metrics[name].append(value)
        local_tokens = sum(batch["completion_mask"].sum() for batch in batches).to(device)
        window_tokens = self.accelerator.gather(local_tokens.reshape(1)).sum()
        rows = torch.tensor([sum(batch["completion_mask"].shape[0] for batch in batches)], device=device)
        window_rows = self.accelerator.gather(rows).sum()
        # The SFT term trains on the dataset's or the teacher's completions, never on the student's own samples.
        self._window = {"tokens": window_tokens, "sft": args.sft_loss_weight > 0 and source != STUDENT}
        self._metrics["lmbda"].append(lmbda)
        self._metrics["on_policy"].append(float(source == STUDENT))
        self._metrics["teacher_generated"].append(float(source == TEACHER))
        self._metrics["completion_tokens"].append(window_tokens.item() / max(window_rows.item(), 1))
        self._metrics["sft_steps"].append(float(self._window["sft"]))
        return batches, window_tokens

    def _stop_if_the_teacher_is_lost(self, failure: Exception | None) -> None:
        """A teacher that cannot answer (after its retries) on any rank: every rank saves a checkpoint at the last
        finished step and the run stops, between optimizer steps, so no step ever trains on missing teacher data."""
        if not any_rank(self.accelerator, failure is not None, self.args.device):
            return
        self._save_checkpoint(self.model, trial=None)
        checkpoint = f"{self.args.output_dir}/checkpoint-{self.state.global_step}"
        reason = str(failure) if failure else "another rank lost its teacher"
        raise GKDError(f"{reason}; saved {checkpoint}: resume with --resume_from_checkpoint last")

    def _sample_window(self, batches: list[dict], source: str) -> list[dict]:
        """One batched decode for every prompt of the window; each micro-batch keeps its prompts and rows."""
        if self.args.text_prompt_tokens:  # plain text: the window's first tokens are the prompt to continue
            batches = [text_prompts(batch, self.args.text_prompt_tokens, self.pad_token_id) for batch in batches]
        prompt_ids, prompt_mask = left_pad_prompts(batches, self.pad_token_id)
        if source == TEACHER:
            completion_ids, completion_mask = self.teacher.sample(self._sample_request(prompt_ids, prompt_mask,
                                                                                       batches))
        elif self.rollouts is not None:
            completion_ids, completion_mask = self.rollouts.sample(
                self.accelerator.unwrap_model(self.model), self.state.global_step,
                self._sample_request(prompt_ids, prompt_mask, batches))
            for name, seconds in self.rollouts.timings.items():
                self._metrics[name].append(seconds)
        else:
            completion_ids, completion_mask = self._decode(STUDENT, self.model_wrapped, prompt_ids, prompt_mask)
        sampled, start = [], 0
        for batch in batches:
            rows = slice(start, start + batch["prompt_ids"].shape[0])
            start = rows.stop
            width = max(1, int(completion_mask[rows].sum(dim=1).max().item()))
            carried = {key: batch[key] for key in (*ROW_KEYS, *TEACHER_PROMPT_KEYS) if key in batch}
            sampled.append(
                {
                    "prompt_ids": batch["prompt_ids"],
                    "prompt_mask": batch["prompt_mask"],
                    "completion_ids": completion_ids[rows, :width],
                    "completion_mask": completion_mask[rows, :width],
                    **carried,
                }
            )
        return sampled

    def _sample_request(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        batches: list[dict]) -> SampleRequest:
        """What the teacher is asked to sample (`--seq_kd`): a server draws each row from its seed, a model beside
        the student through this trainer's own decode loop; each row names its teacher where the data does."""
        rank, step = self.args.process_index, self.state.global_step
        seeds = [step_seed(self.args.seed, step, "served", rank * 100_000 + row) for row in range(len(prompt_ids))]
        routed = all("teacher_index" in batch for batch in batches)
        teacher_index = torch.cat([batch["teacher_index"] for batch in batches]) if routed else None
        teacher_prompts = (None, None)
        if all("teacher_prompt_ids" in batch for batch in batches):  # --cross_tokenizer
            teacher_prompts = left_pad_prompts(batches, 0, TEACHER_PROMPT_KEYS)
        return SampleRequest(prompt_ids, prompt_mask, self.sampling, seeds, self.shared_vocab_size,
                             lambda model, ids, mask, sampling=None: self._decode(TEACHER, model, ids, mask, sampling),
                             teacher_index, *teacher_prompts)

    def _decode(self, source: str, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                sampling: Sampling | None = None):
        device = self.args.device
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
                generator, prompt_ids.to(device), prompt_mask.to(device), sampling or self.sampling,
                decoder=self._decoder_for(source, model), lora_copies=self._lora_copies if source == STUDENT else None,
            )
        return completion_ids, completion_mask

    def _decoder_for(self, source: str, model) -> StaticDecoder | None:
        if source == STUDENT or not self._decoders:
            return self._decoders.get(source)
        return self._decoders.setdefault((source, id(model)), StaticDecoder(self._decoder_options))

    # ---- the loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = self._loss_parts(model, inputs, with_sft=self._window["sft"])
        if num_items_in_batch is None:
            num_items_in_batch = self.accelerator.gather(inputs["completion_mask"].sum().reshape(1)).sum()
        # Gradients are averaged over ranks by DDP/DeepSpeed; the window's token count is global, so scale back up.
        scale = self.accelerator.num_processes / num_items_in_batch.clamp(min=1).to(parts.total.device)
        if model.training:
            # Kept as tensors until the log line: `.item()` here would sync the GPU every micro-batch.
            self._part_sums["kd_loss"] = self._part_sums["kd_loss"] + parts.kd.detach() * scale
            self._part_sums["sft_loss"] = self._part_sums["sft_loss"] + parts.sft.detach() * scale
            for name, (kd, tokens) in getattr(parts, "by_teacher", {}).items():  # unscaled: per teacher's own tokens
                self._part_sums[f"kd_loss/{name}"] = self._part_sums[f"kd_loss/{name}"] + kd.detach()
                self._part_sums[f"kd_tokens/{name}"] = self._part_sums[f"kd_tokens/{name}"] + tokens
        loss = parts.total * scale
        return (loss, None) if return_outputs else loss

    def _loss_parts(self, model, inputs, with_sft: bool) -> losses.LossParts:
        """kd_loss_weight x (sum over completion tokens of the generalized JSD to the teacher) + sft_loss_weight x
        (sum of their cross-entropy), and the two sums."""
        args = self.args
        prompt_width, completion_width = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"].bool()
        # Hidden states at column prompt_width - 1 + t predict completion token t.
        columns = slice(prompt_width - 1, prompt_width - 1 + completion_width)
        positions = CompletionPositions(inputs, input_ids, attention_mask, columns, mask,
                                        inputs["completion_ids"][mask])
        options = losses.LossOptions(
            beta=args.beta, temperature=args.loss_temperature, chunk_size=max(args.loss_chunk_size, 1),
            kd_weight=args.kd_loss_weight, sft_weight=args.sft_loss_weight if with_sft else 0.0,
            renormalize=args.topk_renormalize,
        )
        unwrapped = self.accelerator.unwrap_model(model)
        if self._use_chunked_loss(unwrapped):
            # Calling the backbones directly bypasses the autocast that accelerate wraps around `model.forward`
            # (TRL's DistillationTrainer has the same gap): without this, --bf16 with fp32 weights would run student
            # and teacher in fp32 here, while the logits path and generation run in bf16.
            with self.accelerator.autocast():
                student_hidden = self._redirected_hidden_state(model, unwrapped, input_ids, attention_mask)
                student_hidden = student_hidden[:, columns][mask]
                head = unwrapped.get_output_embeddings()
                teacher = self._teacher_targets(positions, as_logits=False)

                def chunked(target, rows):
                    weight, bias = head.weight, head.bias
                    if isinstance(target, losses.SparseTeacher) and weight.shape[0] > self.shared_vocab_size:
                        weight = weight[: self.shared_vocab_size]  # the tail bucket: real tokens only
                        bias = None if bias is None else bias[: self.shared_vocab_size]
                    hidden, labels = _at(student_hidden, rows), _at(positions.labels, rows)
                    return losses.chunked_distillation_loss(hidden, weight, target, options, labels, bias)

                return _summed_over_parts(teacher, chunked)
        # The reference path (--loss_chunk_size 0, and ZeRO-3 whose lm_head weights are shards): logits at the
        # completion columns only, the same sums as the chunked path.
        keep = completion_width + 1
        student_logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        teacher = self._teacher_targets(positions, as_logits=True)
        student_logits = student_logits[:, :-1][mask]

        def logits_loss(target, rows):
            if isinstance(target, AlignedTeacher):  # --cross_tokenizer: the teacher's answer laid out by chunks
                row_of = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
                completions = _at(row_of, rows).unique().numel() if model.training else 0
                return self._aligned_loss(_at(student_logits, rows), _at(positions.labels, rows), target, options,
                                          completions)
            return losses.logits_distillation_loss(_at(student_logits, rows), target, options,
                                                   _at(positions.labels, rows), self.shared_vocab_size)

        return _summed_over_parts(teacher, logits_loss)

    def _aligned_loss(self, student_logits, labels, teacher: AlignedTeacher, options: losses.LossOptions,
                      completions: int) -> losses.LossParts:
        """kd_weight x the cross-tokenizer loss (`cross_tokenizer_loss`) + sft_weight x cross-entropy; logs the
        sampled reverse KL per completion this rank saw (`chunk_reverse_kl`)."""
        kd, estimates = aligned_distillation(student_logits[:, :len(self.processing_class)], labels, teacher,
                                             options.beta, options.temperature)
        sft = torch.zeros((), device=student_logits.device)
        if options.sft_weight > 0:
            sft = torch.nn.functional.cross_entropy(student_logits.float(), labels, reduction="sum")
        if completions:  # training steps only
            self._metrics["chunk_reverse_kl"].append(estimates["chunk_reverse_kl"].item() / completions)
        return losses.LossParts(options.kd_weight * kd + options.sft_weight * sft, kd.detach(), sft.detach())

    def _teacher_targets(self, positions: CompletionPositions, as_logits: bool):
        """What the loss compares against; None when the distillation term has no weight."""
        if self.args.kd_loss_weight == 0:
            return None
        return self.teacher.targets(positions, as_logits, self.shared_vocab_size)

    def _redirected_hidden_state(self, model, unwrapped, input_ids, attention_mask):
        """The student backbone's output, called through the wrapper's forward (DDP/DeepSpeed hooks run).

        TRL's `_ForwardRedirection` restores `forward` by assigning the bound method to the instance, which leaves a
        `forward` entry in the module's `__dict__` for good; the compiled decode step guards on that dict and would be
        captured a second time after the first training step. So the entry is removed again unless it was there."""
        had_instance_forward = "forward" in vars(unwrapped)
        try:
            return self._forward_redirection(model, unwrapped, last_hidden_state, unwrapped, input_ids, attention_mask)
        finally:
            if not had_instance_forward:
                vars(unwrapped).pop("forward", None)

    def _use_chunked_loss(self, unwrapped) -> bool:
        """The chunked loss reads lm_head weights directly, so only where they are whole, plain, unscaled Linears.

        Under ZeRO-3 the weights are shards outside their module's forward, so the loss takes the logits path
        there (it still only projects the completion columns)."""
        if self.args.loss_chunk_size == 0 or self.is_deepspeed_enabled and _zero_stage(self.accelerator) == 3:
            return False
        return has_plain_head(unwrapped) and self.teacher.chunked_loss_ok()

    # ---- evaluation and logging ----

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss: the per-token loss on the dataset's responses (teacher-forced), both terms weighted."""
        if self.args.kd_loss_weight > 0:
            (inputs,) = self.teacher.fetch([inputs], self.shared_vocab_size)
            self.teacher.pop_timings()  # an evaluation's waits and alignment are not the next training step's
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            total = self._loss_parts(model, inputs, with_sft=self.args.sft_loss_weight > 0).total
        tokens = inputs["completion_mask"].sum().clamp(min=1)
        return (total / tokens).detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe_loss(loss)
        return loss

    def _save_checkpoint(self, model, trial):
        with complete_checkpoint(self, trial):  # a marker written last says the checkpoint is whole
            super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Then the rate of the step to come from this run's schedule: the optimizer's state holds the checkpoint's
        last rate, which for a run resumed with a larger --max_steps is the old schedule's end (0 for a cosine), and
        the first new step would train at it. With the same --max_steps the rate is the one restored."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's wrapper, or none
        if checkpoint is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, learning_rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = learning_rate
        scheduler._last_lr = rates

    def _issue_warnings_after_load(self, load_result) -> None:
        """Trainer warns on resume of a model with tied embeddings that `lm_head.weight` is missing from the
        checkpoint, which holds it once, as the embedding: say nothing when only such identical weights are missing."""
        model = self.accelerator.unwrap_model(self.model)
        if not load_result.unexpected_keys and only_tied_weights_missing(model, load_result.missing_keys):
            return
        super()._issue_warnings_after_load(load_result)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # one `on_policy` entry per optimizer step since the last log
            steps = len(self._metrics.get("on_policy", ()))
            self.nonfinite_guard.add_to_log(logs, steps=steps)
            self._log_loss_parts(logs, steps)
        if self._metrics and "loss" in logs:
            self._metrics.pop("sft_steps", None)
            for key, values in self._metrics.items():
                logs[key] = sum(values) / len(values)
            self._metrics.clear()
        super().log(logs, start_time)

    def _log_loss_parts(self, logs: dict, steps: int) -> None:
        """kd_loss and sft_loss per token, each averaged over the steps it trained on (sft: not the on-policy ones),
        over all ranks as Trainer's `loss` is. Every rank logs, so the gather is one collective on each. Where the
        teacher answers in parts (several teachers): kd_loss/NAME per token of that part's own completion tokens, and
        kd_tokens/NAME, its tokens per optimizer step, over all ranks."""
        sft_steps = sum(self._metrics.get("sft_steps", ()))
        names = self.teacher.part_names
        keys = ("kd_loss", "sft_loss", *(f"{kind}/{name}" for name in names for kind in ("kd_loss", "kd_tokens")))
        local = torch.stack([torch.as_tensor(self._part_sums[key], dtype=torch.float32, device=self.args.device)
                             for key in keys])
        gathered = self.accelerator.gather(local.reshape(1, len(keys)))
        kd_sum, sft_sum = gathered[:, :2].mean(dim=0).tolist()
        by_teacher = gathered[:, 2:].sum(dim=0).tolist()
        self._part_sums.clear()
        if self.args.kd_loss_weight > 0 and steps:
            logs["kd_loss"] = kd_sum / steps
            for name, kd, tokens in zip(names, by_teacher[0::2], by_teacher[1::2]):
                if tokens:
                    logs[f"kd_loss/{name}"] = kd / tokens
                logs[f"kd_tokens/{name}"] = tokens / steps
        if self.args.sft_loss_weight > 0 and sft_steps:
            logs["sft_loss"] = sft_sum / sft_steps


@dataclass
class PartedLossParts(losses.LossParts):
    """The loss summed over several teachers' parts, and each part's kd sum and completion tokens, by name."""

    by_teacher: dict = field(default_factory=dict)


def _at(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return values if rows is None else values[rows]


def _summed_over_parts(teacher, loss_of) -> losses.LossParts:
    """`loss_of(target, rows)` for one teacher's answer; for several (a list of `TargetPart`s), each part's loss on
    its own positions, summed. The sums add up, so the window's per-token normalisation holds. A part covering every
    position is computed on the whole tensors, as one teacher's answer is."""
    if not isinstance(teacher, list):
        return loss_of(teacher, None)
    total = kd = sft = None
    by_teacher = {}
    for part in teacher:
        whole = bool(part.rows.all())
        parts = loss_of(part.target, None if whole else part.rows)
        total = parts.total if total is None else total + parts.total
        kd = parts.kd if kd is None else kd + parts.kd
        sft = parts.sft if sft is None else sft + parts.sft
        by_teacher[part.name] = (parts.kd, part.rows.sum())
    return PartedLossParts(total, kd, sft, by_teacher)


def _vocab_size(model) -> int:
    return model.config.get_text_config().vocab_size


def _zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0

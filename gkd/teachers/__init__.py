"""Where the teacher's signal comes from: a live model beside the student (`live`), a cache of its top-K
log-probabilities built once (`cache`), or an inference server on its own machines (`server`).

The live teacher's hidden states feed the dense loss; the cache and the server give `SparseTargets`, the teacher's K
most likely tokens and their log-probabilities at every completion position, which feed the sparse loss
(`losses.sparse_generalized_jsd`). Sparse targets are fetched for a whole gradient-accumulation window before its
first forward, so a teacher that cannot answer stops the run between optimizer steps, never halfway through one.
"""

from dataclasses import dataclass

import torch


@dataclass
class SparseTargets:
    """The teacher at N completion positions (row-major over the batch's completion mask): ids [N, K] and their
    log-probabilities [N, K] (float32), `valid` [N, K] false where a slot holds nothing, and the log-probability of
    the completion's own token at each position [N] (the support of `--teacher_top_k 1 --beta 1`)."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    valid: torch.Tensor
    actual_log_probs: torch.Tensor

    BATCH_KEYS = ("teacher_ids", "teacher_log_probs", "teacher_valid", "teacher_actual_log_probs")

    def into_batch(self, batch: dict) -> dict:
        """The targets as batch tensors, so they travel with the micro-batch (and to its device) like its ids."""
        values = (self.ids, self.log_probs, self.valid, self.actual_log_probs)
        return {**batch, **dict(zip(self.BATCH_KEYS, values))}

    @classmethod
    def from_batch(cls, batch: dict) -> "SparseTargets | None":
        if "teacher_ids" not in batch:
            return None
        return cls(*(batch[key] for key in cls.BATCH_KEYS))

    def top(self, k: int) -> "SparseTargets":
        """The first k slots (the K stored are in descending order)."""
        return SparseTargets(self.ids[:, :k], self.log_probs[:, :k], self.valid[:, :k], self.actual_log_probs)

    def sampled_token(self, completion_ids: torch.Tensor) -> "SparseTargets":
        """The completion's own token as the one-token support (tinker's and TRL's server-mode reverse KL)."""
        ids = completion_ids.reshape(-1, 1)
        log_probs = self.actual_log_probs.reshape(-1, 1)
        return SparseTargets(ids, log_probs, torch.isfinite(log_probs), self.actual_log_probs)


def completion_rows(batch: dict) -> list[tuple[list[int], list[int]]]:
    """Each row's prompt and completion token ids without padding (the layout of `batching.pad_batch`)."""
    rows = []
    for prompt, prompt_mask, completion, completion_mask in zip(
        batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
    ):
        rows.append((prompt[prompt_mask.bool()].tolist(), completion[completion_mask.bool()].tolist()))
    return rows


def check_teacher(model_args, training_args, student_tokenizer, student_ref):
    """Before any weight loads: a live teacher is a usable model sharing the student's vocabulary (its ModelRef is
    returned); a server answers, names a tokenizer that matches, and can give K log-probabilities (None returned);
    a cache is checked against the encoded data later (`open_source`)."""
    from .. import models

    kind = model_args.teacher_kind
    if kind == "live":
        ref = models.ModelRef(model_args.teacher_model_name_or_path, model_args.teacher_model_revision,
                              model_args.trust_remote_code, "--teacher_model_name_or_path")
        models.check_model(ref)
        models.check_same_vocabulary(
            student_tokenizer, models.load_tokenizer(ref), ref.name,
            {student_ref.name: models.embedding_size(student_ref), ref.name: models.embedding_size(ref)})
        return ref
    return None


def open_source(model_args, training_args, script_args, student_tokenizer, stop_token_ids, num_samples: int,
                vocab_size: int):
    """The cache or the server a run reads its teacher from, checked against the run (None for a live teacher)."""
    kind = model_args.teacher_kind
    if kind == "cache":
        from ..data import DataSource
        from ..data.pipeline import tokenizer_fingerprint
        from ..data.sources import fingerprint
        from .cache import CacheIdentity, TeacherCache, check_fits, read_manifest

        source = DataSource(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
        identity = CacheIdentity(fingerprint(source), tokenizer_fingerprint(student_tokenizer),
                                 training_args.max_length, training_args.max_new_tokens, tuple(stop_token_ids),
                                 num_samples)
        check_fits(read_manifest(model_args.teacher_logits_path), identity, training_args.teacher_top_k,
                   model_args.teacher_logits_path)
        return TeacherCache(model_args.teacher_logits_path, vocab_size)
    if kind == "server":
        from .server import TeacherServer, check_tokenizer

        server = TeacherServer(model_args.teacher_server_url, training_args.teacher_server_timeout,
                               training_args.teacher_server_retries, training_args.teacher_server_concurrency)
        server.describe()
        check_tokenizer(server, student_tokenizer, model_args.teacher_tokenizer_name_or_path,
                        model_args.trust_remote_code)
        server.check(training_args.teacher_top_k or 1, training_args.max_length)
        server.top_k = training_args.teacher_top_k
        return server
    return None

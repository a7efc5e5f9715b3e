"""A cache of the teacher's top-K log-probabilities at every completion token of a dataset, built once
(`gkd-cache-teacher`, gkd/tools/cache_teacher.py) and trained from with `--teacher_logits_path`, after NeMo-Aligner's
KD-logit workflow: the teacher is never in memory during training, and epochs after the first cost no teacher passes.

Layout: `cache.json` (what produced it: teacher, tokenizer, K, the data's fingerprint, the encoding options; written
last, when every shard is complete) and `shard-NNNNN/` folders written by `datasets.save_to_disk`, one row per encoded
sample in the order of the run's encoded dataset: `index`, `completion_ids` (int32, to check the run encodes the same
tokens), `topk_ids` (int32) and `topk_log_probs` (float16, or bfloat16 as its raw 16 bits in uint16: Arrow has no
bfloat16 type; `storage_dtype` in cache.json says which) flattened [tokens x K] in descending order, and
`actual_log_probs` (float32, the teacher's log-probability of each completion token).

A cache for a teacher with another tokenizer (`gkd-cache-teacher --cross_tokenizer`) holds each sample's completion
as the teacher tokenizes it, scored after the teacher's own rendering of the prompt; it is aligned with the student's
tokens when a `--cross_tokenizer` run reads it (gkd/teachers/cross.py). Its identity records both tokenizers, and
the teacher's is saved in `teacher_tokenizer/`, so the cache alone is enough to train from.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .base import PrefetchedTeacher
from .targets import SparseTargets

FORMAT = "gkd-teacher-cache-1"
MANIFEST = "cache.json"
TEACHER_TOKENIZER = "teacher_tokenizer"  # a cache across tokenizers: the teacher's, saved beside the shards
PROGRESS = "cache.partial.json"
STORAGE_DTYPES = ("float16", "bfloat16")
_ARROW_TYPES = {"float16": "float16", "bfloat16": "uint16"}  # the Arrow type each storage dtype is written as


@dataclass(frozen=True)
class CacheIdentity:
    """What makes a cache fit a run: the same encoded samples (data, tokenizer, options) and enough K."""

    data_fingerprint: str
    tokenizer_fingerprint: str
    max_length: int
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    num_samples: int
    # a cache in the teacher's own tokens (--cross_tokenizer): its tokenizer too; None where it shares the student's
    teacher_tokenizer_fingerprint: str | None = None

    @classmethod
    def of(cls, data_fingerprint: str, tokenizer, options, num_samples: int,
           teacher_tokenizer=None) -> "CacheIdentity":
        """The identity of an encoding (`data.EncodeOptions`) of data with that fingerprint: the one construction,
        for the cache builder and for the run that reads the cache. `tokenizer` is the student's (it numbers the
        samples); `teacher_tokenizer` the teacher's own, for a cache across tokenizers."""
        from ..data.pipeline import tokenizer_fingerprint

        return cls(data_fingerprint, tokenizer_fingerprint(tokenizer), options.max_length, options.max_new_tokens,
                   tuple(options.stop_token_ids), num_samples,
                   tokenizer_fingerprint(teacher_tokenizer) if teacher_tokenizer is not None else None)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def log_probs_feature(storage_dtype: str):
    """The `datasets` feature of the `topk_log_probs` column for a storage dtype."""
    import datasets

    return datasets.Sequence(datasets.Value(_ARROW_TYPES[storage_dtype]))


def to_storage(log_probs: torch.Tensor, storage_dtype: str) -> list:
    """Float log-probabilities as the column stores them: floats that Arrow rounds to float16, or bfloat16's bits
    (rounded to nearest even by torch, as an in-memory bfloat16 tensor would be)."""
    if storage_dtype == "bfloat16":
        return log_probs.to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16).tolist()
    return log_probs.tolist()


def from_storage(values, storage_dtype: str) -> np.ndarray:
    """The stored column back as float32: a bfloat16 is the top half of the float32 it rounds."""
    if storage_dtype == "bfloat16":
        return (np.asarray(values, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(values, dtype=np.float32)


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        partial = " (its build did not finish: run gkd-cache-teacher again with the same options to complete it)" \
            if (folder / PROGRESS).is_file() else ""
        raise ConfigError(f"--teacher_logits_path {folder}: no {MANIFEST}, so not a finished teacher cache{partial}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--teacher_logits_path {folder}: unreadable {MANIFEST} ({error})") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"--teacher_logits_path {folder}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def teacher_tokenizer_folder(folder: str | Path) -> Path:
    """Where a cache in the teacher's own tokens keeps the teacher's tokenizer (what `--cross_tokenizer` reads)."""
    manifest = read_manifest(folder)
    if not manifest.get("teacher_tokenizer"):
        raise ConfigError(_NOT_CROSSED.format(folder=folder))
    path = Path(folder) / manifest["teacher_tokenizer"]
    if not path.is_dir():
        raise ConfigError(f"--teacher_logits_path {folder}: the teacher's tokenizer ({path.name}/) is missing; give it "
                          "with --teacher_tokenizer_name_or_path, or rebuild the cache")
    return path


_CROSSED = ("--teacher_logits_path {folder} was built in the teacher's own tokens (gkd-cache-teacher "
            "--cross_tokenizer): train with --cross_tokenizer")
_NOT_CROSSED = ("--teacher_logits_path {folder} holds the teacher's answers in the student's tokens: with "
                "--cross_tokenizer, build the cache with gkd-cache-teacher --cross_tokenizer")


def check_fits(manifest: dict, identity: CacheIdentity, top_k: int | None, folder: str | Path) -> None:
    """Refuse a cache built for other samples, or in other tokens, naming the first difference."""
    recorded = manifest["identity"]
    crossed = recorded.get("teacher_tokenizer_fingerprint") is not None
    if crossed != (identity.teacher_tokenizer_fingerprint is not None):
        raise ConfigError((_CROSSED if crossed else _NOT_CROSSED).format(folder=folder))
    differences = [
        ("data", "data_fingerprint", "another dataset, or edited records"),
        ("tokenizer", "tokenizer_fingerprint", "another tokenizer or chat template"),
        ("teacher tokenizer", "teacher_tokenizer_fingerprint", "another teacher tokenizer or chat template"),
        ("max_length", "max_length", None),
        ("max_new_tokens", "max_new_tokens", None),
        ("stop tokens", "stop_token_ids", None),
        ("number of samples", "num_samples", None),
    ]
    mine = identity.__dict__
    for label, key, meaning in differences:
        ours, theirs = mine[key], recorded.get(key)
        if (list(ours) if isinstance(ours, tuple) else ours) != theirs:
            detail = meaning or f"cache {theirs}, this run {ours}"
            raise ConfigError(f"--teacher_logits_path {folder} does not match this run: its {label} differs "
                              f"({detail}); rebuild it with the run's options")
    if top_k is not None and top_k > manifest["top_k"]:
        raise ConfigError(f"--teacher_top_k {top_k}: the cache at {folder} holds only the top {manifest['top_k']}")


class TeacherCache:
    """Read access to a finished cache: the sparse targets of any encoded sample, by its `index`."""

    def __init__(self, folder: str | Path, vocab_size: int):
        import datasets

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.top_k = self.manifest["top_k"]
        self.storage_dtype = self.manifest.get("storage_dtype", "float16")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"--teacher_logits_path {self.folder}: storage_dtype {self.storage_dtype!r} in "
                              f"{MANIFEST}, expected one of {', '.join(STORAGE_DTYPES)}")
        self.vocab_size = vocab_size
        shards = []
        for shard in self.manifest["shards"]:
            path = self.folder / shard["name"]
            try:
                dataset = datasets.load_from_disk(str(path))
            except (OSError, ValueError) as error:
                raise ConfigError(f"--teacher_logits_path {self.folder}: {shard['name']} cannot be read ({error}); "
                                  "rebuild the cache") from None
            if len(dataset) != shard["rows"]:
                raise ConfigError(f"--teacher_logits_path {self.folder}: {shard['name']} has {len(dataset)} rows, "
                                  f"{shard['rows']} were written (truncated?); rebuild the cache")
            stored = getattr(dataset.features.get("topk_log_probs"), "feature", None)
            if getattr(stored, "dtype", None) != _ARROW_TYPES[self.storage_dtype]:
                raise ConfigError(f"--teacher_logits_path {self.folder}: {shard['name']} stores log-probabilities as "
                                  f"{getattr(stored, 'dtype', stored)}, {MANIFEST} says {self.storage_dtype}; rebuild "
                                  "the cache")
            shards.append(dataset)
        self.rows = datasets.concatenate_datasets(shards).with_format("numpy")

    def targets(self, batch: dict, top_k: int | None = None, vocab_size: int | None = None) -> SparseTargets:
        """The targets of one padded micro-batch's completion positions, looked up by the samples' `index` (all K of
        them; the trainer keeps the first `--teacher_top_k`). Ids at or beyond the shared vocabulary are invalid."""
        vocab_size = vocab_size or self.vocab_size
        indices = batch["index"].tolist()
        records = self.rows[indices]
        lengths = batch["completion_mask"].sum(dim=1).tolist()
        ids, log_probs, actual = [], [], []
        for row, length in enumerate(lengths):
            cached = np.asarray(records["completion_ids"][row])
            ours = batch["completion_ids"][row, :length].cpu().numpy()
            if len(cached) < length or not np.array_equal(cached[:length], ours):
                differs = next((i for i, (a, b) in enumerate(zip(cached, ours)) if a != b), min(len(cached), length))
                raise ConfigError(f"--teacher_logits_path {self.folder}: sample {indices[row]} was cached with other "
                                  f"tokens than the run trains on (from token {differs} of {length}); rebuild the "
                                  "cache with the run's options")
            k = self.top_k
            ids.append(np.asarray(records["topk_ids"][row]).reshape(-1, k)[:length])
            log_probs.append(from_storage(records["topk_log_probs"][row], self.storage_dtype).reshape(-1, k)[:length])
            actual.append(np.asarray(records["actual_log_probs"][row], dtype=np.float32)[:length])
        ids = torch.from_numpy(np.concatenate(ids).astype(np.int64))
        log_probs = torch.from_numpy(np.concatenate(log_probs))
        valid = ids < vocab_size
        return SparseTargets(ids.masked_fill(~valid, 0), log_probs, valid, torch.from_numpy(np.concatenate(actual)))


@torch.no_grad()
def score_batch(model, batch: dict, top_k: int, chunk_size: int = 512, storage_dtype: str = "float16") -> list[dict]:
    """The teacher's top-K ids and log-probabilities, and the actual token's, at every completion position of each
    row of a padded batch (`batching.pad_batch`'s layout), as the rows of a cache shard (`to_storage`'s values)."""
    from .live import last_hidden_state
    from .targets import top_k_targets

    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    prompt_width, completion_width = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    columns = slice(prompt_width - 1, prompt_width - 1 + completion_width)  # the states predicting completion tokens
    hidden = last_hidden_state(model, input_ids, attention_mask)[:, columns]
    mask = batch["completion_mask"].bool()
    if not mask.any():  # prompt-only samples: nothing to score, but each keeps its row in the shard
        targets = SparseTargets(*(torch.zeros(0, top_k, dtype=dtype) for dtype in (torch.long, torch.float32)),
                                torch.zeros(0, top_k, dtype=torch.bool), torch.zeros(0))
    else:
        targets = top_k_targets(hidden[mask], model.get_output_embeddings(), top_k, 1.0, 1 << 62,
                                batch["completion_ids"][mask], chunk_size)
    rows, start = [], 0
    for row, length in enumerate(mask.sum(dim=1).tolist()):
        positions = slice(start, start + length)
        start += length
        rows.append({
            "index": int(batch["index"][row]),
            "completion_ids": batch["completion_ids"][row, :length].int().tolist(),
            "topk_ids": targets.ids[positions].int().flatten().tolist(),
            "topk_log_probs": to_storage(targets.log_probs[positions].flatten(), storage_dtype),
            "actual_log_probs": targets.actual_log_probs[positions].tolist(),
        })
    return rows


class CachedTeacher(PrefetchedTeacher):
    """The `Teacher` a run reads from a cache: K is `--teacher_top_k`, or all the cache holds."""

    def __init__(self, cache: TeacherCache, top_k: int | None, beta: float):
        self.cache, self.top_k, self.beta = cache, top_k or cache.top_k, beta

    def lookup(self, batch: dict, vocab_size: int) -> SparseTargets:
        return self.cache.targets(batch, self.top_k, vocab_size)

"""Build a cache of the teacher's top-K log-probabilities once, then train from it with `--teacher_logits_path`.

    gkd-cache-teacher --teacher_model_name_or_path T --dataset_name D --top_k 100 --output_dir C \\
        [--max_length 1024 --max_new_tokens 128]          (the values the training run will use)
    gkd-cache-teacher --cross_tokenizer --tokenizer_name_or_path S ...   (a teacher with another tokenizer)
    accelerate launch --num_processes N -m gkd.tools.cache_teacher ...   (each rank scores its share of the shards)
    python scripts/cache_teacher_logits.py ...                           (the same command)

Records are read, rendered and cut exactly as training does (the same data pipeline, chat template, max_length and
max_new_tokens), and the cache records the fingerprints of all of it, so a run whose samples differ is refused before
it trains. Shards are written one at a time, each under a hidden name until complete, so memory stays flat and a killed
build resumes from its complete shards when run again with the same options. The layout: gkd/teachers/cache.py.
With --cross_tokenizer, each completion is scored in the teacher's own tokens after its own rendering of the prompt,
as a `--cross_tokenizer` run asks a live teacher (docs/cross_tokenizer.md).
"""

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gkd.errors import ConfigError
from gkd.folders import LOCK_FILE, check_output, lock_folder, move_aside, release_lock
from gkd.teachers.cache import (FORMAT, MANIFEST, PROGRESS, STORAGE_DTYPES, TEACHER_TOKENIZER, CacheIdentity,
                                log_probs_feature, score_batch, shard_name)
from gkd.teachers.cross import TeacherTokens

logger = logging.getLogger(__name__)


@dataclass
class CacheConfig:
    """Options of gkd-cache-teacher."""

    teacher_model_name_or_path: str = field(metadata={"help": "The teacher: a model folder or a Hub model id."})
    dataset_name: str = field(metadata={"help": "The training data, in any form gkd/train.py reads."})
    output_dir: str = field(metadata={"help": "Folder for the cache (cache.json and shard-NNNNN folders)."})
    top_k: int = field(default=100, metadata={"help": "Log-probabilities kept per token, most likely first."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The tokenizer (and chat template) training renders with: the student's. Default: the "
                  "teacher's, which shares the vocabulary; give the student when its chat template differs."},
    )
    cross_tokenizer: bool = field(
        default=False,
        metadata={"help": "The teacher has a tokenizer of its own (a training run's --cross_tokenizer): each "
                  "completion is scored in the teacher's tokens, after the teacher's own chat template renders the "
                  "prompt. Needs --tokenizer_name_or_path (the student's)."},
    )
    teacher_model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub teacher."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to cache."})
    max_length: int = field(default=1024, metadata={"help": "As the training run's --max_length."})
    max_new_tokens: int = field(default=128, metadata={"help": "As the training run's --max_new_tokens."})
    batch_size: int = field(default=8, metadata={"help": "Samples per teacher forward."})
    shard_size: int = field(default=1024, metadata={"help": "Samples per shard (the unit a killed build resumes)."})
    storage_dtype: str = field(default="float16", metadata={"help": "float16 or bfloat16 log-probabilities.",
                                                            "choices": list(STORAGE_DTYPES)})
    dtype: str = field(default="auto", metadata={"help": "Precision the teacher runs in ('auto' = as stored)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenize the data."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished cache, or another run's partial one."})

    def __post_init__(self):
        for name in ("top_k", "batch_size", "shard_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_length <= self.max_new_tokens:
            raise ConfigError(f"--max_length ({self.max_length}) must exceed --max_new_tokens ({self.max_new_tokens})")
        if self.cross_tokenizer and not self.tokenizer_name_or_path:
            raise ConfigError("--cross_tokenizer needs --tokenizer_name_or_path: the student's tokenizer, which "
                              "numbers the samples and whose tokens the training run aligns with the teacher's")


def build(config: CacheConfig) -> Path:
    """Score every sample's completion with the teacher and write the cache; returns its folder."""
    from accelerate import PartialState

    from gkd import data, models
    from gkd.launch import cpu_deepspeed_backend, warn_about_state

    backend = cpu_deepspeed_backend(torch.cuda.is_available())  # CPU ranks need gloo named: see gkd/launch.py
    state = PartialState(backend=backend) if backend else PartialState()
    warn_about_state(state)  # e.g. `accelerate launch --num_processes 2` that started one process
    teacher_ref = models.ModelRef(config.teacher_model_name_or_path, config.teacher_model_revision,
                                  config.trust_remote_code, "--teacher_model_name_or_path")
    models.check_model(teacher_ref)
    models.check_context(teacher_ref, config.max_length)
    folder = check_output(config.output_dir, [config.teacher_model_name_or_path, config.tokenizer_name_or_path,
                                              config.dataset_name])  # as every tool checks its output folder
    vocabulary = models.embedding_size(teacher_ref)
    if config.top_k > vocabulary:
        raise ConfigError(f"--top_k {config.top_k} is more than the teacher's vocabulary of {vocabulary} tokens")
    tokenizer_ref = models.ModelRef(config.tokenizer_name_or_path, flag="--tokenizer_name_or_path",
                                    trust_remote_code=config.trust_remote_code) \
        if config.tokenizer_name_or_path else teacher_ref
    if config.tokenizer_name_or_path:
        models.check_model(tokenizer_ref)
    tokenizer = models.load_tokenizer(tokenizer_ref)
    stop_ids = models.stop_token_ids(tokenizer, tokenizer_ref)
    pair = None
    if config.cross_tokenizer:
        from gkd.teachers import vocabulary_pair

        pair = vocabulary_pair(tokenizer, stop_ids, teacher_ref)
    else:
        models.check_same_vocabulary(tokenizer, models.load_tokenizer(teacher_ref), teacher_ref.name,
                                     remedy=" (a teacher of another model family: add --cross_tokenizer)")
    options = data.EncodeOptions(config.max_length, config.max_new_tokens, tuple(stop_ids))
    source = data.DataSource(config.dataset_name, config.dataset_config, config.dataset_train_split)
    with state.main_process_first():
        data_fingerprint = data.sources.fingerprint(source)
        encoded, stats, _ = data.prepare_dataset(source, tokenizer, options, num_proc=config.dataset_num_proc,
                                                 data_fingerprint=data_fingerprint)
        if pair:
            teacher_options = data.EncodeOptions(config.max_length, config.max_new_tokens, tuple(pair.teacher_stop_ids))
            encoded = data.pipeline.with_teacher_prompts(encoded, source, [(pair.teacher, teacher_options, None)],
                                                         {"num_proc": config.dataset_num_proc})
    identity = CacheIdentity.of(data_fingerprint, tokenizer, options, len(encoded), pair.teacher if pair else None)
    existed, lock = folder.exists(), None
    if state.is_main_process:
        lock = _prepare_folder(folder, config, identity)
    try:
        state.wait_for_everyone()
        shards = [(number, start, min(start + config.shard_size, len(encoded)))
                  for number, start in enumerate(range(0, len(encoded), config.shard_size))]
        mine = [shard for shard in shards if shard[0] % state.num_processes == state.process_index
                and not (folder / shard_name(shard[0])).is_dir()]
        if mine:
            model = models.load_frozen(teacher_ref, config.dtype).to(state.device)
            tokens = TeacherTokens(pair, config.max_length) if pair else None
            _score_shards(model, encoded, mine, folder, config, tokenizer.pad_token_id, state, tokens)
        state.wait_for_everyone()
        if state.is_main_process:
            if pair:  # the cache alone is enough to train from: the teacher's tokenizer goes with it
                _save_teacher_tokenizer(pair.teacher, teacher_ref, folder / TEACHER_TOKENIZER)
            _write_manifest(folder, config, identity, shards, stats,
                                min(len(pair.teacher), vocabulary) if pair else None)
        state.wait_for_everyone()
    except BaseException:
        if lock is not None:
            _forget_failed_build(folder, existed)
        raise
    finally:
        if lock is not None:
            release_lock(lock)  # not only at exit: a caller in the same process (tests, a notebook) may build again
    return folder


def _save_teacher_tokenizer(tokenizer, teacher_ref, folder: Path) -> None:
    """The teacher's tokenizer, and its generation config where it has one (stop tokens a run reads from it)."""
    from transformers import GenerationConfig

    tokenizer.save_pretrained(str(folder))
    try:
        GenerationConfig.from_pretrained(teacher_ref.name, **teacher_ref.kwargs()).save_pretrained(str(folder))
    except (OSError, ValueError):  # no generation_config.json
        pass


def _forget_failed_build(folder: Path, existed: bool) -> None:
    """After a build that raised: its half-written shards go; with no shard complete, so does its progress file (and
    the folder it created), so a rerun starts afresh with any options. Complete shards stay, to resume from when the
    same options are given again (other options are refused without --overwrite, as for a killed build)."""
    for staging in folder.glob(f".shard-*.partial-{os.getpid()}"):
        shutil.rmtree(staging, ignore_errors=True)
    if any(path.is_dir() for path in folder.glob("shard-*")):
        return
    (folder / PROGRESS).unlink(missing_ok=True)
    if not existed and all(path.name == LOCK_FILE for path in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _prepare_folder(folder: Path, config: CacheConfig, identity: CacheIdentity):
    """A new folder, a partial build of the same cache (resumed), or a refusal naming what is there; returns the
    folder's lock."""
    settings = {"identity": asdict(identity), "top_k": config.top_k, "storage_dtype": config.storage_dtype,
                "shard_size": config.shard_size, "teacher": config.teacher_model_name_or_path,
                "teacher_revision": config.teacher_model_revision}
    progress = folder / PROGRESS
    holds_other = folder.is_dir() and any(path.name != LOCK_FILE for path in folder.iterdir())
    if (folder / MANIFEST).is_file() or (holds_other and not progress.is_file()):
        if not config.overwrite:
            what = "a finished teacher cache" if (folder / MANIFEST).is_file() else "other files"
            raise ConfigError(f"--output_dir {folder} holds {what}; pass --overwrite to move it aside and build anew, "
                              "or choose another")
        _move_aside(folder)
    elif progress.is_file():
        previous = json.loads(progress.read_text())
        if json.loads(json.dumps(settings)) != previous and not config.overwrite:
            raise ConfigError(f"--output_dir {folder} holds a partial cache built with other options; pass "
                              "--overwrite to start it over, or give the same options to resume it")
        if json.loads(json.dumps(settings)) != previous:
            _move_aside(folder)
        else:
            done = sorted(path.name for path in folder.glob("shard-*") if path.is_dir())
            logger.info("resuming the partial cache in %s: %d shards already complete", folder, len(done))
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(folder)  # one build at a time; released when the build ends or this process does
    for stale in folder.glob(".shard-*"):  # a killed build's half-written shard
        shutil.rmtree(stale, ignore_errors=True)
    progress.write_text(json.dumps(settings, indent=1))
    return lock


def _move_aside(folder: Path) -> None:
    aside = move_aside(folder, "replaced")
    logger.warning("--overwrite: moved the previous %s to %s (delete it when you no longer need it)", folder, aside)


def _score_shards(model, encoded, shards, folder: Path, config: CacheConfig, pad_token_id: int, state,
                  tokens: TeacherTokens | None) -> None:
    """Each shard's samples scored batch by batch (in the teacher's tokens when `tokens` aligns them) and saved."""
    import datasets
    from tqdm.auto import tqdm

    from gkd.batching import pad_batch

    features = datasets.Features({
        "index": datasets.Value("int64"),
        "completion_ids": datasets.Sequence(datasets.Value("int32")),
        "topk_ids": datasets.Sequence(datasets.Value("int32")),
        "topk_log_probs": log_probs_feature(config.storage_dtype),  # Arrow has no bfloat16: its bits, as uint16
        "actual_log_probs": datasets.Sequence(datasets.Value("float32")),
    })
    total = sum(end - start for _, start, end in shards)
    progress = tqdm(total=total, desc=f"caching the teacher (rank {state.process_index})", unit="sample",
                    disable=not state.is_local_main_process and state.num_processes > 1)
    for number, start, end in shards:
        rows = []
        for batch_start in range(start, end, config.batch_size):
            samples = encoded[batch_start:min(batch_start + config.batch_size, end)]
            batch = pad_batch([dict(zip(samples, values)) for values in zip(*samples.values())], pad_token_id)
            if tokens:  # the completions as the teacher tokenizes them, after its own prompts
                batch = tokens.teacher_batch(batch)[2]
            batch = {key: value.to(state.device) for key, value in batch.items()}
            # prompt-only samples get empty rows
            rows.extend(score_batch(model, batch, config.top_k, storage_dtype=config.storage_dtype))
            progress.update(len(samples["index"]))
        staging = folder / f".{shard_name(number)}.partial-{os.getpid()}"
        shard = datasets.Dataset.from_dict({key: [row[key] for row in rows] for key in features}, features=features)
        shard.save_to_disk(str(staging))
        staging.rename(folder / shard_name(number))
    progress.close()
    if tokens:
        shares = tokens.pop_stats()
        if shares:
            rank = f" (rank {state.process_index}'s shards)" if state.num_processes > 1 else ""
            logger.info("aligned across tokenizers%s: %.1f%% of completion bytes in 1:1 chunks, %.1f chunks per "
                        "completion, %.1f%% of completions given to the teacher", rank,
                        100 * shares["aligned_byte_share"], shares["chunks_per_completion"],
                        100 * shares["aligned_completions"])


def _write_manifest(folder: Path, config: CacheConfig, identity: CacheIdentity, shards, stats,
                    teacher_vocab_size: int | None) -> None:
    listed, positions = [], 0
    for number, start, end in shards:
        import datasets

        shard = datasets.load_from_disk(str(folder / shard_name(number)))
        tokens = int(sum(len(ids) for ids in shard["completion_ids"]))
        positions += tokens
        listed.append({"name": shard_name(number), "start": start, "end": end, "rows": len(shard), "tokens": tokens})
    manifest = {
        "format": FORMAT, "identity": asdict(identity), "top_k": config.top_k, "storage_dtype": config.storage_dtype,
        "teacher": config.teacher_model_name_or_path, "teacher_revision": config.teacher_model_revision,
        "tokenizer": config.tokenizer_name_or_path or config.teacher_model_name_or_path,
        **({"teacher_tokenizer": TEACHER_TOKENIZER, "teacher_vocab_size": teacher_vocab_size}
           if teacher_vocab_size else {}),  # --cross_tokenizer: rows in the teacher's tokens
        "dataset": {"name": config.dataset_name, "config": config.dataset_config, "split": config.dataset_train_split,
                    "records": stats.num_records},
        "tokens": positions, "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "shards": listed,
    }
    staging = folder / f".{MANIFEST}.tmp"
    staging.write_text(json.dumps(manifest, indent=1))
    os.replace(staging, folder / MANIFEST)  # last: a cache.json marks a finished cache
    (folder / PROGRESS).unlink(missing_ok=True)
    logger.info("cached %d tokens of %d samples, top %d, %.1f bytes per token, in %s", positions,
                identity.num_samples, config.top_k, manifest["bytes"] / max(positions, 1), folder)


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse, quiet_libraries

    (config,) = parse(CacheConfig, argv, description=__doc__.splitlines()[0])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    quiet_libraries()
    started = time.time()
    folder = build(config)
    print(f"wrote {folder} in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # `python -m gkd.tools.cache_teacher`; `gkd-cache-teacher` runs gkd.cli.command
    from gkd.cli import run

    run(main)

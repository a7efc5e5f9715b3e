"""The dataset a run trains on: read, validated, encoded through `datasets` (Arrow on disk, `map` over
`--dataset_num_proc` processes), and cached under a key of the data, the tokenizer and the encoding options.

A second run on the same data memory-maps the cached encoding and starts in seconds; under `accelerate launch` the main
process encodes while the other ranks wait, then they all map the same files. The cache is the only copy of nothing:
delete `$HF_DATASETS_CACHE/gkd` at any time.
"""

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from ..errors import DataError
from .encoding import MIN_TEXT_TOKENS, EncodeOptions, EncodeStats, encode_rows
from .sources import DataSource, fingerprint, read_conversations

logger = logging.getLogger(__name__)

FORMAT_VERSION = "gkd-encoded-1"  # bump when encoding changes what it writes
STATS_FILE = "gkd_stats.json"
NORMALISED_BATCH = 1000


def prepare_dataset(source: DataSource, tokenizer, options: EncodeOptions, num_proc: int | None = None,
                    batch_size: int | None = None, cache_root: str | Path | None = None,
                    data_fingerprint: str | None = None, role: str = "student"):
    """(encoded `datasets.Dataset`, `EncodeStats`, cache key): from the cache when the same data, tokenizer and
    options were encoded before, else read, validated, encoded and cached now. A caller that needs the data's
    fingerprint too (a teacher cache's identity) passes the one it computed: the data is hashed once."""
    key = cache_key(source, tokenizer, options, data_fingerprint)
    folder = Path(cache_root or _default_cache_root()) / key
    if (folder / STATS_FILE).is_file():
        import datasets

        logger.info("%s: encoded before, reusing %s", source.name, folder)
        stats = EncodeStats(**json.loads((folder / STATS_FILE).read_text())["stats"])
        return datasets.load_from_disk(str(folder / "dataset")), stats, key
    dataset, stats = _encode_now(source, tokenizer, options, num_proc, batch_size, folder, role)
    return dataset, stats, key


def cache_key(source: DataSource, tokenizer, options: EncodeOptions, data_fingerprint: str | None = None) -> str:
    """Changes with the records, the tokenizer (vocabulary, special tokens, chat template), the options, and the code
    that reads and encodes them (so an upgrade of gkd never reuses an encoding an older version wrote)."""
    code = "".join((Path(__file__).parent / name).read_text() for name in ("records.py", "encoding.py"))
    parts = [FORMAT_VERSION, hashlib.sha256(code.encode()).hexdigest(), data_fingerprint or fingerprint(source),
             tokenizer_fingerprint(tokenizer), json.dumps(asdict(options))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()[:32]


def _default_cache_root() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "gkd"


def _encode_now(source, tokenizer, options, num_proc, batch_size, folder: Path, role: str = "student"):
    """Validate while writing the normalised records to Arrow, encode with `map`, save, then publish the folder."""
    import datasets

    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        normalised, num_records = _write_normalised(source, staging / "normalised.arrow")
        encoded = normalised.map(
            encode_rows, batched=True, batch_size=batch_size or 1000, num_proc=num_proc,
            fn_kwargs={"tokenizer": tokenizer, "options": options, "role": role}, remove_columns=normalised.column_names,
            features=_encoded_features(), new_fingerprint=folder.name, cache_file_name=str(staging / "encoded.arrow"),
            desc="tokenizing",
        )
        if len(encoded) == 0:  # only plain text can give no sample: every chat record gives one, cut to fit
            raise DataError(source.name, f"no record is long enough to train on: all {num_records} are plain text of "
                                         f"fewer than {MIN_TEXT_TOKENS} tokens (a window needs one prompt token and at "
                                         "least one to predict)")
        encoded = encoded.add_column("index", list(range(len(encoded))))  # a sample's row: its key in a logits cache
        stats = EncodeStats(num_records=num_records, **_column_counts(encoded))
        encoded.save_to_disk(str(staging / "dataset"))
        (staging / STATS_FILE).write_text(json.dumps({"source": source.name, "stats": asdict(stats)}, indent=1))
        for path in staging.glob("*.arrow"):  # the intermediate files; the saved dataset has its own copy
            path.unlink()
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / STATS_FILE).is_file():  # another process finished the same key first: use its copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(str(folder / "dataset")), stats


def _write_normalised(source: DataSource, path: Path):
    """Every record validated and normalised, streamed into one Arrow file: memory stays flat however many."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    features = datasets.Features({
        "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "completion": datasets.Value("string"),
        "text": datasets.Value("string"),
        "source": datasets.Value("string"),
        "teacher": datasets.Value("string"),
    })
    count = 0
    with ArrowWriter(features=features, path=str(path)) as writer:
        batch = []
        for conversation in read_conversations(source):
            batch.append({"prompt": conversation.prompt, "completion": conversation.completion,
                          "text": conversation.text, "source": conversation.source, "teacher": conversation.teacher})
            if len(batch) == NORMALISED_BATCH:
                writer.write_batch({name: [row[name] for row in batch] for name in features})
                count += len(batch)
                batch = []
        if batch:
            writer.write_batch({name: [row[name] for row in batch] for name in features})
            count += len(batch)
        writer.finalize()
    if count == 0:
        raise DataError(source.name, "no records found")
    return datasets.Dataset.from_file(str(path)), count


def _encoded_features():
    import datasets

    return datasets.Features({
        "prompt_ids": datasets.Sequence(datasets.Value("int32")),
        "completion_ids": datasets.Sequence(datasets.Value("int32")),
        "is_text": datasets.Value("bool"),
        "truncated": datasets.Value("bool"),
        "stop_text": datasets.Value("bool"),
        "teacher": datasets.Value("string"),
        "source": datasets.Value("string"),
    })


def _column_counts(encoded) -> dict:
    import pyarrow.compute as compute

    table = encoded.data
    lengths = compute.list_value_length(table.column("completion_ids"))
    return {
        "num_samples": len(encoded),
        "num_prompt_only": int(compute.sum(compute.equal(lengths, 0)).as_py() or 0),
        "num_truncated": int(compute.sum(table.column("truncated").cast("int64")).as_py() or 0),
        "num_text": int(compute.sum(table.column("is_text").cast("int64")).as_py() or 0),
        "num_stop_text": int(compute.sum(table.column("stop_text").cast("int64")).as_py() or 0),
    }



def training_datasets(script_args, training_args, tokenizer, stop_token_ids: list[int], teacher_kind: str = "live",
                      teacher_names: list[str] | None = None, default_teacher: str | None = None,
                      teacher_tokenizers: list | None = None):
    """The run's (train, eval) datasets, encoded once per node (the main process first, the others from its cache),
    with what their statistics mean for the run (and its teacher: live, cache or server) said or refused before any
    model loads; and the training data's fingerprint (what a teacher cache must have been built from). With several
    teachers (`teacher_names`), every sample is routed to one (`route_teachers`). `teacher_tokenizers`: with
    --cross_tokenizer, (tokenizer, stop ids) of each teacher in `teacher_names` order (of the one teacher without
    them); each sample's prompt is rendered by its own teacher too (`with_teacher_prompts`)."""
    from ..errors import ConfigError

    options = EncodeOptions(training_args.max_length, training_args.max_new_tokens, tuple(stop_token_ids))
    kwargs = {"num_proc": script_args.dataset_num_proc, "batch_size": script_args.dataset_batch_size}
    train_source = DataSource(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    with training_args.main_process_first(desc="encoding the data"):
        data_fingerprint = fingerprint(train_source)
        train, stats, _ = prepare_dataset(train_source, tokenizer, options, data_fingerprint=data_fingerprint,
                                          **kwargs)
        eval_source = _eval_source(script_args, training_args)
        evaluation = prepare_dataset(eval_source, tokenizer, options, **kwargs)[0] if eval_source else None
    logger.info(stats.describe(script_args.dataset_name, training_args.max_length))
    if stats.num_stop_text:
        first = train.with_format("arrow")["stop_text"].to_pylist().index(True)
        logger.warning("%s: %d replies write the text of an end-of-turn token (first: %s), which the chat template "
                       "turns into that token: each is trained only up to it; edit those replies to keep the rest",
                       script_args.dataset_name, stats.num_stop_text, train[first]["source"])
    train = route_teachers(train, teacher_names, default_teacher, script_args.dataset_name)
    if evaluation is not None:
        evaluation = route_teachers(evaluation, teacher_names, default_teacher,
                                    script_args.eval_dataset_name or script_args.dataset_name)
    if teacher_tokenizers:
        teachers = [(teacher_tokenizer, EncodeOptions(training_args.max_length, training_args.max_new_tokens,
                                                      tuple(teacher_stop_ids)), name)
                    for (teacher_tokenizer, teacher_stop_ids), name in zip(teacher_tokenizers,
                                                                           teacher_names or [None])]
        with training_args.main_process_first(desc="encoding the prompts for the teacher"):
            train = with_teacher_prompts(train, train_source, teachers, kwargs)
            if evaluation is not None:
                evaluation = with_teacher_prompts(evaluation, eval_source, teachers, kwargs)
    _check_trainable(stats, training_args, script_args.dataset_name, teacher_kind)
    if training_args.text_prompt_tokens is not None and not stats.num_text:
        logger.warning("--text_prompt_tokens has no effect: %s has no plain-text records", script_args.dataset_name)
    samplers = []  # who continues a prompt on some step: a text window's prompt is one token without the option
    if training_args.has_on_policy_steps:
        samplers.append(f"the student on on-policy steps ({training_args.lmbda_options})")
    if training_args.seq_kd and training_args.has_off_policy_steps:
        samplers.append("the teacher on --seq_kd steps")
    if stats.num_text and samplers and training_args.text_prompt_tokens is None:
        raise ConfigError(f"{script_args.dataset_name}: plain-text records have no prompt for {' or '.join(samplers)} "
                          "to continue: give --text_prompt_tokens N (the first N tokens of a window are the prompt), "
                          "or train without sampling (--lmbda 0, no --seq_kd)")
    return train, evaluation, data_fingerprint


def with_teacher_prompts(dataset, source: DataSource, teachers: list[tuple], kwargs: dict):
    """The column `teacher_prompt_ids`: each sample's prompt as its teacher's own chat template renders it, in that
    teacher's tokens (`--cross_tokenizer`). `teachers`: (tokenizer, `EncodeOptions`, name or None) in `teacher_index`
    order. The same records encoded for each teacher, cached like the student's; a chat record is one sample on every
    side, so rows correspond one to one. Plain text is split into windows by token count, which differs between
    tokenizers: refused."""
    from ..errors import DataError

    is_text = dataset.with_format("arrow")["is_text"].to_pylist()
    if True in is_text:
        raise DataError(dataset[is_text.index(True)]["source"], "is plain text, which --cross_tokenizer cannot align "
                                                               "yet: give chat records (messages), or train without "
                                                               "--cross_tokenizer")
    prompts = []
    for tokenizer, options, name in teachers:
        role = "teacher" if name is None else f"teacher {name}"
        encoded = prepare_dataset(source, tokenizer, options, role=role, **kwargs)[0]
        assert len(encoded) == len(dataset), "chat records encode to one sample each, for any tokenizer"
        prompts.append(encoded.with_format("arrow")["prompt_ids"] if len(teachers) > 1 else encoded["prompt_ids"])
    if len(prompts) == 1:
        return dataset.add_column("teacher_prompt_ids", prompts[0])
    prompts = [column.to_pylist() for column in prompts]
    teacher_index = dataset.with_format("arrow")["teacher_index"].to_pylist()
    return dataset.add_column("teacher_prompt_ids",
                              [prompts[teacher][row] for row, teacher in enumerate(teacher_index)])


def route_teachers(dataset, teacher_names: list[str] | None, default_teacher: str | None, name: str):
    """Each sample's teacher as an index into `teacher_names` (the column `teacher_index`): its record's `teacher`
    field, or `default_teacher` where it names none (the only one, when one is given). A name the run does not know,
    or a record without one and no default, is refused naming the record. Without `teacher_names` (one teacher, not
    given as --teacher NAME=SOURCE) the field is ignored, said once."""
    import pyarrow.compute as compute

    column = dataset.with_format("arrow")["teacher"]  # in the dataset's order (a selection's too)
    named = len(column) - column.null_count
    if not teacher_names:
        if named:
            logger.warning("%s: %d records name a teacher; the run has one teacher (no --teacher NAME=SOURCE), so "
                           "the field is ignored", name, named)
        return dataset
    if default_teacher is None and len(teacher_names) == 1:
        default_teacher = teacher_names[0]
    counts = {entry["values"]: entry["counts"] for entry in compute.value_counts(column).to_pylist()}
    missing = counts.pop(None, 0)
    known = ", ".join(teacher_names)
    for unknown in (teacher for teacher in counts if teacher not in teacher_names):
        row = compute.index(column, unknown).as_py()
        raise DataError(dataset[row]["source"], f"names the teacher {unknown!r}, which no --teacher gives (known: "
                                                f"{known})", field="teacher")
    if missing and default_teacher is None:
        row = compute.index(compute.is_null(column), True).as_py()
        raise DataError(dataset[row]["source"], f"names no teacher, and there is no --default_teacher: add a "
                                                f"'teacher' field ({known}) or give --default_teacher NAME",
                        field="teacher")
    if missing:
        counts[default_teacher] = counts.get(default_teacher, 0) + missing
    logger.info("%s: samples per teacher: %s", name,
                ", ".join(f"{teacher} {counts.get(teacher, 0)}" for teacher in teacher_names))
    position = {teacher: index for index, teacher in enumerate(teacher_names)}
    indices = [position[teacher if teacher is not None else default_teacher] for teacher in column.to_pylist()]
    return dataset.add_column("teacher_index", indices)


def _eval_source(script_args, training_args) -> DataSource | None:
    if script_args.eval_dataset_name:
        return DataSource(script_args.eval_dataset_name, script_args.dataset_config, script_args.dataset_test_split)
    if training_args.evaluates:  # a Hub dataset's test split (config.check_together refused local data without it)
        return DataSource(script_args.dataset_name, script_args.dataset_config, script_args.dataset_test_split)
    return None


def _check_trainable(stats: EncodeStats, training_args, name: str, teacher_kind: str = "live") -> None:
    """Prompt-only records train only on steps that sample a response for them: on-policy steps, and off-policy ones
    under --seq_kd. Refuse a run whose off-policy steps would train on nothing, warn of records that train less."""
    from ..errors import ConfigError

    if not stats.num_prompt_only or training_args.seq_kd or not training_args.has_off_policy_steps:
        return
    on_policy, lmbda = training_args.has_on_policy_steps, training_args.lmbda_options
    if teacher_kind == "cache":  # it scores the dataset's responses only: no --seq_kd, no on-policy steps
        remedy = "a --teacher_logits_path cache cannot answer them: --seq_kd needs a live teacher or a server"
    else:
        remedy = "add --seq_kd to have the teacher answer them" + (" on the off-policy steps" if on_policy else "")
    if stats.num_prompt_only == stats.num_samples:
        steps = "the off-policy steps" if on_policy else "every step"
        alternative = "" if teacher_kind == "cache" else ", or use --lmbda 1"
        raise ConfigError(f"{name}: every record is prompt-only (no response to train on), so {steps} ({lmbda}) "
                          f"would train on nothing; {remedy}{alternative}")
    trains = (f"they train only on on-policy steps ({lmbda})" if on_policy else
              f"they never train ({lmbda}: no step samples a response for them)")
    logger.warning("%d of %d samples are prompt-only (no response): %s; %s", stats.num_prompt_only,
                   stats.num_samples, trains, remedy)

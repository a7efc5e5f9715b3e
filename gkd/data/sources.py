"""Where records come from, read one at a time with their place for error messages, and a fingerprint of each source
that changes whenever its records can.

Local: a `.json` list of records, a `.jsonl` file (one record per line, read line by line), a `.parquet` file, a
folder of such files, its sub-folders included (sorted by path, concatenated; suffixes in any case; hidden files
skipped), or a folder written by
`datasets.save_to_disk` (a `DatasetDict` gives its `--dataset_train_split`). Anything else is a Hugging Face Hub
dataset id, loaded with `datasets.load_dataset(name, --dataset_config, split=...)` through the HF cache (offline with
`HF_DATASETS_OFFLINE=1`).
"""

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .records import Conversation, Location, detect_format, kind, normalise

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")  # written by `save_to_disk`
ARROW_BATCH = 1000


@dataclass(frozen=True)
class DataSource:
    """A dataset as the user named it: a path or a Hub id, and for Hub and saved datasets the config and split."""

    name: str
    config: str | None = None
    split: str = "train"

    @property
    def is_local(self) -> bool:
        return Path(self.name).expanduser().exists()


def read_records(source: DataSource) -> Iterator[tuple[Location, Any]]:
    """Every record of the source, in order, with its location; a file's records after its first are yielded
    lazily, so memory stays flat for JSON Lines and Parquet."""
    path = Path(source.name).expanduser()
    if not path.exists() and looks_like_path(source.name):
        raise DataError(path, "no such file or folder")
    if not path.exists():
        yield from _hub_records(source)
    elif path.is_dir():
        if any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
            yield from _arrow_records(_load_saved(path, source.split), path)
            return
        files = data_files(path)
        if not files:
            raise DataError(path, "empty folder: expected .json, .jsonl or .parquet files, or a folder written by "
                                  "save_to_disk")
        for file in files:
            yield from _file_records(file)
    elif path.suffix.lower() in FILE_SUFFIXES:
        yield from _file_records(path)
    else:
        raise DataError(path, "expected a .json, .jsonl or .parquet file, a folder of them, a folder written by "
                              "save_to_disk, or a Hub dataset id")


def read_conversations(source: DataSource) -> Iterator[Conversation]:
    """Every record validated and normalised; a file's format is its first record's."""
    file, file_format = None, None
    found = False
    for where, record in read_records(source):
        if where.file != file:
            file, file_format = where.file, detect_format(record, where)
        found = True
        yield normalise(record, where, file_format)
    if not found:
        raise DataError(source.name, "no records found")


def data_files(folder: Path) -> list[Path]:
    """The data files of a folder and of its sub-folders, by path name; hidden files and folders are skipped."""
    found = [path for path in folder.rglob("*")
             if path.is_file() and path.suffix.lower() in FILE_SUFFIXES
             and not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def looks_like_path(name: str) -> bool:
    """A name no Hub dataset id has: absolute, relative to here or home, a file suffix, or more than one slash."""
    return (name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in FILE_SUFFIXES
            or name.count("/") > 1)


def load_conversations(name: str | Path, config: str | None = None, split: str = "train") -> list[Conversation]:
    """A whole (small) dataset in memory, validated: for evaluation prompts and pruning calibration."""
    return list(read_conversations(DataSource(str(name), config, split)))


def fingerprint(source: DataSource) -> str:
    """Changes whenever the records can: the content of local files, datasets' own fingerprint otherwise."""
    path = Path(source.name).expanduser()
    digest = hashlib.sha256(f"{source.config}:{source.split}".encode())
    if not path.exists():
        digest.update(_load_hub(source)._fingerprint.encode())
    elif path.is_dir() and any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
        digest.update(_load_saved(path, source.split)._fingerprint.encode())
    else:
        files = [path] if path.is_file() else data_files(path)
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------------- local files


def _file_records(file: Path) -> Iterator[tuple[Location, Any]]:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(file)
        return
    if file.stat().st_size == 0:
        raise DataError(file, "empty file: no records")
    if suffix == ".jsonl":
        yield from _json_lines(file)
        return
    text = _read_text(file)
    if not text.strip():
        raise DataError(file, "empty file: no records")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _json_lines(file)  # `datasets.Dataset.to_json` writes JSON Lines even into a `.json` file
            return
        raise DataError(file, f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(records, list):
        raise DataError(file, f"expected a list of records [{{...}}, ...] or one record per line, got {kind(records)}")
    if not records:
        raise DataError(file, "empty list: no records")
    for index, record in enumerate(records):
        yield Location(file, index), record


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not data
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(file, f"cannot read the file as UTF-8 text: {error}") from None


def _json_lines(file: Path) -> Iterator[tuple[Location, Any]]:
    """Line by line; split on "\\n" only (str.splitlines would also split on U+2028, which JSON allows in strings)."""
    index = 0
    with open(file, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(file, f"cannot read the file as UTF-8 text: {error} (line {line_number})") from None
            if not line.strip():
                continue
            where = Location(file, index, line_number)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise where.error(None, f"invalid JSON at column {error.colno}: {error.msg}") from None
            yield where, record
            index += 1
    if index == 0:
        raise DataError(file, "empty file: no records")


def _parquet_records(file: Path) -> Iterator[tuple[Location, Any]]:
    import pyarrow.parquet as parquet

    try:
        table = parquet.ParquetFile(file)
    except Exception as error:  # noqa: BLE001 -- pyarrow raises several types for a file that is not Parquet
        raise DataError(file, f"cannot read it as Parquet: {' '.join(str(error).split())}") from None
    index = 0
    batches = table.iter_batches(batch_size=ARROW_BATCH)
    while True:
        try:  # a corrupted page only shows when its batch is decoded (OSError, or ArrowInvalid, a ValueError)
            batch = next(batches, None)
        except (OSError, ValueError) as error:
            message = " ".join(str(error).split())  # thrift's messages span lines
            raise DataError(file, f"corrupted Parquet data: records from {index} on cannot be read: "
                                  f"{message}") from None
        if batch is None:
            break
        for record in batch.to_pylist():
            yield Location(file, index), record
            index += 1
    if index == 0:
        raise DataError(file, "empty Parquet file: no records")


# ------------------------------------------------------------------------------------------- datasets' own formats


def _load_saved(folder: Path, split: str):
    import datasets  # heavy (pyarrow, pandas): imported only for sources that need it

    try:
        dataset = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as error:
        raise DataError(folder, f"cannot load the dataset saved with save_to_disk: {error}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(folder, f"expected a '{split}' split in this DatasetDict, found {sorted(dataset)}")
        dataset = dataset[split]
    if len(dataset) == 0:
        raise DataError(folder, "empty dataset: no records")
    return dataset


def _load_hub(source: DataSource):
    """`datasets.load_dataset`; offline (`HF_HUB_OFFLINE=1`), from the dataset repository's snapshot in the HF hub
    cache when there is one, which `load_dataset` itself only reads through a cache of its own."""
    import datasets
    from huggingface_hub import constants, snapshot_download

    try:
        if constants.HF_HUB_OFFLINE:
            try:
                folder = snapshot_download(source.name, repo_type="dataset", local_files_only=True)
            except Exception:  # noqa: BLE001 -- not in the hub cache: maybe in datasets' own
                folder = None
            if folder is not None:
                return datasets.load_dataset(folder, source.config, split=source.split)
        return datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as error:  # noqa: BLE001 -- datasets raises many types for an id it cannot resolve
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(source.name, f"not a local file or folder, and not a dataset the Hugging Face Hub (or, "
                                     f"offline, the HF cache) has with config {source.config} and split "
                                     f"'{source.split}': {first}") from None


def _hub_records(source: DataSource) -> Iterator[tuple[Location, Any]]:
    dataset = _load_hub(source)
    if len(dataset) == 0:
        raise DataError(source.name, f"split '{source.split}' has no records")
    yield from _arrow_records(dataset, f"{source.name}[{source.split}]")


def _arrow_records(dataset, label) -> Iterator[tuple[Location, Any]]:
    index = 0
    for batch in dataset.with_format(None).iter(batch_size=ARROW_BATCH):
        columns = list(batch)
        for values in zip(*(batch[column] for column in columns)):
            yield Location(label, index), dict(zip(columns, values))
            index += 1

"""Errors a user can fix. The CLI prints them as one line and exits non-zero; anything else is a bug."""


class GKDError(Exception):
    """A problem with the user's input (arguments, data, model folders), reported without a traceback."""


class ConfigError(GKDError):
    """An option value that cannot work (out of range, contradictory, or a path that does not exist)."""


class DataError(GKDError):
    """A dataset problem, located precisely enough to fix by hand: file, record index, field, and what was expected."""

    def __init__(self, file, message: str, record: int | None = None, field: str | None = None):
        self.file, self.record, self.field, self.message = str(file), record, field, message
        where = [self.file]
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}")

    def __reduce__(self):  # raised in a `datasets.map` worker, it travels back to the main process pickled
        return type(self), (self.file, self.message, self.record, self.field)


class ModelError(GKDError):
    """A model or tokenizer folder that is missing, unreadable, or incompatible (for example another vocabulary)."""


def check_finite(options) -> None:
    """NaN passes every range check (`nan <= 0` is False), and inf most: refuse both in every float option of a
    dataclass of options."""
    import dataclasses
    import math

    for option in dataclasses.fields(options):
        value = getattr(options, option.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{option.name} must be a finite number, got {value}")

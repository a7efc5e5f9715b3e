"""What every gkd command line shares: one parser (dataclasses, flags or a YAML `--config`), one runner (user errors
as one `error: ...` line and exit 2, Ctrl-C as one line and exit 130), and quiet libraries."""

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError, GKDError

INTERRUPTED_EXIT_CODE = 130


def parse(dataclass_types, argv: list[str] | None = None, description: str | None = None,
          allow_extra: bool = False) -> tuple:
    """Instances of `dataclass_types` from `argv` (default: sys.argv) and an optional `--config run.yaml`, whose keys
    are the same options; flags given on the command line override the file. With `allow_extra`, the arguments no
    dataclass takes come last, as a list (a runner passes them on), instead of being refused.

    TRL's `TrlParser` reads the YAML; what it gets wrong for a CLI is turned into one `ConfigError` line each: a
    missing or malformed file, a file that is not a mapping, an unknown key or flag, a value of the wrong type."""
    from transformers import TrainingArguments  # noqa: F401 -- before trl: keeps TRL's lazy imports quiet

    types = list(dataclass_types) if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]
    # No abbreviations: argparse would take `--lr` for `--lr_scheduler_type`.
    parser = _parser_class()(types, description=description, allow_abbrev=False)
    parser.add_argument("--config", help="A YAML file of the options below; command-line flags override it.")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        _check_config_file(parser, argv)
    try:
        # HfArgumentParser appends a namespace of what no dataclass took (here `config`): keep the dataclasses.
        parsed = tuple(parser.parse_args_and_config(argv, return_remaining_strings=allow_extra))
        for options in parsed[: len(types)]:
            check_finite(options)
        return parsed[: len(types)] + ((parsed[-1],) if allow_extra else ())
    except (ValueError, TypeError) as error:  # unknown flags or keys, TrainingArguments' own checks
        raise ConfigError(_one_line(error)) from None


def check_finite(options) -> None:
    """NaN passes every range check (`nan <= 0` is False), and inf most: refuse both in every float option."""
    import dataclasses
    import math

    for option in dataclasses.fields(options):
        value = getattr(options, option.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{option.name} must be a finite number, got {value}")


def _parser_class():
    from trl import TrlParser

    class Parser(TrlParser):
        """argparse prints its whole usage and exits; a gkd CLI says what is wrong in one line instead."""

        def error(self, message):
            raise ConfigError(message)

    return Parser


def _check_config_file(parser, argv: list[str]) -> None:
    """The checks TrlParser leaves to a traceback: the file exists, parses, is a mapping of known options of the
    right types."""
    import yaml

    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise ConfigError("--config needs a YAML file")
    path = Path(argv[index + 1])
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path}: cannot read it ({_one_line(error)})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({_one_line(error)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, got {type(config).__name__}")
    actions = {action.dest: action for action in parser._actions}
    for key, value in config.items():
        if key == "env":
            continue
        action = actions.get(key)
        if action is None:
            raise ConfigError(f"--config {path}: unknown option '{key}'")
        _check_yaml_value(path, key, value, action)


def _check_yaml_value(path: Path, key: str, value, action) -> None:
    """YAML values bypass argparse's conversion unless they are strings: check the types argparse would enforce."""
    expected = action.type
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and action.nargs not in ("+", "*"):
        raise ConfigError(f"--config {path}: '{key}' expects one value, got a list")
    for item in values:
        if item is None or isinstance(item, str):
            continue  # argparse converts strings (and reports bad ones); None keeps the default
        if isinstance(item, (dict, list)):
            raise ConfigError(f"--config {path}: '{key}' expects a plain value, got {type(item).__name__}")
        if expected is int and (isinstance(item, bool) or not isinstance(item, int)):
            raise ConfigError(f"--config {path}: '{key}' expects an integer, got {item!r}")
        if expected is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
            raise ConfigError(f"--config {path}: '{key}' expects a number, got {item!r}")
        if action.choices and item not in action.choices and str(item) not in map(str, action.choices):
            raise ConfigError(f"--config {path}: '{key}' must be one of {list(action.choices)}, got {item!r}")


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


def run(main: Callable[[], int | None]) -> None:
    """Run a CLI's `main`: a `GKDError` becomes `error: ...` on stderr and exit code 2, Ctrl-C one line and 130;
    anything else is a bug and keeps its traceback."""
    try:
        code = main()
    except GKDError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    sys.exit(code or 0)


def quiet_libraries() -> None:
    """Keep stderr for our one-line errors: no progress bars or library warnings (these CLIs log their own steps)."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations between peft and transformers


def hide_checkpointing_deprecations() -> None:
    """transformers 5.23 resolves its deprecated `gradient_checkpointing*` aliases itself and warns each time: for
    LLM-Dojo's `--gradient_checkpointing`, and for the calls peft 0.21.2 and trl 1.16.0 still make. None of these
    FutureWarnings is something a gkd user can act on."""
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)

"""What every gkd command line shares: one parser (dataclasses, flags or a YAML `--config`), one runner (user errors
as one `error: ...` line and exit 2, Ctrl-C and SIGTERM as one line and 130 or 143), and quiet libraries."""

import difflib
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .errors import ConfigError, GKDError, check_finite

INTERRUPTED_EXIT_CODE = 130
TERMINATED_EXIT_CODE = 143


class Terminated(BaseException):
    """SIGTERM outside training (where it stops the run at a step's end instead): out, in one line."""


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
    _check_empty_values(argv)
    if not allow_extra:
        _check_flags(parser, argv)
    if "--config" in argv:
        index = argv.index("--config")
        argv[index + 1:index + 2] = [expand_home(value) for value in argv[index + 1:index + 2]]
        _check_config_file(parser, argv)
    try:
        # HfArgumentParser appends a namespace of what no dataclass took (here `config`): keep the dataclasses.
        parsed = tuple(parser.parse_args_and_config(argv, return_remaining_strings=allow_extra))
        for options in parsed[: len(types)]:
            check_finite(options)
        return parsed[: len(types)] + ((parsed[-1],) if allow_extra else ())
    except (ValueError, TypeError) as error:  # unknown flags or keys, TrainingArguments' own checks
        raise ConfigError(_one_line(error)) from None


def _parser_class():
    from trl import TrlParser

    class Parser(TrlParser):
        """argparse prints its whole usage and exits; a gkd CLI says what is wrong in one line instead."""

        def error(self, message):
            raise ConfigError(message)

        def parse_known_args(self, args=None, namespace=None):
            # Before the dataclasses are built from it (their checks see the real path), flags and YAML alike.
            namespace, remaining = super().parse_known_args(args, namespace)
            for name, value in vars(namespace).items():
                setattr(namespace, name, expand_home(value))
            return namespace, remaining

    return Parser


def expand_home(value):
    """`~` and `~/...` as the shell would have expanded them, in a string or a list of them; anything else as is.

    A path in a YAML file or in quotes reaches us unexpanded, and would be taken for a Hub id or a relative folder
    named `~`. No option's other values start with `~/` (Hub ids cannot), so every option is expanded, once, here."""
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    if isinstance(value, list):
        return [expand_home(item) for item in value]
    return value


def _check_flags(parser, argv: list[str]) -> None:
    """Unknown flags first, by name: HfArgumentParser would build the dataclasses (whose own checks may complain of
    something else) before it reported them."""
    known = {name for action in parser._actions for name in action.option_strings}
    for token in argv:
        name = token.split("=", 1)[0]
        if name.startswith("--") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            raise ConfigError(f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else ""))


def _check_empty_values(argv: list[str]) -> None:
    """An empty value (`--resume_from_checkpoint ""`, an unset shell variable) would be taken as no value, or as the
    current folder: refused, naming the option, whatever the option."""
    for index, token in enumerate(argv):
        name, equals, value = token.partition("=")
        if not name.startswith("--"):
            continue
        if (equals and not value.strip()) or (not equals and index + 1 < len(argv) and not argv[index + 1].strip()):
            raise ConfigError(f"{name} is empty: give it a value, or leave the option out")


def _check_config_file(parser, argv: list[str]) -> None:
    """The checks TrlParser leaves to a traceback: the file exists, parses, is a mapping of known options of the
    right types."""
    import yaml

    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise ConfigError("--config needs a YAML file")
    path = Path(argv[index + 1])
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
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


def _unique_key_loader():
    """yaml's SafeLoader, refusing a key given twice (it would keep the last without a word)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            repeated = sorted({key for key in keys if keys.count(key) > 1}, key=str)
            if repeated:
                raise yaml.YAMLError(f"'{repeated[0]}' is given twice")
            return super().construct_mapping(node, deep=deep)

    return Loader


def _check_yaml_value(path: Path, key: str, value, action) -> None:
    """YAML values bypass argparse's conversion unless they are strings: check the types argparse would enforce."""
    expected = action.type
    values = value if isinstance(value, list) else [value]
    listed = action.nargs in ("+", "*")
    if value is None and action.default is not None:
        raise ConfigError(f"--config {path}: '{key}' needs a value, got null")
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"--config {path}: '{key}' is empty: give it a value, or leave the key out")
    if isinstance(value, list) and not listed:
        raise ConfigError(f"--config {path}: '{key}' expects one value, got a list")
    if listed and not isinstance(value, list) and value is not None:
        example = [f"{name}={source}" for name, source in value.items()] if isinstance(value, dict) else [value]
        raise ConfigError(f"--config {path}: '{key}' expects a list, e.g. {example}")
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


def run(main: Callable[[], int | None], process_exit: bool = True) -> None:
    """Run a CLI's `main`: a `GKDError` becomes `error: ...` on stderr and exit code 2, Ctrl-C and SIGTERM one line
    and 130 or 143; anything else is a bug and keeps its traceback. `process_exit`: the process ends with `main`
    (a command line), so signals after it are ignored; False in a test's process, which keeps its own handlers.

    The signal handlers record the signal before they raise, and the runner asks the record, not the exception: a
    library's broad `except:` (fsspec's in `datasets.load_from_disk`) can swallow the exception and raise another,
    or none. A second signal exits at once. Training replaces these handlers with its stop-at-step-end ones
    (gkd/signals.py) while it runs."""
    _received.clear()
    previous = _catch_signals()
    try:
        code = main()
    except BaseException as error:
        exit_if_signalled()
        if isinstance(error, GKDError):
            _say(f"error: {_one_line(error)}")
            sys.exit(2)
        interruption = _interruption_within(error)  # e.g. a Ctrl-C that a library's import machinery wrapped
        if interruption is None or isinstance(error, SystemExit):
            raise
        _exit_interrupted(signal.SIGTERM if isinstance(interruption, Terminated) else signal.SIGINT)
    finally:
        for signum, handler in previous.items():  # None: a handler not set from Python, i.e. the default
            # A command's whole process: its work is done or refused, and a signal during the interpreter's teardown
            # would only add a traceback to it. Run in a test's process: the test runner's own handlers come back.
            late = signal.SIG_IGN if process_exit else (signal.SIG_DFL if handler is None else handler)
            signal.signal(signum, late)
    exit_if_signalled()
    sys.exit(code or 0)


def command(module: str) -> None:
    """Run `module.main()` under `run`, importing the module inside it: a Ctrl-C while torch loads is one line too.
    The console scripts and scripts/*.py start here."""
    run(lambda: importlib.import_module(module).main())


_received: list[int] = []  # the signals the runner's handler got during the current `run`, in order


def _catch_signals() -> dict:
    """SIGTERM, and SIGINT where Python's own handler has it (a background job's ignored SIGINT stays ignored), to
    `_on_signal`; returns the handlers replaced. Python runs handlers in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_signal)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    return previous


def _on_signal(signum, frame):
    _received.append(signum)
    if len(_received) > 1:  # the first one's exception may have been swallowed: a second one is out at once
        _say_interrupted(_received[0])
        os._exit(_exit_code(_received[0]))
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def exit_if_signalled() -> None:
    """Out in one line if a signal arrived while `main` ran, whatever exception (or none) came of it. `main` calls it
    too before long work (training), in case a library swallowed the signal's exception and carried on."""
    if _received:
        _exit_interrupted(_received[0])


def _exit_interrupted(signum: int) -> None:
    _say_interrupted(signum)
    sys.exit(_exit_code(signum))


def _say_interrupted(signum: int) -> None:
    _say("error: terminated" if signum == signal.SIGTERM else "error: interrupted")


def _say(line: str) -> None:
    """One line on stderr, on a line of its own: progress bars still drawn are closed first (a bar leaves the cursor
    after its text, and the line would be glued to it)."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 -- a bar that cannot close must not hide the error line
            pass
    print(line, file=sys.stderr, flush=True)


def _exit_code(signum: int) -> int:
    return TERMINATED_EXIT_CODE if signum == signal.SIGTERM else INTERRUPTED_EXIT_CODE


def _interruption_within(error: BaseException) -> BaseException | None:
    """transformers' lazy imports turn a Ctrl-C during an import into an ImportError; find the Ctrl-C behind it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            return error
        error = error.__cause__ or error.__context__
    return None


# The console scripts of pyproject.toml, one per command line.
train_command = partial(command, "gkd.train")
merge_command = partial(command, "gkd.tools.merge")
prune_command = partial(command, "gkd.tools.prune")
eval_command = partial(command, "gkd.tools.evaluate")
compare_command = partial(command, "gkd.tools.compare")
cache_teacher_command = partial(command, "gkd.tools.cache_teacher")
teacher_serve_command = partial(command, "gkd.tools.teacher_server")
export_gguf_command = partial(command, "gkd.tools.export_gguf")


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
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated",
                            category=FutureWarning)

"""What every gkd command line shares: user errors as one line on stderr (exit 2, no traceback), quiet libraries."""

import sys
import warnings
from collections.abc import Callable

from .errors import GKDError


def run(main: Callable[[], int | None]) -> None:
    """Run a CLI's `main`: a `GKDError` becomes `error: ...` on stderr and exit code 2; anything else is a bug and
    keeps its traceback."""
    try:
        code = main()
    except GKDError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
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
    """transformers 5.23 resolves its deprecated `gradient_checkpointing*` aliases itself, and warns each time: for
    LLM-Dojo's `--gradient_checkpointing`, which gkd keeps as a flag of its own, and for the calls peft 0.21.2 and
    trl 1.16.0 still make. None of these FutureWarnings is something a gkd user can act on."""
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)

"""gkd/signals.py: a signal stops training at the end of a step, and waits for the final save."""

import logging
import signal
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl

from gkd.signals import StopOnSignal


@pytest.fixture
def python_sigint():
    """SIGINT as Python sets it up, whatever this process inherited (a background job starts with it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def one_process_trainer():
    accelerator = SimpleNamespace(gather=lambda tensor: tensor, is_main_process=True)
    return SimpleNamespace(accelerator=accelerator, args=SimpleNamespace(output_dir="runs/x"))


def test_sigint_stops_at_the_step_end_and_a_second_one_interrupts_at_once(python_sigint):
    """Ctrl-C: the first only asks for a checkpoint at the end of the step; the second raises KeyboardInterrupt."""
    args, state, control = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=7), TrainerControl()
    stop = StopOnSignal(one_process_trainer())
    stop.on_train_begin(args, state, control)
    try:
        stop.on_step_end(args, state, control)
        assert not control.should_save and not control.should_training_stop
        signal.raise_signal(signal.SIGINT)  # handled: no KeyboardInterrupt here
        stop.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and stop.stopped_at == 7
        assert stop.stopped_by_signal()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.release()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_after_the_last_step_waits_for_the_final_save(python_sigint, caplog):
    """Trainer's on_train_end has run; the handlers stay until `release()`, after the final save, so SIGTERM there
    neither kills the process nor stops training early, and the log says the save came first."""
    previous_term = signal.getsignal(signal.SIGTERM)
    args, state, control = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=3), TrainerControl()
    stop = StopOnSignal(one_process_trainer())
    stop.on_train_begin(args, state, control)
    stop.on_train_end(args, state, control)
    try:
        signal.raise_signal(signal.SIGTERM)  # with the default handler this process would be dead
        assert not stop.stopped_by_signal()
    finally:
        stop.release()
    with caplog.at_level(logging.WARNING, logger="gkd.signals"):
        stop.report_after_save()
    assert "the final model is saved in runs/x; SIGTERM arrived during the save" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == previous_term

"""Per-phase timing and peak memory of a `transformers.Trainer` run, for gkd/bench.py.

Phases are exclusive wall times per optimizer step: entering a phase pauses the one it is nested in, so the phases
add up to the step. `Probe` installs the timers without touching the trainers' code: `GenerationMixin.generate`
(every `generate` call, whoever makes it, and gkd's own decode loop), forward hooks on the teacher and its backbone,
a wrapper around the trainer's `training_step`, and a callback around `optimizer.step()` and at each step's end.
"""

import multiprocessing
import os
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from unittest import mock

PHASES = ("generation", "teacher_forward", "student_forward_backward", "optimizer", "other")


class PhaseClock:
    """Exclusive wall time per phase: entering a phase pauses the one it is nested in, so the phases sum to the step."""

    def __init__(self, synchronize):
        self.synchronize = synchronize
        self.totals = defaultdict(float)
        self.stack: list[str] = []
        self.mark = None
        self.steps: list[dict] = []
        self.step_started = None
        self.cpu_started = None

    def _now(self) -> float:
        self.synchronize()
        return time.perf_counter()

    def enter(self, phase: str) -> None:
        now = self._now()
        if self.stack:
            self.totals[self.stack[-1]] += now - self.mark
        self.stack.append(phase)
        self.mark = now

    def exit(self) -> None:
        now = self._now()
        self.totals[self.stack.pop()] += now - self.mark
        self.mark = now

    @contextmanager
    def phase(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def start(self) -> None:
        self.totals.clear()
        self.step_started = self._now()
        self.cpu_started = time.process_time()

    def end_step(self) -> None:
        now = self._now()
        step = {"step": now - self.step_started, **{phase: self.totals.get(phase, 0.0) for phase in PHASES[:-1]}}
        step["other"] = step["step"] - sum(step[phase] for phase in PHASES[:-1])
        # CPU seconds of this process: on a machine other jobs share, steadier than wall time (the work, not the wait).
        cpu_now = time.process_time()
        step["cpu"] = cpu_now - self.cpu_started
        self.steps.append(step)
        self.totals.clear()
        self.step_started, self.cpu_started = now, cpu_now


class Probe:
    """Installs the timers on one trainer: `generate`, the teacher's forward, `training_step`, the optimizer step."""

    def __init__(self, trainer, teacher, cuda: bool):
        import torch
        from transformers import TrainerCallback
        from transformers.generation.utils import GenerationMixin

        self.cuda = cuda
        self.clock = PhaseClock(torch.cuda.synchronize if cuda else lambda: None)
        self.generated_widths: list[int] = []
        self.memory_at_start = 0.0
        clock = self.clock

        self._generate = GenerationMixin.generate
        original_generate = self._generate
        widths = self.generated_widths

        def timed_generate(model, *args, **kwargs):
            with clock.phase("generation"):
                output = original_generate(model, *args, **kwargs)
            prompt = kwargs.get("input_ids", args[0] if args else None)
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            if prompt is not None:
                widths.append(sequences.shape[1] - prompt.shape[1])
            return output

        GenerationMixin.generate = timed_generate

        # gkd's static and compiled backends decode in their own loop, not through `generate`.
        from gkd.decoding import StaticDecoder

        self._static_generate = StaticDecoder.generate
        original_static_generate = self._static_generate

        def timed_static_generate(decoder, *args, **kwargs):
            with clock.phase("generation"):
                completion_ids = original_static_generate(decoder, *args, **kwargs)
            widths.append(completion_ids.shape[1])
            return completion_ids

        StaticDecoder.generate = timed_static_generate

        depth = [0]

        def before(*_):
            if depth[0] == 0:
                clock.enter("teacher_forward")
            depth[0] += 1

        def after(*_):
            depth[0] -= 1
            if depth[0] == 0:
                clock.exit()

        self.hooks = []
        for module in {id(teacher): teacher, id(teacher.base_model): teacher.base_model}.values():
            self.hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

        original_step = trainer.training_step

        def timed_training_step(*args, **kwargs):
            with clock.phase("student_forward_backward"):
                return original_step(*args, **kwargs)

        trainer.training_step = timed_training_step
        probe = self

        class StepCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                probe.memory_at_start = probe.reset_peak_memory()
                clock.start()

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                clock.enter("optimizer")

            def on_optimizer_step(self, args, state, control, **kwargs):
                clock.exit()

            def on_step_end(self, args, state, control, **kwargs):
                clock.end_step()

        trainer.add_callback(StepCallback())

    def remove(self) -> None:
        from transformers.generation.utils import GenerationMixin

        from gkd.decoding import StaticDecoder

        GenerationMixin.generate = self._generate
        StaticDecoder.generate = self._static_generate
        for hook in self.hooks:
            hook.remove()

    def reset_peak_memory(self) -> float:
        """Resets the peak and returns the memory in use now, in GiB."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**30
        try:
            with open("/proc/self/clear_refs", "w") as handle:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                handle.write("5")
        except OSError:
            pass
        return proc_status_gib("VmRSS")

    def peak_memory(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return proc_status_gib("VmHWM")


def proc_status_gib(key: str) -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux; whole-process peak


def run_in_child(function, *args, start_method: str = "fork", environment: dict[str, str] | None = None):
    """`function(*args)` in a process of its own, so its memory peak, compile caches and patches are its alone.

    Returns ("ok", value), ("out of memory", the error's first line) or ("error", traceback text); a child that dies
    without answering (the out-of-memory killer) is an "error". `environment` is added to the child's variables: a
    spawned child reads them at start, which is how glibc's malloc settings reach it. A forked child must be forked
    before the parent touches CUDA."""
    context = multiprocessing.get_context(start_method)
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_entry, args=(sender, function, args))
    with mock.patch.dict(os.environ, environment or {}):  # restored once the child has started
        child.start()
    sender.close()
    try:
        outcome = receiver.recv()
    except EOFError:
        outcome = None
    child.join()
    return outcome or ("error", f"the process died (exit code {child.exitcode})")


def _child_entry(sender, function, args) -> None:
    import torch

    try:
        sender.send(("ok", function(*args)))
    except torch.OutOfMemoryError as error:
        sender.send(("out of memory", str(error).splitlines()[0]))
    except BaseException:  # the parent reports it; the child must not die silently
        sender.send(("error", traceback.format_exc()))
    finally:
        sender.close()


def run_command(command: list[str], cwd, env: dict, first_line_marker: str | None = None) -> dict:
    """Run a command line to its end, watching it: wall seconds, seconds until a stdout line containing
    `first_line_marker` appeared, the process's high-water resident memory (VmHWM, read until it exits), its output.
    Raises RuntimeError with the output's end when it fails."""
    import subprocess
    import threading
    import time
    from pathlib import Path

    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"kib": 0}

    def watch():
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak["kib"] = max(peak["kib"], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    first, output = None, []
    for line in process.stdout:
        output.append(line)
        if first is None and first_line_marker and first_line_marker in line:
            first = time.perf_counter() - started
    process.wait()
    watcher.join()
    if process.returncode != 0:
        raise RuntimeError("".join(output[-40:]))
    return {"seconds": time.perf_counter() - started, "first_marker_seconds": first,
            "peak_rss_gib": peak["kib"] / 2**20, "output": "".join(output)}

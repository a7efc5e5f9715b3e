"""gkd/run_folder.py and gkd/folders.py in this process: what a run's folder holds, the lock, the staged final save,
and metrics.jsonl after a resume."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from gkd import folders, run_folder
from gkd.errors import ConfigError
from gkd.folders import check_output_folder, move_aside, staged_folder


def test_results_are_weights_adapters_state_and_checkpoints(tmp_path):
    assert run_folder.results_in(tmp_path / "missing") == []
    (tmp_path / "run_config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    assert run_folder.results_in(tmp_path) == []  # a failed start's files are not results
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "adapter_config.json").write_text("{}")
    assert run_folder.results_in(tmp_path) == ["adapter_config.json", "checkpoint-3"]


def test_a_second_lock_on_a_busy_folder_names_the_holder(tmp_path):
    first = folders.lock_folder(tmp_path)
    try:
        with pytest.raises(ConfigError, match=r"in use by another gkd process \(pid \d+ on .*started"):
            folders.lock_folder(tmp_path)
    finally:
        folders.release_lock(first)
    folders.release_lock(folders.lock_folder(tmp_path))  # released: lockable again


def test_a_resume_trims_metrics_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    run_folder._trim_metrics(tmp_path, 2)
    assert [record["step"] for record in run_folder.read_metrics(tmp_path)] == [1, 2]


class FakeTrainer:
    """What save_final_model uses of a Trainer; its save_model writes config.json and then, if told, fails."""

    def __init__(self, fail: bool):
        self.fail = fail
        self.accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)

    def save_model(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text('{"new": true}')
        if self.fail:
            raise KeyboardInterrupt  # the second Ctrl-C, mid-save
        (Path(folder) / "model.safetensors").write_bytes(b"new weights")


def test_an_interrupted_final_save_leaves_the_folder_as_it_was(tmp_path):
    (tmp_path / "config.json").write_text('{"old": true}')
    with pytest.raises(KeyboardInterrupt):
        run_folder.save_final_model(FakeTrainer(fail=True), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"old": True}
    assert not (tmp_path / "model.safetensors").exists()
    run_folder.save_final_model(FakeTrainer(fail=False), tmp_path)  # the next save replaces the stale staging
    assert json.loads((tmp_path / "config.json").read_text()) == {"new": True}
    assert (tmp_path / "model.safetensors").read_bytes() == b"new weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_staged_folders_appear_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with staged_folder(target, overwrite=False) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert not (tmp_path / "a").exists()  # the parents it made are gone too
    with staged_folder(target, overwrite=False) as staging:
        (staging / "whole.bin").write_bytes(b"x")
    assert [path.name for path in target.iterdir()] == ["whole.bin"]
    with pytest.raises(ConfigError, match="is not empty; pass --overwrite"):
        check_output_folder(target, overwrite=False)
    with pytest.raises(ConfigError, match="would replace the input"):
        check_output_folder(tmp_path / "a", overwrite=True, inputs=[target / "whole.bin"])


def test_move_aside_never_replaces_an_earlier_copy(tmp_path):
    for number in (1, 2):
        folder = tmp_path / "run"
        folder.mkdir()
        (folder / "n").write_text(str(number))
        assert move_aside(folder, "replaced") == tmp_path / f"run.replaced-{number}"
    assert (tmp_path / "run.replaced-1" / "n").read_text() == "1"


def test_an_output_folder_is_no_input_holds_none_and_lies_in_none(tmp_path):
    """folders.check_output, the one check of every command's output folder: a cache written inside its data folder
    became data; a folder holding an input is refused only where the command may move it aside."""
    data = tmp_path / "d"
    data.mkdir()
    (data / "calib.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"lies inside the input folder .*/d: .*choose a folder outside it"):
        folders.check_output(data / "teacher_cache", [data])
    with pytest.raises(ConfigError, match="would replace the input"):
        folders.check_output(data, [data / "calib.jsonl"])
    with pytest.raises(ConfigError, match="would replace the input"):
        folders.check_output(data, [data], replaces=False)
    folders.check_output(data, [data / "calib.jsonl"], replaces=False)  # written into (gkd-eval), never moved aside
    folders.check_output(tmp_path / "elsewhere", [data, "org/hub-model"])


def test_a_busy_folder_is_refused_and_probing_it_blocks_no_one(tmp_path):
    """Every tool refuses a folder a running training holds; the probe itself is a shared lock, so ranks probing at
    once (every rank runs the check) do not refuse each other."""
    import fcntl

    held = folders.lock_folder(tmp_path)
    try:
        with pytest.raises(ConfigError, match=r"in use by another gkd process \(pid \d+"):
            folders.check_output(tmp_path)
    finally:
        folders.release_lock(held)
    with open(tmp_path / folders.LOCK_FILE) as other_rank:
        fcntl.flock(other_rank, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another rank, mid-probe
        folders.check_output(tmp_path)

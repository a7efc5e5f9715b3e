"""Every command line gkd ships, run the ways a user runs it: `python -m gkd.tools.NAME`, each console script of
pyproject.toml, `python -m benchmarks.NAME`. All go through gkd.cli's one parser and runner: `--help` prints the usage
and exits 0, an unknown flag is one `error:` line and exit 2. A console script and `python -m` run the same `main`
through the same runner, so each way is run once per command (`--help` by script, a bad flag by module)."""

import ast
import sys
import tomllib
from functools import partial
from pathlib import Path

import pytest
from helpers import REPO, assert_user_error, run_cli


def command_modules(folder: str) -> list[str]:
    """The modules of `folder` that are command lines: those that define a top-level `main`."""
    names = []
    for path in sorted((REPO / folder).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            names.append(f"{folder.replace('/', '.')}.{path.stem}")
    return names


TOOLS = command_modules("gkd/tools")
BENCHMARKS = command_modules("benchmarks")
CONSOLE_SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def test_the_command_lines_are_found():
    assert {"gkd.tools.merge", "gkd.tools.prune", "gkd.tools.evaluate", "gkd.tools.compare",
            "gkd.tools.cache_teacher", "gkd.tools.teacher_server"} <= set(TOOLS)
    assert {"benchmarks.bench", "benchmarks.bench_generation", "benchmarks.bench_loss", "benchmarks.bench_teachers",
            "benchmarks.bench_rollouts", "benchmarks.data_start", "benchmarks.memory_budget"} <= set(BENCHMARKS)


def test_every_tool_has_a_console_script_through_the_one_runner():
    """Each console script is a `gkd.cli.command` partial, and every tool module is one's target."""
    import gkd.cli

    targets = {}
    for name, target in CONSOLE_SCRIPTS.items():
        module, attribute = target.split(":")
        assert module == "gkd.cli", (name, target)
        runner = getattr(gkd.cli, attribute)
        assert isinstance(runner, partial) and runner.func is gkd.cli.command, (name, target)
        targets[runner.args[0]] = name
    assert set(TOOLS) <= set(targets), f"tools without a console script: {sorted(set(TOOLS) - set(targets))}"


# compare passes the flags it does not know on to gkd-train, which refuses them once the runs are planned: here it
# stops earlier, at its own missing options, in one line too.
PASSES_FLAGS_ON = {"gkd.tools.compare", "gkd-compare"}


def assert_refuses_bogus_flag(command: str, result) -> None:
    assert_user_error(result, *([] if command in PASSES_FLAGS_ON else ["--bogus_flag"]))


def console_script(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed: pip install --no-deps --no-build-isolation -e ."
    return str(path)


def assert_usage(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:") and "--help" in result.stdout, result.stdout[:500]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.subprocess
@pytest.mark.parametrize("module", TOOLS)
def test_tool_module_refuses_an_unknown_flag_in_one_line(module):
    assert_refuses_bogus_flag(module, run_cli(["-m", module, "--bogus_flag", "1"], timeout=120))


@pytest.mark.subprocess
@pytest.mark.parametrize("name", sorted(CONSOLE_SCRIPTS))
def test_console_script_prints_its_usage(name):
    assert_usage(run_cli(["--help"], launcher=[console_script(name)], timeout=120))


@pytest.mark.parametrize("module", BENCHMARKS)
def test_benchmark_refuses_an_unknown_flag_in_one_line(module, capfd):
    """In process (a benchmark's module imports torch; its `__main__` block is checked to be the same runner)."""
    import importlib

    from gkd.cli import run

    source = (REPO / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8")
    assert source.rstrip().endswith("run(main)"), f"{module}: python -m {module} must run main through gkd.cli.run"
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exited:
        run(lambda: main(["--bogus_flag", "1"]), process_exit=False)
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert exited.value.code == 2 and len(errors) == 1 and "--bogus_flag" in errors[0], errors

"""The README documents what the code does: every gkd option, and a two-command Quickstart."""

import re
import subprocess
import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))


def test_readme_options_table_is_current():
    from options_table import options_table

    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- options-table -->")[1].split("<!-- /options-table -->")[0]
    assert section.strip() == options_table().strip(), "run: python scripts/options_table.py, paste into README.md"


def test_quickstart_has_exactly_two_commands_and_make_knows_them():
    readme = (REPO / "README.md").read_text()
    quickstart = readme.split("## Quickstart")[1].split("\n## ")[0]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    for target in ("demo", "test"):
        dry_run = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        assert dry_run.returncode == 0 and "pip install" in dry_run.stdout


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci/run").read_text()

"""The README documents what the code does: every gkd option, and a two-command Quickstart."""

import re
import runpy
import subprocess

from helpers import REPO


def test_readme_options_table_is_current():
    options_table = runpy.run_path(str(REPO / "scripts/options_table.py"))["options_table"]
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


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_links_between_the_docs_point_at_files_and_headings_that_exist():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def readme_metrics() -> tuple[set[str], dict[str, set[str]], set[str]]:
    """The Outputs section's list of metrics.jsonl keys: (on every training line, {key: its condition's bullet} for
    the others, on the summary line)."""
    outputs = (REPO / "README.md").read_text().split("## Outputs")[1].split("\n## ")[0]
    bullets = re.findall(r"^- (.*?)(?=^- |^$)", outputs, re.M | re.S)
    names = [re.findall(r"`([a-z][a-z_]*)`", bullet) for bullet in bullets]
    always = set(names[0]) if bullets and bullets[0].startswith("always:") else set()
    conditional = {bullet_names[0]: set(bullet_names) for bullet_names in names[1:]}
    summary = set(re.findall(r"`([a-z][a-z_]*)`", outputs.partition("The last line")[2].split(".\n")[0]))
    return always, conditional, summary


def test_readme_lists_only_metrics_the_code_logs():
    """Every key the README lists is a name gkd or transformers' Trainer logs (a renamed metric leaves it stale)."""
    always, conditional, summary = readme_metrics()
    assert {"loss", "nonfinite_skipped", "lmbda"} <= always and {"kd_loss", "sft_loss"} <= set(conditional)
    code = "".join(path.read_text() for path in (REPO / "gkd").rglob("*.py"))
    trainer_own = {"loss", "grad_norm", "learning_rate", "epoch", "train_runtime", "train_samples_per_second",
                   "train_steps_per_second", "train_loss"}
    for name in always | set(conditional) | summary:
        assert name in trainer_own or f'"{name}"' in code, f"README lists `{name}`, which nothing logs"

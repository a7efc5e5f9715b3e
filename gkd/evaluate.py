"""`python -m gkd.evaluate` keeps working: the tool lives in gkd/tools/evaluate.py (also `gkd-eval`)."""

from gkd.cli import command

if __name__ == "__main__":
    command("gkd.tools.evaluate")

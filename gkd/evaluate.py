"""`python -m gkd.evaluate` keeps working: the tool lives in gkd/tools/evaluate.py (also `gkd-eval`)."""

from gkd.tools.evaluate import cli

if __name__ == "__main__":
    cli()

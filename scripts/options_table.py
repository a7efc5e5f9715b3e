"""Print the Markdown table of gkd's own options (README's Options section is this output; a test keeps it current).

    python scripts/options_table.py
"""

import dataclasses


def options_table() -> str:
    from gkd.config import GKDConfig, ModelArguments, ScriptArguments

    rows = ["| option | default | what it does |", "|---|---|---|"]
    for group in (ScriptArguments, ModelArguments, GKDConfig):
        for field in dataclasses.fields(group):
            # TrainingArguments' own options are documented by transformers; list those gkd declares itself.
            if field.name not in vars(group).get("__annotations__", {}):
                continue
            names = " ".join(f"`--{name.lstrip('-')}`" for name in [field.name, *field.metadata.get("aliases", [])])
            text = " ".join(field.metadata.get("help", "").split()).replace("|", "\\|")
            rows.append(f"| {names} | `{field.default}` | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_table())

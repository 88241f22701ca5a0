"""The flag reference docs/flags.md, generated from the config dataclasses: `python -m bert_ft.docs` (run from the
repository root) rewrites it; tests/test_docs.py fails while the page and the code disagree."""

from __future__ import annotations

import dataclasses
import os

from .cli import PredictConfig
from .config import TrainConfig
from .export import ExportConfig
from .plugins import registered_commands, registered_tasks


def flags_table(option_types: dict[str, type]) -> str:
    """A markdown table: flag, default, applies to, help (one row per dataclass field)."""
    rows = ["| flag | default | for | what it does |", "|---|---|---|---|"]
    for scope, dataclass_type in option_types.items():
        for item in dataclasses.fields(dataclass_type):
            choices = item.metadata.get("choices")
            help_text = item.metadata["help"] + (f" ({' / '.join(choices)})" if choices else "")
            default = item.default if item.default not in (None, "") else "–"
            rows.append(f"| `--{item.name}` | `{default}` | {scope} | {help_text.replace('|', '/')} |")
    return "\n".join(rows)


def all_flags_table() -> str:
    """Every flag of every registered task and command."""
    tasks = registered_tasks()
    return flags_table({"all tasks": TrainConfig, **{name: task.options_type for name, task in tasks.items()},
                        "predict": PredictConfig, "export": ExportConfig,
                        **{name: command.config_type for name, command in registered_commands().items()}})


FLAGS_PAGE = os.path.join("docs", "flags.md")  # relative to the repository root


def flags_page() -> str:
    """The whole text of docs/flags.md: a title, how it is made, and the table."""
    return ("# Every flag\n\n"
            "Generated from the config dataclasses by `python -m bert_ft.docs` (run from the repository root after "
            "changing a flag;\n`tests/test_docs.py` fails while this page and the code disagree). `run_task.py TASK "
            "--help` prints the same\nflags for one task. Back to the [documentation index](README.md).\n\n"
            + all_flags_table() + "\n")


if __name__ == "__main__":
    with open(FLAGS_PAGE, "w", encoding="utf-8") as handle:
        handle.write(flags_page())
    print(f"wrote {FLAGS_PAGE}")

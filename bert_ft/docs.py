"""The README's flag table, generated from the config dataclasses: `python -m bert_ft.docs`."""

from __future__ import annotations

import dataclasses

from .cli import PredictConfig
from .config import TrainConfig
from .export import ExportConfig
from .plugins import registered_tasks


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
                        "predict": PredictConfig, "export": ExportConfig})


if __name__ == "__main__":
    print(all_flags_table())

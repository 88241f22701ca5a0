#!/usr/bin/env python
"""bert-ft command line from the repository: `python run_task.py {ner,relation,sentence,predict,export} [flags]`.

The same as the installed `bert-ft` command, with the tasks of the tasks/ folder beside this script registered
under their installed name, bert_ft_tasks, installed or not (without an install there are no entry points, and a
stale bert_ft.egg-info in the repository root can hide them).
"""

import importlib.util
import os
import sys

from bert_ft.cli import main
from bert_ft.plugins import plugin_modules, use_task_modules

TASKS_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def register_repository_tasks() -> None:
    """Make bert_ft_tasks this repository's tasks/ folder (an editable install already does), and register the
    tasks of each of its modules: the same classes as the entry points', so the registry sees each once."""
    found = importlib.util.find_spec("bert_ft_tasks")
    if found is None or os.path.dirname(found.origin or "") != TASKS_FOLDER:
        spec = importlib.util.spec_from_file_location("bert_ft_tasks", os.path.join(TASKS_FOLDER, "__init__.py"),
                                                      submodule_search_locations=[TASKS_FOLDER])
        package = importlib.util.module_from_spec(spec)
        sys.modules["bert_ft_tasks"] = package
        spec.loader.exec_module(package)
    use_task_modules(plugin_modules("bert_ft_tasks", TASKS_FOLDER))  # helper modules (joint.py) define no task


if __name__ == "__main__":
    register_repository_tasks()
    sys.exit(main())

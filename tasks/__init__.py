"""bert-ft's own task plugins, installed as the package `bert_ft_tasks` (this folder: pyproject.toml maps it).

Each module defines one Task (bert_ft.task) with its Head; the registry finds them through the entry-point group
"bert_ft.tasks" (bert_ft.plugins), as it finds any plugin's. Import them as bert_ft_tasks.ner and so on: the one
name, so that the registry never sees a task's class twice under two module names.
"""

if __name__ != "bert_ft_tasks":
    raise ImportError(f"the task plugins are the package bert_ft_tasks (the tasks/ folder, installed under that "
                      f"name): import bert_ft_tasks instead of {__name__} (install with `make setup` or "
                      "`pip install -e .`; `python run_task.py` from the repository root finds it without an install)")

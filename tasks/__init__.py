"""Task plugins. TASKS is the one registry: the CLI's sub-commands come from it (plus any plugin tasks)."""

from .ner import NerTask
from .relation import RelationTask
from .sentence import SentenceTask

TASKS = {task.name: task for task in (NerTask, RelationTask, SentenceTask)}

#!/usr/bin/env python
"""bert-ft command line: `python run_task.py {ner,relation,sentence} [flags]` or `python run_task.py predict ...`."""

import sys

from bert_ft.cli import main
from tasks import TASKS

if __name__ == "__main__":
    sys.exit(main(TASKS))

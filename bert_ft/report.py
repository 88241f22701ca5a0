"""Pictures for the run folder: training curves and the confusion matrix (matplotlib, no screen needed)."""

from __future__ import annotations

import os
import tempfile


def _save(figure, path: str) -> None:
    """Atomic PNG write: draw to a temporary file, then rename."""
    handle, temp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png")
    os.close(handle)
    try:
        figure.savefig(temp_path, dpi=110, bbox_inches="tight")
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def write_plots(output_dir: str, history: list[dict], metric: str,
                confusion: tuple[list[str], list[list[int]]] | None) -> None:
    """training_curves.png (train loss and validation metric per epoch) and confusion_matrix.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(6, 4))
    epochs = [record["epoch"] for record in history]
    loss_axis.plot(epochs, [record["train_loss"] for record in history], "o-", color="tab:blue", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss", color="tab:blue")
    if any(f"eval_{metric}" in record for record in history):
        metric_axis = loss_axis.twinx()
        metric_axis.plot(epochs, [record.get(f"eval_{metric}") for record in history], "s-", color="tab:orange")
        metric_axis.set_ylabel(f"validation {metric}", color="tab:orange")
    loss_axis.set_title("training curves")
    _save(figure, os.path.join(output_dir, "training_curves.png"))
    plt.close(figure)

    if confusion is None:
        return
    names, matrix = confusion
    size = max(4.0, 0.45 * len(names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("gold")
    peak = max((max(row) for row in matrix if row), default=0)
    for row_index, row in enumerate(matrix):
        for column_index, count in enumerate(row):
            if count:
                axis.text(column_index, row_index, str(count), ha="center", va="center", fontsize=7,
                          color="white" if count > peak / 2 else "black")
    axis.set_title("confusion matrix (test)")
    _save(figure, os.path.join(output_dir, "confusion_matrix.png"))
    plt.close(figure)

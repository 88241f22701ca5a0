"""Pictures for the run folder: training curves and the confusion matrix (matplotlib, no screen needed)."""

from __future__ import annotations

import os
import sys
import tempfile

# Families tried after DejaVu Sans (matplotlib >= 3.6 falls back glyph by glyph): the common CJK fonts of Linux,
# macOS and Windows, so Chinese/Japanese/Korean class names draw where one of them is installed.
FALLBACK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK KR", "Source Han Sans SC",
                     "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Droid Sans Fallback", "AR PL UMing CN",
                     "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei", "SimHei", "Malgun Gothic")


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


def _coverage(names: list[str]) -> tuple[list[str], list[bool]]:
    """The font families to use, and for each name whether they cover all its characters."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    installed = {entry.name: entry.fname for entry in font_manager.fontManager.ttflist}
    families = ["DejaVu Sans"] + [family for family in FALLBACK_FAMILIES if family in installed]
    covered: set[int] = set()
    for family in families:
        if family in installed:
            try:
                covered.update(FT2Font(installed[family]).get_charmap())
            except (OSError, RuntimeError):  # an unreadable font file: it draws nothing
                continue
    return families, [all(ord(char) in covered or char.isspace() for char in name) for name in names]


def tick_labels(names: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(font families to use, labels to draw, names no installed font can draw).

    A label with a character that no available font covers would be drawn as boxes; those labels are drawn as
    their class number instead ("#3"), and the caller says so, so that no picture silently shows unreadable names.
    """
    from matplotlib import font_manager

    families, drawable = _coverage(names)
    if not all(drawable):
        # matplotlib caches its font list once: a font installed since then is unknown to it until added.
        known = {entry.fname for entry in font_manager.fontManager.ttflist}
        for path in font_manager.findSystemFonts():
            if path not in known:
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):  # unreadable font file: skip it
                    continue
        families, drawable = _coverage(names)
    labels = [name if ok else f"#{index}" for index, (name, ok) in enumerate(zip(names, drawable))]
    return families, labels, [name for name, ok in zip(names, drawable) if not ok]


def curves_figure(history: list[dict], metric: str):
    """The training-curves figure: train loss and validation metric per epoch, ticks on whole epochs only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, loss_axis = plt.subplots(figsize=(6, 4))
    epochs = [record["epoch"] for record in history]
    loss_axis.plot(epochs, [record["train_loss"] for record in history], "o-", color="tab:blue", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs: no 1.25, 1.5 ticks
    loss_axis.set_ylabel("train loss", color="tab:blue")
    if any(f"eval_{metric}" in record for record in history):
        metric_axis = loss_axis.twinx()
        metric_axis.plot(epochs, [record.get(f"eval_{metric}") for record in history], "s-", color="tab:orange")
        metric_axis.set_ylabel(f"validation {metric}", color="tab:orange")
    loss_axis.set_title("training curves")
    return figure


def write_plots(output_dir: str, history: list[dict], metric: str,
                confusion: tuple[list[str], list[list[int]]] | None) -> None:
    """training_curves.png (train loss and validation metric per epoch) and confusion_matrix.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = curves_figure(history, metric)
    _save(figure, os.path.join(output_dir, "training_curves.png"))
    plt.close(figure)

    if confusion is None:
        return
    names, matrix = confusion
    families, labels, undrawable = tick_labels(names)
    if undrawable:
        print(f"confusion_matrix.png: no installed font draws {undrawable[:5]}; those classes are shown by "
              "number (#N: class N, counted from 0, of the confusion matrix in report.txt). Install a CJK font "
              "(e.g. `apt-get install fonts-noto-cjk`) to see their names.", file=sys.stderr)
    size = max(4.0, 0.45 * len(names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(names)), labels, rotation=60, ha="right", fontsize=8, fontfamily=families)
    axis.set_yticks(range(len(names)), labels, fontsize=8, fontfamily=families)
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

"""Pictures: valid PNGs, and class names no installed font can draw are never drawn as boxes."""

from __future__ import annotations

import warnings

from bert_ft import report
from bert_ft.report import tick_labels, write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_ascii_names_are_drawn_as_they_are() -> None:
    families, labels, undrawable = tick_labels(["PER", "B-LOC", "Other"])
    assert labels == ["PER", "B-LOC", "Other"] and undrawable == [] and families[0] == "DejaVu Sans"


def test_names_without_a_font_become_class_numbers(monkeypatch) -> None:
    monkeypatch.setattr(report, "FALLBACK_FAMILIES", ())  # as on a machine with no CJK font
    _, labels, undrawable = tick_labels(["positive", "负面", "正面"])
    assert labels == ["positive", "#1", "#2"]
    assert undrawable == ["负面", "正面"]


def test_write_plots_with_cjk_classes_draws_no_missing_glyph(tmp_path, capsys) -> None:
    history = [{"epoch": 1, "train_loss": 0.9, "eval_accuracy": 0.6},
               {"epoch": 2, "train_loss": 0.5, "eval_accuracy": 0.7}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        confusion = (["负面", "正面", "neutral"], [[3, 1, 0], [0, 4, 1], [1, 0, 2]])
        write_plots(str(tmp_path), history, "accuracy", confusion)
    assert not [w for w in caught if "missing from font" in str(w.message)], [str(w.message) for w in caught]
    for name in ("training_curves.png", "confusion_matrix.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
    _, _, undrawable = tick_labels(["负面"])
    if undrawable:  # this machine has no CJK font: the run says so and how to fix it
        assert "apt-get install fonts-noto-cjk" in capsys.readouterr().err

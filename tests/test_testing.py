"""The public plugin harness (bert_ft.testing.check_task) on bert-ft's own three tasks, and that it fails when a
task breaks what it checks."""

from __future__ import annotations

import pytest

from bert_ft.plugins import registered_tasks
from bert_ft.testing import check_task

INPUTS = {"ner": ["EU rejects German call to boycott British lamb .", "Peter Blackburn"],
          "relation": ["The <e1>fire</e1> was caused by the <e2>lightning</e2> ."],
          "sentence": ["a gripping , beautifully acted film", "dull"]}


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_built_in_task_passes_the_harness(name, tiny_model_dir, tmp_path):
    task_type = registered_tasks()[name]
    task = task_type(task_type.options_type())
    report = check_task(task, task.default_files()["train"], str(tmp_path), inputs=INPUTS[name],
                        model_dir=tiny_model_dir)
    assert report["loss_after"] < report["loss_before"] and report["packing_exact"] is True
    assert len(report["predictions"]) == len(INPUTS[name])


def test_the_harness_fails_a_head_that_packing_breaks(tiny_model_dir, tmp_path, monkeypatch):
    """A sentence head that reads position 0 of each row (not each example's own first token) trains, reloads and
    predicts on padded rows, but packed rows give other outputs: check_task names the packing check."""
    from bert_ft.heads import encoder_inputs
    from bert_ft_tasks.sentence import SentenceTask, SequenceClassifier

    def row_start_scores(self, batch):
        hidden = self.model.base_model(**encoder_inputs(batch))[0]  # (rows, seq, hidden)
        # (examples, num_labels); x1000 in eval (the packing check runs in eval, training is left alone): a tiny
        # random encoder gives every example nearly the same [CLS] state, so the wrong-position error must exceed
        # the exactness check's tolerance (1e-4) to be seen at all
        return (1.0 if self.training else 1000.0) * self.classify_first(self.model, hidden[batch["example_row"], 0])

    monkeypatch.setattr(SequenceClassifier, "scores", row_start_scores)
    task = SentenceTask()
    with pytest.raises(AssertionError, match="check_task: packing"):
        check_task(task, task.default_files()["train"], str(tmp_path), model_dir=tiny_model_dir,
                   epochs=4)

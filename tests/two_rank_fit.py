"""Run by tests/test_calibration.py under `torch.distributed.run --nproc_per_node 2`: each rank holds half of the
validation batches (as a prepared loader shards them), the temperature is fitted on the gathered outputs, and rank
0 writes it beside the fit of one process on all the batches (argv[1]: the JSON file)."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from bert_ft.calibration import calibrate  # noqa: E402
from bert_ft.inference import decode_batches  # noqa: E402
from bert_ft_tasks.ner import NerTask  # noqa: E402
from tests.test_calibration import LABELS, _ner_split, _tagger, _with_index, _word_batch  # noqa: E402


def main() -> None:
    accelerator = Accelerator(cpu=True)
    found = {}
    for use_crf in (False, True):
        generator = torch.Generator().manual_seed(6)
        tagger = _tagger(use_crf)
        count, piece = 96, 24  # 4 pieces of equal size: 2 per rank, as even batches give them
        lengths = [int(value) for value in torch.randint(1, 9, (count,), generator=generator)]
        scores = torch.randn(count, 8, 3, generator=generator) * 4
        gold = torch.randint(0, 3, (count, 8), generator=generator)
        gold = torch.where(torch.rand(count, 8, generator=generator) < 0.6, scores.argmax(-1), gold)
        examples, features = _ner_split(gold, lengths)
        pieces = []
        for start in range(0, count, piece):
            part = lengths[start:start + piece]
            pieces.append((_with_index(_word_batch(part, gold[start:start + piece, :max(part)]), start),
                           scores[start:start + piece, :max(part)]))
        whole = [(_with_index(_word_batch(lengths, gold), 0), scores)]
        mine = pieces[accelerator.process_index::accelerator.num_processes]

        def confidences(scored, gather):
            def confidences_at(temperature: float) -> list:
                outputs = decode_batches(tagger, scored, count, gather, temperature)
                return NerTask().confidences(examples, features, outputs, LABELS)
            return confidences_at

        for objective in ("confidence", "label"):
            found[f"{'crf' if use_crf else 'linear'} {objective}"] = {
                "ranks": calibrate(tagger, mine, confidences(mine, accelerator), accelerator, objective),
                "one": calibrate(tagger, whole, confidences(whole, None), None, objective)}
    if accelerator.is_main_process:
        with open(sys.argv[1], "w", encoding="utf-8") as handle:
            json.dump({"num_processes": accelerator.num_processes, "fits": found}, handle)


if __name__ == "__main__":
    main()

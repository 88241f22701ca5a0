"""--sparse_embedding_updates: touched-row gradients and a lazy AdamW give dense AdamW's parameters (every one, after
200 steps with warmup + linear decay, weight decay, layer-wise lr groups and clipping), the same clip norms, the same
FGM perturbation, exact resume, and it is off where it must be."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from bert_ft import sparse_embedding
from bert_ft.adversarial import FGM, PGD
from bert_ft.cli import main
from bert_ft.optim import build_optimizer, parameter_groups, set_frozen, unfreeze_all
from bert_ft.random_models import build_family
from bert_ft.sparse_embedding import LazyEmbeddingAdamW, clip_gradients, materialize, sparse_updates_off_reason
from bert_ft_tasks.sentence import SentenceTask

from .conftest import ROOT

LABELS = ["negative", "positive"]


class PlainAccelerator:
    """What clip_gradients needs of an Accelerator in one fp32 process."""

    def unscale_gradients(self) -> None:
        pass

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def sentence_head(model_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    return SentenceTask(SentenceTask.options_type()).build_model(model_dir, LABELS, tokenizer, False)


def batches(steps: int, vocab: int, seed: int = 0) -> list[dict]:
    """Zipf-like token ids over 3,000 rows (frequent rows every step, rare ones after long gaps), 8 x 12 tokens;
    row 2000 only in the first and last batch, row 2001 only in the first (caught up by materialize)."""
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, 3001, dtype=torch.float64)
    out = []
    for step in range(steps):
        ids = 1000 + torch.multinomial(weights, 8 * 12, replacement=True, generator=generator).view(8, 12)
        ids[ids == 2000] = 1000
        ids[ids == 2001] = 1000
        if step in (0, steps - 1):
            ids[0, 1] = 2000
        if step == 0:
            ids[1, 1] = 2001
        ids[:, 0] = 101
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (8,), generator=generator)})
    assert vocab > 4000
    return out


def trained(head, sparse: bool, data: list[dict], max_grad_norm: float = 0.5, layer_lr_decay: float = 0.8):
    """Train `head` (dropout off) through bert-ft's optimiser; returns the clip norms of every step."""
    head.eval()  # no dropout: both paths see the same function
    groups = parameter_groups(head, 5e-4, 2e-3, layer_lr_decay, 0.01)
    optimizer = build_optimizer(groups, 0.01, head.get_input_embeddings() if sparse else None)
    assert isinstance(optimizer, LazyEmbeddingAdamW) == sparse
    scheduler = get_linear_schedule_with_warmup(optimizer, 20, len(data))
    norms = []
    for batch in data:
        head.model(**batch).loss.backward()
        norms.append(float(clip_gradients(PlainAccelerator(), head.parameters(), max_grad_norm)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    materialize(optimizer)
    return norms


def relative_errors(left, right) -> dict[str, float]:
    other = dict(right.named_parameters())
    return {name: float((param.detach() - other[name].detach()).norm() / other[name].detach().norm().clamp_min(1e-12))
        for name, param in left.named_parameters()}


# BERT's attention key bias adds the same q.b to every score of a query row, which softmax ignores: its gradient is
# 0 up to rounding, and AdamW normalises that noise into lr-sized steps (dense fused and dense single-tensor AdamW
# end >100% apart there too). Its effect on the model, none, is checked through the outputs instead.
NOISE_ONLY = ("attention.self.key.bias", "attention.key.bias")  # BERT, ALBERT


def assert_same_model(sparse, dense, data: list[dict]) -> None:
    errors = {name: error for name, error in relative_errors(sparse, dense).items() if not name.endswith(NOISE_ONLY)}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])
    with torch.no_grad():
        for batch in data:
            left, right = sparse.model(**batch).logits, dense.model(**batch).logits
            assert torch.allclose(left, right, rtol=1e-5, atol=1e-6), (left - right).abs().max()


def test_200_steps_equal_dense_adamw_with_the_same_clip_norms(tiny_model_dir, monkeypatch):
    # A short truncation horizon (154 skipped steps instead of 264) so that row 2000's catch-up of 198 steps is
    # truncated too.
    monkeypatch.setattr(sparse_embedding, "TRUNCATION", 1e-7)
    dense = sentence_head(tiny_model_dir)
    sparse = copy.deepcopy(dense)
    data = batches(200, dense.get_input_embeddings().weight.shape[0])
    dense_norms = trained(dense, False, data)
    sparse_norms = trained(sparse, True, data)
    assert torch.allclose(torch.tensor(sparse_norms), torch.tensor(dense_norms), rtol=1e-5, atol=0)
    assert sum(norm > 0.5 for norm in dense_norms) >= 30  # clipping acted on many steps (40 of 200)
    assert_same_model(sparse, dense, data[:4])
    embedding = dense.get_input_embeddings().weight
    rows = torch.tensor([2000, 2001, 5, 1000])  # rare, touched once, never touched (decay only), frequent
    assert torch.allclose(sparse.get_input_embeddings().weight[rows], embedding[rows], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(embedding[5], sentence_head(tiny_model_dir).get_input_embeddings().weight[5])


def test_catch_up_equals_dense_zero_gradient_steps():
    """The closed form against torch's AdamW step by step: gaps up to 300 steps (past the 264-step truncation),
    gradients of 1e-3 (the series) and 1e-9 (eps not small: the exact sum), elements never touched, a changing lr."""
    torch.manual_seed(0)
    vocab, hidden, steps = 8, 6, 300
    embedding = torch.nn.Embedding(vocab, hidden)
    weight = embedding.weight
    reference = torch.nn.Parameter(weight.detach().clone())
    lazy = LazyEmbeddingAdamW([{"params": [weight], "lr": 1e-2, "weight_decay": 0.1}], embedding)
    dense = torch.optim.AdamW([{"params": [reference], "lr": 1e-2, "weight_decay": 0.1}], foreach=False)
    touched = {0: set(range(1, steps + 1)), 1: {1, 5, 20, 299}, 2: {3}, 3: set(), 4: {1, 2, 3, 298}, 5: {2, 9},
               6: {1, 150}, 7: {4}}
    scale = torch.tensor([1e-3, 1e-3, 1e-9, 1e-9, 0.0, 1e-3])  # per column; column 4 never gets a gradient
    for step in range(1, steps + 1):
        for group in lazy.param_groups + dense.param_groups:
            group["lr"] = 1e-2 * (1 - step / (steps + 10))
        rows = [row for row, when in touched.items() if step in when]
        values = torch.randn(len(rows), hidden) * scale
        reference.grad = torch.zeros(vocab, hidden).index_put_((torch.tensor(rows, dtype=torch.long),), values)
        weight.grad = torch.sparse_coo_tensor(torch.tensor([rows], dtype=torch.long).view(1, -1), values,
                                              (vocab, hidden), check_invariants=True).coalesce()
        dense.step()
        lazy.step()
    lazy.materialize()
    assert torch.allclose(weight, reference, rtol=1e-5, atol=1e-7), (weight - reference).abs().max()
    moments = lazy.state[weight]
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(moments[name], dense.state[reference][name], rtol=1e-5, atol=1e-20), name


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_adversarial_perturbation_and_gradients_equal_the_dense_path(tiny_model_dir, kind):
    """Two accumulated micro-batches: the perturbed embeddings each adversarial pass sees, and the gradients after
    it, equal the dense path's."""
    dense = sentence_head(tiny_model_dir).eval()
    sparse = copy.deepcopy(dense)
    build_optimizer(parameter_groups(sparse, 5e-4, 2e-3, 1.0, 0.01), 0.01, sparse.get_input_embeddings())
    data = batches(2, 30522, seed=1)
    seen = {}
    for name, head in (("dense", dense), ("sparse", sparse)):
        weight = head.get_input_embeddings().weight
        original = weight.detach().clone()
        adversary = FGM(weight, 1.0) if kind == "fgm" else PGD(weight, 1.0, 3, 0.3, list(head.parameters()))
        perturbations = []

        def forward_backward(batch=None):
            perturbations.append(weight.detach() - original)
            head.model(**current[0]).loss.backward()

        for batch in data:
            current = [batch]
            adversary.before_backward()
            head.model(**batch).loss.backward()
            assert adversary.adversarial_backward(forward_backward)
        grad = weight.grad
        assert grad.is_sparse == (name == "sparse")
        seen[name] = (perturbations, grad.to_dense() if grad.is_sparse else grad,
                      {key: param.grad for key, param in head.named_parameters()})
        assert torch.equal(weight.detach(), original)  # restored exactly
    (dense_steps, dense_grad, dense_grads), (sparse_steps, sparse_grad, sparse_grads) = seen["dense"], seen["sparse"]
    assert len(dense_steps) == len(sparse_steps) == (2 if kind == "fgm" else 6)
    for left, right in zip(sparse_steps, dense_steps):
        assert right.norm() > 0.1
        assert torch.allclose(left, right, rtol=1e-4, atol=1e-7), (left - right).abs().max()
    assert torch.allclose(sparse_grad, dense_grad, rtol=1e-4, atol=1e-8)
    for key, grad in dense_grads.items():
        if not key.endswith(NOISE_ONLY) and "word_embeddings" not in key and grad is not None:
            assert torch.allclose(sparse_grads[key], grad, rtol=1e-4, atol=1e-7), key


@pytest.mark.parametrize("family", ["albert", "electra", "deberta-v3", "modernbert"])
def test_every_family_trains_as_dense(family, tmp_path):
    """ALBERT and ELECTRA (embedding size != hidden size), DeBERTa-v3, ModernBERT: 6 steps, the same model."""
    folder = build_family(family, str(tmp_path / family))
    dense = sentence_head(folder)
    sparse = copy.deepcopy(dense)
    vocab = dense.get_input_embeddings().weight.shape[0]
    data = [{**batch, "input_ids": batch["input_ids"] % vocab} for batch in batches(6, 30522, seed=2)]
    trained(dense, False, data, layer_lr_decay=1.0)  # ALBERT shares one layer's weights: no layer-wise lr
    trained(sparse, True, data, layer_lr_decay=1.0)
    assert_same_model(sparse, dense, data[:2])


def test_off_where_it_must_be(tiny_model_dir):
    head = sentence_head(tiny_model_dir)

    def reason(processes: int = 1, **changes) -> str:
        config = {"sparse_embedding_updates": True, "lora_r": 0, "unfreeze_at_epoch": None, "torch_compile": False}
        return sparse_updates_off_reason(SimpleNamespace(**{**config, **changes}), head, processes)

    assert reason() == ""
    assert "--sparse_embedding_updates false" in reason(sparse_embedding_updates=False)
    assert "LoRA" in reason(lora_r=4)
    assert "several processes" in reason(processes=2)
    assert "--torch_compile" in reason(torch_compile=True)
    set_frozen(head, False, 1)  # the embeddings and layer 0
    assert "frozen" in reason()
    assert reason(unfreeze_at_epoch=2) == ""  # they are trained from that epoch on: sparse from then
    optimizer = build_optimizer(parameter_groups(head, 5e-4, 2e-3, 1.0, 0.01), 0.01, head.get_input_embeddings())
    head.model(**batches(1, 30522)[0]).loss.backward()
    optimizer.step()
    assert optimizer.steps == 0  # frozen: no gradient, no step for the embeddings (as dense AdamW)
    unfreeze_all(head)
    head.model(**batches(1, 30522)[0]).loss.backward()
    assert head.get_input_embeddings().weight.grad.is_sparse
    optimizer.step()
    assert optimizer.steps == 1


def run_args(model_dir: str, output_dir: str, *extra: str) -> list[str]:
    return ["ner", "--model_name_or_path", model_dir, "--output_dir", output_dir, "--num_train_epochs", "2",
            "--max_train_samples", "64", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3",
            "--max_seq_length", "48", "--save_steps", "3", "--save_total_limit", "10", *extra]


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """On by default (2 accumulated micro-batches): resuming mid-epoch from checkpoint-3 ends with the uninterrupted
    run's scores and weights."""
    from safetensors.torch import load_file

    run = str(tmp_path / "run")
    assert main(run_args(tiny_model_dir, run)) == 0
    optimizer_state = torch.load(os.path.join(run, "checkpoint-3", "optimizer.bin"), weights_only=True)
    assert optimizer_state["lazy_embedding"]["steps"] == 3
    assert bool((optimizer_state["lazy_embedding"]["row_step"] == 3).all())  # materialized before saving
    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    for name in ("metrics.json", "model"):
        path = os.path.join(resumed, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    assert main(run_args(tiny_model_dir, resumed, "--resume_from_checkpoint",
                         os.path.join(resumed, "checkpoint-3"))) == 0
    metrics, again = (json.load(open(os.path.join(folder, "metrics.json"))) for folder in (run, resumed))
    keys = ("eval_f1", "test_f1", "train_loss", "test_precision")
    assert {key: again[key] for key in keys} == {key: metrics[key] for key in keys}
    for saved in ("model", "checkpoint-8"):  # the best model (epoch 1) and the last step's weights
        weights, resumed_weights = (load_file(os.path.join(folder, saved, "model.safetensors"))
                                    for folder in (run, resumed))
        assert all(torch.equal(weights[key], resumed_weights[key]) for key in weights), saved


def test_optimizer_state_moves_between_dense_and_sparse(tiny_model_dir):
    """A dense checkpoint's optimiser state continues as sparse updates, and the reverse, as dense AdamW would."""
    data = batches(8, 30522, seed=3)
    reference = sentence_head(tiny_model_dir)
    trained(reference, False, data)
    for first, second in ((True, True), (False, True), (True, False)):  # sparse to sparse: the state round trip
        head = sentence_head(tiny_model_dir).eval()
        groups = parameter_groups(head, 5e-4, 2e-3, 0.8, 0.01)
        optimizer = build_optimizer(groups, 0.01, head.get_input_embeddings() if first else None)
        scheduler = get_linear_schedule_with_warmup(optimizer, 20, len(data))
        for index, batch in enumerate(data):
            if index == 4:  # "resume" with the other setting: a new optimiser and schedule from the saved states
                materialize(optimizer)  # as before every checkpoint
                saved, schedule = optimizer.state_dict(), scheduler.state_dict()
                weights, head = head.state_dict(), sentence_head(tiny_model_dir).eval()  # a new process
                head.load_state_dict(weights)
                groups = parameter_groups(head, 5e-4, 2e-3, 0.8, 0.01)
                optimizer = build_optimizer(groups, 0.01, head.get_input_embeddings() if second else None)
                scheduler = get_linear_schedule_with_warmup(optimizer, 20, len(data))
                optimizer.load_state_dict(saved)  # after the schedule's start, as Accelerate's load_state does
                scheduler.load_state_dict(schedule)
            head.model(**batch).loss.backward()
            clip_gradients(PlainAccelerator(), head.parameters(), 0.5)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        materialize(optimizer)
        assert_same_model(head, reference, data[:2])


def test_a_run_equals_the_dense_run(tiny_model_dir, tmp_path):
    """Through the CLI (prepare, schedule, checkpoints, evaluation), the default run's last weights equal those of a
    --sparse_embedding_updates false run to 1e-5 per tensor (fp32; the key biases are rounding noise in both)."""
    from safetensors.torch import load_file

    weights = {}
    for sparse in ("true", "false"):  # subprocesses: fp32 whatever --mixed_precision auto gives in this process
        run = str(tmp_path / sparse)
        flags = run_args(tiny_model_dir, run, "--mixed_precision", "no", "--sparse_embedding_updates", sparse)
        done = subprocess.run([sys.executable, os.path.join(ROOT, "run_task.py"), *flags], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        weights[sparse] = load_file(os.path.join(run, "checkpoint-8", "model.safetensors"))
    for key, dense in weights["false"].items():
        if not key.endswith(NOISE_ONLY):
            error = float((weights["true"][key] - dense).norm() / dense.norm().clamp_min(1e-12))
            assert error < 1e-5, (key, error)
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))["embeddings.word_embeddings.weight"]
    moved = (weights["true"]["model.bert.embeddings.word_embeddings.weight"] - initial).abs().amax(1)
    assert int((moved > 0).sum()) == initial.shape[0] - 1  # every row but [PAD] decayed or trained

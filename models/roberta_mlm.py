"""The RoBERTa-MLM pieces the method needs on text, by name, on top of Hugging Face `transformers`: the text
counterpart of models/vit_mae.py.

    load_mlm(name)                  the initial model θ₀ (encoder + LM head): hub id, local dir, or `roberta-tiny`
    load_tokenizer(name)            the model's own tokenizer (AutoTokenizer of the same name; the tiny one built in)
    mlm_masks(ids, special, noise)  MLM's masked input and labels from per-token uniform noise drawn per
                                    (seed, step, sample), as DataCollatorForLanguageModeling masks
    mlm_loss(mlm, ids, mask, labels)  cross-entropy on the masked tokens
    first_token_feature(encoder, ids, mask)  `<s>` of the last layer on the *unmasked* text: the representation
                                    h(x) that self-distillation matches
    MLMWithFeature(mlm)             the self-distillation student: both terms in one module forward
    build_text_classifier(...)      RobertaForSequenceClassification whose encoder comes from θ₀ or a checkpoint
    tokenize_texts / pad_batch      a split tokenised once (truncated at max_length), padded per batch
    load_or_tokenize(...)           ... cached in memory and on disk, keyed by the texts and the tokenizer

Where a model name leads is models.hub, which this module imports.
"""
import hashlib
import json
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoTokenizer, RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification,
                          RobertaModel, RobertaTokenizer)

import outputs
from errors import UserError
from models.checkpoints import _load_exact
from models.hub import TEXT_TINY_CONFIG, TEXT_TINY_NAME, _from_pretrained, _hub_offline_reason, looks_like_local_path
from utils import STREAM_HEAD, mix_seed

TINY_INIT_SEED = 0  # roberta-tiny's θ₀ is this seed's initialisation, the same in every stage and run
MAX_LENGTH = 512  # tokens per text after truncation, specials included (RoBERTa's, and Gururangan et al.'s)
# MLM as BERT / RoBERTa / DataCollatorForLanguageModeling: 15 % of the real tokens are selected; of those
# 80 % become <mask>, 10 % a random token of the whole vocabulary, 10 % stay as they are.
MLM_PROBABILITY, MASK_REPLACE_PROB, RANDOM_REPLACE_PROB = 0.15, 0.8, 0.1
NOISE_PLANES = 4  # uniform draws per token: selected, <mask>, random, which random token


# ----------------------------------------------------------------------------- the tiny tokenizer and θ₀

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character (what ByteLevel pre-tokenising maps to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def tiny_tokenizer() -> RobertaTokenizer:
    """roberta-tiny's tokenizer: RoBERTa's byte-level BPE with no merges, i.e. one token per byte.

    ids: <s> 0, <pad> 1, </s> 2, <unk> 3 (RoBERTa's order), byte b at 4 + b, <mask> 260. Built in code, so it
    needs no download and is the same everywhere; save_pretrained + AutoTokenizer.from_pretrained round-trip it."""
    vocab = {token: i for i, token in enumerate(("<s>", "<pad>", "</s>", "<unk>"))}
    for b, char in sorted(_byte_to_unicode().items()):
        vocab[char] = len(vocab)
    vocab["<mask>"] = len(vocab)
    # `vocab=` / `merges=`: the v4 keywords `vocab_file=` / `merges_file=` are ignored by transformers 5
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=MAX_LENGTH)


def load_mlm(model_name: str) -> RobertaForMaskedLM:
    """θ₀ (or a stage's checkpoint) as a RobertaForMaskedLM (encoder + LM head, the decoder tied to the word
    embeddings), with attention dropout off (no_attention_dropout)."""
    if model_name == TEXT_TINY_NAME:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_INIT_SEED)
            return RobertaForMaskedLM(RobertaConfig(**TEXT_TINY_CONFIG))  # transformers' RoBERTa init
    return no_attention_dropout(_from_pretrained(RobertaForMaskedLM, model_name, model_type="roberta"))


def no_attention_dropout(model: nn.Module) -> nn.Module:
    """Attention dropout set to 0 (config and modules). transformers 5 passes its rate to the attention function
    (SDPA's dropout_p) instead of applying an nn.Dropout, so its masks cannot be drawn per (seed, step, sample) as
    every other dropout mask is (training/draws.py), and one process would not equal N. The hidden dropout stays."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "attention_probs_dropout_prob"):
            config.attention_probs_dropout_prob = 0.0
        if type(module).__name__.endswith("SelfAttention") and isinstance(getattr(module, "dropout", None),
                                                                          nn.Dropout):
            module.dropout.p = 0.0
    return model


def load_tokenizer(model_name: str):
    """The model's own tokenizer: AutoTokenizer of the same hub id or directory (built in for roberta-tiny),
    checked to encode text as text (check_tokenizer)."""
    if model_name == TEXT_TINY_NAME:
        return tiny_tokenizer()
    if os.path.isdir(model_name):
        if not any(os.path.isfile(os.path.join(model_name, f)) for f in ("tokenizer.json", "vocab.json")):
            raise UserError(f"'{model_name}' has no tokenizer (tokenizer.json); save the model's tokenizer there "
                            f"with tokenizer.save_pretrained('{model_name}')")
        tokenizer = _tokenizer_from(model_name, local_files_only=True)
    elif os.path.exists(model_name) or looks_like_local_path(model_name):
        raise UserError(f"'{model_name}' is not a model directory; pass one, a hub id or {TEXT_TINY_NAME}")
    else:
        tokenizer = _tokenizer_from(model_name, local_files_only=_hub_offline_reason() is not None)
    check_tokenizer(tokenizer, model_name)
    return tokenizer


def _tokenizer_from(name: str, local_files_only: bool):
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    except Exception as e:  # missing files, a corrupt tokenizer.json: errors with no common base
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fix = ("" if os.path.isdir(name) else f"; on a machine with access run `hf download {name} --local-dir DIR`, "
               f"then pass --model_name DIR")
        raise UserError(f"cannot load the tokenizer of '{name}' ({message}){fix}") from None


def check_tokenizer(tokenizer, model_name: str) -> None:
    """A tokenizer that encodes a sentence as special tokens only (a RoBERTa tokenizer built with the v4 keywords
    `vocab_file=` / `merges_file=` in transformers 5) would train on nothing without an error: refuse it."""
    ids = tokenizer("a b c")["input_ids"]
    if tokenizer.mask_token_id is None or all(i in tokenizer.all_special_ids for i in ids):
        raise UserError(f"the tokenizer of '{model_name}' encodes text as special tokens only ({ids}) or has no "
                        f"mask token; it is not a usable RoBERTa tokenizer (save one with save_pretrained)")


# ----------------------------------------------------------------------------- masked language modelling

def mlm_masks(input_ids: torch.Tensor, special_mask: torch.Tensor, noise: torch.Tensor, mask_token_id: int,
              vocab_size: int, mlm_probability: float = MLM_PROBABILITY) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM's masking, DataCollatorForLanguageModeling's (torch_mask_tokens) with its random draws given as noise.

    input_ids (B, L); special_mask (B, L) bool, True at special tokens and padding (never selected);
    noise (B, L, 4) uniform in [0, 1), a function of (seed, step, sample, position): plane 0 < p selects a
    token, plane 1 < 0.8 makes a selected token <mask>, plane 2 < 0.5 makes one of the rest a random token,
    floor(plane 3 · V) of the whole vocabulary (specials included, as the collator draws it).
    Returns (B, L) masked input_ids and (B, L) labels: the original id where selected, -100 elsewhere."""
    selected = (noise[..., 0] < mlm_probability) & ~special_mask
    replaced = (noise[..., 1] < MASK_REPLACE_PROB) & selected
    random = (noise[..., 2] < RANDOM_REPLACE_PROB / (1 - MASK_REPLACE_PROB)) & selected & ~replaced
    random_tokens = (noise[..., 3] * vocab_size).long().clamp_(max=vocab_size - 1)  # (B, L)
    masked = input_ids.masked_fill(replaced, mask_token_id)
    masked = torch.where(random, random_tokens, masked)
    labels = input_ids.masked_fill(~selected, -100)
    return masked, labels


def special_tokens_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, L) bool: the tokens MLM never selects, the tokenizer's special tokens and the padding."""
    specials = torch.tensor(tokenizer.all_special_ids, device=input_ids.device)
    return torch.isin(input_ids, specials) | (attention_mask == 0)


def mlm_loss(mlm: RobertaForMaskedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             num_masked: torch.Tensor | int | None = None) -> torch.Tensor:
    """MLM loss: cross-entropy of the LM head's prediction at each selected token (labels != -100), summed and
    divided by `num_masked` (default: this batch's count, i.e. the mean, as RobertaForMaskedLM's own loss).

    input_ids: (B, L) masked; labels (B, L). The number of selected tokens varies per sample, so a mean over each
    process's tokens is not the mean over the global batch: with N processes pass the global count (and let the
    gradient average over processes be undone by N) to take the same step as one process. The LM head runs on the
    selected tokens only (its vocabulary-wide output is most of the cost at every other token)."""
    hidden = mlm.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
    selected = labels != -100
    logits = mlm.lm_head(hidden[selected])  # (M, V)
    total = F.cross_entropy(logits.float(), labels[selected], reduction="sum")
    if num_masked is None:
        num_masked = selected.sum().clamp(min=1)
    return total / torch.as_tensor(num_masked, device=total.device)


def first_token_feature(encoder: RobertaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
                        ) -> torch.Tensor:
    """h(x): the `<s>` token of the last encoder layer on the unmasked text, padding excluded by the attention mask.

    (B, L) -> (B, D). RoBERTa is post-LayerNorm: the last hidden state is already normalised."""
    return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]


class MLMWithFeature(nn.Module):
    """The self-distillation student: one module forward gives the MLM loss on the masked text and h(x) on the
    unmasked text, so a single backward pass (and a single DDP synchronisation) covers both terms.

    Two encoder passes (the inputs differ), not one pass over a doubled batch: a doubled batch would put both
    copies' rows in each process's dropout draw and break "1 process ≡ N processes". h(x) is read from the
    encoder (`mlm.roberta`), so the distillation gradient never reaches the LM head's own parameters (its
    decoder matrix is the word-embedding table, which is the encoder's and does receive it)."""

    def __init__(self, mlm: RobertaForMaskedLM):
        super().__init__()
        self.mlm = mlm

    def forward(self, masked_ids, labels, input_ids, attention_mask, num_masked=None):
        return (mlm_loss(self.mlm, masked_ids, attention_mask, labels, num_masked),
                first_token_feature(self.mlm.roberta, input_ids, attention_mask))


# ----------------------------------------------------------------------------- the fine-tuning classifier

CLASSIFIER_HEAD = ("classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                   "classifier.out_proj.bias")


def text_encoder_state(mlm: RobertaForMaskedLM) -> dict:
    """The encoder's tensors of an MLM model (its `roberta.*` weights, prefix removed)."""
    return {k[len("roberta."):]: v for k, v in mlm.state_dict().items() if k.startswith("roberta.")}


def build_text_classifier(config: RobertaConfig, encoder_state: dict, num_classes: int, dropout: float = 0.1,
                          seed: int = 0) -> RobertaForSequenceClassification:
    """RoBERTa's classifier (RobertaClassificationHead: `<s>` -> dropout, dense, tanh, dropout, linear) whose
    encoder is `encoder_state`. Every encoder tensor comes from `encoder_state`; only the head is new: transformers'
    initialisation of a new RobertaForSequenceClassification under the seed mix_seed(seed, STREAM_HEAD), whatever
    drew from the global generator before. Attention dropout 0 (see no_attention_dropout)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id", "architectures")}
    settings.update(num_labels=num_classes, hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0,
                    classifier_dropout=None)  # None: the head's dropout is hidden_dropout_prob
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, STREAM_HEAD))
        model = RobertaForSequenceClassification(RobertaConfig(**settings))
    _load_exact(model, {"roberta." + k: v for k, v in encoder_state.items()}, "the encoder checkpoint",
                allowed_missing=CLASSIFIER_HEAD)
    return model


# ----------------------------------------------------------------------------- tokenising a split once

def tokenize_texts(tokenizer, texts: list[str], max_length: int = MAX_LENGTH) -> list[list[int]]:
    """Each text's ids with the model's specials (`<s> ... </s>`), truncated to max_length tokens, unpadded."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad_batch(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic padding: (B, L) input_ids and attention_mask, L the longest sequence of this batch."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, :len(sequence)] = 1
    return input_ids, attention_mask


class TokenizedSplit:
    """A text split (data.text.TextSplit) tokenised once (load_or_tokenize): the batches of training/batches.py
    gather from it by index and pad each batch to its longest text. Item i: (its ids, its label)."""

    is_text = True  # training/batches.py pads these batches instead of decoding images

    def __init__(self, split, tokenizer, max_length: int = MAX_LENGTH, cache_dir: str | None = None):
        self.name, self.split, self.classes = split.name, split.split, split.classes
        self.ids = load_or_tokenize(tokenizer, split.texts, max_length, cache_dir)
        self.labels = torch.tensor(split.labels, dtype=torch.long)
        self.pad_token_id = tokenizer.pad_token_id

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return self.ids[index], int(self.labels[index])

    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: list[int]) -> "TokenizedSplit":
        """The texts at `indices`, in that order (fine-tuning's held-out part and the rest)."""
        part = object.__new__(TokenizedSplit)
        part.__dict__.update(self.__dict__, ids=[self.ids[i] for i in indices], labels=self.labels[indices])
        return part

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) positions -> (B, L) input_ids and attention_mask, L the longest of these texts, and (B,) labels."""
        rows = index.tolist()
        input_ids, attention_mask = pad_batch([self.ids[i] for i in rows], self.pad_token_id)
        return input_ids, attention_mask, self.labels[index.cpu()]


def token_cache_key(tokenizer, texts: list[str], max_length: int) -> str:
    """A digest of what the ids depend on: every text, the whole tokenizer (its tokenizers JSON: vocabulary,
    merges, normaliser, pre-tokeniser, post-processor, specials) and the truncation length."""
    h = hashlib.sha256()
    h.update(_tokenizer_json(tokenizer).encode())
    h.update(f"max_length {max_length}\n{len(texts)} texts\n".encode())
    for text in texts:
        encoded = text.encode()
        h.update(len(encoded).to_bytes(8, "little") + encoded)  # length-prefixed: no two splits collide
    return h.hexdigest()[:16]


def _tokenizer_json(tokenizer) -> str:
    """The tokenizer's definition, without the truncation and padding state the last call left in it."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return json.dumps(definition, sort_keys=True)


_in_memory: dict[str, list[list[int]]] = {}


def load_or_tokenize(tokenizer, texts: list[str], max_length: int = MAX_LENGTH, cache_dir: str | None = None
                     ) -> list[list[int]]:
    """tokenize_texts, done once per (texts, tokenizer, max_length): kept in memory, and on disk as
    <cache_dir>/tokens-<key>.pt when cache_dir is given (a disk that cannot take it only costs the next run the
    tokenising: the write is skipped with a notice)."""
    key = token_cache_key(tokenizer, texts, max_length)
    if key in _in_memory:
        return _in_memory[key]
    path = os.path.join(cache_dir, f"tokens-{key}.pt") if cache_dir else None
    ids = _read_tokens(path) if path else None
    if ids is None:
        ids = tokenize_texts(tokenizer, texts, max_length)
        if path:
            _write_tokens(path, ids)
    _in_memory[key] = ids
    return ids


def _read_tokens(path: str) -> list[list[int]] | None:
    """The ids of a disk copy, or None when there is none or it is damaged (then tokenised again and replaced)."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, weights_only=True)
        return [chunk.tolist() for chunk in torch.split(saved["ids"], saved["lengths"].tolist())]
    except Exception:  # truncated or foreign file: pickle, zip and key errors have no common base
        return None


def _write_tokens(path: str, ids: list[list[int]]) -> None:
    flat = torch.tensor([i for sequence in ids for i in sequence], dtype=torch.int32)
    lengths = torch.tensor([len(sequence) for sequence in ids], dtype=torch.int64)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with outputs.atomic(path) as tmp:
            torch.save({"ids": flat, "lengths": lengths}, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk or a read-only folder as RuntimeError
        print(f"note: the tokenised split is not cached on disk ({outputs.failure(e, folder)}: {path}); this run "
              f"keeps it in memory", flush=True)

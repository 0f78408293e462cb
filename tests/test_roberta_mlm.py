"""The text half's model pieces (models/roberta_mlm.py): the built-in roberta-tiny and its tokenizer, MLM masks
drawn per (seed, step, sample) as DataCollatorForLanguageModeling draws them, the MLM loss, h(x) = `<s>` on the
unmasked text, the student, the classifier built from an MLM checkpoint, and tokenising a split once."""
import json
import os

import pytest
import tokenizers
import torch
from transformers import (AutoTokenizer, DataCollatorForLanguageModeling, RobertaConfig, RobertaForMaskedLM,
                          RobertaTokenizer, ViTMAEConfig, ViTMAEForPreTraining)

import utils
from errors import UserError
from models import hub, roberta_mlm
from models.roberta_mlm import (MLMWithFeature, build_text_classifier, first_token_feature, load_mlm,
                                load_or_tokenize, load_tokenizer, mlm_loss, mlm_masks, pad_batch, special_tokens_mask,
                                text_encoder_state, token_cache_key, tokenize_texts)
from training.draws import Draws

TEXTS = ["The teacher is frozen.", "A student restarts from the initial model and learns to match it.",
         "Ünïcödé bytes, too: ∑ ≠ ∅", "x"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("roberta-tiny")


@pytest.fixture(scope="module")
def batch(tokenizer):
    return pad_batch(tokenize_texts(tokenizer, TEXTS), tokenizer.pad_token_id)  # (B, L) ids, attention mask


def _noise(shape, seed):
    return torch.rand(*shape, roberta_mlm.NOISE_PLANES, generator=torch.Generator().manual_seed(seed))


def _masks(input_ids, attention_mask, tokenizer, noise):
    return mlm_masks(input_ids, special_tokens_mask(input_ids, attention_mask, tokenizer), noise,
                     tokenizer.mask_token_id, len(tokenizer))


# ----------------------------------------------------------------------------- the tiny model and its tokenizer

def test_tiny_tokenizer_is_a_byte_vocabulary_that_round_trips_through_save_pretrained(tokenizer, tmp_path):
    ids = tokenizer("Hi ∑")["input_ids"]
    assert ids == [0, 4 + ord("H"), 4 + ord("i"), 4 + ord(" "), *(4 + b for b in "∑".encode()), 2]
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.mask_token_id) == (261, 1, 260)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert again.decode(again(text)["input_ids"], skip_special_tokens=True) == text
    assert load_tokenizer("roberta-tiny").backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_v4_tokenizer_keywords_encode_a_sentence_as_specials_only_and_are_refused(tokenizer, tmp_path):
    """transformers 5 ignores `vocab_file=` / `merges_file=`: such a tokenizer trains on `<s></s>` only."""
    tokenizer.save_pretrained(tmp_path / "real")
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "a", "b", "Ġ", "Ġb", "<mask>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ b\n")
    v4 = RobertaTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    ids = v4("a b")["input_ids"]
    assert set(ids) <= set(v4.all_special_ids), ids  # the pitfall itself: no real token at all
    with pytest.raises(UserError, match="special tokens only"):
        roberta_mlm.check_tokenizer(v4, "v4")
    # what load_tokenizer gives from a directory is the saved tokenizer itself, real tokens included
    load_mlm("roberta-tiny").save_pretrained(tmp_path / "real")
    loaded = load_tokenizer(str(tmp_path / "real"))
    assert loaded("a b")["input_ids"] == tokenizer("a b")["input_ids"] == [0, 4 + 97, 4 + 32, 4 + 98, 2]


def test_tiny_mlm_is_transformers_roberta_init_under_a_fixed_seed():
    torch.manual_seed(123)  # a state no load can leave behind
    before = torch.random.get_rng_state()
    model = load_mlm("roberta-tiny")
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is left alone
    torch.manual_seed(roberta_mlm.TINY_INIT_SEED)
    reference = RobertaForMaskedLM(model.config)
    again = load_mlm("roberta-tiny")
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
        assert torch.equal(value, again.state_dict()[key]), key
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight  # tied, as RoBERTa
    assert model.config.attention_probs_dropout_prob == 0.0 and model.config.hidden_dropout_prob == 0.1
    assert 0.015 < model.roberta.embeddings.word_embeddings.weight.std() < 0.025  # N(0, 0.02) init


def test_model_names_resolve_to_their_modality_and_refuse_the_other_one(tmp_path, tokenizer):
    assert hub.modality("roberta-tiny") == "text" and hub.modality("vit-mae-tiny") == "image"
    load_mlm("roberta-tiny").save_pretrained(tmp_path / "text")
    torch.manual_seed(0)
    ViTMAEForPreTraining(ViTMAEConfig(**hub.TINY_CONFIG)).save_pretrained(tmp_path / "image")
    assert hub.modality(str(tmp_path / "text")) == "text" and hub.modality(str(tmp_path / "image")) == "image"
    assert isinstance(load_mlm(str(tmp_path / "text")), RobertaForMaskedLM)
    with pytest.raises(UserError, match="holds a 'vit_mae' model; a RoBERTa model"):
        load_mlm(str(tmp_path / "image"))
    with pytest.raises(UserError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path / "text"))
    with pytest.raises(UserError, match="is not a model directory"):
        load_tokenizer(str(tmp_path / "missing/"))
    for load in (load_mlm, load_tokenizer, hub.modality):  # the Hub is offline in the tests (conftest)
        with pytest.raises(UserError, match="hf download owner/roberta-x --local-dir DIR"):
            load("owner/roberta-x")


# ----------------------------------------------------------------------------- MLM masks

def test_mlm_masks_equal_the_library_collator_given_the_same_draws(tokenizer, monkeypatch):
    """DataCollatorForLanguageModeling (pads, finds the specials, masks) with its three Bernoulli draws and its
    random tokens supplied from the same noise gives exactly our masked ids and labels."""
    examples = [{"input_ids": ids} for ids in tokenize_texts(tokenizer, [t * k for k in (1, 4) for t in TEXTS])]
    input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], tokenizer.pad_token_id)
    noise = _noise(input_ids.shape, seed=3)
    ours = _masks(input_ids, attention_mask, tokenizer, noise)

    planes = iter(range(3))
    monkeypatch.setattr(torch, "bernoulli", lambda probs, generator=None: (noise[..., next(planes)] < probs).float())
    monkeypatch.setattr(torch, "randint", lambda high, size, dtype=None, generator=None:
                        (noise[..., 3] * high).long().clamp(max=high - 1))
    collated = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=None)(examples)
    assert next(planes, None) is None  # the collator drew exactly the three Bernoulli planes
    assert torch.equal(collated["input_ids"], ours[0]) and torch.equal(collated["labels"], ours[1])
    selected = ours[1] != -100
    is_mask, kept = ours[0] == tokenizer.mask_token_id, ours[0] == input_ids
    assert min((selected & is_mask).sum(), (selected & ~is_mask & ~kept).sum(), (selected & kept).sum()) >= 5


def test_mlm_masks_select_15_percent_of_real_tokens_never_specials_or_padding_and_split_80_10_10(tokenizer):
    texts = [t * k for k in (1, 3, 7) for t in TEXTS] * 4
    input_ids, attention_mask = pad_batch(tokenize_texts(tokenizer, texts), tokenizer.pad_token_id)
    special = special_tokens_mask(input_ids, attention_mask, tokenizer)
    assert special[:, 0].all() and (special == (attention_mask == 0)).sum() < special.numel()
    counts = torch.zeros(4)  # selected, <mask>, another token, kept
    real = 0
    for seed in range(40):
        masked, labels = _masks(input_ids, attention_mask, tokenizer, _noise(input_ids.shape, seed))
        selected = labels != -100
        assert not (selected & special).any() and torch.equal(masked[special], input_ids[special])
        assert torch.equal(labels[selected], input_ids[selected])
        assert torch.equal(masked[~selected], input_ids[~selected])
        is_mask = masked == tokenizer.mask_token_id
        counts += torch.tensor([selected.sum(), (selected & is_mask).sum(),
                                (selected & ~is_mask & (masked != input_ids)).sum(),
                                (selected & (masked == input_ids)).sum()], dtype=torch.float)
        real += (~special).sum().item()
    rate, (mask, other, kept) = counts[0] / real, (counts[1:] / counts[0]).tolist()
    assert abs(rate - 0.15) < 0.005, rate  # ~37k real tokens a draw x 40 draws: std ~0.0003
    assert abs(mask - 0.8) < 0.01 and abs(other - 0.1 * 259 / 261) < 0.01 and abs(kept - 0.1 - 0.1 / 261) < 0.01


def test_mlm_masks_are_a_function_of_seed_step_and_sample_not_of_processes_or_padding(tokenizer):
    """The stage draws (B, max_length, 4) noise from Draws (one row per sample of the global batch) and keeps the
    batch's columns: 1 process and 2 take the same masks, and padding a batch longer changes none."""
    max_length, seed, step = 64, 7, 5
    input_ids, attention_mask = pad_batch(tokenize_texts(tokenizer, TEXTS, max_length - 9), tokenizer.pad_token_id)

    def masks(rank, world, rows, extra_padding=0):
        draws = Draws(seed, len(TEXTS), steps=10, rank=rank, world=world, device=torch.device("cpu"))
        ids = torch.nn.functional.pad(input_ids[rows], (0, extra_padding), value=tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(attention_mask[rows], (0, extra_padding))
        noise = draws.uniform(step, utils.STREAM_NOISE, max_length, roberta_mlm.NOISE_PLANES)[:, :ids.shape[1]]
        return _masks(ids, mask, tokenizer, noise)

    whole = masks(0, 1, slice(None))
    halves = [masks(r, 2, slice(2 * r, 2 * r + 2)) for r in (0, 1)]
    for i in (0, 1):
        assert torch.equal(torch.cat([halves[0][i], halves[1][i]]), whole[i])
    padded = masks(0, 1, slice(None), extra_padding=9)
    length = input_ids.shape[1]
    assert torch.equal(padded[1][:, :length], whole[1]) and (padded[1][:, length:] == -100).all()
    assert not torch.equal(masks(0, 1, slice(None))[1], _masks(input_ids, attention_mask, tokenizer,
                                                              _noise(input_ids.shape, 0))[1])


# ----------------------------------------------------------------------------- the loss and the feature

def test_mlm_loss_is_the_library_loss_and_sums_over_processes_with_the_global_count(tokenizer, batch):
    model = load_mlm("roberta-tiny").eval()
    input_ids, attention_mask = batch
    masked, labels = _masks(input_ids, attention_mask, tokenizer, _noise(input_ids.shape, 1))
    loss = mlm_loss(model, masked, attention_mask, labels)
    library = model(input_ids=masked, attention_mask=attention_mask, labels=labels).loss
    assert torch.allclose(loss, library, atol=1e-6), (loss, library)
    # two processes with unequal counts of selected tokens: their means average to another number, but each
    # normalised by the global count they add up to the whole batch's loss
    count = (labels != -100).sum()
    parts = [mlm_loss(model, masked[rows], attention_mask[rows], labels[rows], num_masked=count)
             for rows in (slice(0, 1), slice(1, None))]
    assert torch.allclose(parts[0] + parts[1], loss, atol=1e-6)
    none = mlm_loss(model, masked, attention_mask, torch.full_like(labels, -100))
    assert none.item() == 0.0  # a process whose rows drew no token adds nothing, and no NaN


def test_first_token_feature_is_unchanged_by_extra_padding(batch):
    encoder = load_mlm("roberta-tiny").eval().roberta
    input_ids, attention_mask = batch
    h = first_token_feature(encoder, input_ids, attention_mask)
    padded_ids = torch.nn.functional.pad(input_ids, (0, 11), value=1)
    h_padded = first_token_feature(encoder, padded_ids, torch.nn.functional.pad(attention_mask, (0, 11)))
    assert h.shape == (len(TEXTS), 64) and torch.allclose(h, h_padded, atol=1e-5)
    assert torch.equal(h, encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


def test_student_gives_the_mlm_loss_and_h_of_the_unmasked_text(tokenizer, batch):
    model = load_mlm("roberta-tiny").eval()
    input_ids, attention_mask = batch
    masked, labels = _masks(input_ids, attention_mask, tokenizer, _noise(input_ids.shape, 2))
    loss, h = MLMWithFeature(model)(masked, labels, input_ids, attention_mask)
    assert torch.equal(loss, mlm_loss(model, masked, attention_mask, labels))
    assert torch.equal(h, first_token_feature(model.roberta, input_ids, attention_mask))
    assert not torch.allclose(h, first_token_feature(model.roberta, masked, attention_mask), atol=1e-4)


def test_distillation_gradient_reaches_the_encoder_and_not_the_lm_head(tokenizer, batch):
    model = load_mlm("roberta-tiny")
    input_ids, attention_mask = batch
    masked, labels = _masks(input_ids, attention_mask, tokenizer, _noise(input_ids.shape, 2))
    _, h = MLMWithFeature(model)(masked, labels, input_ids, attention_mask)
    (h ** 2).sum().backward()  # the distillation term alone
    encoder_params = {id(p) for p in model.roberta.parameters()}
    head_only = [(n, p) for n, p in model.lm_head.named_parameters() if id(p) not in encoder_params]
    assert {n for n, _ in head_only} == {"bias", "dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"}
    assert all(p.grad is None or not p.grad.any() for _, p in head_only)
    assert all(p.grad is not None and p.grad.any() for p in model.roberta.encoder.layer[-1].parameters())


# ----------------------------------------------------------------------------- fine-tuning

def test_text_classifier_takes_every_encoder_tensor_and_only_the_head_is_new(batch):
    mlm = load_mlm("roberta-tiny")
    torch.manual_seed(1)
    for p in mlm.parameters():  # a trained-looking encoder, so taking it is visible
        p.data.add_(torch.randn_like(p) * 0.1)
    classifier = build_text_classifier(mlm.config, text_encoder_state(mlm), num_classes=5)
    for key, value in text_encoder_state(mlm).items():
        assert torch.equal(classifier.roberta.state_dict()[key], value), key
    assert classifier.config.num_labels == 5 and classifier.classifier.out_proj.out_features == 5
    assert classifier.classifier.dropout.p == 0.1 and classifier.config.attention_probs_dropout_prob == 0.0
    other = build_text_classifier(mlm.config, text_encoder_state(mlm), num_classes=5, dropout=0.3)
    dropout = {n: m.p for n, m in other.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {p for n, p in dropout.items() if not n.endswith("attention.self.dropout")} == {0.3}
    assert {p for n, p in dropout.items() if n.endswith("attention.self.dropout")} == {0.0}  # only its p is read
    base_like = RobertaConfig(**{**mlm.config.to_dict(), "attention_probs_dropout_prob": 0.1})  # roberta-base's
    assert build_text_classifier(base_like, text_encoder_state(mlm), 5).config.attention_probs_dropout_prob == 0.0
    logits = classifier.eval()(input_ids=batch[0], attention_mask=batch[1]).logits
    assert logits.shape == (len(TEXTS), 5)
    broken = dict(text_encoder_state(mlm))
    del broken["encoder.layer.0.output.dense.bias"]
    with pytest.raises(UserError, match="missing"):
        build_text_classifier(mlm.config, broken, num_classes=5)


# ----------------------------------------------------------------------------- tokenising a split once

def test_tokenising_truncates_keeps_the_specials_and_pads_per_batch(tokenizer):
    ids = tokenize_texts(tokenizer, TEXTS, max_length=16)
    assert max(len(s) for s in ids) == 16 and all(s[0] == 0 and s[-1] == 2 for s in ids)
    assert len(tokenize_texts(tokenizer, [TEXTS[1] * 20])[0]) == roberta_mlm.MAX_LENGTH == 512
    input_ids, attention_mask = pad_batch(ids[2:], tokenizer.pad_token_id)
    assert input_ids.shape == (2, 16) and attention_mask.sum(1).tolist() == [len(ids[2]), len(ids[3])]
    assert (input_ids[attention_mask == 0] == tokenizer.pad_token_id).all()
    short = pad_batch(ids[3:], tokenizer.pad_token_id)[0]
    assert short.shape == (1, len(ids[3])) and short[0].tolist() == ids[3]


def test_tokenised_split_is_cached_by_texts_tokenizer_and_length(tokenizer, tmp_path, monkeypatch):
    tokenize_texts(tokenizer, TEXTS, 7)  # leaves truncation state in the tokenizer: not part of what it is
    key = token_cache_key(tokenizer, TEXTS, 16)
    assert key == token_cache_key(load_tokenizer("roberta-tiny"), list(TEXTS), 16)
    other = tokenizer.backend_tokenizer.to_str().replace('"<unk>"', '"<UNK>"')
    assert len({key, token_cache_key(tokenizer, TEXTS[:3], 16), token_cache_key(tokenizer, TEXTS, 17),
                token_cache_key(tokenizer, [TEXTS[0] + "!", *TEXTS[1:]], 16),
                token_cache_key(tokenizer, [TEXTS[0] + TEXTS[1][:2], TEXTS[1][2:], *TEXTS[2:]], 16)}) == 5
    changed = RobertaTokenizer(tokenizer_object=tokenizers.Tokenizer.from_str(other))
    assert token_cache_key(changed, TEXTS, 16) != key

    expected = tokenize_texts(tokenizer, TEXTS, 16)
    monkeypatch.setattr(roberta_mlm, "_in_memory", {})
    assert load_or_tokenize(tokenizer, TEXTS, 16, str(tmp_path)) == expected
    path = tmp_path / f"tokens-{key}.pt"
    assert path.is_file() and os.listdir(tmp_path) == [path.name]

    def refuse(*_):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(roberta_mlm, "tokenize_texts", refuse)
    assert load_or_tokenize(tokenizer, TEXTS, 16, str(tmp_path)) == expected  # from memory
    monkeypatch.setattr(roberta_mlm, "_in_memory", {})
    assert load_or_tokenize(tokenizer, TEXTS, 16, str(tmp_path)) == expected  # from disk

    path.write_bytes(b"damaged")
    monkeypatch.setattr(roberta_mlm, "_in_memory", {})
    monkeypatch.setattr(roberta_mlm, "tokenize_texts", tokenize_texts)
    assert load_or_tokenize(tokenizer, TEXTS, 16, str(tmp_path)) == expected  # tokenised again, file replaced
    monkeypatch.setattr(roberta_mlm, "_in_memory", {})
    monkeypatch.setattr(roberta_mlm, "tokenize_texts", refuse)
    assert load_or_tokenize(tokenizer, TEXTS, 16, str(tmp_path)) == expected

"""Model cards of text runs (RoBERTa, masked language modelling): the card says what the text stages did, with
the record's numbers, loads the model the way the saved directory allows, and never describes a ViT-MAE. The
records are made here in the shape a text run writes (preprocessing null, RoBERTa's optimizer), so these tests
need no text training; the image cards are tests/test_sharing.py's."""
import json
import os
import re
import socket
import statistics

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

import training
from models.roberta_mlm import build_text_classifier, first_token_feature, load_mlm, text_encoder_state, tiny_tokenizer
from outputs import card as cards
from training.record import SCHEMA_VERSION, START_FIELDS, VERSION_KEY

DATASET = "chemprot"
INIT = "self-further-pretrain-4"
LABELS = ["ACTIVATOR", "INHIBITOR", "SUBSTRATE"]
# what a fine-tuning seed reports: (macro-F1, micro-F1, accuracy, test loss)
SCORES = {1: (0.5125, 0.625, 0.625, 0.9731), 2: (0.4375, 0.5875, 0.5875, 1.0412)}
SCRIPTS = {"further-pretrain": "pretrain.py", "self-distill": "selftrain.py", "finetune": "finetune.py"}
IMAGE_WORDS = ("image", "vit", "mae", "patch", "norm_pix", "flip", "pixel")


def _record(stage: str, model_name: str = "roberta-tiny", **args) -> dict:
    """A run record (args.json) as a text start writes it: no preprocessing, RoBERTa's betas and epsilon."""
    args = {"dataset": DATASET, "model_name": model_name, "steps": 4, "batch_size": 16, "lr": 1e-4,
            "warmup_steps": 0, "weight_decay": 0.01, "mask_ratio": 0.15, "max_length": 128, "seed": 0,
            "clip_grad": None, "precision": "auto", "checkpoint_dir": "ckpt", "data_dir": "data", **args}
    start = {"stage": stage, "args": args, "command": [SCRIPTS[stage], "--dataset", DATASET, "--model_name", model_name],
             "git_commit": "0123abc", "versions": {}, "device": "cpu", "device_type": "cpu", "host": "h",
             "world_size": 1, "precision": "fp32", "threads": 1, "preprocessing": None,
             "optimizer": {"betas": [0.9, 0.98], "eps": 1e-6, "no_weight_decay": "no weight decay on biases and "
                                                                                  "LayerNorm weights."},
             "inputs": {}, "started": "2026-12-07T01:00:00", "job": None}
    assert set(start) == set(START_FIELDS)  # the shape training.record reads
    return {VERSION_KEY: SCHEMA_VERSION, **start, "history": [{**start, "start_step": 0}]}


def _write(path, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _stage_dir(root, stage: str, losses: list[dict], model_name: str = "roberta-tiny", **args) -> str:
    out = os.path.join(root, "ckpt", ("further-pretrain-4" if stage == "further-pretrain" else INIT), DATASET)
    _write(os.path.join(out, training.RECORD_FILE), _record(stage, model_name, **args))
    with open(os.path.join(out, training.METRICS_FILE), "w") as f:
        f.writelines(json.dumps({"step": step, **terms}) + "\n" for step, terms in enumerate(losses, start=1))
    return out


def _result(seed: int) -> dict:
    macro, micro, acc, loss = SCORES[seed]
    return {"modality": "text", "test_acc": acc, "test_loss": loss, "test_macro_f1": macro, "test_micro_f1": micro,
            "dataset": DATASET, "init": INIT, "seed": seed, "checkpoint": "ckpt/" + INIT + "/" + DATASET,
            "num_test": 80, "num_train": 400}


def _classifier_run(root, seed: int) -> tuple[str, dict]:
    """results/<dataset>/<init>/seed<k>/ with its record and model/, and the result file seed<k>.json beside it."""
    run_dir = os.path.join(root, "results", DATASET, INIT, f"seed{seed}")
    record = _record("finetune", seed=seed, ckpt_name=INIT, dropout=0.1, clip_grad=1.0, lr=2e-5, batch_size=16,
                     weight_decay=0.1)
    _write(os.path.join(run_dir, training.RECORD_FILE), record)
    _write(run_dir + ".json", {**_result(seed), **record})
    os.makedirs(os.path.join(run_dir, "model"), exist_ok=True)
    return os.path.join(run_dir, "model"), _result(seed)


@pytest.fixture
def text_runs(tmp_path):
    root = str(tmp_path)
    teacher = _stage_dir(root, "further-pretrain", [{"mlm_loss": 5.61}, {"mlm_loss": 5.2}, {"mlm_loss": 4.93}])
    student = _stage_dir(root, "self-distill", [{"mlm_loss": 5.5, "distill_loss": 0.0}, {"mlm_loss": 4.8,
                                                                                           "distill_loss": 0.012}],
                         distill_weight=1.0, teacher=teacher)
    seed1, _ = _classifier_run(root, 1)
    seed2, _ = _classifier_run(root, 2)
    return {"root": root, "teacher": teacher, "student": student, "seed1": seed1, "seed2": seed2}


def _no_image_wording(text: str) -> None:
    words = text.lower()
    assert not [w for w in IMAGE_WORDS if w in words], [w for w in IMAGE_WORDS if w in words]


def _code(text: str, containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if containing in b)


# ----------------------------------------------------------------------------- the MLM stages

def test_the_mlm_stages_cards_describe_masked_language_modelling(text_runs):
    """As a stage writes it: before the weights, so the directory has no config.json yet."""
    for name, stage_tag in (("teacher", "further-pretraining"), ("student", "self-distillation")):
        card = ModelCard(cards.model_card(text_runs[name]))
        assert card.data.pipeline_tag == "fill-mask" and card.data.library_name == "transformers"
        assert card.data.tags == ["text", "roberta", "masked-language-modeling", stage_tag]
        assert card.data.base_model is None and card.data.datasets == [DATASET]  # roberta-tiny is no Hub model
        text = card.text
        assert "RoBERTa" in text.split("\n")[1]  # the title
        assert "`RobertaForMaskedLM`" in text and "with the tokenizer" in text
        assert f"continued on the training texts of `{DATASET}`" in text or name == "student"
        assert ("MLM with 15 % of the tokens selected (not <s>, </s> or padding), of which 80 % become `<mask>`, "
                "10 % a random token and 10 % stay as they are") in text
        assert "texts truncated at 128 tokens" in text
        assert "AdamW β = (0.9, 0.98), ε = 1e-06, learning rate 0.0001" in text
        assert "`roberta-tiny` (this repository's small RoBERTa for CPU runs" in text
        assert "The MLM stages have no test metric" in text
        assert "from transformers import AutoTokenizer, pipeline" in text and 'pipeline("fill-mask"' in text
        assert "AutoModelForMaskedLM.from_pretrained(model_id)" in text
        assert "check the terms at https://github.com/allenai/dont-stop-pretraining" in text
        assert "- θ₀ `roberta-tiny`: initialised by this repository's code (its licence)" in text
        assert cards.BIBTEX in text
        _no_image_wording(text)
    teacher = ModelCard(cards.model_card(text_runs["teacher"])).text
    assert "masked language modelling of θ₀ = `roberta-tiny`" in teacher
    assert "| step | mlm_loss |" in teacher and "| 1 | 5.6100 |" in teacher and "| 3 | 4.9300 |" in teacher
    student = ModelCard(cards.model_card(text_runs["student"])).text
    assert "L = L_MLM + λ · (1/B) Σᵢ ‖h_S(xᵢ) − h_T(xᵢ)‖², λ = 1.0" in student
    assert "`<s>` token of the last encoder layer on the unmasked text" in student
    assert f"the further pre-trained model `{text_runs['teacher']}`, frozen" in student
    assert "| step | mlm_loss | distill_loss |" in student and "| 2 | 4.8000 | 0.0120 |" in student


def test_a_hub_roberta_is_told_from_the_record_alone_without_the_network(tmp_path, monkeypatch):
    """roberta-base (the text recipe's default, a Hub id without an owner): the record's missing preprocessing says
    text; nothing is downloaded or asked."""
    def no_network(*a, **kw):
        raise AssertionError("the card asked the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    out = _stage_dir(str(tmp_path), "further-pretrain", [{"mlm_loss": 2.0}], model_name="roberta-base")
    card = ModelCard(cards.model_card(out, repo_id="me/chemprot-teacher"))
    assert card.data.pipeline_tag == "fill-mask" and card.data.base_model == "roberta-base"
    assert "masked language modelling of θ₀ = [`roberta-base`](https://huggingface.co/roberta-base)" in card.text
    assert "- θ₀ `roberta-base`: check the terms at https://huggingface.co/roberta-base" in card.text
    assert "model_id = 'me/chemprot-teacher'" in card.text
    _no_image_wording(card.text)


def test_card_modality_reads_the_names_the_saved_config_the_result_and_the_record(tmp_path):
    text, image = _record("further-pretrain", "roberta-base"), _record("further-pretrain", "facebook/vit-mae-base")
    image["preprocessing"] = {"size": 224, "resample": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "source": "x"}
    old = {**_record("further-pretrain", "facebook/vit-mae-base"), "inputs": None}  # version 1: neither recorded
    empty = str(tmp_path)
    assert cards.card_modality(empty, text) == "text"
    assert cards.card_modality(empty, image) == "image"
    assert cards.card_modality(empty, old) == "image"
    assert cards.card_modality(empty, _record("further-pretrain", "vit-mae-tiny")) == "image"
    assert cards.card_modality(empty, {**image, "args": {"model_name": "roberta-tiny"}}) == "text"
    assert cards.card_modality(empty, old, {"modality": "text"}) == "text"
    _write(os.path.join(empty, "config.json"), {"model_type": "roberta"})
    assert cards.card_modality(empty, image) == "text"  # what the directory holds wins over the record
    _write(os.path.join(empty, "config.json"), {"model_type": "vit"})
    assert cards.card_modality(empty, text) == "image"


# ----------------------------------------------------------------------------- the classifier

def test_a_text_classifiers_card_lists_macro_micro_f1_and_accuracy_per_seed_with_mean_and_std(text_runs):
    card = ModelCard(cards.model_card(text_runs["seed2"]))
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.tags == ["text", "text-classification", "roberta", "self-distillation"]
    assert card.data.model_name == f"{DATASET}-{INIT}-seed2"
    scored = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert scored == {("f1", "macro"): 0.4375, ("f1", "micro"): 0.5875, ("accuracy", None): 0.5875}
    assert all(r.task_type == "text-classification" and r.dataset_split == "test" for r in card.data.eval_results)
    text = card.text
    assert text.split("\n")[1] == f"# `{DATASET}` classifier: RoBERTa fine-tuned from {INIT}, seed 2"
    assert "(80 texts)" in text and "`RobertaForSequenceClassification`" in text
    assert "AdamW β = (0.9, 0.98), ε = 1e-06, learning rate 2e-05" in text
    assert "| 1 | 51.25 | 62.50 | 62.50 | 0.9731 |" in text
    assert "| 2 (this model) | 43.75 | 58.75 | 58.75 | 1.0412 |" in text
    means = []
    for i, name in enumerate(("macro-F1", "micro-F1", "accuracy")):
        values = [100 * SCORES[s][i] for s in (1, 2)]
        means.append(f"{name} **{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} %**")
    assert f"Mean ± sample std over 2 seeds: {', '.join(means)}." in text
    assert "truncation=True, max_length=128" in _code(text, 'pipeline("text-classification"')  # as training cut
    _no_image_wording(text)


def test_a_text_classifier_given_its_result_before_the_file_exists_lists_only_itself(text_runs):
    """finetune.py writes the card before the result file: seed 1's card when seed 1 is the only run."""
    os.remove(os.path.dirname(text_runs["seed2"]) + ".json")
    run_dir = os.path.dirname(text_runs["seed1"])
    os.remove(run_dir + ".json")
    text = cards.model_card(text_runs["seed1"], _result(1))
    assert "Mean over 1 seed: macro-F1 **51.25 %**, micro-F1 **62.50 %**, accuracy **62.50 %**." in text
    assert "| 2 " not in text


# ----------------------------------------------------------------------------- the snippets load what was saved

def test_the_mlm_cards_snippets_run_on_the_saved_model(text_runs, capsys):
    out = text_runs["student"]
    mlm, tokenizer = load_mlm("roberta-tiny").eval(), tiny_tokenizer()
    mlm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    text = cards.model_card(out)  # now config.json is there too
    assert ModelCard(text).data.pipeline_tag == "fill-mask"
    namespace = {}
    exec(_code(text, 'pipeline("fill-mask"'), namespace)
    assert "token_str" in capsys.readouterr().out  # the pipeline's predictions for <mask>
    namespace = {}
    exec(_code(text, "AutoModel.from_pretrained"), namespace)
    ids = AutoTokenizer.from_pretrained(out)("A sentence to embed.", truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = first_token_feature(mlm.roberta, ids["input_ids"], ids["attention_mask"])
    torch.testing.assert_close(namespace["features"], expected)


def test_the_classifiers_snippet_gives_the_saved_models_prediction(text_runs, capsys):
    out = text_runs["seed2"]
    torch.manual_seed(0)
    mlm = load_mlm("roberta-tiny")
    model = build_text_classifier(mlm.config, text_encoder_state(mlm), len(LABELS)).eval()
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {name: i for i, name in enumerate(LABELS)}
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    text = cards.model_card(out)
    namespace = {}
    exec(_code(text, 'pipeline("text-classification"'), namespace)
    printed = capsys.readouterr().out
    ids = tiny_tokenizer()("A sentence to classify.", truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        expected = LABELS[int(model(**ids).logits.argmax())]
    assert f"'label': '{expected}'" in printed

"""The three stages on text (RoBERTa + MLM), end to end through their main(): against a plain transformers loop
written here (RobertaForMaskedLM with DataCollatorForLanguageModeling's masks, the MLM loss of the model itself,
torch's AdamW, transformers' linear schedule), the text recipe's defaults and the refusals of mixed modalities."""
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoTokenizer, DataCollatorForLanguageModeling, RobertaConfig, RobertaForMaskedLM,
                          RobertaForSequenceClassification, get_linear_schedule_with_warmup)

import finetune
import pretrain
import selftrain
import utils
from errors import UserError
from helpers import read_json, text_dataset
from models.hub import TEXT_TINY_CONFIG
from models.roberta_mlm import tiny_tokenizer
from training.draws import Draws

SEED, STEPS, BATCH, LR, MAX_LENGTH = 3, 4, 8, 1e-3, 24
RUN = ["--device", "cpu", "--workers", "0", "--log_every", "1", "--seed", str(SEED), "--steps", str(STEPS),
       "--batch_size", str(BATCH), "--lr", str(LR), "--max_length", str(MAX_LENGTH), "--precision", "fp32"]


def _model_dir(path, init_seed: int) -> str:
    """A RoBERTa θ₀ directory (the tiny config, dropout off, so the reference loop draws no dropout masks) with the
    tiny tokenizer: what a user's `--model_name DIR` holds."""
    torch.manual_seed(init_seed)
    config = RobertaConfig(**{**TEXT_TINY_CONFIG, "hidden_dropout_prob": 0.0})
    RobertaForMaskedLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    data_dir = root / "data"
    name = text_dataset(data_dir)
    return {"root": root, "data_dir": str(data_dir), "dataset": name,
            "theta0": _model_dir(root / "theta0", 0), "teacher": _model_dir(root / "teacher", 1)}


def _args(script, setup, *extra):
    argv = ["--dataset", setup["dataset"], "--data_dir", setup["data_dir"], "--model_name", setup["theta0"], *RUN,
            "--checkpoint_dir", str(setup["root"] / "ck"), *extra]
    return script.get_args_parser().parse_args(argv)


def _texts(setup, split="train"):
    import json
    with open(os.path.join(setup["data_dir"], setup["dataset"], f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _collate(tokenizer, examples, noise, monkeypatch, mlm_probability=0.15):
    """DataCollatorForLanguageModeling on `examples`, its three Bernoulli draws and its random tokens taken from
    `noise` (B, max_length, 4): the draws the stage makes for the step."""
    planes = iter(range(3))
    with monkeypatch.context() as m:
        m.setattr(torch, "bernoulli", lambda p, generator=None: (noise[:, :p.shape[1], next(planes)] < p).float())
        m.setattr(torch, "randint", lambda high, size, dtype=None, generator=None:
                  (noise[:, :size[1], 3] * high).long().clamp(max=high - 1))
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=None)(examples)


def _optimizer(model, weight_decay):
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.98), eps=1e-6)
    return optimizer, get_linear_schedule_with_warmup(optimizer, round(0.06 * STEPS), STEPS)


def reference_mlm(setup, monkeypatch, teacher_dir=None, mlm_probability=0.15):
    """Stage 1 (teacher_dir None) or stage 2 as a plain transformers loop: the model's own MLM loss on the collator's
    masks, plus for stage 2 ‖h_S(x) − h_T(x)‖² of the `<s>` token of the last layer on the unmasked text."""
    tokenizer = AutoTokenizer.from_pretrained(setup["theta0"])
    model = RobertaForMaskedLM.from_pretrained(setup["theta0"]).train()
    teacher = RobertaForMaskedLM.from_pretrained(teacher_dir).eval() if teacher_dir else None
    ids = tokenizer([t["text"] for t in _texts(setup)], truncation=True, max_length=MAX_LENGTH)["input_ids"]
    optimizer, schedule = _optimizer(model, 0.01)
    draws = Draws(SEED, BATCH, STEPS, 0, 1, torch.device("cpu"))  # the data order and noise the stage draws
    for step in range(STEPS):
        examples = [{"input_ids": ids[i]} for i in draws.indices(len(ids), step).tolist()]
        batch = _collate(tokenizer, examples, draws.uniform(step, utils.STREAM_NOISE, MAX_LENGTH, 4), monkeypatch,
                         mlm_probability)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        if teacher is not None:
            plain = tokenizer.pad(examples, return_tensors="pt")
            h_s = model.roberta(**plain).last_hidden_state[:, 0]
            with torch.no_grad():
                h_t = teacher.roberta(**plain).last_hidden_state[:, 0]
            loss = loss + (h_s - h_t).pow(2).sum(-1).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model.state_dict()


def _assert_same(ours: dict, reference: dict, atol=2e-5):
    assert set(ours) <= set(reference), set(ours) - set(reference)
    worst = max((ours[k] - reference[k]).abs().max().item() for k in ours)
    assert worst < atol, worst


@pytest.mark.parametrize("mask_ratio", [None, 0.3], ids=["default", "given"])
def test_further_pretraining_on_text_is_a_plain_transformers_mlm_loop(setup, monkeypatch, tmp_path, mask_ratio):
    """The text default (15 %) and a --mask_ratio given, each against the collator at that rate."""
    given = [] if mask_ratio is None else ["--mask_ratio", str(mask_ratio)]
    pretrain.main(_args(pretrain, setup, *given, "--output_dir", str(tmp_path / "run")))
    ours = load_file(os.path.join(tmp_path, "run", "model.safetensors"))
    reference = reference_mlm(setup, monkeypatch, mlm_probability=mask_ratio or 0.15)
    start = RobertaForMaskedLM.from_pretrained(setup["theta0"]).state_dict()
    assert max((ours[k] - start[k]).abs().max().item() for k in ours) > 1e-3  # it trained
    _assert_same(ours, reference)


def test_self_distillation_on_text_is_mlm_plus_matching_the_teachers_first_token(setup, monkeypatch):
    args = _args(selftrain, setup, "--teacher", setup["teacher"])
    selftrain.main(args)
    ours = load_file(os.path.join(setup["root"], "ck", f"self-further-pretrain-{STEPS}", setup["dataset"],
                                  "model.safetensors"))
    _assert_same(ours, reference_mlm(setup, monkeypatch, teacher_dir=setup["teacher"]))
    without = reference_mlm(setup, monkeypatch)  # the distillation term moved the encoder
    assert max((ours[k] - without[k]).abs().max().item() for k in ours) > 1e-4


def reference_classifier(setup, dropout=0.0):
    """Fine-tuning as a plain transformers loop: RoBERTa's classifier, its head transformers' init under the seed
    mix_seed(seed, STREAM_HEAD), the encoder θ₀'s; cross-entropy; eval: accuracy and macro-F1 on the test split."""
    tokenizer = AutoTokenizer.from_pretrained(setup["theta0"])
    config = RobertaConfig.from_pretrained(setup["theta0"], num_labels=2, hidden_dropout_prob=dropout,
                                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(utils.mix_seed(SEED, utils.STREAM_HEAD))
    model = RobertaForSequenceClassification(config)
    model.roberta.load_state_dict(RobertaForMaskedLM.from_pretrained(setup["theta0"]).roberta.state_dict())
    model.train()
    rows = _texts(setup)
    ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)["input_ids"]
    labels = torch.tensor([r["label"] for r in rows])
    optimizer, schedule = _optimizer(model, 0.1)
    draws = Draws(SEED, BATCH, STEPS, 0, 1, torch.device("cpu"))
    for step in range(STEPS):
        index = draws.indices(len(ids), step)
        batch = tokenizer.pad([{"input_ids": ids[i]} for i in index.tolist()], return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    test = _texts(setup, "test")
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in test], truncation=True, max_length=MAX_LENGTH, padding=True,
                          return_tensors="pt")
        guess = model(**batch).logits.argmax(-1)
    truth = torch.tensor([r["label"] for r in test])
    f1 = [2 * ((guess == c) & (truth == c)).sum().item() / ((guess == c).sum() + (truth == c).sum()).item()
          for c in (0, 1) if ((guess == c) | (truth == c)).any()]
    return model.state_dict(), (guess == truth).float().mean().item(), sum(f1) / len(f1)


def test_text_fine_tuning_is_robertas_classifier_in_a_plain_loop(setup, tmp_path):
    args = _args(finetune, setup, "--scratch", "True", "--dropout", "0", "--results_dir", str(tmp_path),
                 "--save_model")
    finetune.main(args)
    result = read_json(tmp_path / setup["dataset"] / "initial" / f"seed{SEED}.json")
    reference, acc, macro_f1 = reference_classifier(setup)
    ours = load_file(os.path.join(result["model"], "model.safetensors"))
    _assert_same(ours, reference)
    assert result["modality"] == "text" and result["test_acc"] == pytest.approx(acc)
    assert result["test_micro_f1"] == pytest.approx(acc) and result["test_macro_f1"] == pytest.approx(macro_f1)
    assert (result["args"]["weight_decay"], result["args"]["clip_grad"]) == (0.1, 1.0)

    from transformers import pipeline
    classify = pipeline("text-classification", model=result["model"], device="cpu")
    test = _texts(setup, "test")
    names = read_json(os.path.join(setup["data_dir"], setup["dataset"], "counts.json"))["classes"]
    guesses = classify([r["text"] for r in test])
    assert sum(g["label"] == names[r["label"]] for g, r in zip(guesses, test)) / len(test) == pytest.approx(
        result["test_acc"])


# ----------------------------------------------------------------------------- defaults and refusals

def _resolved(script, stage, argv, train_size=None):
    import text_common
    args = script.get_args_parser().parse_args(argv)
    kind = text_common.run_modality(args)
    text_common.resolve_defaults(args, kind, stage, train_size)
    return kind, args


def test_a_text_dataset_takes_the_text_recipes_defaults_and_an_image_dataset_keeps_the_papers(setup, tmp_path):
    text = ["--dataset", setup["dataset"], "--data_dir", setup["data_dir"]]
    kind, args = _resolved(pretrain, "mlm", text)
    assert kind == "text"
    assert (args.model_name, args.batch_size, args.lr, args.mask_ratio, args.steps, args.warmup_steps) == \
        ("roberta-base", 256, 1e-4, 0.15, 20000, 1200)
    assert all(type(v) in (str, int, float, bool, type(None)) for v in vars(args).values())  # plain in the record
    kind, args = _resolved(finetune, "finetune", text, train_size=48)
    assert (args.model_name, args.batch_size, args.lr, args.steps, args.warmup_steps) == \
        ("roberta-base", 16, 2e-5, 30, 2)  # 10 epochs of 48 texts at 16; 6 % warmup
    kind, args = _resolved(finetune, "finetune", [*text, "--lr", "1e-4", "--steps", "7", "--batch_size", "4"], 48)
    assert (args.lr, args.steps, args.batch_size) == (1e-4, 7, 4)  # a flag given wins
    os.makedirs(tmp_path / "imgs" / "cub")
    image = ["--dataset", "cub", "--data_dir", str(tmp_path / "imgs")]
    kind, args = _resolved(pretrain, "mlm", image)
    assert kind == "image"
    assert (args.model_name, args.batch_size, args.lr, args.mask_ratio, args.warmup_steps) == \
        ("facebook/vit-mae-base", 64, 1.5e-4, 0.75, 0)
    kind, args = _resolved(finetune, "finetune", image)
    assert (args.batch_size, args.lr, args.steps, args.warmup_steps) == (32, 1e-4, 10000, 500)


@pytest.mark.parametrize("script, extra, words", [
    (pretrain, ["--model_name", "vit-mae-tiny"], ["vit-mae-tiny is an image model", "text dataset"]),
    (finetune, ["--model_name", "roberta-tiny", "--recipe", "mae", "--scratch", "True"], ["--recipe mae", "text"]),
    (finetune, ["--model_name", "roberta-tiny", "--mixup", "0.8", "--scratch", "True"], ["--mixup 0.8"]),
    (pretrain, ["--model_name", "roberta-tiny", "--cuda_graph"], ["--cuda_graph", "text"]),
])
def test_mixing_an_image_piece_into_a_text_run_is_one_line(setup, script, extra, words):
    args = script.get_args_parser().parse_args(["--dataset", setup["dataset"], "--data_dir", setup["data_dir"],
                                                "--device", "cpu", *extra])
    with pytest.raises(UserError) as e:
        script.main(args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_text_model_on_an_image_dataset_is_one_line(tmp_path):
    from helpers import folder_dataset
    folder_dataset(tmp_path / "cubs", {"a": 2, "b": 2})
    args = pretrain.get_args_parser().parse_args(["--dataset", "cubs", "--data_dir", str(tmp_path),
                                                  "--model_name", "roberta-tiny", "--device", "cpu"])
    with pytest.raises(UserError, match="roberta-tiny is a text model but 'cubs' is an image dataset"):
        pretrain.main(args)


# ----------------------------------------------------------------------------- processes and resume

TINY_TEXT = ["--model_name", "roberta-tiny", "--device", "cpu", "--workers", "0", "--log_every", "1",
             "--max_length", "32", "--batch_size", "8", "--lr", "1e-3"]


def _stage_argv(stage, setup, tmp_path, name, steps=3):
    out = ["--output_dir", tmp_path / name]
    if stage == "selftrain.py":
        out += ["--teacher", tmp_path / "teacher"]
    if stage == "finetune.py":
        out += ["--scratch", "True", "--results_dir", tmp_path / "res"]
    return [*TINY_TEXT, "--dataset", setup["dataset"], "--data_dir", setup["data_dir"], "--steps", steps,
            "--checkpoint_dir", tmp_path / "ck", *out]


def _teacher(setup, tmp_path):
    pretrain.main(pretrain.get_args_parser().parse_args(list(map(str, [
        *TINY_TEXT, "--dataset", setup["dataset"], "--data_dir", setup["data_dir"], "--steps", "2",
        "--output_dir", tmp_path / "teacher"]))))


def _weights(folder):
    folder = os.path.join(folder, "model") if os.path.isdir(os.path.join(folder, "model")) else folder
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("stage", ["pretrain.py", "selftrain.py", "finetune.py"])
def test_two_processes_take_the_same_text_steps_as_one(stage, setup, tmp_path):
    """DDP over gloo, global batch 8 (4 a process, each padded to its own longest text, hidden dropout 0.1 drawn for
    the global batch, MLM's mean over the global batch's selected tokens) == one process with batch 8."""
    from helpers import losses, torchrun
    if stage == "selftrain.py":
        _teacher(setup, tmp_path)
    extra = ["--save_model"] if stage == "finetune.py" else []
    for nproc, name in ((1, "one"), (2, "two")):
        proc = torchrun(nproc, os.path.join(os.path.dirname(os.path.dirname(__file__)), stage),
                        [*_stage_argv(stage, setup, tmp_path, name), *extra], tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=k)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)
    if stage == "finetune.py":
        a, b = read_json(tmp_path / "one.json"), read_json(tmp_path / "two.json")
        assert b["world_size"] == 2 and a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
        assert a["test_macro_f1"] == pytest.approx(b["test_macro_f1"], abs=0.05)


@pytest.mark.parametrize("script", [pretrain, selftrain, finetune], ids=["pretrain", "selftrain", "finetune"])
def test_a_killed_text_run_resumes_bit_identically(script, setup, tmp_path):
    import training
    from helpers import Cut, cut_at, losses
    stage = script.__name__ + ".py"
    if script is selftrain:
        _teacher(setup, tmp_path)
    extra = ["--save_every", "2", "--save_model"] if script is finetune else ["--save_every", "2"]

    def args(name):
        return script.get_args_parser().parse_args(list(map(str, [*_stage_argv(stage, setup, tmp_path, name, 6),
                                                                  *extra])))
    script.main(args("whole"))
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):  # the state of step 2 is on disk
        script.main(args("resumed"))
    script.main(args("resumed"))
    assert losses(tmp_path / "whole") == losses(tmp_path / "resumed")
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_all_runs_the_text_table_and_reports_its_metric(setup, tmp_path):
    """The launcher users type, on a text dataset: the two MLM stages, fine-tuning from the three starting points,
    then the report with the text dataset's metric (macro-F1 for a dataset of one's own)."""
    from helpers import REPO, launch
    flags = f"--model_name roberta-tiny --data_dir {setup['data_dir']} --workers 0 --max_length 32"
    env = {"SEEDS": "1", "STEPS": "2", "FINETUNE_STEPS": "2", "MAE_FLAGS": "--batch_size 8",
           "FINETUNE_FLAGS": "--batch_size 8"}
    proc = launch(f"bash {REPO}/run_all.sh cpu {setup['dataset']} {flags}", tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for route in ("initial", "further-pretrain-2", "self-further-pretrain-2"):
        result = read_json(tmp_path / "results" / setup["dataset"] / route / "seed1.json")
        assert result["modality"] == "text" and result["args"]["steps"] == 2
        assert result["args"]["model_name"] == "roberta-tiny" and result["args"]["max_length"] == 32
    table = (tmp_path / "results" / "report.md").read_text()
    assert "macro-F1" in table and "Self-distillation" in table, table

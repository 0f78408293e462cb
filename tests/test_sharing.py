"""Sharing a model: the card every saved model directory carries (numbers equal to the run's records), loading a
saved classifier with the stock Auto classes and pipeline, and publishing (against a stand-in for the Hub)."""
import io
import json
import os
import re
import shutil
import types

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

import finetune
import pretrain
import report
import selftrain
import training
from data import LMDBReader, decode_image
from outputs import card as cards
from models import checkpoints, cls_feature, load_encoder, load_mae, save_model
from tools import publish

from helpers import Cut, REPO, TINY, assert_one_line, cut_at, tool_output

FINETUNE = ["--ckpt_name", "self-further-pretrain-4", "--steps", 40, "--batch_size", 32, "--lr", 3e-3,
            "--warmup_steps", 0, "--save_model"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The three stages on digits: teacher and student (4 steps), then two fine-tuning seeds of the student saved
    as classifiers (40 steps: enough to tell some classes apart); seed 1 runs before seed 2 exists."""
    root = tmp_path_factory.mktemp("runs")
    common = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--checkpoint_dir", root / "ckpt",
              "--batch_size", 16]
    pretrain.main(pretrain.get_args_parser().parse_args(map(str, [*common, "--steps", 4])))
    selftrain.main(selftrain.get_args_parser().parse_args(map(str, [*common, "--steps", 4])))
    for seed in (1, 2):
        argv = [*common, *FINETUNE, "--results_dir", root / "results", "--seed", seed]
        finetune.main(finetune.get_args_parser().parse_args(map(str, argv)))
    init = root / "results" / "digits" / "self-further-pretrain-4"
    return {"root": root, "teacher": root / "ckpt" / "further-pretrain-4" / "digits",
            "student": root / "ckpt" / "self-further-pretrain-4" / "digits", "init": init,
            "seed1": init / "seed1" / "model", "seed2": init / "seed2" / "model", "data_dir": data_dir}


def _card(model_dir) -> ModelCard:
    return ModelCard.load(os.path.join(model_dir, "README.md"))


def _settings(text: str) -> dict:
    return dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", text, flags=re.M))


def _code(text: str, containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if containing in b)


def _shown(args: dict) -> dict:
    return {k: "none" if v is None else str(v) for k, v in args.items() if k not in cards.NOT_SHOWN}


def _fmt(value) -> str:
    return f"{value:.4f}"


# ----------------------------------------------------------------------------- the cards and the records

def test_the_mae_checkpoints_cards_state_their_records(runs):
    for stage, name in (("further-pretrain", "teacher"), ("self-distill", "student")):
        card = _card(runs[name])
        record = json.load(open(runs[name] / "args.json"))
        assert record["stage"] == stage
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
        assert card.data.datasets == ["digits"] and card.data.base_model is None  # vit-mae-tiny is no Hub model
        assert card.data.license == "other" and card.data.license_link == "README.md"
        assert ("self-distillation" if stage == "self-distill" else "further-pretraining") in card.data.tags
        assert _settings(card.text) == _shown(record["args"])
        assert f"git commit {record['git_commit']}" in card.text
        assert "python " + " ".join(record["command"]) in card.text or record["command"][0] in card.text
        rows = [json.loads(line) for line in open(runs[name] / "metrics.jsonl")]
        terms = [t for t in cards.LOSS_TERMS if t in rows[0]]
        for row in (rows[0], rows[-1]):
            assert f"| {row['step']} | " + " | ".join(_fmt(row[t]) for t in terms) + " |" in card.text
        assert cards.BIBTEX in card.text
        assert "check the terms at https://scikit-learn.org/" in card.text
    student = _card(runs["student"]).text
    assert "λ = 1.0" in student and str(runs["teacher"]) in student  # the teacher it matched


def test_a_classifiers_card_lists_each_seed_that_existed_and_their_mean_and_std(runs):
    first, second = _card(runs["seed1"]), _card(runs["seed2"])
    results = {k: json.load(open(runs["init"] / f"seed{k}.json")) for k in (1, 2)}
    # seed 1's card was written when only seed 1 had run; seed 2's lists both
    for card, seeds in ((first, [1]), (second, [1, 2])):
        rows = re.findall(r"^\| (\d+)(?: \(this model\))? \| ([\d.]+) \| ([\d.]+) \|$", card.text, flags=re.M)
        assert [int(r[0]) for r in rows] == seeds
        for seed, acc, loss in rows:
            result = results[int(seed)]
            assert acc == f"{100 * result['test_acc']:.2f}" and loss == _fmt(result["test_loss"])
    summary = report.summarize(str(runs["root"] / "results"))[("digits", "self-further-pretrain-4")]
    assert f"**{summary['mean_acc']:.2f} ± {summary['std_acc']:.2f} %**" in second.text
    assert f"**{100 * results[1]['test_acc']:.2f} %**" in first.text  # one seed: no spread
    # the metadata: this model's own accuracy, exactly
    assert second.data.eval_results[0].metric_value == results[2]["test_acc"]
    assert second.data.eval_results[0].metric_type == "accuracy" and second.data.pipeline_tag == "image-classification"
    assert "self-distillation" in second.data.tags  # fine-tuned from the self-distilled student
    assert _settings(second.text) == _shown(results[2]["args"])
    assert "AdamW β = (0.9, 0.999)" in second.text and str(runs["student"]) in second.text


def test_a_card_names_a_hub_theta0_as_its_base_model_and_links_its_terms(runs, tmp_path):
    shutil.copytree(runs["teacher"], tmp_path / "t")
    record = json.load(open(tmp_path / "t" / "args.json"))
    record["args"]["model_name"] = "facebook/vit-mae-base"  # as a full-scale run records it
    (tmp_path / "t" / "args.json").write_text(json.dumps(record))
    card = ModelCard(cards.model_card(str(tmp_path / "t"), repo_id="me/teacher"))
    assert card.data.base_model == "facebook/vit-mae-base"
    assert "check the terms at https://huggingface.co/facebook/vit-mae-base" in card.text
    assert card.data.model_name is None and "model_id = 'me/teacher'" in card.text


def test_a_resumed_runs_card_shows_each_start(stage_args, tmp_path, monkeypatch):
    argv = stage_args("--save_every", 1, steps=3)
    with training.supplied_draws(cut_at(stop=2)), pytest.raises(Cut):
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    pretrain.main(pretrain.get_args_parser().parse_args(argv))
    out = tmp_path / "ckpt" / "further-pretrain-3" / "digits"
    record = json.load(open(out / "args.json"))
    starts = re.findall(r"^# from step (\d+): started (\S+) on .*, git commit (\S+)$", _card(out).text, flags=re.M)
    assert starts == [(str(h["start_step"]), h["started"], h["git_commit"]) for h in record["history"]]
    assert [s[0] for s in starts] == ["0", "2"]


def test_a_card_leaves_out_results_of_other_settings_and_unreadable_ones(runs, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(runs["init"], init)
    other = json.load(open(init / "seed1.json"))
    other["args"]["lr"] = 0.5
    other["seed"] = other["args"]["seed"] = 7
    (init / "seed7.json").write_text(json.dumps(other))
    (init / "seed8.json").write_text("{ cut short")
    text = cards.model_card(str(init / "seed2" / "model"))
    assert "Not included: seed7.json (other settings), seed8.json (unreadable)." in text
    rows = re.findall(r"^\| (\d+)(?: \(this model\))? \| ", text, flags=re.M)
    assert rows == ["1", "2"]


def test_readme_cites_the_paper_and_links_the_terms_as_the_cards_do():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert cards.BIBTEX in readme
    for name, (_, link) in cards.DATASET_SOURCES.items():
        assert f"check the terms at {link}" in readme.replace("\n  ", " "), name
    assert "check the terms at https://huggingface.co/facebook/vit-mae-base" in readme


def test_the_card_is_in_place_before_the_weights(tmp_path, monkeypatch):
    """model.safetensors marks a finished checkpoint: a kill while saving never leaves one without its card."""
    moved, real = [], os.replace

    def replace(src, dst):
        moved.append(os.path.basename(dst))
        if os.path.basename(dst) == "model.safetensors":
            raise KeyboardInterrupt  # killed just before the weights land
        real(src, dst)
    monkeypatch.setattr(checkpoints.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_model(load_mae("vit-mae-tiny"), str(tmp_path), card="# card\n")
    assert moved[-1] == "model.safetensors" and "README.md" in moved
    assert (tmp_path / "README.md").read_text() == "# card\n" and not (tmp_path / "model.safetensors").exists()


def test_a_card_edited_by_hand_is_told_from_a_written_one(runs, tmp_path):
    shutil.copytree(runs["teacher"], tmp_path / "t")
    assert cards.card_state(str(tmp_path / "t")) == "generated"
    path = tmp_path / "t" / "README.md"
    path.write_text(path.read_text().replace("## Results", "## Results\n\nMy note."))
    assert cards.card_state(str(tmp_path / "t")) == "edited"
    path.unlink()
    assert cards.card_state(str(tmp_path / "t")) == "missing"


# ----------------------------------------------------------------------------- loading

def _test_images(data_dir):
    reader = LMDBReader(os.path.join(data_dir, "digits", "test.lmdb"))
    records = [reader[i] for i in range(len(reader))]
    return [image for image, _ in records], torch.tensor([label for _, label in records])


def _training_inputs(encoded: list[bytes], size: int = 32, resample: int = 2) -> torch.Tensor:
    """What the stages feed the model: PIL resize, then (x / 255 - mean) / std (utils.Run.normalize)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (checkpoints.IMAGENET_MEAN, checkpoints.IMAGENET_STD))
    images = torch.stack([decode_image(b, size, resample) for b in encoded]).float().div_(255)
    return (images - mean) / std


def test_the_mae_cards_snippet_gives_the_same_features_twice_equal_to_cls_feature(runs, tmp_path, monkeypatch):
    encoded, _ = _test_images(runs["data_dir"])
    (tmp_path / "image.png").write_bytes(encoded[0])
    monkeypatch.chdir(tmp_path)
    code = _code(_card(runs["student"]).text, "ViTModel")
    first, second = {}, {}
    exec(code, first)
    exec(code, second)
    assert torch.equal(first["features"], second["features"])
    encoder = load_encoder(str(runs["student"]), "vit-mae-tiny", reference=load_mae("vit-mae-tiny").config).eval()
    with torch.no_grad():
        expected = cls_feature(encoder, _training_inputs(encoded[:1]))
    assert torch.equal(first["features"], expected)
    # what the card warns about: the stock AutoModel masks 75 % of the patches at random
    from transformers import AutoModel
    auto = AutoModel.from_pretrained(str(runs["student"])).eval()
    inputs = first["inputs"]
    with torch.no_grad():
        a, b = auto(**inputs).last_hidden_state, auto(**inputs).last_hidden_state
    assert a.shape[1] == 1 + 16 and not torch.equal(a, b)


def test_a_saved_classifier_reproduces_its_test_accuracy_through_the_pipeline(runs, tmp_path, monkeypatch):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTForImageClassification
    model_dir = str(runs["seed2"])
    result = json.load(open(runs["init"] / "seed2.json"))
    encoded, labels = _test_images(runs["data_dir"])
    images = [Image.open(io.BytesIO(b)) for b in encoded]
    # the processor the card names gives exactly the training inputs
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, _training_inputs(encoded))
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    assert isinstance(model, ViTForImageClassification) and model.config.id2label[3] == "3"
    with torch.no_grad():
        predicted = model(pixels).logits.argmax(-1)
    # the card's own snippet builds the pipeline
    (tmp_path / "image.png").write_bytes(encoded[0])
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(_code(_card(model_dir).text, "pipeline("), namespace)
    classify = namespace["classify"]
    assert type(classify.image_processor).__name__ == "ViTImageProcessorPil"
    answers = classify(images, top_k=1)
    by_pipeline = torch.tensor([model.config.label2id[a[0]["label"]] for a in answers])
    assert torch.equal(by_pipeline, predicted)
    assert (by_pipeline == labels).sum().item() / len(labels) == result["test_acc"]
    assert len(set(by_pipeline.tolist())) > 1  # a model that tells classes apart, not one class everywhere


def test_the_default_torchvision_processor_resizes_photos_unlike_training_and_pil_like_it():
    """Why the card and README say backend="pil": on real photographs the torchvision resize is off by 1/255
    here and there (digits, upscaled 8 -> 32 px, happen to come out equal)."""
    from sklearn.datasets import load_sample_images
    from transformers import ViTImageProcessor, ViTImageProcessorPil
    std = torch.tensor(checkpoints.IMAGENET_STD).view(1, 3, 1, 1)
    for array in load_sample_images().images:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        for resample in (2, 3):
            ours = _training_inputs([buf.getvalue()], 224, resample)
            off = {}
            for cls in (ViTImageProcessor, ViTImageProcessorPil):
                processor = cls(size={"height": 224, "width": 224}, resample=resample,
                                image_mean=list(checkpoints.IMAGENET_MEAN), image_std=list(checkpoints.IMAGENET_STD))
                x = processor(Image.fromarray(array), return_tensors="pt")["pixel_values"]
                off[cls] = ((x - ours) * std * 255).abs()
            assert off[ViTImageProcessorPil].max() == 0
            assert 0.5 < off[ViTImageProcessor].max() < 1.01 and (off[ViTImageProcessor] > 0.5).float().mean() < 0.01


# ----------------------------------------------------------------------------- publishing, against a stand-in Hub

class FakeHub:
    """Records what tools.publish asks of huggingface_hub.HfApi: the calls and each uploaded file's bytes."""

    def __init__(self, fail_with=None):
        self.calls, self.files, self.fail_with = [], {}, fail_with
        hub = self

        class Api:
            def __init__(self, token=None):
                hub.calls.append(("init", token))

            def create_repo(self, repo_id, **kw):
                hub.calls.append(("create_repo", repo_id, kw))

            def create_branch(self, repo_id, **kw):
                hub.calls.append(("create_branch", repo_id, kw))

            def create_commit(self, repo_id, operations, **kw):
                if hub.fail_with is not None:
                    raise hub.fail_with
                hub.calls.append(("create_commit", repo_id, kw))
                for op in operations:
                    with open(op.path_or_fileobj, "rb") as f:
                        hub.files[op.path_in_repo] = f.read()
                return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")
        self.Api = Api


@pytest.fixture
def hub(monkeypatch):
    """The Hub reachable and logged in, with FakeHub standing in for HfApi."""
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.Api)
    monkeypatch.setattr(publish, "hub_offline_reason", lambda: None)
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    return fake


def _main(flags, model_dir, repo_id, monkeypatch, capsys):
    """tools.publish as the shell runs it: (exit code, stdout, stderr)."""
    return tool_output(publish, [model_dir, repo_id, *flags], monkeypatch, capsys)


def test_publish_uploads_the_model_and_its_card_and_keeps_the_runs_private_files(runs, tmp_path, hub, monkeypatch,
                                                                                 capsys):
    model_dir = tmp_path / "teacher"
    shutil.copytree(runs["teacher"], model_dir)
    (model_dir / "train_state.pt").write_bytes(b"state")
    (model_dir / "args.json.tmp4242").write_text("half")
    (model_dir / ".saving").mkdir()
    (model_dir / ".saving" / "model.safetensors").write_bytes(b"partial")
    (model_dir / "old").mkdir()
    assert (model_dir / ".lock").exists()
    code, out, err = _main(["--private", "--revision", "v1"], model_dir, "me/teacher", monkeypatch, capsys)
    assert code == 0, err
    assert set(hub.files) == {"README.md", "args.json", "config.json", "metrics.jsonl", "model.safetensors",
                              "preprocessor_config.json"}
    for name, data in hub.files.items():
        assert data == (model_dir / name).read_bytes(), name
    card = hub.files["README.md"].decode()
    assert card == cards.model_card(str(model_dir), repo_id="me/teacher")  # written again, naming the repository
    assert "model_id = 'me/teacher'" in card and cards.card_state(str(model_dir)) == "generated"
    assert hub.calls[0] == ("init", "hf_stand_in")
    assert hub.calls[1] == ("create_repo", "me/teacher", {"private": True, "exist_ok": True})
    assert hub.calls[2] == ("create_branch", "me/teacher", {"branch": "v1", "exist_ok": True})
    assert hub.calls[3][2]["revision"] == "v1"
    assert "published 6 files" in out


def test_publishing_a_classifier_lists_every_seed_that_exists_by_then(runs, tmp_path, hub, monkeypatch, capsys):
    init = tmp_path / "init"
    shutil.copytree(runs["init"], init)
    assert len(re.findall(r"^\| \d", (init / "seed1" / "model" / "README.md").read_text(), flags=re.M)) == 1
    code, _, err = _main(["--license", "apache-2.0", "--datasets", "me/digits"], init / "seed1" / "model",
                         "me/clf", monkeypatch, capsys)
    assert code == 0, err
    card = ModelCard(hub.files["README.md"].decode())
    assert [int(s) for s in re.findall(r"^\| (\d+)", card.text, flags=re.M)] == [1, 2]
    mean = report.summarize(str(runs["root"] / "results"))[("digits", "self-further-pretrain-4")]
    assert f"**{mean['mean_acc']:.2f} ± {mean['std_acc']:.2f} %**" in card.text
    assert card.data.license == "apache-2.0" and card.data.license_name is None and card.data.datasets == ["me/digits"]
    assert set(hub.files) == {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"}
    assert hub.calls[1] == ("create_repo", "me/clf", {"private": None, "exist_ok": True})
    assert [c[0] for c in hub.calls] == ["init", "create_repo", "create_commit"]  # main: no branch


def test_publish_offline_or_logged_out_is_one_line_and_changes_nothing(runs, tmp_path, monkeypatch, capsys):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.Api)
    model_dir = tmp_path / "teacher"
    shutil.copytree(runs["teacher"], model_dir)
    before = (model_dir / "README.md").read_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _main([], model_dir, "me/teacher", monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "offline", "HF_HUB_OFFLINE=1", "nothing was uploaded")
    # reachable, but nobody logged in
    monkeypatch.setattr(publish, "hub_offline_reason", lambda: None)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, _, err = _main([], model_dir, "me/teacher", monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "not logged in", "hf auth login")
    assert fake.calls == [] and (model_dir / "README.md").read_text() == before


def test_publish_refuses_to_replace_a_card_edited_by_hand_unless_kept(runs, tmp_path, hub, monkeypatch, capsys):
    model_dir = tmp_path / "student"
    shutil.copytree(runs["student"], model_dir)
    edited = (model_dir / "README.md").read_text() + "\nMy own words.\n"
    (model_dir / "README.md").write_text(edited)
    code, _, err = _main([], model_dir, "me/student", monkeypatch, capsys)
    assert code == 2 and hub.calls == []
    assert_one_line(err, "edited by hand", "--keep_card")
    code, _, err = _main(["--keep_card"], model_dir, "me/student", monkeypatch, capsys)
    assert code == 0, err
    assert hub.files["README.md"].decode() == edited == (model_dir / "README.md").read_text()


def test_publish_dry_run_lists_the_files_and_touches_nothing(runs, tmp_path, hub, monkeypatch, capsys):
    model_dir = tmp_path / "teacher"
    shutil.copytree(runs["teacher"], model_dir)
    (model_dir / "train_state.pt").write_bytes(b"state")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    code, out, err = _main(["--dry_run", "--exclude", "args.*"], model_dir, "me/teacher", monkeypatch, capsys)
    assert code == 0, err
    listed = re.findall(r"^  (\S+) +[\d.]+ k?M?B", out, flags=re.M)
    assert listed == ["README.md", "config.json", "metrics.jsonl", "model.safetensors", "preprocessor_config.json"]
    assert re.search(r"^  train_state\.pt +the resumable training state$", out, flags=re.M)
    assert re.search(r"^  args\.json +--exclude args\.\*$", out, flags=re.M)
    assert hub.calls == [] and before == {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}


def test_publish_bad_input_and_hub_refusals_are_one_line(runs, tmp_path, hub, monkeypatch, capsys):
    import httpx2
    for flags, directory, repo_id, words in (
            ([], tmp_path / "nowhere", "me/x", ["not a directory"]),
            ([], runs["root"] / "ckpt", "me/x", ["no config.json"]),
            ([], runs["teacher"], "me//x", ["not a Hub repository id"]),
            ([], runs["teacher"], "x", ["owner/name"]),
            (["--exclude", "*.safetensors"], runs["teacher"], "me/x", ["model.safetensors", "needs"])):
        code, _, err = _main(flags, directory, repo_id, monkeypatch, capsys)
        assert code == 2, (flags, directory, repo_id)
        assert_one_line(err, *words)
    model_dir = tmp_path / "teacher"
    shutil.copytree(runs["teacher"], model_dir)
    request = httpx2.Request("POST", "https://huggingface.co/api/models/me/x/commit/main")
    hub.fail_with = huggingface_hub.errors.HfHubHTTPError("403 Forbidden: you cannot write to me/x",
                                                          response=httpx2.Response(403, request=request))
    code, _, err = _main([], model_dir, "me/x", monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "403", "me/x")
    hub.fail_with = ConnectionError("connection reset")
    code, _, err = _main([], model_dir, "me/x", monkeypatch, capsys)
    assert code == 1
    assert_one_line(err, "failed", "ConnectionError", "run it again")

"""Model cards: the README.md of every saved model directory, Hub metadata (YAML) on top, written from the
run's own records, so a checkpoint says what made it wherever it is copied or published.

    card = model_card(out_dir)                  # a stage's checkpoint: args.json and metrics.jsonl are in out_dir
    card = model_card(model_dir, result)        # a classifier (finetune.py --save_model): the run's record is in
                                                # the parent folder; `result` is this run's, before its file exists
    save_model(model, out_dir, preprocessing, card=card)   # the card is moved in before the weights
    write_card(model_dir, repo_id="me/name")    # again, later (tools.publish): every seed's result by then

The card holds: what the stage did, with the recipe's numbers; every recorded setting; the command of each
start and the git commit; the results (MAE stages: the first and last logged losses; a classifier: test
accuracy per seed and mean ± std over the seeds of the same settings, from the result files beside this run's);
how to load it (deterministic features for the MAE checkpoints: a saved ViT-MAE config keeps mask_ratio 0.75,
so AutoModel would mask 75 % of the patches at random); licence and terms; the citation.

A card ends with a line holding the sha256 of the text above it, so a card edited by hand can be told from one
written here (card_state) and is never replaced without being asked.
"""
import hashlib
import json
import os
import re
import shlex
import statistics

import report
import training
import utils
from errors import UserError
from mae_common import further_pretrain_dir
from models.checkpoints import CARD_FILE
from models.hub import TINY_NAME, looks_like_local_path
from training.record import upgrade

BIBTEX = """@inproceedings{lee2023selfdistillation,
  title={Self-Distillation for Further Pre-training of Transformers},
  author={Seanie Lee and Minki Kang and Juho Lee and Sung Ju Hwang and Kenji Kawaguchi},
  booktitle={The Eleventh International Conference on Learning Representations},
  year={2023},
  url={https://openreview.net/forum?id=kj6oK_Hj40}
}"""
PAPER = ("[Self-Distillation for Further Pre-training of Transformers](https://openreview.net/forum?id=kj6oK_Hj40) "
         "(Lee et al., ICLR 2023)")

# Where each dataset's owners publish it, and so their terms (not verified offline: the card says "check").
DATASET_SOURCES = {
    "aircraft": ("FGVC-Aircraft", "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"),
    "chest_xray": ("pediatric chest X-rays, Kermany et al. (Mendeley Data)",
                   "https://data.mendeley.com/datasets/rscbjbr9sj"),
    "cub": ("CUB-200-2011", "https://www.vision.caltech.edu/datasets/cub_200_2011/"),
    "dtd": ("Describable Textures Dataset (DTD)", "https://www.robots.ox.ac.uk/~vgg/data/dtd/"),
    "stanford_dogs": ("Stanford Dogs", "http://vision.stanford.edu/aditya86/ImageNetDogs/"),
    "vgg_flower_102": ("Oxford Flowers-102", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    "digits": ("scikit-learn's handwritten digits (a copy of UCI's Optical Recognition of Handwritten Digits)",
               "https://scikit-learn.org/stable/datasets/toy_dataset.html"
               "#optical-recognition-of-handwritten-digits-dataset"),
}
MAE_ORIGIN = "https://github.com/facebookresearch/mae"  # facebook/vit-mae-* were converted from its checkpoints
DEFAULT_LICENSE = {"license": "other", "license_name": "base-model-and-dataset-terms", "license_link": CARD_FILE}

# Recorded arguments that say where files were or how the run was driven, not what it computed: not shown.
NOT_SHOWN = frozenset({"data_dir", "checkpoint_dir", "output_dir", "results_dir", "workers", "log_every",
                       "save_every", "overwrite", "plot", "data_cache", "save_model"})
LOSS_TERMS = ("loss", "mae_loss", "distill_loss", "cls_loss")
_MARK = "<!-- written by outputs/card.py from the run's records; sha256 of the text above: {} -->"
_MARK_RE = re.compile(r"\n<!-- written by outputs/card\.py from the run's records; sha256 of the text above: "
                      r"([0-9a-f]{64}) -->\n?$")


# ----------------------------------------------------------------------------- the run behind a model directory

def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_record(path: str) -> dict | None:
    """The run record (or result file) at `path` in today's shape (training.record.upgrade); None if unreadable."""
    record = _read_json(path)
    return upgrade(record, path) if isinstance(record, dict) else None


def run_of(model_dir: str) -> tuple[str, dict]:
    """(run directory, run record) of a model directory: a stage's checkpoint holds its record (args.json);
    a classifier saved by finetune.py --save_model sits in <run directory>/model/."""
    model_dir = os.path.normpath(model_dir)
    for run_dir, stages in ((model_dir, ("further-pretrain", "self-distill")),
                            (os.path.dirname(model_dir), ("finetune",))):
        record = _read_record(os.path.join(run_dir, training.RECORD_FILE))
        if record is not None and record["stage"] in stages and isinstance(record["args"], dict):
            return run_dir, record
    raise UserError(f"{model_dir} has no run record ({training.RECORD_FILE} of pretrain.py / selftrain.py in it, or of "
                    f"finetune.py in its parent folder); a card is written from the run's records")


def _metrics(run_dir: str) -> list[dict]:
    rows = []
    try:
        with open(os.path.join(run_dir, training.METRICS_FILE)) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line a kill cut short
                    continue
    except OSError:
        pass
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def classifier_results(run_dir: str, this: dict) -> tuple[dict[int, dict], list[str]]:
    """({seed: result} of the runs beside this one (results/<dataset>/<init>/seed<k>.json) with this run's
    dataset, init and settings, this run's own result included; the names of the files left out)."""
    folder = os.path.dirname(os.path.normpath(run_dir))
    own = os.path.normpath(run_dir) + ".json"
    same, left_out = {}, []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not report.RESULT_FILE.match(name) or os.path.normpath(path) == own:
            continue
        try:
            other = report.read_result(path)
        except UserError:
            left_out.append(f"{name} (unreadable)")
            continue
        if (other.get("dataset"), other.get("init")) != (this.get("dataset"), this.get("init")) or \
                report.settings_of(other) != report.settings_of(this) or not isinstance(other.get("seed"), int):
            left_out.append(f"{name} (other settings)")
            continue
        same[other["seed"]] = other
    same[this["seed"]] = this
    return dict(sorted(same.items())), left_out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value), as report.py computes them."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# ----------------------------------------------------------------------------- pieces of text

def is_hub_id(name: str) -> bool:
    return name != TINY_NAME and name.count("/") == 1 and not looks_like_local_path(name) and not os.path.exists(name)


def _initial_model(name: str) -> str:
    if name == TINY_NAME:
        return (f"`{TINY_NAME}` (this repository's small ViT-MAE for CPU runs: 32×32 images, 4×4 patches, MAE's "
                f"initialisation; not a Hub model)")
    if is_hub_id(name):
        return f"[`{name}`](https://huggingface.co/{name})"
    return f"`{name}` (a local model directory)"


def _command(entry: dict) -> str:
    argv = [str(a) for a in entry.get("command") or []]
    if not argv:
        return "(not recorded)"
    return ("python " if argv[0].endswith(".py") else "") + shlex.join(argv)


def _value(value) -> str:
    return "none" if value is None else str(value)


def _settings_table(record: dict) -> list[str]:
    args = record["args"]
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {_value(args[k])} |" for k in sorted(args) if k not in NOT_SHOWN]
    for key in ("precision", "world_size", "device"):
        if record[key] is not None:
            lines.append(f"| {key} (recorded) | {_value(record[key])} |")
    return lines


def _starts(record: dict) -> list[str]:
    lines = []
    for entry in record["history"]:
        lines.append(f"# from step {entry['start_step']}: started {entry['started'] or '?'} on "
                     f"{entry['device'] or '?'}, git commit {entry['git_commit'] or 'unknown'}")
        lines.append(_command(entry))
    return ["```bash", *lines, "```"]


def _optimiser(args: dict, record: dict) -> str:
    """The optimizer as the run record has it (`optimizer`: betas, eps, the no-weight-decay rule)."""
    opt = record["optimizer"] or {}
    betas = tuple(opt["betas"]) if opt.get("betas") else "(not recorded)"
    rule = opt.get("no_weight_decay") or "the stage's rule"
    return (f"{args['steps']} steps of batch {args['batch_size']} (global), AdamW β = {betas}, learning rate "
            f"{args['lr']} with {args['warmup_steps']} warmup steps then linear decay to 0, weight decay "
            f"{args['weight_decay']} ({rule.rstrip('.')})")


def _what_it_did(stage: str, args: dict, record: dict) -> str:
    base = _initial_model(args["model_name"])
    optimiser = _optimiser(args, record)
    mae = (f"MAE loss with mask ratio {args.get('mask_ratio')} and norm_pix_loss {args.get('norm_pix_loss')}; "
           f"the fixed 2-D sin-cos position tables stay frozen")
    if stage == "further-pretrain":
        return (f"**Further pre-training** (stage 1 of the paper; this model is the *teacher*): masked "
                f"auto-encoding of θ₀ = {base} continued on the training images of `{args['dataset']}` "
                f"(labels unused): {optimiser}; {mae}. Encoder and decoder are saved (`ViTMAEForPreTraining`).")
    teacher = args.get("teacher") or further_pretrain_dir(args["checkpoint_dir"], args["steps"], args["dataset"])
    return (f"**Self-distillation** (stage 2 of the paper; this model is the *student*): θ₀ = {base}, encoder and "
            f"decoder, trained again on the training images of `{args['dataset']}` (labels unused) with "
            f"L = L_MAE + λ · (1/B) Σᵢ ‖h_S(xᵢ) − h_T(xᵢ)‖², λ = {args.get('distill_weight')}, where h(x) is the "
            f"CLS token of the last encoder layer after the final LayerNorm on the unmasked image and the teacher "
            f"T is the further pre-trained model `{teacher}`, frozen: {optimiser}; {mae}. Encoder and decoder are "
            f"saved (`ViTMAEForPreTraining`).")


def _route_tag(args: dict) -> list[str]:
    """The paper's route a classifier took: fine-tuned from θ₀, a further pre-trained or a self-distilled model."""
    if args.get("scratch"):
        return []
    name = str(args.get("ckpt_name"))
    return ["self-distillation"] if name.startswith("self-further-pretrain") else \
        ["further-pretraining"] if name.startswith("further-pretrain") else []


def _classifier_did(args: dict, this: dict) -> str:
    if args.get("scratch"):
        start = f"θ₀ = {_initial_model(args['model_name'])} itself"
    else:
        start = f"the checkpoint `{this.get('checkpoint')}`"
        ckpt_record = _read_record(os.path.join(str(this.get("checkpoint")), training.RECORD_FILE))
        if ckpt_record is not None and isinstance(ckpt_record["args"], dict):
            c = ckpt_record["args"]
            kind = {"further-pretrain": "further pre-training", "self-distill": "self-distillation"}.get(
                ckpt_record["stage"], ckpt_record["stage"])
            start += (f" ({kind} of `{c.get('model_name', '?')}` for {c.get('steps')} steps, git "
                      f"commit {ckpt_record['git_commit'] or 'unknown'})")
    val = f"; {args['val_split']} of the training images held out for validation" if args.get("val_split") else ""
    return (f"**Fine-tuning** (stage 3 of the paper): a linear classifier on the CLS token after the final LayerNorm, "
            f"its encoder taken from {start}, trained with the labels of `{args['dataset']}`'s training split: "
            f"{_optimiser(args, this)}, dropout {args.get('dropout')} on the hidden states, gradient-norm clip "
            f"{args.get('clip_grad')}, "
            f"horizontal flips as the only augmentation{val}; seed {args['seed']}. Test accuracy is measured once, "
            f"after the last step.")


def _mae_results(run_dir: str) -> list[str]:
    rows = _metrics(run_dir)
    if not rows:
        return ["No metrics were logged (metrics.jsonl is missing or empty)."]
    terms = [t for t in LOSS_TERMS if any(t in r for r in rows)]
    picked = [rows[0], rows[-1]] if len(rows) > 1 else rows
    lines = [f"Training losses from `{training.METRICS_FILE}` ({len(rows)} logged steps), first and last:", "",
             "| step | " + " | ".join(terms) + " |", "|---|" + "---|" * len(terms)]
    lines += [f"| {r['step']} | " + " | ".join(f"{r[t]:.4f}" if t in r else "—" for t in terms) + " |" for r in picked]
    return lines + ["", "The MAE stages have no test metric: fine-tune the checkpoint to measure it (below)."]


def _classifier_results(run_dir: str, this: dict) -> list[str]:
    same, left_out = classifier_results(run_dir, this)
    has_val = any(r.get("val_acc") is not None for r in same.values())
    lines = [f"Test accuracy on `{this['dataset']}`'s test split ({this.get('num_test', '?')} images), per "
             f"fine-tuning seed of these settings (this model: seed {this['seed']}):", "",
             "| seed | test accuracy (%) | test loss |" + (" val accuracy (%) |" if has_val else ""),
             "|---|---|---|" + ("---|" if has_val else "")]
    for seed, r in same.items():
        val = "" if not has_val else " — |" if r.get("val_acc") is None else f" {100 * r['val_acc']:.2f} |"
        mark = " (this model)" if seed == this["seed"] else ""
        lines.append(f"| {seed}{mark} | {100 * r['test_acc']:.2f} | {r['test_loss']:.4f} |{val}")
    mean, std = mean_std([100 * r["test_acc"] for r in same.values()])
    spread = f" ± {std:.2f}" if std is not None else ""
    seeds = f"{len(same)} seed{'s' if len(same) > 1 else ''}"
    lines += ["", f"Mean{' ± sample std' if std is not None else ''} over {seeds}: **{mean:.2f}{spread} %**."]
    if left_out:
        lines += ["", f"Not included: {', '.join(left_out)}."]
    return lines


def _mae_usage(reference: str) -> list[str]:
    return [
        "Features. The saved config keeps `mask_ratio` 0.75 (the training setting), so `AutoModel` /",
        "`ViTMAEModel` and `pipeline(\"image-feature-extraction\")` would hide 75 % of the patches at random on every",
        "call (transformers issues 20328, 22512). Load the encoder into `ViTModel` instead: no masking, patches",
        "in order, and the CLS token below is h(x), the feature self-distillation matches (the load report lists",
        "the decoder's weights as unused: expected).",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, ViTModel",
        "",
        f"model_id = {reference!r}",
        "processor = AutoImageProcessor.from_pretrained(model_id, backend=\"pil\")  # the resize used in training",
        "encoder = ViTModel.from_pretrained(model_id, add_pooling_layer=False).eval()",
        "inputs = processor(images=Image.open(\"image.png\").convert(\"RGB\"), return_tensors=\"pt\")",
        "with torch.no_grad():",
        "    features = encoder(**inputs).last_hidden_state[:, 0]  # (1, hidden_size): the CLS token h(x)",
        "```",
        "",
        "With `ViTMAEModel`, `mask_ratio=0.0` alone is not enough: the patches are still shuffled by random noise",
        "(the CLS token then changes in the last digits from call to call, and the patch tokens come out",
        "permuted). Pass the noise too: `ViTMAEModel.from_pretrained(model_id, mask_ratio=0.0)(**inputs,",
        "noise=torch.arange(num_patches).expand(batch, -1).float())` keeps every patch, in order.",
        "",
        "Fine-tuning: `ViTForImageClassification.from_pretrained(model_id, num_labels=K)` (a new linear head on the",
        "CLS token), or this repository's stage 3 on a checkpoint directory:",
        "`python finetune.py --dataset DATASET --checkpoint_dir DIR --ckpt_name NAME` reads `DIR/NAME/DATASET`.",
    ]


def _classifier_usage(reference: str) -> list[str]:
    return [
        "```python",
        "from transformers import AutoImageProcessor, pipeline",
        "",
        f"model_id = {reference!r}",
        "processor = AutoImageProcessor.from_pretrained(model_id, backend=\"pil\")  # the resize used in training",
        "classify = pipeline(\"image-classification\", model=model_id, image_processor=processor)",
        "print(classify(\"image.png\"))",
        "```",
        "",
        "`backend=\"pil\"` (formerly `use_fast=False`) resizes with PIL as training did, which reproduces the test",
        "accuracy above exactly. transformers' default backend (torchvision) resizes slightly differently: on",
        "photographs downscaled to 224 or 32 px, 0.03–0.5 % of the input values differ, by 1/255.",
        "`AutoModelForImageClassification.from_pretrained(model_id)` loads the model alone; `config.id2label`",
        "names the classes.",
    ]


def _terms(base: str, dataset: str) -> list[str]:
    lines = ["The code that trained this model is Apache-2.0 (the repository's LICENSE). The weights derive from "
             "the initial model and the training data, which have their own terms:", ""]
    if is_hub_id(base) and base.startswith("facebook/vit-mae"):
        lines.append(f"- θ₀ `{base}`: check the terms at https://huggingface.co/{base} (converted from the MAE "
                     f"release, {MAE_ORIGIN})")
    elif is_hub_id(base):
        lines.append(f"- θ₀ `{base}`: check the terms at https://huggingface.co/{base}")
    elif base == TINY_NAME:
        lines.append(f"- θ₀ `{TINY_NAME}`: initialised by this repository's code (its licence)")
    else:
        lines.append(f"- θ₀ `{base}` (a local directory): check the terms of the model it holds")
    if dataset in DATASET_SOURCES:
        title, link = DATASET_SOURCES[dataset]
        lines.append(f"- `{dataset}`, {title}: check the terms at {link}")
    else:
        lines.append(f"- `{dataset}`: a dataset of your own; state its terms here")
    lines += ["", f"The metadata above says `license: {DEFAULT_LICENSE['license']}` until those terms are checked; "
                  f"`python -m tools.publish DIR REPO_ID --license ID` sets a licence identifier."]
    return lines


# ----------------------------------------------------------------------------- the card

def model_card(model_dir: str, result: dict | None = None, repo_id: str | None = None,
               license: str | None = None, datasets: list[str] | None = None) -> str:
    """The card of `model_dir` from its run's records. result: a classifier's own result when its file is not
    written yet (finetune.py saves the model first). repo_id: the Hub name the snippets load (default: the
    directory). license / datasets: Hub identifiers for the metadata (default: `other`, the dataset's name)."""
    from huggingface_hub import EvalResult, ModelCardData
    run_dir, record = run_of(model_dir)
    args, stage = record["args"], record["stage"]
    reference = repo_id or os.path.normpath(model_dir)
    dataset, base = args["dataset"], args["model_name"]
    licence = {"license": license} if license else DEFAULT_LICENSE
    meta = dict(library_name="transformers", base_model=base if is_hub_id(base) else None,
                datasets=list(datasets) if datasets else [dataset], **licence)
    if stage == "finetune":
        this = result if result is not None else _read_record(os.path.normpath(run_dir) + ".json")
        if not isinstance(this, dict) or "test_acc" not in this:
            raise UserError(f"{os.path.normpath(run_dir)}.json (the run's result) is missing or has no test_acc")
        this = {**this, **record}  # the result file is the result plus the record
        title = (f"# `{dataset}` classifier: ViT fine-tuned from "
                 f"{'θ₀' if args.get('scratch') else this.get('init')}, seed {args['seed']}")
        did, results = _classifier_did(args, this), _classifier_results(run_dir, this)
        usage = _classifier_usage(reference)
        meta.update(pipeline_tag="image-classification",
                    model_name=repo_id or f"{dataset}-{this.get('init')}-seed{args['seed']}",
                    tags=["vision", "image-classification", "vit", *_route_tag(args)],
                    eval_results=[EvalResult(task_type="image-classification", dataset_type=meta["datasets"][0],
                                             dataset_name=dataset, dataset_split="test", metric_type="accuracy",
                                             metric_value=this["test_acc"],
                                             metric_name=f"test accuracy (seed {args['seed']})")])
    else:
        kind = {"further-pretrain": "further pre-trained ViT-MAE (the teacher)",
                "self-distill": "self-distilled ViT-MAE (the student)"}[stage]
        title = f"# `{dataset}`: {kind}, {args['steps']} steps"
        did, results, usage = _what_it_did(stage, args, record), _mae_results(run_dir), _mae_usage(reference)
        meta.update(pipeline_tag="image-feature-extraction",
                    tags=["vision", "vit-mae", "masked-image-modeling",
                          "further-pretraining" if stage == "further-pretrain" else "self-distillation"])
    body = [
        title, "",
        f"Trained with a re-implementation of {PAPER} on PyTorch and transformers 5. {did}", "",
        "## Settings", "", "Every recorded argument that shapes the computation (the run record, `args.json`):", "",
        *_settings_table(record), "",
        "## Command", "", "Each start of the run (a resumed run continues bit-identically from its saved state):", "",
        *_starts(record), "",
        "## Results", "", *results, "",
        "## How to use", "", *usage, "",
        "## Licence and terms", "", *_terms(base, dataset), "",
        "## Citation", "", "```bibtex", BIBTEX, "```", "",
    ]
    text = "---\n" + ModelCardData(**meta).to_yaml() + "\n---\n\n" + "\n".join(body)
    return text + _MARK.format(hashlib.sha256(text.encode()).hexdigest()) + "\n"


def card_state(model_dir: str) -> str:
    """'missing', 'generated' (written by model_card, unchanged since) or 'edited' (by hand, or not ours)."""
    try:
        with open(os.path.join(model_dir, CARD_FILE), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError):
        return "edited"
    mark = _MARK_RE.search(text)
    if mark and hashlib.sha256(text[:mark.start() + 1].encode()).hexdigest() == mark.group(1):
        return "generated"
    return "edited"


def write_card(model_dir: str, **kw) -> str:
    """Write model_card(model_dir, **kw) to <model_dir>/README.md (atomically); returns the text."""
    text = model_card(model_dir, **kw)
    path = os.path.join(model_dir, CARD_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return text

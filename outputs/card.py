"""Model cards: the README.md of every saved model directory, Hub metadata (YAML) on top, written from the
run's own records, so a checkpoint says what made it wherever it is copied or published.

    card = model_card(out_dir)                  # a stage's checkpoint: args.json and metrics.jsonl are in out_dir
    card = model_card(model_dir, result)        # a classifier (finetune.py --save_model): the run's record is in
                                                # the parent folder; `result` is this run's, before its file exists
    save_model(model, out_dir, preprocessing, card=card)   # the card is moved in before the weights
    write_card(model_dir, repo_id="me/name")    # again, later (tools.publish): every seed's result by then

The card holds: what the stage did, with the recipe's numbers; every recorded setting; the command of each
start and the git commit; the results (MAE / MLM stages: the first and last logged losses; a classifier: test
accuracy per seed -- and macro- and micro-F1 on text -- with mean ± std over the seeds of the same settings, from
the result files beside this run's); how to load it (deterministic features for the MAE checkpoints: a saved
ViT-MAE config keeps mask_ratio 0.75, so AutoModel would mask 75 % of the patches at random; fill-mask or
text-classification pipelines and the `<s>` feature for RoBERTa); licence and terms; the citation.

Image runs (ViT-MAE, MAE) and text runs (RoBERTa, MLM) get their own wording; card_modality tells them apart from
what is on disk, never asking the Hub.

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
from models.hub import MODALITIES, TEXT_TINY_CONFIG, TEXT_TINY_NAME, TINY_NAME, looks_like_local_path
from models.roberta_mlm import MASK_REPLACE_PROB, RANDOM_REPLACE_PROB, TINY_INIT_SEED
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
# The text datasets data.prepare builds (data/text_sources.py), kept apart from DATASET_SOURCES, whose every link
# README.md states.
ALLENAI_TASKS = "https://github.com/allenai/dont-stop-pretraining"
TEXT_DATASET_SOURCES = {
    "chemprot": ("ChemProt (Kringelum et al. 2016), as Gururangan et al. 2020 released its task files", ALLENAI_TASKS),
    "citation_intent": ("ACL-ARC citation intents (Jurgens et al. 2018), as Gururangan et al. 2020 released its "
                        "task files", ALLENAI_TASKS),
    "sciie": ("SciERC (Luan et al. 2018), as Gururangan et al. 2020 released its task files", ALLENAI_TASKS),
    "twitter_emotion": ("TweetEval's emotion task (Barbieri et al. 2020)", "https://github.com/cardiffnlp/tweeteval"),
    "fortunes": ("Debian's fortunes package (BSD licence of the University of California)",
                 "https://packages.debian.org/sid/fortunes"),
}
MAE_ORIGIN = "https://github.com/facebookresearch/mae"  # facebook/vit-mae-* were converted from its checkpoints
DEFAULT_LICENSE = {"license": "other", "license_name": "base-model-and-dataset-terms", "license_link": CARD_FILE}

# Recorded arguments that say where files were or how the run was driven, not what it computed: not shown.
NOT_SHOWN = frozenset({"data_dir", "checkpoint_dir", "output_dir", "results_dir", "workers", "log_every",
                       "save_every", "overwrite", "plot", "data_cache", "save_model"})
LOSS_TERMS = ("loss", "mae_loss", "mlm_loss", "distill_loss", "cls_loss")
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


def card_modality(model_dir: str, record: dict, result: dict | None = None) -> str:
    """"image" or "text": which half of the method made the model in `model_dir`, from what is on disk, never the
    network: the built-in θ₀ names, the model_type of a config.json already in the directory (a stage writes its
    card before the weights, so the first save has none yet), a fine-tuning result's own `modality`, else the
    record: every image start records its preprocessing and a text start none (records of version 1, all of image
    runs, hold neither a preprocessing nor their inputs)."""
    name = record["args"].get("model_name")
    if name in (TINY_NAME, TEXT_TINY_NAME):
        return "image" if name == TINY_NAME else "text"
    config = _read_json(os.path.join(model_dir, "config.json"))
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in MODALITIES:
        return MODALITIES[model_type]
    if isinstance(result, dict) and result.get("modality") in ("image", "text"):
        return result["modality"]
    return "text" if record["preprocessing"] is None and record["inputs"] is not None else "image"


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

def is_hub_id(name: str, bare: bool = False) -> bool:
    """Whether θ₀'s recorded name is a Hub id. bare: an id without an owner counts too (the Hub's legacy names, as
    `roberta-base`, the text recipe's default; no ViT-MAE has one)."""
    slashes = (0, 1) if bare else (1,)
    return (name not in (TINY_NAME, TEXT_TINY_NAME) and name.count("/") in slashes and not looks_like_local_path(name)
            and not os.path.exists(name))


def _initial_model(name: str, text: bool = False) -> str:
    if name == TINY_NAME:
        return (f"`{TINY_NAME}` (this repository's small ViT-MAE for CPU runs: 32×32 images, 4×4 patches, MAE's "
                f"initialisation; not a Hub model)")
    if name == TEXT_TINY_NAME:
        c = TEXT_TINY_CONFIG
        return (f"`{TEXT_TINY_NAME}` (this repository's small RoBERTa for CPU runs: one token per byte, "
                f"{c['vocab_size']} tokens, {c['num_hidden_layers']} layers of width {c['hidden_size']}, "
                f"transformers' initialisation with seed {TINY_INIT_SEED}; not a Hub model)")
    if is_hub_id(name, bare=text):
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


def _optimiser(args: dict, record: dict, text: bool = False) -> str:
    """The optimizer as the run record has it (`optimizer`: betas, eps, the no-weight-decay rule). text: ε too
    (RoBERTa's 1e-6, not torch's default the image stages keep)."""
    opt = record["optimizer"] or {}
    betas = tuple(opt["betas"]) if opt.get("betas") else "(not recorded)"
    if text:
        betas = f"{betas}, ε = {_value(opt.get('eps')) if opt.get('eps') is not None else '(not recorded)'}"
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


def _mlm(args: dict) -> str:
    rate = args.get("mask_ratio")
    selected = f"{100 * rate:g} %" if isinstance(rate, (int, float)) else f"a fraction {_value(rate)}"
    return (f"MLM with {selected} of the tokens selected (not <s>, </s> or padding), of which "
            f"{100 * MASK_REPLACE_PROB:g} % become `<mask>`, {100 * RANDOM_REPLACE_PROB:g} % a random token and "
            f"{100 * (1 - MASK_REPLACE_PROB - RANDOM_REPLACE_PROB):g} % stay as they are, the loss the "
            f"cross-entropy at the selected tokens; texts truncated at {args.get('max_length')} tokens")


def _text_what_it_did(stage: str, args: dict, record: dict) -> str:
    base = _initial_model(args["model_name"], text=True)
    optimiser = _optimiser(args, record, text=True)
    saved = "Encoder and LM head are saved (`RobertaForMaskedLM`), with the tokenizer."
    if stage == "further-pretrain":
        return (f"**Further pre-training** (stage 1 of the paper; this model is the *teacher*): masked language "
                f"modelling of θ₀ = {base} continued on the training texts of `{args['dataset']}` (labels "
                f"unused): {optimiser}; {_mlm(args)}. {saved}")
    teacher = args.get("teacher") or further_pretrain_dir(args["checkpoint_dir"], args["steps"], args["dataset"])
    return (f"**Self-distillation** (stage 2 of the paper; this model is the *student*): θ₀ = {base}, encoder and "
            f"LM head, trained again on the training texts of `{args['dataset']}` (labels unused) with "
            f"L = L_MLM + λ · (1/B) Σᵢ ‖h_S(xᵢ) − h_T(xᵢ)‖², λ = {args.get('distill_weight')}, where h(x) is the "
            f"`<s>` token of the last encoder layer on the unmasked text and the teacher T is the further "
            f"pre-trained model `{teacher}`, frozen: {optimiser}; {_mlm(args)}. {saved}")


def _route_tag(args: dict) -> list[str]:
    """The paper's route a classifier took: fine-tuned from θ₀, a further pre-trained or a self-distilled model."""
    if args.get("scratch"):
        return []
    name = str(args.get("ckpt_name"))
    return ["self-distillation"] if name.startswith("self-further-pretrain") else \
        ["further-pretraining"] if name.startswith("further-pretrain") else []


def _classifier_start(args: dict, this: dict, text: bool = False) -> str:
    """Where a classifier's encoder came from: θ₀, or a checkpoint (with what its own record says)."""
    if args.get("scratch"):
        start = f"θ₀ = {_initial_model(args['model_name'], text)} itself"
    else:
        start = f"the checkpoint `{this.get('checkpoint')}`"
        ckpt_record = _read_record(os.path.join(str(this.get("checkpoint")), training.RECORD_FILE))
        if ckpt_record is not None and isinstance(ckpt_record["args"], dict):
            c = ckpt_record["args"]
            kind = {"further-pretrain": "further pre-training", "self-distill": "self-distillation"}.get(
                ckpt_record["stage"], ckpt_record["stage"])
            start += (f" ({kind} of `{c.get('model_name', '?')}` for {c.get('steps')} steps, git "
                      f"commit {ckpt_record['git_commit'] or 'unknown'})")
    return start


def _classifier_did(args: dict, this: dict) -> str:
    start = _classifier_start(args, this)
    val = f"; {args['val_split']} of the training images held out for validation" if args.get("val_split") else ""
    return (f"**Fine-tuning** (stage 3 of the paper): a linear classifier on the CLS token after the final LayerNorm, "
            f"its encoder taken from {start}, trained with the labels of `{args['dataset']}`'s training split: "
            f"{_optimiser(args, this)}, dropout {args.get('dropout')} on the hidden states, gradient-norm clip "
            f"{args.get('clip_grad')}, "
            f"horizontal flips as the only augmentation{val}; seed {args['seed']}. Test accuracy is measured once, "
            f"after the last step.")


def _text_classifier_did(args: dict, this: dict) -> str:
    val = f"; {args['val_split']} of the training texts held out for validation" if args.get("val_split") else ""
    return (f"**Fine-tuning** (stage 3 of the paper): RoBERTa's classification head on the `<s>` token of the last "
            f"layer (dropout, dense, tanh, dropout, linear; `RobertaForSequenceClassification`), its encoder taken "
            f"from {_classifier_start(args, this, text=True)}, trained with the labels of `{args['dataset']}`'s "
            f"training split: {_optimiser(args, this, text=True)}, dropout {args.get('dropout')} on the hidden "
            f"states and in the head, gradient-norm clip {args.get('clip_grad')}, texts truncated at "
            f"{args.get('max_length')} tokens{val}; seed {args['seed']}. Test macro-F1, micro-F1 and accuracy are "
            f"measured once, after the last step.")


def _mae_results(run_dir: str, method: str = "MAE") -> list[str]:
    rows = _metrics(run_dir)
    if not rows:
        return ["No metrics were logged (metrics.jsonl is missing or empty)."]
    terms = [t for t in LOSS_TERMS if any(t in r for r in rows)]
    picked = [rows[0], rows[-1]] if len(rows) > 1 else rows
    lines = [f"Training losses from `{training.METRICS_FILE}` ({len(rows)} logged steps), first and last:", "",
             "| step | " + " | ".join(terms) + " |", "|---|" + "---|" * len(terms)]
    lines += [f"| {r['step']} | " + " | ".join(f"{r[t]:.4f}" if t in r else "—" for t in terms) + " |" for r in picked]
    return lines + ["", f"The {method} stages have no test metric: fine-tune the checkpoint to measure it (below)."]


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


def _text_classifier_results(run_dir: str, this: dict) -> list[str]:
    same, left_out = classifier_results(run_dir, this)
    metrics = (("test_macro_f1", "macro-F1"), ("test_micro_f1", "micro-F1"), ("test_acc", "accuracy"))
    has_val = any(r.get("val_acc") is not None for r in same.values())
    lines = [f"Test macro-F1, micro-F1 and accuracy on `{this['dataset']}`'s test split "
             f"({this.get('num_test', '?')} texts), per fine-tuning seed of these settings (this model: seed "
             f"{this['seed']}):", "",
             "| seed | test macro-F1 (%) | test micro-F1 (%) | test accuracy (%) | test loss |"
             + (" val accuracy (%) |" if has_val else ""),
             "|---|---|---|---|---|" + ("---|" if has_val else "")]
    for seed, r in same.items():
        cells = [f"{100 * r[key]:.2f}" if isinstance(r.get(key), (int, float)) else "—" for key, _ in metrics]
        loss = f"{r['test_loss']:.4f}" if isinstance(r.get("test_loss"), (int, float)) else "—"
        val = "" if not has_val else " — |" if r.get("val_acc") is None else f" {100 * r['val_acc']:.2f} |"
        mark = " (this model)" if seed == this["seed"] else ""
        lines.append(f"| {seed}{mark} | {' | '.join(cells)} | {loss} |{val}")
    seeds = f"{len(same)} seed{'s' if len(same) > 1 else ''}"
    means = []
    for key, name in metrics:
        values = [100 * r[key] for r in same.values() if isinstance(r.get(key), (int, float))]
        if not values:
            continue
        mean, std = mean_std(values)
        spread = f" ± {std:.2f}" if std is not None else ""
        counted = "" if len(values) == len(same) else f" (the {len(values)} seeds that recorded it)"
        means.append(f"{name} **{mean:.2f}{spread} %**{counted}")
    one = len(same) == 1
    lines += ["", f"Mean{'' if one else ' ± sample std'} over {seeds}: {', '.join(means)}."]
    if left_out:
        lines += ["", f"Not included: {', '.join(left_out)}."]
    return lines


def _text_usage(reference: str) -> list[str]:
    return [
        "Fill-mask with the tokenizer the model was trained with (saved beside it):",
        "",
        "```python",
        "from transformers import AutoTokenizer, pipeline",
        "",
        f"model_id = {reference!r}",
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        "fill = pipeline(\"fill-mask\", model=model_id, tokenizer=tokenizer)",
        "print(fill(f\"The results were {tokenizer.mask_token} than expected.\"))",
        "```",
        "",
        "`AutoModelForMaskedLM.from_pretrained(model_id)` loads the model alone (encoder and LM head). Features:",
        "RoBERTa masks nothing itself, so the encoder's `<s>` token on the text is h(x), the feature",
        "self-distillation matches (the load report lists the LM head's weights as UNEXPECTED: not needed here).",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        f"model_id = {reference!r}",
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        "encoder = AutoModel.from_pretrained(model_id, add_pooling_layer=False).eval()",
        "inputs = tokenizer(\"A sentence to embed.\", truncation=True, return_tensors=\"pt\")",
        "with torch.no_grad():",
        "    features = encoder(**inputs).last_hidden_state[:, 0]  # (1, hidden_size): the <s> token h(x)",
        "```",
        "",
        "Fine-tuning: `AutoModelForSequenceClassification.from_pretrained(model_id, num_labels=K)` (a new head on",
        "the `<s>` token), or this repository's stage 3 on a checkpoint directory:",
        "`python finetune.py --dataset DATASET --checkpoint_dir DIR --ckpt_name NAME` reads `DIR/NAME/DATASET`.",
    ]


def _text_classifier_usage(reference: str, max_length) -> list[str]:
    return [
        "```python",
        "from transformers import AutoTokenizer, pipeline",
        "",
        f"model_id = {reference!r}",
        "tokenizer = AutoTokenizer.from_pretrained(model_id)  # the tokenizer used in training, saved beside it",
        "classify = pipeline(\"text-classification\", model=model_id, tokenizer=tokenizer)",
        f"print(classify(\"A sentence to classify.\", truncation=True, max_length={max_length}))",
        "```",
        "",
        f"Training truncated every text at {max_length} tokens: `truncation=True, max_length={max_length}` does",
        "the same. `AutoModelForSequenceClassification.from_pretrained(model_id)` loads the model alone;",
        "`config.id2label` names the classes.",
    ]


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


def _terms(base: str, dataset: str, text: bool = False) -> list[str]:
    lines = ["The code that trained this model is Apache-2.0 (the repository's LICENSE). The weights derive from "
             "the initial model and the training data, which have their own terms:", ""]
    sources = TEXT_DATASET_SOURCES if text else DATASET_SOURCES
    if is_hub_id(base) and base.startswith("facebook/vit-mae"):
        lines.append(f"- θ₀ `{base}`: check the terms at https://huggingface.co/{base} (converted from the MAE "
                     f"release, {MAE_ORIGIN})")
    elif is_hub_id(base, bare=text):
        lines.append(f"- θ₀ `{base}`: check the terms at https://huggingface.co/{base}")
    elif base in (TINY_NAME, TEXT_TINY_NAME):
        lines.append(f"- θ₀ `{base}`: initialised by this repository's code (its licence)")
    else:
        lines.append(f"- θ₀ `{base}` (a local directory): check the terms of the model it holds")
    if dataset in sources:
        title, link = sources[dataset]
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
    this = None
    if stage == "finetune":
        this = result if result is not None else _read_record(os.path.normpath(run_dir) + ".json")
        if not isinstance(this, dict) or "test_acc" not in this:
            raise UserError(f"{os.path.normpath(run_dir)}.json (the run's result) is missing or has no test_acc")
    text = card_modality(model_dir, record, this) == "text"
    meta = dict(library_name="transformers", base_model=base if is_hub_id(base, bare=text) else None,
                datasets=list(datasets) if datasets else [dataset], **licence)
    if stage == "finetune" and text:
        this = {**this, **record}  # the result file is the result plus the record
        title = (f"# `{dataset}` classifier: RoBERTa fine-tuned from "
                 f"{'θ₀' if args.get('scratch') else this.get('init')}, seed {args['seed']}")
        did, results = _text_classifier_did(args, this), _text_classifier_results(run_dir, this)
        usage = _text_classifier_usage(reference, args.get("max_length"))
        seed = f"seed {args['seed']}"
        scores = [(key, kind, config, f"test {name} ({seed})") for key, kind, config, name in (
            ("test_macro_f1", "f1", "macro", "macro-F1"), ("test_micro_f1", "f1", "micro", "micro-F1"),
            ("test_acc", "accuracy", None, "accuracy")) if isinstance(this.get(key), (int, float))]
        meta.update(pipeline_tag="text-classification",
                    model_name=repo_id or f"{dataset}-{this.get('init')}-seed{args['seed']}",
                    tags=["text", "text-classification", "roberta", *_route_tag(args)],
                    eval_results=[EvalResult(task_type="text-classification", dataset_type=meta["datasets"][0],
                                             dataset_name=dataset, dataset_split="test", metric_type=kind,
                                             metric_config=config, metric_value=this[key], metric_name=name)
                                  for key, kind, config, name in scores])
    elif stage == "finetune":
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
    elif text:
        kind = {"further-pretrain": "further pre-trained RoBERTa (the teacher)",
                "self-distill": "self-distilled RoBERTa (the student)"}[stage]
        title = f"# `{dataset}`: {kind}, {args['steps']} steps"
        did, results = _text_what_it_did(stage, args, record), _mae_results(run_dir, "MLM")
        usage = _text_usage(reference)
        meta.update(pipeline_tag="fill-mask",
                    tags=["text", "roberta", "masked-language-modeling",
                          "further-pretraining" if stage == "further-pretrain" else "self-distillation"])
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
        "## Licence and terms", "", *_terms(base, dataset, text), "",
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

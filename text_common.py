"""What the three stages do differently on text (RoBERTa + masked language modelling): which half of the method a
run is (the dataset decides), the defaults of the text recipe with their sources, and MLM's masks for a step.

The paper names RoBERTa, MLM and its four text datasets but none of its text settings, so every text default is a
choice, taken from task-adaptive pre-training (TAPT: Gururangan et al. 2020, "Don't Stop Pretraining", Tables 13-14
and allenai/dont-stop-pretraining), where the vision recipe does not carry over. Image runs keep the paper's values:
a flag whose default differs between the two is marked not given in the parsers (utils.not_given) and filled in
here; a flag given on the command line always wins. README.md, "Differences from the original code", lists them.
"""
import math
import os

import utils
from data.text import TextSplit, dataset_modality
from errors import UserError
from models.hub import TEXT_TINY_NAME, TINY_NAME, modality
from models.roberta_mlm import NOISE_PLANES, TokenizedSplit, mlm_masks, special_tokens_mask

TEXT_MODEL = "roberta-base"  # Gururangan et al.'s model (the paper says RoBERTa, not which size)
IMAGE_MODEL = "facebook/vit-mae-base"
MLM_BETAS = (0.9, 0.98)  # TAPT's Adam betas and epsilon, for MLM and for fine-tuning (RoBERTa's own)
MLM_EPS = 1e-6
WARMUP_FRACTION = 0.06  # TAPT: linear warmup over the first 6 % of the steps, then linear decay
FINETUNE_EPOCHS = 10  # TAPT's fine-tuning length (without their early stopping on dev)

# The text recipe's values of the flags whose parser default is the image recipe's: stage -> {flag: value}.
# MLM stages: TAPT's batch 256 and lr 1e-4; 15 % of the tokens selected (BERT / RoBERTa). Fine-tuning: batch 16,
# lr 2e-5, weight decay 0.1 (TAPT's classifier configs). The MAE stages' step count carries over (--steps).
TEXT_DEFAULTS = {
    "mlm": dict(model_name=TEXT_MODEL, batch_size=256, lr=1e-4, mask_ratio=0.15),
    "finetune": dict(model_name=TEXT_MODEL, batch_size=16, lr=2e-5, weight_decay=0.1),
}
IMAGE_ONLY_FINETUNE_FLAGS = {"recipe": "release", "layer_decay": 1.0, "drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0,
                             "label_smoothing": 0.0, "reprob": 0.0, "randaug": "none", "schedule": "linear"}
REPLACEABLE = ("model_name", "batch_size", "lr", "warmup_steps", "mask_ratio", "steps", "weight_decay")


def run_modality(args) -> str:
    """"image" or "text": the dataset's kind (data.text.dataset_modality), checked against --model_name when it is
    given (a text model on images, or an image model on text, is one line naming both)."""
    kind = dataset_modality(args.dataset, args.data_dir)
    if kind == "text" and args.cuda_graph:
        raise UserError("--cuda_graph needs the same shapes at every step, and text batches are padded to their "
                        "longest text; drop --cuda_graph for text datasets")
    name = args.model_name
    if isinstance(name, utils.NotGiven):
        return kind
    if kind == "text" and (name == TINY_NAME or modality(name) != "text"):
        raise UserError(f"--model_name {name} is an image model but '{args.dataset}' is a text dataset; pass a "
                        f"RoBERTa model (e.g. {TEXT_MODEL}, a local directory, or {TEXT_TINY_NAME} on a CPU)")
    if kind == "image" and (name == TEXT_TINY_NAME or name != TINY_NAME and _local_text_model(name)):
        raise UserError(f"--model_name {name} is a text model but '{args.dataset}' is an image dataset; pass a "
                        f"ViT-MAE model (e.g. {IMAGE_MODEL}, a local directory, or {TINY_NAME} on a CPU)")
    return kind


def _local_text_model(name: str) -> bool:
    return os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json")) and modality(name) == "text"


def resolve_defaults(args, kind: str, stage: str | None = None, train_size: int | None = None) -> None:
    """Fill in, in place, every replaceable flag not given: the text recipe's value for a text run (`stage`: "mlm"
    or "finetune"), the parser's (the image recipe's) otherwise, as plain values (the record holds what ran).
    Text only: fine-tuning's steps default to FINETUNE_EPOCHS epochs of `train_size` texts, and the warmup of
    both to WARMUP_FRACTION of the steps."""
    values = TEXT_DEFAULTS[stage] if kind == "text" else {}
    for flag in values:
        setattr(args, flag, utils.given_or(getattr(args, flag), values[flag]))
    if kind == "text":
        if isinstance(args.steps, utils.NotGiven) and train_size is not None:
            args.steps = max(1, math.ceil(FINETUNE_EPOCHS * train_size / args.batch_size))
        args.steps = utils.plain(args.steps)
        args.warmup_steps = utils.given_or(args.warmup_steps, round(WARMUP_FRACTION * args.steps))
    for flag in REPLACEABLE:
        if hasattr(args, flag):
            setattr(args, flag, utils.plain(getattr(args, flag)))


def no_weight_decay(name: str, param) -> bool:
    """RoBERTa's rule (TAPT's and transformers' examples: no decay on bias and LayerNorm.weight): no decay on
    biases and 1-D parameters."""
    return param.ndim <= 1 or name.endswith(".bias")


def tokenized(texts: TextSplit, tokenizer, max_length: int) -> TokenizedSplit:
    """A split of a text dataset, tokenised once with `tokenizer` and cut at max_length tokens; the token ids are
    kept in <data_dir>/<dataset>/.cache/ for the next run (keyed by the texts, the tokenizer and the length)."""
    return TokenizedSplit(texts, tokenizer, max_length, os.path.join(texts.root, ".cache"))


def check_image_only_flags(args) -> None:
    """MAE's fine-tuning recipe is made of image pieces (RandAugment, erasing, mixup / cutmix on pixels, layer decay
    and drop path on the ViT's names): refused on text, naming the first flag that asks for one."""
    asked = [f"--{flag} {getattr(args, flag)}" for flag, off in IMAGE_ONLY_FINETUNE_FLAGS.items()
             if getattr(args, flag) != off]
    if asked:
        raise UserError(f"{asked[0]} is part of MAE's image fine-tuning recipe and does not apply to text; drop it "
                        f"(text fine-tuning follows TAPT: --recipe release)")


def draw_mlm_masks(run, step: int, input_ids, attention_mask, tokenizer, mask_ratio: float, max_length: int):
    """MLM's masked input and labels for step `step`'s (B_local, L) batch: per-token uniform draws that are a
    function of (seed, step, sample, position) -- (B, max_length, 4) drawn, the first L positions used -- so the
    masks depend neither on the number of processes nor on the batch's padding (models.roberta_mlm.mlm_masks)."""
    noise = run.global_rand(step, utils.STREAM_NOISE, max_length, NOISE_PLANES)[:, :input_ids.shape[1]]
    special = special_tokens_mask(input_ids, attention_mask, tokenizer)
    return mlm_masks(input_ids, special, noise, tokenizer.mask_token_id, len(tokenizer), mask_ratio)

"""CPU throughput of the text stages' training steps, measured against a plain transformers loop, side by side.

For each text stage (MLM further pre-training, self-distillation, fine-tuning) two loops train the same θ₀ on the
same padded batches, in one process:
  product  the stage's step as its main_text runs it: the optimizer from Run.adamw (RoBERTa's betas and epsilon,
           no decay on biases and 1-D tensors, warmup then linear decay), the masks of text_common.draw_mlm_masks,
           Run.token_mean_divisor, then per step the stage's loss (pretrain.mlm_training_loss on MLMObjective,
           selftrain.mlm_training_loss on MLMWithFeature, finetune.text_training_loss on build_text_classifier's
           model) under Run.micro_batches / forward / backward / step, through Run.without_directory
  plain    what a transformers user writes: DataCollatorForLanguageModeling's masks (torch_mask_tokens),
           RobertaForMaskedLM's own `labels=` loss (the LM head on every token), RobertaForSequenceClassification's
           `labels=` loss, torch AdamW with transformers' no-decay groups (bias, LayerNorm.weight) and
           get_linear_schedule_with_warmup, clip_grad_norm_ where the stage clips, zero_grad
with the stage's recipe (lr, weight decay, warmup, clipping, distillation weight) in both. Self-distillation's
teacher features are computed once before the clock, as selftrain.py does; its plain loop adds the squared distance
of `<s>` on the unmasked text to the MLM loss, one backward pass. Padding happens before the clock in both (the
product's loader pads, the plain loop's collator would): the timed step starts from the padded batch.

The rounds interleave (product, plain, product, plain, ...), each running the same --steps batches, so a change in
the machine's load hits both; tokens/s is the real (non-padding) tokens over the seconds of all timed rounds, and the
ratio product / plain comes with its range over the rounds. The machine's load average is printed at the start and
the end: on a shared CPU the numbers are only as good as the load lets them be.

    python -m lab.bench_text                        # roberta-tiny, batch 16, texts up to 128 tokens
    python -m lab.bench_text --size base --batch_size 4 --steps 2 --rounds 2   # roberta-base-sized, random weights

The texts are generated (words drawn from a fixed list, lengths spread between a quarter of --max_length and
--max_length), tokenised by roberta-tiny's byte-level tokenizer (one token per byte) for both sizes: the cost of
a step depends on the number of tokens, not on which ids they are.
"""
import argparse
import copy
import os
import time

import numpy as np
import torch
import transformers
from transformers import DataCollatorForLanguageModeling, RobertaConfig, get_linear_schedule_with_warmup

import finetune
import pretrain
import selftrain
import text_common
import training
import utils
from lab.bench import describe
from models import MLMObjective, MLMWithFeature, build_text_classifier, load_mlm, load_tokenizer
from models.hub import TEXT_TINY_NAME
from models.roberta_mlm import MAX_LENGTH, first_token_feature, pad_batch, text_encoder_state, tokenize_texts
from training.mae_recipe import resolve_recipe

STAGES = ("further-pretrain", "self-distill", "finetune")
SCRIPTS = {"further-pretrain": pretrain, "self-distill": selftrain, "finetune": finetune}
SIZES = ("tiny", "base")
NUM_CLASSES = 4
DEFAULT_BATCH = {"tiny": 16, "base": 4}
# roberta-base's architecture: RobertaConfig()'s defaults (width 768, 12 layers, vocabulary 50,265) with the three
# values roberta-base's config.json sets otherwise
ROBERTA_BASE = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they one you were all we her she there would their will when who him been has more if no out so said what "
         "up its about than into them can only other new some could time these two may first then do any like my "
         "now over such our man me even most made after also did many before must through back years where much "
         "your way well down should because each just those people how too little state good very make world "
         "protein binding cell expression receptor inhibitor citation method results model data analysis").split()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tokens/s of the text stages' steps against a plain transformers loop.",
                                allow_abbrev=False)
    p.add_argument("--size", default="tiny", choices=SIZES,
                   help=f"tiny: {TEXT_TINY_NAME} as the stages load it; base: roberta-base's architecture "
                        f"(RobertaConfig defaults) with random weights, no download")
    p.add_argument("--batch_size", type=utils.int_at_least(1), default=None,
                   help=f"texts per step (default: {DEFAULT_BATCH['tiny']} tiny, {DEFAULT_BATCH['base']} base)")
    p.add_argument("--max_length", type=max_length_spec, default=128,
                   help="tokens per text at most, special tokens included; the texts' lengths spread from a "
                        "quarter of it to it")
    p.add_argument("--steps", type=utils.int_at_least(1), default=10,
                   help="timed steps per round and loop (each a different batch; every round runs the same ones)")
    p.add_argument("--rounds", type=utils.int_at_least(1), default=10,
                   help="rounds of (product, plain), interleaved")
    p.add_argument("--warmup_steps", type=utils.int_at_least(0), default=2, help="untimed steps of each loop first")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="which stages to measure")
    p.add_argument("--threads", type=utils.threads_spec, default="auto", help=utils.THREADS_HELP)
    p.add_argument("--seed", type=int, default=0, help="the texts, labels and the product's draws")
    return p


def max_length_spec(value: str) -> int:
    """An argparse type: a token count from 8 to RoBERTa's MAX_LENGTH."""
    number = utils.int_at_least(8)(value)
    if number > MAX_LENGTH:
        raise argparse.ArgumentTypeError(f"{number} is above RoBERTa's {MAX_LENGTH} positions; pass at most "
                                         f"{MAX_LENGTH}")
    return number


# ----------------------------------------------------------------------------- the model, texts and batches

def initial_mlm(size: str) -> transformers.RobertaForMaskedLM:
    """θ₀: roberta-tiny as the stages load it, or roberta-base's architecture with random weights (attention
    dropout off, as load_mlm sets it for every model)."""
    if size == "tiny":
        return load_mlm(TEXT_TINY_NAME)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = RobertaConfig(**ROBERTA_BASE, attention_probs_dropout_prob=0.0)
        return transformers.RobertaForMaskedLM(config)


def generated_texts(count: int, max_length: int, seed: int) -> list[str]:
    """`count` texts of words from WORDS, each of a length drawn between max_length / 4 and max_length - 2
    characters (one token per byte, plus <s> and </s>)."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        target = int(rng.integers(max(1, max_length // 4), max_length - 1))
        words = []
        while sum(len(w) + 1 for w in words) < target:
            words.append(WORDS[int(rng.integers(len(WORDS)))])
        texts.append(" ".join(words)[:target].strip())
    return texts


class Batch:
    """One step's texts, padded: input_ids, attention_mask (B, L), labels (B,), the tokenizer's special-tokens mask
    (B, L) for the collator (as `return_special_tokens_mask=True` gives it), and the real tokens."""

    def __init__(self, ids: list[list[int]], labels: list[int], tokenizer):
        self.input_ids, self.attention_mask = pad_batch(ids, tokenizer.pad_token_id)
        self.labels = torch.tensor(labels, dtype=torch.long)
        specials = torch.tensor(tokenizer.all_special_ids)
        self.special_tokens_mask = torch.isin(self.input_ids, specials).long()
        self.tokens = int(self.attention_mask.sum())
        self.teacher_cls = None  # self-distillation: the frozen teacher's <s>, set before the clock


def make_batches(args, tokenizer) -> list[Batch]:
    texts = generated_texts(args.batch_size * args.steps, args.max_length, args.seed)
    ids = tokenize_texts(tokenizer, texts, args.max_length)
    labels = np.random.default_rng(args.seed + 1).integers(NUM_CLASSES, size=len(texts)).tolist()
    b = args.batch_size
    return [Batch(ids[i:i + b], labels[i:i + b], tokenizer) for i in range(0, len(texts), b)]


# ----------------------------------------------------------------------------- the product's steps

def product_run(args, stage: str) -> tuple[training.Run, argparse.Namespace]:
    """training.Run with the stage script's text defaults (text_common.resolve_defaults, and for fine-tuning the
    release recipe as finetune.main_text resolves it), writing nothing (Run.without_directory)."""
    script = SCRIPTS[stage]
    argv = ["--dataset", "synthetic", "--device", "cpu", "--threads", str(args.threads), "--batch_size",
            str(args.batch_size), "--steps", str(args.total_steps), "--workers", "0", "--max_length",
            str(args.max_length), "--seed", str(args.seed)]
    if script is finetune:
        argv += ["--scratch", "True"]
    run_args = script.get_args_parser().parse_args(argv)
    text_common.resolve_defaults(run_args, "text", "finetune" if script is finetune else "mlm")
    if script is finetune:
        resolve_recipe(run_args)
    return training.Run.without_directory(run_args, f"bench-text {stage}", None), run_args


def product_adamw(run: training.Run, model):
    return run.adamw(model, text_common.no_weight_decay, text_common.MLM_BETAS, eps=text_common.MLM_EPS)


def product_further_pretrain(args, theta0, tokenizer):
    """pretrain.main_text's step on MLMObjective."""
    run, run_args = product_run(args, "further-pretrain")
    mlm = copy.deepcopy(theta0)
    model = run.prepare(MLMObjective(mlm), *product_adamw(run, mlm))
    model.train()

    def train_step(step, masked_ids, labels, attention_mask, num_masked):
        for micro in run.micro_batches(masked_ids, labels, attention_mask):
            with run.forward(step):
                loss, terms = pretrain.mlm_training_loss(model, *micro, num_masked)
            run.backward(loss, terms)
        run.step(step)

    def step(i, batch: Batch):
        masked_ids, labels = text_common.draw_mlm_masks(run, i, batch.input_ids, batch.attention_mask, tokenizer,
                                                        run_args.mask_ratio, run_args.max_length)
        train_step(i, masked_ids, labels, batch.attention_mask, run.token_mean_divisor((labels != -100).sum()))
    return step, run_args


def product_self_distill(args, theta0, tokenizer):
    """selftrain.main_text's step on MLMWithFeature (the teacher's features looked up)."""
    run, run_args = product_run(args, "self-distill")
    student_mlm = copy.deepcopy(theta0)
    student = run.prepare(MLMWithFeature(student_mlm), *product_adamw(run, student_mlm))
    student.train()

    def train_step(step, masked_ids, labels, attention_mask, input_ids, teacher_cls, num_masked):
        for micro in run.micro_batches(masked_ids, labels, attention_mask, input_ids, teacher_cls):
            with run.forward(step):
                loss, terms = selftrain.mlm_training_loss(student, *micro, num_masked,
                                                          distill_weight=run_args.distill_weight)
            run.backward(loss, terms)
        run.step(step)

    def step(i, batch: Batch):
        masked_ids, labels = text_common.draw_mlm_masks(run, i, batch.input_ids, batch.attention_mask, tokenizer,
                                                        run_args.mask_ratio, run_args.max_length)
        train_step(i, masked_ids, labels, batch.attention_mask, batch.input_ids, batch.teacher_cls,
                   run.token_mean_divisor((labels != -100).sum()))
    return step, run_args


def product_finetune(args, theta0, tokenizer):
    """finetune.main_text's step on build_text_classifier's RobertaForSequenceClassification."""
    run, run_args = product_run(args, "finetune")
    model = build_text_classifier(theta0.config, text_encoder_state(theta0), NUM_CLASSES, run_args.dropout,
                                  seed=run_args.seed)
    classifier = run.prepare(model, *product_adamw(run, model))
    classifier.train()

    def train_step(step, input_ids, attention_mask, labels):
        for micro in run.micro_batches(input_ids, attention_mask, labels):
            with run.forward(step):
                loss, terms = finetune.text_training_loss(classifier, *micro)
            run.backward(loss, terms)
        run.step(step)

    def step(i, batch: Batch):
        train_step(i, batch.input_ids, batch.attention_mask, batch.labels)
    return step, run_args


PRODUCT = {"further-pretrain": product_further_pretrain, "self-distill": product_self_distill,
           "finetune": product_finetune}


# ----------------------------------------------------------------------------- the plain transformers loops

def plain_adamw(model, run_args):
    """torch AdamW with the no-decay groups of transformers' examples, and transformers' linear schedule."""
    no_decay = ("bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not any(k in n for k in no_decay)],
               "weight_decay": run_args.weight_decay},
              {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=run_args.lr, betas=text_common.MLM_BETAS, eps=text_common.MLM_EPS)
    return optimizer, get_linear_schedule_with_warmup(optimizer, run_args.warmup_steps, run_args.steps)


def plain_update(model, loss, optimizer, scheduler, clip_grad) -> None:
    loss.backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def plain_mlm(theta0, tokenizer, run_args, distill: bool):
    """RobertaForMaskedLM with DataCollatorForLanguageModeling's masks and its own `labels=` loss; with `distill`,
    plus the squared distance of `<s>` on the unmasked text to the teacher's, in the same backward pass."""
    model = copy.deepcopy(theta0).train()
    optimizer, scheduler = plain_adamw(model, run_args)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=run_args.mask_ratio)

    def step(_, batch: Batch):
        masked_ids, labels = collator.torch_mask_tokens(batch.input_ids.clone(), batch.special_tokens_mask.clone())
        loss = model(input_ids=masked_ids, attention_mask=batch.attention_mask, labels=labels).loss
        if distill:
            h = model.roberta(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[:, 0]
            loss = loss + run_args.distill_weight * (h - batch.teacher_cls).pow(2).sum(dim=-1).mean()
        plain_update(model, loss, optimizer, scheduler, run_args.clip_grad)
    return step


def plain_classifier(theta0, run_args):
    """RobertaForSequenceClassification (the same encoder and head as the product's) with its `labels=` loss."""
    product_model = build_text_classifier(theta0.config, text_encoder_state(theta0), NUM_CLASSES, run_args.dropout,
                                          seed=run_args.seed)
    model = transformers.RobertaForSequenceClassification(product_model.config)
    model.load_state_dict(product_model.state_dict())
    model.train()
    optimizer, scheduler = plain_adamw(model, run_args)

    def step(_, batch: Batch):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        plain_update(model, loss, optimizer, scheduler, run_args.clip_grad)
    return step


def plain_step(stage: str, theta0, tokenizer, run_args):
    if stage == "finetune":
        return plain_classifier(theta0, run_args)
    return plain_mlm(theta0, tokenizer, run_args, distill=stage == "self-distill")


# ----------------------------------------------------------------------------- timing

def timed_round(step, batches: list[Batch], first: int) -> float:
    start = time.perf_counter()
    for k, batch in enumerate(batches):
        step(first + k, batch)
    return time.perf_counter() - start


def measure_stage(args, stage: str, theta0, tokenizer, batches: list[Batch]) -> dict:
    """Warmup steps of each loop, then --rounds rounds of (product, plain) on the same batches."""
    if stage == "self-distill":
        teacher = copy.deepcopy(theta0.roberta).eval().requires_grad_(False)
        with torch.no_grad():
            for batch in batches:
                batch.teacher_cls = first_token_feature(teacher, batch.input_ids, batch.attention_mask)
    product, run_args = PRODUCT[stage](args, theta0, tokenizer)
    plain = plain_step(stage, theta0, tokenizer, run_args)
    loops = {"product": product, "plain": plain}
    for step in loops.values():
        timed_round(step, [batches[k % len(batches)] for k in range(args.warmup_steps)], 0)
    seconds = {name: [] for name in loops}
    for r in range(args.rounds):
        for name, step in loops.items():
            seconds[name].append(timed_round(step, batches, args.warmup_steps + r * len(batches)))
    tokens = sum(batch.tokens for batch in batches)  # per round
    rates = {name: tokens * args.rounds / sum(s) for name, s in seconds.items()}
    round_ratios = [plain_s / product_s for product_s, plain_s in zip(seconds["product"], seconds["plain"])]
    return {"stage": stage, "tokens_per_round": tokens, "product_tokens_per_s": rates["product"],
            "plain_tokens_per_s": rates["plain"], "ratio": rates["product"] / rates["plain"],
            "round_ratio_min": min(round_ratios), "round_ratio_max": max(round_ratios)}


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'stage':<18}{'product tok/s':>15}{'plain tok/s':>13}{'ratio':>8}  rounds' ratios", flush=True)
    print(f"{row['stage']:<18}{row['product_tokens_per_s']:>15.1f}{row['plain_tokens_per_s']:>13.1f}"
          f"{row['ratio']:>8.3f}  {row['round_ratio_min']:.3f}-{row['round_ratio_max']:.3f}", flush=True)


def load_line(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average at {when}: {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} CPUs"


def main(args) -> list[dict]:
    torch.set_num_threads(utils.cpu_threads(args.threads, "cpu"))
    args.batch_size = args.batch_size or DEFAULT_BATCH[args.size]
    args.total_steps = args.warmup_steps + args.rounds * args.steps + 1
    print(f"device: {describe(torch.device('cpu'))}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}", flush=True)
    print(load_line("start"), flush=True)
    theta0, tokenizer = initial_mlm(args.size), load_tokenizer(TEXT_TINY_NAME)
    batches = make_batches(args, tokenizer)
    c = theta0.config
    print(f"model {TEXT_TINY_NAME if args.size == 'tiny' else 'roberta-base-sized, random weights'} (width "
          f"{c.hidden_size}, {c.num_hidden_layers} layers, vocabulary {c.vocab_size}), fp32; batch {args.batch_size}, "
          f"texts up to {args.max_length} tokens, {sum(b.tokens for b in batches)} real tokens (of "
          f"{sum(b.input_ids.numel() for b in batches)} padded positions) per round; "
          f"{args.warmup_steps} warmup steps, then {args.rounds} rounds x {args.steps} steps of each loop, "
          f"interleaved", flush=True)
    rows = []
    for stage in args.stages:
        rows.append(measure_stage(args, stage, theta0, tokenizer, batches))
        print_row(rows[-1], header=len(rows) == 1)
    print(load_line("end"), flush=True)
    return rows


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)

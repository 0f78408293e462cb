"""What the two MAE stages (pretrain.py, selftrain.py) share: their flags, the optimizer's betas, the
weight-decay rule and where their checkpoints go. Neither entry script imports the other."""
import argparse
import os

import paper
import utils

MAE_BETAS = (0.9, 0.95)


def further_pretrain_dir(checkpoint_dir: str, steps: int, dataset: str) -> str:
    """Stage 1's output (the teacher): <checkpoint_dir>/further-pretrain-<steps>/<dataset>."""
    return os.path.join(checkpoint_dir, paper.teacher(steps), dataset)


def self_distill_dir(checkpoint_dir: str, steps: int, dataset: str) -> str:
    """Stage 2's output (the student): <checkpoint_dir>/self-further-pretrain-<steps>/<dataset>."""
    return os.path.join(checkpoint_dir, paper.student(steps), dataset)


def creating_command(ckpt_name: str, dataset: str, checkpoint_dir: str) -> str:
    """The launcher command that writes <checkpoint_dir>/<ckpt_name>/<dataset> (named in "not found" errors)."""
    where = "" if checkpoint_dir == utils.shared_parser().get_default("checkpoint_dir") else \
        f" --checkpoint_dir {checkpoint_dir}"
    for prefix, launcher in (("self-further-pretrain-", "run_selftrain.sh"), ("further-pretrain-", "run_pretrain.sh")):
        if ckpt_name.startswith(prefix):
            return f"bash {launcher} GPU {dataset} {ckpt_name[len(prefix):]}{where}"
    return "pretrain.py or selftrain.py with --output_dir"


def mae_args_parser() -> argparse.ArgumentParser:
    """Flags of the two MAE stages (pre-training and self-distillation)."""
    p = argparse.ArgumentParser(add_help=False, parents=[utils.shared_parser()])
    g = p.add_argument_group("MAE")
    g.add_argument("--mask_ratio", type=utils.finite_float(0, 1, low_open=True, high_open=True),
                   default=utils.not_given(0.75),
                   help="fraction of patches hidden from the encoder (text: of the tokens MLM selects)")
    g.add_argument("--norm_pix_loss", type=utils.str2bool, default=True,
                   help="reconstruct per-patch normalised pixels (True/False)")
    return p


def no_weight_decay(name: str, param) -> bool:
    """MAE's rule (timm's param_groups_weight_decay): no decay on biases and 1-D parameters."""
    return param.ndim <= 1 or name.endswith(".bias")

"""The paper's table as names, written once for the stages, report.py and the launchers: the six datasets in the
paper's order, the length of the two MAE stages, the fine-tuning seeds, and the names of fine-tuning's three
starting points (its routes), which are also the checkpoints' folder names. Standard library only: the launchers
(launch/) import it without torch."""

PAPER_DATASETS = ("aircraft", "chest_xray", "cub", "dtd", "stanford_dogs", "vgg_flower_102")
MAE_STEPS = 20000  # further pre-training and self-distillation
SEEDS = ("1", "2", "3", "4", "5")  # fine-tuning is repeated this many times per (dataset, route)
INITIAL = "initial"  # fine-tuning from θ₀


def teacher(mae_steps) -> str:
    """The further pre-trained checkpoint's name (the teacher): further-pretrain-<steps>."""
    return f"further-pretrain-{mae_steps}"


def student(mae_steps) -> str:
    """The self-distilled checkpoint's name (the student): self-further-pretrain-<steps>."""
    return f"self-further-pretrain-{mae_steps}"


def routes(mae_steps) -> list[str]:
    """Fine-tuning's starting points, in the table's order: θ₀, the teacher, the student."""
    return [INITIAL, teacher(mae_steps), student(mae_steps)]

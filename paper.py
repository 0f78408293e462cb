"""The paper's table as names, written once for the stages, report.py and the launchers: the six image datasets and
the four text datasets in the paper's order, the metric each text dataset is reported with, the length of the two
MAE stages, the fine-tuning seeds, and the names of fine-tuning's three starting points (its routes), which are also
the checkpoints' folder names. Standard library only: the launchers (launch/) import it without torch."""

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

# The text half (RoBERTa, MLM): the paper's four text datasets in its order, and the other text datasets this
# repository builds (data/text.py: their label counts and split sizes).
PAPER_TEXT_DATASETS = ("chemprot", "citation_intent", "sciie", "twitter_emotion")
TEXT_DATASETS = (*PAPER_TEXT_DATASETS, "fortunes")
MICRO_F1_DATASETS = ("chemprot",)  # Gururangan et al. 2020 report micro-F1 for ChemProt, macro-F1 for the others
METRIC_NAMES = {"acc": "accuracy", "macro_f1": "macro-F1", "micro_f1": "micro-F1"}


def metric(dataset: str, modality: str | None = None) -> str:
    """The score the table shows for a dataset, a key of METRIC_NAMES (a result holds it as test_<metric>): micro-F1
    for ChemProt, macro-F1 for every other text dataset -- a known one by name, a user's own by its results'
    modality "text" -- as Gururangan et al. 2020 (Don't Stop Pretraining) report them; accuracy for images."""
    if dataset in MICRO_F1_DATASETS:
        return "micro_f1"
    if dataset in TEXT_DATASETS or modality == "text":
        return "macro_f1"
    return "acc"

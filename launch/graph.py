"""The paper's table, described once: for each dataset further pre-training (the teacher), self-distillation (the
student, from the teacher), fine-tuning from the three starting points (routes) over the seeds; then the report.
Also the rules for which flags reach which run. run_all.sh (launch.launchers, on one machine) and launch/submit.py
(on a cluster) both build their jobs from table(); only the standard library and paper.py (the table's names), so
the launchers need no torch.

    table(["cub", "dtd"], 50) -> cub pretrain, dtd pretrain, cub finetune initial, dtd finetune initial,
        cub selftrain (after cub pretrain), cub finetune further-pretrain-50 (after cub pretrain),
        cub finetune self-further-pretrain-50 (after cub selftrain), the same for dtd, report (after all)"""
import dataclasses

from paper import MAE_STEPS, PAPER_DATASETS, SEEDS, routes, student, teacher  # noqa: F401 (the table's names)

SAVE_EVERY_STEPS = 1000  # the table's runs save this often, so that a stopped table continues where it stopped

# Stage flags the table sets for each run itself: a later copy among the user's flags would win in the stage but
# not in the paths the launcher (and launch.submit --status) reads back, so a summary would show another run's result.
# No stage's parser accepts abbreviations, so the exact names are all there is to check.
SET_PER_RUN = ("--dataset", "--seed", "--scratch", "--ckpt_name", "--output_dir")
# fine-tuning's own flags, which the MAE stages' parsers refuse; True: the flag takes a value
FINETUNE_ONLY = {"--results_dir": True, "--save_model": False}


@dataclasses.dataclass
class Node:
    """One run of the table (for fine-tuning: one route, over every seed). after_ok: the nodes that must have
    succeeded first; after_any: those that must have ended, however."""
    name: str
    stage: str  # pretrain, selftrain, finetune or report
    dataset: str | None = None
    init: str | None = None  # fine-tuning's starting point: initial or a checkpoint name
    after_ok: tuple = ()
    after_any: tuple = ()
    steps: int | None = None  # the MAE stages' step count where a table has several (fig1_table)


def table(datasets, mae_steps) -> list[Node]:
    """The table's runs, each after those it needs. The order is the order to start them in: every dataset's
    further pre-training and fine-tuning from θ₀ first (they need nothing), then each dataset's other runs."""
    nodes = [Node(f"{d} pretrain", "pretrain", d) for d in datasets]
    nodes += [Node(f"{d} finetune initial", "finetune", d, "initial") for d in datasets]
    for d in datasets:
        nodes += [Node(f"{d} selftrain", "selftrain", d, after_ok=(f"{d} pretrain",)),
                  Node(f"{d} finetune {teacher(mae_steps)}", "finetune", d, teacher(mae_steps),
                       after_ok=(f"{d} pretrain",)),
                  Node(f"{d} finetune {student(mae_steps)}", "finetune", d, student(mae_steps),
                       after_ok=(f"{d} selftrain",))]
    return nodes + [Node("report", "report", after_any=tuple(n.name for n in nodes))]


def fig1_table(dataset, mae_steps: list, source: str | None = None, random_init: str | None = None) -> list[Node]:
    """One dataset's table at several MAE step counts (the points of Fig. 1), in the order to start them in.
    source: θ₀ is first pre-trained (MAE) on this dataset, and every run that starts from θ₀ waits for it;
    random_init: an extra fine-tuning route from the model's random init, which needs nothing.

        fig1_table("fm", [2, 3], "crops", "random-init") -> crops pretrain, fm finetune random-init,
            fm finetune initial (after crops pretrain), fm pretrain 2 (after crops pretrain),
            fm finetune further-pretrain-2 (after fm pretrain 2), fm selftrain 2 (after fm pretrain 2),
            fm finetune self-further-pretrain-2 (after fm selftrain 2), the same at 3 steps, report (after all)"""
    theta0 = (f"{source} pretrain",) if source else ()
    nodes = [Node(f"{source} pretrain", "pretrain", source)] if source else []
    if random_init:
        nodes.append(Node(f"{dataset} finetune {random_init}", "finetune", dataset, random_init))
    nodes.append(Node(f"{dataset} finetune initial", "finetune", dataset, "initial", after_ok=theta0))
    for k in mae_steps:
        nodes += [Node(f"{dataset} pretrain {k}", "pretrain", dataset, after_ok=theta0, steps=k),
                  Node(f"{dataset} finetune {teacher(k)}", "finetune", dataset, teacher(k),
                       after_ok=(f"{dataset} pretrain {k}",), steps=k),
                  Node(f"{dataset} selftrain {k}", "selftrain", dataset, after_ok=(f"{dataset} pretrain {k}",),
                       steps=k),
                  Node(f"{dataset} finetune {student(k)}", "finetune", dataset, student(k),
                       after_ok=(f"{dataset} selftrain {k}",), steps=k)]
    return nodes + [Node("report", "report", after_any=tuple(n.name for n in nodes))]


# ----------------------------------------------------------------------------- flag rules

def refused_flag(words, flags) -> str | None:
    """The first of `flags` among `words` (as --flag or --flag=value), or None."""
    for word in words:
        name = word.split("=", 1)[0]
        if name in flags:
            return name
    return None


def mae_flags(words) -> list[str]:
    """The flags for every stage as the MAE stages get them: all but fine-tuning's own."""
    out, skip = [], False
    for word in words:
        name = word.split("=", 1)[0]
        if skip:
            skip = False
        elif name in FINETUNE_ONLY:
            skip = FINETUNE_ONLY[name] and "=" not in word
        else:
            out.append(word)
    return out


def flags_for_one_kind(environ) -> tuple[list[str], list[str]]:
    """$MAE_FLAGS (further pre-training and self-distillation only) and $FINETUNE_FLAGS (fine-tuning only),
    split on whitespace."""
    return environ.get("MAE_FLAGS", "").split(), environ.get("FINETUNE_FLAGS", "").split()


def flag_value(words, name: str, default: str) -> str:
    """The value of `name` among `words` (the last one wins, as in argparse)."""
    value = default
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value

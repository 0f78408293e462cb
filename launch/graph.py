"""The paper's table, described once: for each dataset further pre-training (the teacher), self-distillation (the
student, from the teacher), fine-tuning from the three starting points (routes) over the seeds; then the report.
Also the rules for which flags reach which run. run_all.sh (launch.launchers, on one machine) and launch/submit.py
(on a cluster) both build their jobs from table(); only the standard library and paper.py (the table's names), so
the launchers need no torch.

    table(["cub", "dtd"], 50) -> cub pretrain, dtd pretrain, cub finetune initial, dtd finetune initial,
        cub selftrain (after cub pretrain), cub finetune further-pretrain-50 (after cub pretrain),
        cub finetune self-further-pretrain-50 (after cub selftrain), the same for dtd, report (after all)

With probes (probe.py, e.g. table(["cub"], 50, PROBES)), each route also has a probe node per protocol, beside its
fine-tuning node and after the same run: cub probe linear initial, cub probe knn initial, ..."""
import dataclasses

from paper import MAE_STEPS, PAPER_DATASETS, SEEDS, routes, student, teacher  # noqa: F401 (the table's names)

SAVE_EVERY_STEPS = 1000  # the table's runs save this often, so that a stopped table continues where it stopped

# Stage flags the table sets for each run itself: a later copy among the user's flags would win in the stage but
# not in the paths the launcher (and launch.submit --status) reads back, so a summary would show another run's result.
# No stage's parser accepts abbreviations, so the exact names are all there is to check.
SET_PER_RUN = ("--dataset", "--seed", "--scratch", "--ckpt_name", "--output_dir")
# fine-tuning's own flags, which the MAE stages' parsers refuse; True: the flag takes a value
FINETUNE_ONLY = {"--results_dir": True, "--save_model": False}
# the probes (probe.py): their protocols, and the flags for every stage that probe.py's parser refuses
PROBES = ("linear", "knn")
NOT_PROBE = {"--save_model": False}


@dataclasses.dataclass
class Node:
    """One run of the table (for fine-tuning: one route, over every seed). after_ok: the nodes that must have
    succeeded first; after_any: those that must have ended, however."""
    name: str
    stage: str  # pretrain, selftrain, finetune or report
    dataset: str | None = None
    init: str | None = None  # fine-tuning's (or a probe's) starting point: initial or a checkpoint name
    after_ok: tuple = ()
    after_any: tuple = ()
    steps: int | None = None  # the MAE stages' step count where a table has several (fig1_table)
    probe: str | None = None  # a probe node's protocol (PROBES)


def table(datasets, mae_steps, probes=()) -> list[Node]:
    """The table's runs, each after those it needs. The order is the order to start them in: every dataset's
    further pre-training and fine-tuning from θ₀ first (they need nothing), then each dataset's other runs.
    probes: protocols of PROBES; each route gets a probe node per protocol, after the same run as its fine-tuning."""
    def route(d, init, after=()):
        return [Node(f"{d} finetune {init}", "finetune", d, init, after_ok=after)] + [
            Node(f"{d} probe {protocol} {init}", "probe", d, init, after_ok=after, probe=protocol)
            for protocol in probes]

    nodes = [Node(f"{d} pretrain", "pretrain", d) for d in datasets]
    nodes += [node for d in datasets for node in route(d, "initial")]
    for d in datasets:
        nodes += [Node(f"{d} selftrain", "selftrain", d, after_ok=(f"{d} pretrain",)),
                  *route(d, teacher(mae_steps), (f"{d} pretrain",)),
                  *route(d, student(mae_steps), (f"{d} selftrain",))]
    return nodes + [Node("report", "report", after_any=tuple(n.name for n in nodes))]


def probe_protocols(value: str) -> tuple:
    """$PROBES (or --probes' words joined): "" or 0 -> none; 1 -> every protocol; else protocols of PROBES,
    e.g. "knn" or "linear knn". ValueError with the line to show when it is none of these."""
    words = value.split()
    if words in ([], ["0"]):
        return ()
    if words == ["1"]:
        return PROBES
    wrong = [w for w in words if w not in PROBES]
    if wrong:
        raise ValueError(f"PROBES must be 1 (every probe), 0 (none) or probes among {' '.join(PROBES)}, not "
                         f"'{value}'")
    return tuple(dict.fromkeys(words))


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


def _without(words, flags: dict) -> list[str]:
    """`words` less each of `flags` (with its value where flags[name] is True)."""
    out, skip = [], False
    for word in words:
        name = word.split("=", 1)[0]
        if skip:
            skip = False
        elif name in flags:
            skip = flags[name] and "=" not in word
        else:
            out.append(word)
    return out


def mae_flags(words) -> list[str]:
    """The flags for every stage as the MAE stages get them: all but fine-tuning's own."""
    return _without(words, FINETUNE_ONLY)


def probe_flags(words) -> list[str]:
    """The flags for every stage as the probes get them: all but those of fine-tuning that probe.py lacks."""
    return _without(words, NOT_PROBE)


def flags_for_one_kind(environ) -> tuple[list[str], list[str]]:
    """$MAE_FLAGS (further pre-training and self-distillation only) and $FINETUNE_FLAGS (fine-tuning only),
    split on whitespace."""
    return environ.get("MAE_FLAGS", "").split(), environ.get("FINETUNE_FLAGS", "").split()


def probe_only_flags(environ) -> list[str]:
    """$PROBE_FLAGS (the probes only), split on whitespace."""
    return environ.get("PROBE_FLAGS", "").split()


# what the table sets for every probe run itself, beyond SET_PER_RUN, and what to do instead
PROBE_SET_PER_RUN = {"--probe": "choose the probes with PROBES (1, or among linear knn)",
                     "--results_dir": "give it among the flags for every stage, where the report reads it",
                     "--steps": "use PROBE_STEPS=N"}


def flag_value(words, name: str, default: str) -> str:
    """The value of `name` among `words` (the last one wins, as in argparse)."""
    value = default
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value

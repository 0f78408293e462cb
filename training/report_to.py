"""--report_to: what the first process writes to metrics.jsonl, sent live to TensorBoard or Weights & Biases too,
with the same step numbers, and the run's record once per start. Both are optional packages: a missing one is
one line saying what to install.

    tensorboard  event files in the run directory (`tensorboard --logdir checkpoints`); a resumed run purges
                 what an earlier start logged after its start step, so no step is shown twice
    wandb        a W&B run whose id is kept in the run record (`wandb_run_id`), so a resumed run continues the
                 same W&B run; WANDB_MODE=offline (compute nodes often have no network) writes it under the
                 run directory for a later `wandb sync`. Steps a killed start logged past its last saved state are
                 logged again by the resumed start with the same values (a resumed run is bit-identical); W&B
                 keeps the first.
"""
import os

from errors import UserError
from training.tensorboard_events import EventLog

CHOICES = ("none", "tensorboard", "wandb")
WANDB_HINT = "Weights & Biases is not installed here: pip install wandb (optional; or --report_to none)"


class _TensorBoard:
    def __init__(self, run_dir: str, record: dict, start_step: int):
        # what an earlier start logged after start_step is dropped (metrics.jsonl keeps the lines up to start_step)
        self.log = EventLog(run_dir, purge_step=start_step + 1)
        self.log.arguments(record, step=start_step)

    def send(self, entry: dict) -> None:
        self.log.metrics(entry)
        self.log.flush()  # on disk now: a killed run keeps what it logged (every --log_every steps: cheap)

    def close(self) -> None:
        self.log.close()


class _WandB:
    def __init__(self, run_dir: str, record: dict, run_id: str, stage: str):
        try:
            import wandb
        except ImportError:
            raise UserError(WANDB_HINT) from None
        self.wandb = wandb
        arguments = record["args"]  # the run's, all of them: W&B's config of the run
        dataset = arguments.get("dataset")
        self.run = wandb.init(id=run_id, resume="allow", dir=run_dir, config=arguments,
                              project=os.environ.get("WANDB_PROJECT", "self-distillation"),
                              name=f"{stage} {dataset} {os.path.basename(os.path.normpath(run_dir))}",
                              tags=[stage, str(dataset)])

    def send(self, entry: dict) -> None:
        self.run.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    def close(self) -> None:
        self.run.finish()


def new_wandb_id() -> str:
    """A W&B run id (wandb's own generator when it is installed)."""
    try:
        from wandb.util import generate_id
    except ImportError:
        raise UserError(WANDB_HINT) from None
    return generate_id()


def reporter(kind: str, run_dir: str, record: dict, start_step: int, stage: str):
    """The reporter of --report_to `kind` (None for none); record: the run record, holding wandb_run_id for wandb."""
    if kind == "tensorboard":
        return _TensorBoard(run_dir, record, start_step)
    if kind == "wandb":
        return _WandB(run_dir, record, record["wandb_run_id"], stage)
    return None

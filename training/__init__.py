"""The plumbing of a training run, one room per concern; `Run` (run.py) is the facade the three stages use.

    process.py   who this process is in the job: rank, world size, device, precision, barriers, reductions
    run_dir.py   the run directory: its lock, record and history, finished / resumable checks, --overwrite, the state
    record.py    the run record's schema version and its upgrade, which every reader calls
    draws.py     what step s draws at random: data order, masking noise, flips, dropout's seed
    batches.py   what step s trains on: its batch, from the decode-once copy of the split or the workers
    step.py      the optimizer step: AdamW and the schedule, backward, clipping, the non-finite flag
    mae_recipe.py fine-tuning's --recipe mae pieces on timm: layer decay, the cosine schedule, augmentation, the loss
    cuda_graph.py --cuda_graph: the stage's step function, the eager one, captured in one CUDA graph and replayed
    metrics.py   metrics.jsonl, the progress bar or plain lines; report_to.py and tensorboard_events.py: the same
                 lines live to TensorBoard or W&B (--report_to)
    run.py       Run, the facade

None of the rooms imports Run or the entry scripts; utils.py holds the stateless helpers they share."""
from training.cuda_graph import GraphedStep
from training.draws import Draws, GlobalBatchDropout, StepSampler, supplied_draws
from training.process import Process, resolve_device
from training.run import Run, observed_steps
from training.run_dir import LOCK_FILE, METRICS_FILE, RECORD_FILE, STATE_FILE
from training.step import TrainStep, adamw, linear_schedule, optimizer_and_schedule, param_groups

__all__ = ["Draws", "GlobalBatchDropout", "GraphedStep", "LOCK_FILE", "METRICS_FILE", "Process", "RECORD_FILE", "Run",
           "STATE_FILE", "StepSampler", "TrainStep", "adamw", "linear_schedule", "observed_steps",
           "optimizer_and_schedule", "param_groups", "resolve_device", "supplied_draws"]

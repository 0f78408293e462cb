"""metrics.jsonl, one JSON line per logged step (step, lr, the loss terms, grad_norm, images/s, peak memory),
and what a person watching sees: a progress bar on a terminal, plain lines otherwise (CI, nohup, clusters)."""
import datetime
import json
import os
import resource
import sys
import time

import torch

from errors import RunFailed
from outputs import atomic_file, reported


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line a kill cut short (or no line at all) counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


class Metrics:
    """The metrics of a run from `start_step` on. Every process calls log() at the same steps (the terms are
    averaged over the processes); only the first process writes, and sends each line to `reporter` (--report_to,
    training/report_to.py) if there is one."""

    def __init__(self, path: str, process, stage: str, steps: int, batch_size: int, start_step: int, reporter=None):
        self.path, self.process, self.stage, self.steps, self.batch_size = path, process, stage, steps, batch_size
        self.reporter = reporter
        if process.is_main and os.path.exists(path):
            # drop lines past the resumed step (a killed run may have logged beyond its last state)
            with open(path) as f:
                kept = [line for line in f if logged_step(line) <= start_step]
            with reported("the metrics", path, RunFailed), atomic_file(path) as f:  # a kill here keeps the old file
                f.writelines(kept)
        self.progress = None
        if process.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            self.progress = tqdm(total=steps, initial=start_step, desc=stage, dynamic_ncols=True)
        self.clock = (time.perf_counter(), start_step)
        if process.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(process.device)

    def log(self, done: int, lr: float, **terms: torch.Tensor) -> None:
        """One line for step `done` (1-based): `lr` the learning rate it used, `terms` scalar tensors."""
        now = time.perf_counter()
        last_time, last_step = self.clock
        self.clock = (now, done)
        entry = {"step": done, "lr": lr}
        values = self.process.mean(torch.stack([v.detach().float() for v in terms.values()]))
        entry.update(zip(terms, values.tolist()))
        entry["images_per_s"] = (done - last_step) * self.batch_size / max(now - last_time, 1e-9)
        entry["peak_mem_mb"] = peak_memory_mb(self.process.device)
        if not self.process.is_main:
            return
        with reported("the metrics", self.path, RunFailed), open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.reporter is not None:
            self.reporter.send(entry)
        if self.progress is not None:
            self.progress.update(done - self.progress.n)
            self.progress.set_postfix(loss=f"{entry['loss']:.4f}", img_s=f"{entry['images_per_s']:.1f}")
        else:
            remaining = (self.steps - done) * self.batch_size / max(entry["images_per_s"], 1e-9)
            parts = " ".join(f"{k} {entry[k]:.4f}" for k in terms if k != "grad_norm")
            print(f"[{self.stage}] step {done}/{self.steps} {parts} lr {entry['lr']:.3g} "
                  f"{entry['images_per_s']:.1f} img/s eta {datetime.timedelta(seconds=round(remaining))}",
                  flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.reporter is not None:
            self.reporter.close()

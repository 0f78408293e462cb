"""The rules by which `python -m lab.gpu_check` decides PASS or FAIL: two runs' loss curves agree within bf16
noise, the teacher's features looked up equal the ones computed on-line, dropout inside a replayed CUDA graph
follows the per-step seed. Pure functions of what the runs recorded (metrics.jsonl lines, tensors); each returns
a Verdict, and RULES says each rule in words (printed at the start of a check and in its report).

Why these bounds (the numbers behind them are in BENCHMARKS.md, "GPU self-check"):
- The three ways of running a stage -- eager with the decode-once batches (the default), eager streaming through
  the workers (--data_cache off), the whole step in one CUDA graph (--cuda_graph) -- compute the same step on the
  same batches, masks, flips and dropout masks. On a GPU they may still differ by rounding: backward kernels that
  accumulate with atomics are not bit-reproducible, and the graphed step's capturable AdamW computes its bias
  corrections in float32 on the device. In bf16 (2^-8 relative per rounding) such differences grow chaotically
  over tens of steps until the two runs are two samples of the same training.
- Early steps, tight: before the difference has grown, a step's loss and gradient norm must agree to 5e-3
  relative. On CPU, bf16 autocast against fp32 -- a far larger change of the computation than anything that
  separates the three ways -- moved steps 1-8 by at most 1.1e-3 (loss) and 2.2e-3 (gradient norm) on
  vit-mae-tiny, 2.4e-4 and 8.0e-4 on ViT-B/16, while another batch moves a step's loss by about 1.5-2.6 % (the
  median change from one step to the next; the report prints the run's own): a wrong batch, mask or flip fails
  here at once.
- Later steps, smoothed: means over windows of WINDOW_STEPS steps must agree to CURVE_RTOL of the reference's
  window mean (or of half its first window's mean, whichever is larger, so that a loss falling towards zero is
  not held to a relative bound on a tiny number). Two runs that share nothing but the recipe (another seed:
  other data order, masks, flips, dropout and head) differed by at most 2.0 % there (further pre-training and
  fine-tuning, vit-mae-tiny, 200 steps), a 1.5x learning rate by 11 % (further pre-training): 4 % is twice the
  spread of runs that are statistically the same training, and fails a run that trains differently.
- Teacher features: each row of the encoder's output depends on its own image only, and the table is computed in
  batches of the steps' shape, so at one batch shape the looked-up row is expected to be bit-equal to the on-line
  one; a different kernel choice could still change it by bf16 rounding. Bound: 2^-5 (8 bf16 ulps) of the
  feature's norm, and the looked-up row must be four times closer to its own image's on-line feature than to any
  other image's in the batch (a random teacher's CLS features of different images can be close, so the first
  bound alone would not notice a row looked up for the wrong image).
- Dropout: the mask is a function of the step's seed only (not of the weights), so it can be asserted exactly:
  every recorded mask equals what eager draws after seeding with the step's seed, positions where the input was
  0 (whose drop cannot be seen) left out; consecutive steps' masks differ where independent draws do,
  2p(1 - p) of the positions (0.18 at p = 0.1); the drop rate is p.
"""
import dataclasses
import math

import torch

PASS, FAIL = "PASS", "FAIL"

LR_RTOL = 1e-6  # --cuda_graph keeps the rate in a float32 tensor on CUDA (2^-24 relative), which the log reads
EARLY_STEPS = 8  # the 3 warm-up steps of --cuda_graph, the captured step and 4 replays
EARLY_RTOL = 5e-3
WINDOW_STEPS = 10
CURVE_RTOL = 0.04
CURVE_FLOOR = 0.5  # of the reference's first window mean
TEACHER_RTOL = 2.0 ** -5
TEACHER_SEPARATION = 4.0
DROPOUT_CHANGE_ATOL = 0.02  # |measured - 2p(1-p)| for the masks of consecutive steps
DROPOUT_RATE_ATOL = 0.01  # |measured drop rate - p|

RULES = {
    "loss curves": (
        f"the same steps logged, with the same learning rates (to {LR_RTOL:g} relative: float32 rounding); "
        f"steps 1-{EARLY_STEPS}: loss, each loss term and gradient norm within {EARLY_RTOL:g} relative of the "
        f"reference's; after that, means over windows of {WINDOW_STEPS} steps of the loss and each term within "
        f"{CURVE_RTOL:.0%} of the reference's window mean (or of {CURVE_FLOOR:g} x its first window's mean, if "
        f"larger); reference: the eager run with the default paths"),
    "teacher features": (
        f"for the rows of every checked step's batch: |looked up - on-line| <= {TEACHER_RTOL:g} |on-line|, and "
        f"|looked up - on-line| <= 1/{TEACHER_SEPARATION:g} of the distance from the on-line feature to that of "
        f"any other image in the batch; bit-equal rows are counted"),
    "dropout": (
        f"every recorded step's dropout masks equal the eager draws after seeding with that step's seed (exact, "
        f"positions whose input is 0 left out); consecutive steps' masks differ at 2p(1-p) +- "
        f"{DROPOUT_CHANGE_ATOL:g} of the positions; the drop rate is p +- {DROPOUT_RATE_ATOL:g}"),
}


@dataclasses.dataclass
class Verdict:
    status: str  # PASS or FAIL
    summary: str  # one line
    measured: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loss curves

def _relative(value: float, reference: float) -> float:
    if value == reference:
        return 0.0
    return abs(value - reference) / abs(reference) if reference else math.inf


def window_means(values: list[float], window: int) -> list[float]:
    """Means of consecutive windows of `window` values; a last partial window is dropped (unless it is all)."""
    if len(values) < window:
        return [sum(values) / len(values)] if values else []
    return [sum(values[i:i + window]) / window for i in range(0, len(values) - window + 1, window)]


def compare_curves(reference: list[dict], other: list[dict], terms: list[str], window: int = WINDOW_STEPS
                   ) -> Verdict:
    """Two runs' metrics.jsonl lines (one per step) under the loss-curve rule (RULES["loss curves"]).
    `terms`: the logged loss terms besides "loss" (e.g. ["mae_loss"])."""
    keys = ["loss", *terms]
    measured = {"steps": len(reference), "window_steps": window}
    failures = []
    steps_ref, steps_other = [m["step"] for m in reference], [m["step"] for m in other]
    if not reference or steps_ref != steps_other:
        return Verdict(FAIL, f"logged steps differ: {len(steps_ref)} vs {len(steps_other)} lines "
                             f"(first {steps_ref[:3]} vs {steps_other[:3]})", measured)
    lr_differs = [m["step"] for m, o in zip(reference, other) if _relative(o["lr"], m["lr"]) > LR_RTOL]
    if lr_differs:
        failures.append(f"learning rates differ from step {lr_differs[0]}")
    measured["identical"] = all(m.get(k) == o.get(k) for m, o in zip(reference, other) for k in keys + ["grad_norm"])

    early = {}
    for key in keys + ["grad_norm"]:
        rel = [(_relative(o[key], m[key]), m["step"]) for m, o in zip(reference[:EARLY_STEPS], other[:EARLY_STEPS])
               if m.get(key) is not None and o.get(key) is not None]
        if rel:
            worst, step = max(rel)
            early[key] = {"max_rel": worst, "at_step": step}
            if worst > EARLY_RTOL:
                failures.append(f"{key} at step {step} differs by {worst:.2g} relative (> {EARLY_RTOL:g})")
    measured["early"] = early
    # how much another batch moves a step's loss: what the early bound is to be compared with
    losses = [m["loss"] for m in reference]
    changes = sorted(_relative(b, a) for a, b in zip(losses, losses[1:]))
    measured["step_to_step_median_rel"] = changes[len(changes) // 2] if changes else None

    windows = {}
    for key in keys:
        ref_w = window_means([m[key] for m in reference[EARLY_STEPS:]], window)
        other_w = window_means([o[key] for o in other[EARLY_STEPS:]], window)
        if not ref_w:
            continue
        floor = CURVE_FLOOR * abs(ref_w[0])
        rel = [abs(b - a) / max(abs(a), floor) if a != b else 0.0 for a, b in zip(ref_w, other_w)]
        worst = max(range(len(rel)), key=rel.__getitem__)
        windows[key] = {"max_rel": rel[worst], "at_window": worst, "reference": ref_w, "other": other_w}
        if rel[worst] > CURVE_RTOL:
            first = EARLY_STEPS + worst * window + 1
            failures.append(f"{key} over steps {first}-{first + window - 1} differs by {rel[worst]:.1%} "
                            f"(> {CURVE_RTOL:.0%})")
    measured["windows"] = windows
    final = {k: (reference[-1][k], other[-1][k]) for k in keys}
    measured["final"] = final
    if failures:
        return Verdict(FAIL, "; ".join(failures), measured)
    if measured["identical"]:
        return Verdict(PASS, f"bit-identical over {len(reference)} steps", measured)
    early_worst = max(v["max_rel"] for v in early.values())
    window_worst = max((v["max_rel"] for v in windows.values()), default=0.0)
    return Verdict(PASS, f"{len(reference)} steps; steps 1-{min(EARLY_STEPS, len(reference))} within "
                         f"{early_worst:.2g} relative, windows within {window_worst:.2%}", measured)


# ----------------------------------------------------------------------------- teacher features

class TeacherComparison:
    """Accumulates, batch by batch, how the looked-up teacher features compare with the on-line ones."""

    def __init__(self):
        self.rows = self.bit_equal = 0
        self.max_rel = 0.0
        self.min_separation = math.inf  # min over rows of (distance to the nearest other image) / error

    def add(self, looked_up: torch.Tensor, online: torch.Tensor) -> None:
        """One batch: looked_up, online (B, D). Rows whose on-line features are bit-equal (the same image twice in
        a batch that spans two epochs, or two identical images) cannot be told apart by any lookup: they are not
        "another image" to each other."""
        looked_up, online = looked_up.double(), online.double()
        error = (looked_up - online).norm(dim=-1)  # (B,)
        self.rows += len(error)
        self.bit_equal += int((looked_up == online).all(dim=-1).sum())
        self.max_rel = max(self.max_rel, float((error / online.norm(dim=-1)).max()))
        same = (online[:, None] == online[None]).all(dim=-1)  # (B, B), the diagonal included
        nearest = torch.cdist(online, online).masked_fill(same, math.inf).min(dim=-1).values  # to another image
        ratio = torch.where(error > 0, nearest / error, torch.full_like(error, math.inf))
        self.min_separation = min(self.min_separation, float(ratio.min()))

    def verdict(self) -> Verdict:
        measured = {"rows": self.rows, "bit_equal_rows": self.bit_equal, "max_rel": self.max_rel,
                    "min_separation": self.min_separation}
        if not self.rows:
            return Verdict(FAIL, "no rows compared", measured)
        failures = []
        if self.max_rel > TEACHER_RTOL:
            failures.append(f"a looked-up feature differs by {self.max_rel:.3g} of its norm (> {TEACHER_RTOL:g})")
        if self.min_separation < TEACHER_SEPARATION:
            failures.append(f"a looked-up feature is only {self.min_separation:.3g}x closer to its own image's "
                            f"on-line feature than to another image's (< {TEACHER_SEPARATION:g})")
        if failures:
            return Verdict(FAIL, "; ".join(failures), measured)
        return Verdict(PASS, f"{self.bit_equal} of {self.rows} rows bit-equal; largest difference "
                             f"{self.max_rel:.2g} of the norm", measured)


# ----------------------------------------------------------------------------- dropout

class DropoutComparison:
    """Accumulates, step by step, recorded dropout masks against the eager draws of the step's seed."""

    def __init__(self, p: float):
        self.p = p
        self.steps = self.positions = self.mismatches = self.dropped = 0
        self.changes = []  # per pair of consecutive steps: the fraction of positions whose drop changed
        self.first_mismatch_step = None

    def add(self, step: int, dropped: list[torch.Tensor], known: list[torch.Tensor], expected: list[torch.Tensor],
            previous: tuple | None) -> None:
        """One step's masks, per dropout call in forward order: `dropped` recorded, `known` where the input was
        not 0, `expected` the eager draw's drops. `previous`: (dropped, known) of the first call at the step
        before, or None."""
        mismatches = sum(int(((d != e) & k).sum()) for d, k, e in zip(dropped, known, expected))
        self.steps += 1
        self.positions += sum(int(k.sum()) for k in known)
        self.dropped += sum(int((d & k).sum()) for d, k in zip(dropped, known))
        self.mismatches += mismatches
        if mismatches and self.first_mismatch_step is None:
            self.first_mismatch_step = step + 1
        if previous is not None:
            both = known[0] & previous[1]
            self.changes.append(float((dropped[0] != previous[0])[both].float().mean()))

    def verdict(self) -> Verdict:
        expected_change = 2 * self.p * (1 - self.p)
        rate = self.dropped / self.positions if self.positions else math.nan
        measured = {"steps": self.steps, "positions": self.positions, "mismatches": self.mismatches,
                    "first_mismatch_step": self.first_mismatch_step, "drop_rate": rate,
                    "expected_change": expected_change, "changes": self.changes}
        failures = []
        if not self.steps:
            return Verdict(FAIL, "no step recorded", measured)
        if self.mismatches:
            failures.append(f"{self.mismatches} of {self.positions} mask positions differ from the eager draws of "
                            f"the step's seed (first at step {self.first_mismatch_step})")
        off = [c for c in self.changes if abs(c - expected_change) > DROPOUT_CHANGE_ATOL]
        if not self.changes or off:
            worst = off[0] if off else math.nan
            failures.append(f"consecutive steps' masks differ at {worst:.3g} of the positions (expected "
                            f"{expected_change:.3g} +- {DROPOUT_CHANGE_ATOL:g})")
        if not abs(rate - self.p) <= DROPOUT_RATE_ATOL:
            failures.append(f"drop rate {rate:.4f}, expected {self.p:g} +- {DROPOUT_RATE_ATOL:g}")
        if failures:
            return Verdict(FAIL, "; ".join(failures), measured)
        return Verdict(PASS, f"{self.steps} steps, {self.positions} mask positions equal to the eager draws; "
                             f"consecutive steps differ at {min(self.changes):.3f}-{max(self.changes):.3f} "
                             f"(expected {expected_change:.2f}); drop rate {rate:.4f}", measured)

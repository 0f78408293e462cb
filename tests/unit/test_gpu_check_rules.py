"""lab/gpu_check_rules.py, the GPU self-check's rules: they pass what is within bf16 noise and fail what is not."""
import math

import torch

from lab import gpu_check_rules as rules


def _lines(losses, grad_norms=None, lr=1e-4, **terms):
    return [{"step": i + 1, "lr": lr, "loss": loss, "grad_norm": 1.0 if grad_norms is None else grad_norms[i],
             **{k: v[i] for k, v in terms.items()}} for i, loss in enumerate(losses)]


def test_curves_within_bf16_noise_pass_and_departures_fail():
    reference = [2.0 - 0.01 * i + 0.02 * math.sin(i) for i in range(60)]  # noisy, slowly falling
    same = rules.compare_curves(_lines(reference), _lines(reference), [])
    assert same.status == rules.PASS and same.summary == "bit-identical over 60 steps"
    # rounding early, a chaotic ±2 % per step later: within the rules
    noisy = [x * (1 + 1e-4 * (-1) ** i) if i < 8 else x * (1 + 0.02 * (-1) ** i) for i, x in enumerate(reference)]
    verdict = rules.compare_curves(_lines(reference), _lines(noisy), [])
    assert verdict.status == rules.PASS and not verdict.measured["identical"], verdict.summary
    # another batch at step 2 (1 %), beyond the early bound
    other = list(reference)
    other[1] *= 1.01
    verdict = rules.compare_curves(_lines(reference), _lines(other), [])
    assert verdict.status == rules.FAIL and "loss at step 2 differs by 0.01" in verdict.summary
    # a gradient norm off early, a loss term drifting later, another learning rate, other steps
    assert "grad_norm at step 5" in rules.compare_curves(
        _lines(reference), _lines(reference, grad_norms=[1.0] * 4 + [1.01] + [1.0] * 55), []).summary
    drift = [x * (1.06 if i >= 30 else 1.0) for i, x in enumerate(reference)]
    verdict = rules.compare_curves(_lines(reference, mae_loss=reference), _lines(reference, mae_loss=drift),
                                   ["mae_loss"])
    assert verdict.status == rules.FAIL
    assert "mae_loss over steps" in verdict.summary and "by 6.0% (> 4%)" in verdict.summary
    assert "learning rates differ from step 1" in rules.compare_curves(
        _lines(reference), _lines(reference, lr=1.001e-4), []).summary
    float32_rate = float(torch.tensor(1e-4, dtype=torch.float32))  # what the --cuda_graph run logs on CUDA
    assert rules.compare_curves(_lines(reference), _lines(reference, lr=float32_rate), []).status == rules.PASS
    assert rules.compare_curves(_lines(reference), _lines(reference[:-1]), []).summary.startswith(
        "logged steps differ: 60 vs 59")
    # a loss falling towards 0 is held to half its first window's level, not to a relative bound on ~0
    falling = [2.0 * 0.9 ** i for i in range(60)]
    off = [x + 0.005 if i >= 8 else x for i, x in enumerate(falling)]  # 0.005 on values down to 0.004
    verdict = rules.compare_curves(_lines(falling), _lines(off), [])
    assert verdict.status == rules.PASS, verdict.summary
    assert max(verdict.measured["windows"]["loss"]["other"][-1] / verdict.measured["windows"]["loss"]["reference"][-1]
               - 1, 0) > rules.CURVE_RTOL  # relative to the value itself it would be far off


def test_teacher_rule_notices_a_row_of_another_image():
    g = torch.Generator().manual_seed(0)
    # features of different images only 1 % apart (a random teacher's CLS features can be this close)
    online = torch.ones(8, 16) + 0.01 * torch.randn(8, 16, generator=g)
    exact = rules.TeacherComparison()
    exact.add(online.clone(), online)
    assert exact.verdict().status == rules.PASS and exact.bit_equal == 8
    rounded = rules.TeacherComparison()
    rounded.add(online.bfloat16().float(), online)  # bf16 rounding of every element
    assert rounded.verdict().status == rules.PASS, rounded.verdict().summary
    shifted = rules.TeacherComparison()
    shifted.add(online.roll(1, dims=0), online)  # each row looked up for the neighbouring image
    verdict = shifted.verdict()
    assert shifted.max_rel < rules.TEACHER_RTOL  # the norm bound alone would not notice
    assert verdict.status == rules.FAIL and "closer to its own image's" in verdict.summary
    # the same image twice in a batch (a batch across two epochs) is not "another image", even when rounded
    twice = rules.TeacherComparison()
    twice.add(online[[0, 0, 1]].bfloat16().float(), online[[0, 0, 1]])
    assert twice.verdict().status == rules.PASS, twice.verdict().summary


def test_dropout_rule_wants_the_step_seeds_masks():
    p, shape = 0.1, (4, 50, 64)
    draw = lambda seed: torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p
    known = [torch.ones(shape, dtype=torch.bool)]

    def compare(recorded_seeds):
        comparison, previous = rules.DropoutComparison(p), None
        for step, seed in enumerate(recorded_seeds):
            dropped = [draw(seed)]
            comparison.add(step, dropped, known, [draw(100 + step)], previous)
            previous = (dropped[0], known[0])
        return comparison.verdict()
    assert compare([100, 101, 102, 103]).status == rules.PASS
    frozen = compare([100, 100, 100, 100])  # the first mask replayed at every step
    assert frozen.status == rules.FAIL and "first at step 2" in frozen.summary
    assert "consecutive steps' masks differ at 0" in frozen.summary
    assert "differ from the eager draws" in compare([100, 101, 7, 103]).summary

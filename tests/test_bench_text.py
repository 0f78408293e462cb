"""lab/bench_text.py: the table it prints and returns, and that each loop it times is the one it names."""
import math

import pytest
import transformers
from transformers import DataCollatorForLanguageModeling

import finetune
import pretrain
import selftrain
import text_common
import training
from lab import bench_text

TINY = ["--batch_size", "4", "--max_length", "32", "--steps", "2", "--rounds", "2", "--warmup_steps", "1"]


def spy(monkeypatch, owner, name: str, counts: dict, key: str, when=lambda *a, **k: True) -> None:
    """Count the calls of owner.name (those for which `when` holds) in counts[key], then call it."""
    original = getattr(owner, name)
    counts[key] = 0

    def counted(*args, **kwargs):
        counts[key] += when(*args, **kwargs)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)


def test_bench_text_times_the_stages_step_and_a_plain_loop(monkeypatch, capsys):
    """Three stages, finite positive tokens/s, ratio = product / plain; every product step ran the stage's own
    functions (masks, loss, Run.step) and every plain step transformers' collator and `labels=` losses."""
    counts = {}
    spy(monkeypatch, text_common, "draw_mlm_masks", counts, "product masks")
    spy(monkeypatch, pretrain, "mlm_training_loss", counts, "product MLM loss")
    spy(monkeypatch, selftrain, "mlm_training_loss", counts, "product distillation loss")
    spy(monkeypatch, finetune, "text_training_loss", counts, "product classifier loss")
    spy(monkeypatch, training.Run, "step", counts, "product optimizer steps")
    spy(monkeypatch, DataCollatorForLanguageModeling, "torch_mask_tokens", counts, "plain masks")
    spy(monkeypatch, transformers.RobertaForMaskedLM, "forward", counts, "plain MLM loss",
        when=lambda *a, **k: k.get("labels") is not None)
    spy(monkeypatch, transformers.RobertaForSequenceClassification, "forward", counts, "plain classifier loss",
        when=lambda *a, **k: k.get("labels") is not None)

    rows = bench_text.main(bench_text.get_args_parser().parse_args(TINY))
    printed = capsys.readouterr().out

    steps = 1 + 2 * 2  # per loop and stage: warmup + rounds x steps
    assert counts == {"product masks": 2 * steps, "product MLM loss": steps, "product distillation loss": steps,
                      "product classifier loss": steps, "product optimizer steps": 3 * steps,
                      "plain masks": 2 * steps, "plain MLM loss": 2 * steps, "plain classifier loss": steps}
    assert [row["stage"] for row in rows] == list(bench_text.STAGES)
    for row in rows:
        for key in ("product_tokens_per_s", "plain_tokens_per_s", "ratio", "round_ratio_min", "round_ratio_max"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["stage"], key, row[key])
        assert row["ratio"] == pytest.approx(row["product_tokens_per_s"] / row["plain_tokens_per_s"])
        assert row["round_ratio_min"] <= row["round_ratio_max"]
        assert 0 < row["tokens_per_round"] <= 4 * 2 * 32
    lines = {cells[0]: cells for cells in (line.split() for line in printed.splitlines()) if cells}
    for stage in bench_text.STAGES:
        product, plain, ratio = map(float, lines[stage][1:4])
        assert product > 0 and plain > 0 and ratio == pytest.approx(product / plain, abs=0.002)
    assert "load average at start" in printed and "load average at end" in printed


def test_bench_text_refuses_a_length_roberta_cannot_take(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_text.get_args_parser().parse_args(["--max_length", "600"])
    assert exit_info.value.code == 2
    assert "600 is above RoBERTa's 512 positions; pass at most 512" in capsys.readouterr().err

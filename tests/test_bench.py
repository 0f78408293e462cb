"""bench.py: the table it prints and returns, and that its reference computes what ours computes."""
import pytest
import torch
from transformers import ViTMAEConfig

from lab import bench
from models import cls_feature, load_mae, mae_loss


def test_bench_table(capsys):
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--model", "vit-mae-tiny", "--batch_size", "8",
                                               "--warmup_steps", "1", "--steps", "2", "--repeats", "1"])
    rows = bench.main(args)
    printed = capsys.readouterr().out

    assert [row["stage"] for row in rows] == list(bench.STAGES)
    for row in rows:
        assert row["stage"] in printed
        assert row["batch"] == 8
        assert row["ours_images_per_s"] > 0 and row["reference_images_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_images_per_s"] / row["reference_images_per_s"])
        assert row["gflops_per_image"] > 0
        # CPU: no resettable peak memory, no MFU
        assert row["ours_peak_mib"] is None and row["ours_mfu"] is None
    # the printed ratio is the printed ours / printed reference, to the printed precision (4 digits, 0.01)
    table = [line.split() for line in printed.splitlines()]
    stage_lines = [cells for cells in table if cells and cells[0] in bench.STAGES]
    assert len(stage_lines) == len(bench.STAGES)
    for cells in stage_lines:
        ours, reference, ratio = map(float, cells[2:5])
        # the ratio's last digit (±0.005) plus 4 significant digits on each of ours and reference (±0.05 % each)
        assert abs(ratio - ours / reference) <= 0.005 + 1e-3 * ours / reference
    assert "GPU-hours" in printed and "reference / ours" in printed  # all three stages: the projection


def test_reference_is_the_same_computation():
    """Eager attention and the release's hand-written unmasked forward give our numbers."""
    theta0 = load_mae("vit-mae-tiny").eval()
    reference = bench.release_mae(theta0).eval()
    x = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    with torch.no_grad():
        assert mae_loss(reference, x, noise) == pytest.approx(mae_loss(theta0, x, noise).item(), rel=1e-5)
        torch.testing.assert_close(bench.release_cls_feature(reference.vit, x), cls_feature(theta0.vit, x),
                                   rtol=1e-5, atol=1e-5)
    # ViT-B/16 FLOPs per image, as the module docstring states: MAE forward 19.6 G, unmasked encoder 35.1 G
    # (the usual 17.6 GMACs of ViT-B/16 at 224)
    config = ViTMAEConfig()
    assert bench.step_flops_per_image("further-pretrain", config) / 3e9 == pytest.approx(19.56, abs=0.01)
    assert bench.step_flops_per_image("finetune", config, num_classes=0) / 3e9 == pytest.approx(35.13, abs=0.01)
    assert bench.step_flops_per_image("self-distill", config) / 1e9 == pytest.approx(3 * (19.56 + 35.13) + 35.13,
                                                                                      abs=0.1)


def test_projection_of_the_papers_table(capsys):
    """GPU-hours for 6 datasets x [20k x 64 + 20k x 64 + 3 x 5 x 10k x 32] images at the given rates."""
    rates = dict.fromkeys(bench.STAGES, 1000.0)
    # per dataset: 1,280 s + 1,280 s + 4,800 s
    assert bench.projection(rates) == pytest.approx(6 * (1280 + 1280 + 4800) / 3600)
    # side by side multiplies fine-tuning's throughput only
    assert bench.projection(rates, side_by_side=2.0) == pytest.approx(6 * (1280 + 1280 + 2400) / 3600)
    assert bench.projection({**rates, "self-distill": 500.0}) == pytest.approx(6 * (1280 + 2560 + 4800) / 3600)
    # ViT-B/16: 6 x (1.28M x 58.7 + 1.28M x 199.2 + 4.8M x 105.4) GFLOP ≈ 5.0 EFLOP (shared/gpu/README.md)
    config = ViTMAEConfig()
    config.mask_ratio = 0.75
    assert bench.table_flops(config) / 1e18 == pytest.approx(5.02, abs=0.01)
    rows = [{"stage": s, "ours_images_per_s": 2000.0, "reference_images_per_s": 1000.0} for s in bench.STAGES]
    out = bench.print_projection(rows, config, side_by_side=1.5, peak=1e15)
    assert out["reference_gpu_hours"] == pytest.approx(6 * 7360 / 3600)
    assert out["ours_gpu_hours"] == pytest.approx(6 * (640 + 640 + 1600) / 3600)
    printed = capsys.readouterr().out
    assert "reference / ours: 2.56" in printed and "x1.5" in printed
    # MFU over the table: its FLOPs over the GPU-hours at the peak
    assert f"MFU {out['table_flops'] / (out['ours_gpu_hours'] * 3600 * 1e15):.1%}" in printed


def test_bench_threads_measures_the_thread_counts_it_names(tmp_path, capsys):
    """lab.bench_threads runs pretrain.py as a user does, with each --threads (checked against the run's record),
    quiet and beside busy processes, and prints the ratios of what it measured."""
    from lab import bench_threads
    args = bench_threads.get_args_parser().parse_args(
        ["--steps", "4", "--log_every", "2", "--busy", "1", "--data_dir", str(tmp_path / "data"),
         "--out", str(tmp_path / "figures.json")])
    figures = bench_threads.main(args)
    printed = capsys.readouterr().out
    assert set(figures["pretrain"]) == {"quiet 1", "quiet 2", "loaded 1", "loaded 2"}
    assert all(speed > 0 for speed in figures["pretrain"].values())
    p = figures["pretrain"]
    assert f"quiet: --threads 2 / --threads 1 = {p['quiet 2'] / p['quiet 1']:.2f}" in printed
    assert f"--threads 1: loaded / quiet = {p['loaded 1'] / p['quiet 1']:.2f}" in printed

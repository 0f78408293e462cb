"""The speed paths give today's numbers: decode-once batches, randomness drawn ahead, the teacher's
features computed once, and --cuda_graph's graphed step (training/cuda_graph.py, run without capture on CPU)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import pretrain
import selftrain
import training
import utils
from data import ImageDataset, cache
from models import Preprocessing, cls_feature, load_mae

from helpers import Cut, TINY, cut_at, metrics, nan_loss_at


def _run(tmp_path, *extra, batch_size=8, steps=6, process=None):
    """A run that writes nothing, for its batches; `process`: its place in a job (default: one process)."""
    args = pretrain.get_args_parser().parse_args(
        [*TINY, "--dataset", "digits", "--batch_size", str(batch_size), "--steps", str(steps), *map(str, extra)])
    return training.Run.without_directory(args, "test", Preprocessing(), process=process)


def _all(batches):
    return [(step, [t.clone() for t in tensors]) for step, tensors in batches]


def test_decoded_batches_equal_the_streaming_batches(data_dir, tmp_path, monkeypatch):
    full = ImageDataset("digits", "train", data_dir, 32)
    subset = torch.utils.data.Subset(full, finetune.train_val_split(len(full), 0.2)[0])
    for dataset in (subset, full):
        streamed = _all(_run(tmp_path, "--data_cache", "off").batches(dataset))
        decoded = _all(_run(tmp_path).batches(dataset))
        assert [s for s, _ in streamed] == list(range(6)) == [s for s, _ in decoded]
        for (_, a), (_, b) in zip(streamed, decoded):
            assert all(torch.equal(x, y) for x, y in zip(a, b))  # images, labels, indices
        # the indices are positions in the dataset given: its own items are the batch
        images, labels, index = decoded[2][1]
        assert labels.tolist() == [dataset[i][1] for i in index.tolist()]
    test = ImageDataset("digits", "test", data_dir, 32)
    streamed_eval = _run(tmp_path, "--data_cache", "off").eval_batches(test)
    for a, b in zip(streamed_eval, _run(tmp_path).eval_batches(test), strict=True):  # strict: a dropped batch fails
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    # a second run reads the disk copy and decodes nothing
    path = cache.cache_path(full)
    assert os.path.exists(path) and path.startswith(os.path.join(data_dir, "digits", ".cache", "train-32-2-"))
    monkeypatch.setattr(cache, "decode", lambda *a: pytest.fail("decoded again"))
    again = _all(_run(tmp_path).batches(full))
    assert all(torch.equal(x, y) for (_, a), (_, b) in zip(decoded, again) for x, y in zip(a, b))


def test_disk_cache_is_invalidated_by_data_size_and_filter(tmp_path):
    root = tmp_path / "data" / "mine" / "train"
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        for i in range(3):
            Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    dataset = ImageDataset("mine", "train", str(tmp_path / "data"), 8)
    images, labels, how = cache.load_or_decode(dataset, 0, write=True)
    assert how == "decoded once" and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(images[4], dataset[4][0])
    assert cache.load_or_decode(dataset, 0, write=True)[2].startswith("read from")
    first = cache.cache_path(dataset)
    assert cache.cache_path(ImageDataset("mine", "train", str(tmp_path / "data"), 16)) != first
    assert cache.cache_path(ImageDataset("mine", "train", str(tmp_path / "data"), 8, Image.BICUBIC)) != first
    Image.fromarray(np.full((12, 10, 3), 200, np.uint8)).save(root / "b" / "1.png")  # the data changes
    assert cache.cache_path(dataset) != first
    images, _, how = cache.load_or_decode(dataset, 0, write=True)
    assert how == "decoded once" and images[4].eq(200).all()
    assert not [f for f in os.listdir(os.path.dirname(first)) if ".tmp" in f]  # written atomically
    # decoded by worker processes: the same tensor
    assert torch.equal(cache.decode(dataset, 2)[0], images)
    # a damaged file is decoded again and replaced
    with open(cache.cache_path(dataset), "wb") as f:
        f.write(b"not a tensor file")
    again, _, how = cache.load_or_decode(dataset, 0, write=True)
    assert how == "decoded once" and torch.equal(again, images)
    assert cache.load_or_decode(dataset, 0, write=True)[2].startswith("read from")


def test_a_split_over_the_memory_budget_streams_with_a_notice(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cache, "available_ram", lambda: 1000)
    dataset = ImageDataset("digits", "train", data_dir, 32)
    run = _run(tmp_path)
    batches = _all(run.batches(dataset))
    assert "streaming it through the workers" in capsys.readouterr().out
    assert not run.data.is_decoded(dataset)
    streamed = _all(_run(tmp_path, "--data_cache", "off").batches(dataset))
    assert all(torch.equal(x, y)
               for (_, a), (_, b) in zip(batches, streamed, strict=True) for x, y in zip(a, b, strict=True))


def test_randomness_drawn_ahead_equals_the_per_step_generators():
    """Indices, masking noise and flips for step k are what utils.generator(seed, stream, k) gives, across
    chunk boundaries, for any process of a job and for a resumed run."""
    steps, batch = 150, 6
    for world, rank, start in ((1, 0, 0), (2, 1, 0), (3, 2, 70)):
        draws = training.Draws(5, batch, steps, rank, world, torch.device("cpu"))
        rows = slice(rank * batch // world, (rank + 1) * batch // world)
        sampler = training.StepSampler(40, batch, 5, start, steps, rank, world)
        drawn = sampler.indices(start, steps)
        for step, listed in zip(range(start, steps), sampler):
            assert drawn[step - start].tolist() == listed == draws.indices(40, step).tolist()
            noise = torch.rand(batch, 64, generator=utils.generator(5, utils.STREAM_NOISE, step))[rows]
            assert torch.equal(draws.uniform(step, utils.STREAM_NOISE, 64), noise)
            flip = torch.rand(batch, generator=utils.generator(5, utils.STREAM_FLIP, step))[rows]
            assert torch.equal(draws.uniform(step, utils.STREAM_FLIP), flip)


def test_drawn_ahead_draws_a_chunk_of_steps_at_once():
    calls = []

    def draw(start, stop):
        calls.append((start, stop))
        return torch.arange(start, stop)
    ahead = training.draws.DrawnAhead(draw, torch.device("cpu"), steps=150)
    assert [int(ahead[s]) for s in range(150)] == list(range(150))
    assert calls == [(0, 64), (64, 128), (128, 150)]  # one draw (and copy) per 64 steps
    assert int(ahead[3]) == 3 and calls[-1] == (3, 67)  # a step outside the chunk held: drawn again from there


def test_teacher_features_looked_up_equal_the_online_ones(data_dir, tmp_path):
    """On CPU in fp32 each row of the encoder's output depends on its own image only (per-row matmuls,
    per-sample attention and LayerNorm; the table uses the steps' batch shape, padding the last batch), so
    the looked-up h_T(x) is bit-equal to the one computed in the step, as the loop did before."""
    teacher = load_mae("vit-mae-tiny").vit.eval().requires_grad_(False)
    dataset = ImageDataset("digits", "train", data_dir, 32)
    assert len(dataset) % 8  # the last table batch is padded
    for cached in ("auto", "off"):
        run = _run(tmp_path, "--data_cache", cached, steps=4)
        table = selftrain.teacher_features(teacher, run.device, run, dataset)
        assert table.shape == (len(dataset), teacher.config.hidden_size)
        for step, (images, _, index) in run.batches(dataset):
            with torch.inference_mode(), run.autocast():
                online = cls_feature(teacher, images)
            assert torch.equal(table[index], online)
        with torch.inference_mode():
            last = cls_feature(teacher, run.normalize(dataset[len(dataset) - 1][0][None]))
        torch.testing.assert_close(table[-1:], last, rtol=1e-5, atol=1e-6)  # the right image at the end


def test_static_buffer_step_equals_the_eager_step(stage_args, tmp_path):
    """--cuda_graph on CPU: static input buffers, the learning rate as a tensor, the non-finite flag in place,
    clipping always, gradients zeroed in place; the same parameters and logged numbers as the eager step."""
    for name, graph in (("eager", "--no-cuda_graph"), ("static", "--cuda_graph")):
        pretrain.main(pretrain.get_args_parser().parse_args(
            stage_args(graph, "--warmup_steps", 2, "--output_dir", tmp_path / f"pt-{name}", steps=5)))
        finetune.main(finetune.get_args_parser().parse_args(stage_args(
            graph, "--scratch", "True", "--warmup_steps", 2, "--output_dir", tmp_path / f"ft-{name}",
            "--results_dir", tmp_path / "res", steps=5)))
    for stage in ("pt", "ft"):
        assert metrics(tmp_path / f"{stage}-eager") == [
            {**m, "images_per_s": e["images_per_s"], "peak_mem_mb": e["peak_mem_mb"]}
            for m, e in zip(metrics(tmp_path / f"{stage}-static"), metrics(tmp_path / f"{stage}-eager"))]
    a, b = (load_mae(str(tmp_path / f"pt-{name}")).state_dict() for name in ("eager", "static"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.load(open(tmp_path / f"ft-{name}.json")) for name in ("eager", "static"))
    assert (ra["test_acc"], ra["test_loss"]) == (rb["test_acc"], rb["test_loss"])
    assert rb["args"]["cuda_graph"] is True and rb["args"]["data_cache"] == "auto"


def test_static_step_run_killed_and_resumed_is_bit_identical(stage_args, tmp_path, monkeypatch):
    """The state saved with the learning rate as a tensor resumes as the eager one does."""
    argv = lambda name: pretrain.get_args_parser().parse_args(
        stage_args("--cuda_graph", "--save_every", 2, "--warmup_steps", 2, "--output_dir", tmp_path / name, steps=6))
    pretrain.main(argv("whole"))
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):
        pretrain.main(argv("resumed"))
    assert torch.load(tmp_path / "resumed" / training.STATE_FILE, weights_only=True)["step"] == 2
    pretrain.main(argv("resumed"))
    assert metrics(tmp_path / "whole") == [
        {**m, "images_per_s": w["images_per_s"], "peak_mem_mb": w["peak_mem_mb"]}
        for m, w in zip(metrics(tmp_path / "resumed"), metrics(tmp_path / "whole"))]
    a, b = (load_mae(str(tmp_path / name)).state_dict() for name in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_static_step_flags_a_non_finite_loss(stage_args, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, 3)
    argv = pretrain.get_args_parser().parse_args(
        stage_args("--cuda_graph", "--log_every", 4, "--output_dir", tmp_path / "r", steps=6))
    with pytest.raises(utils.UserError, match="not finite at step 3"):
        pretrain.main(argv)


def test_graphed_step_runs_the_stage_step_function_on_static_buffers(tmp_path):
    """--cuda_graph on CPU: Run.graphed calls the stage's own step function on static input buffers that every call
    refills (a captured graph reads fixed addresses), seeds dropout from (seed, step) before it (a capture cannot
    take a seed; a replay reads the generator's), and does the host work after it (observers, then the schedule):
    Run.step inside the function does the device work only."""
    observed = []
    with training.observed_steps(lambda step: observed.append((step, run.scheduler.last_epoch))):
        run = _run(tmp_path, "--cuda_graph", "--warmup_steps", 2, steps=4)
    model = load_mae("vit-mae-tiny")
    model = run.prepare(model, *run.adamw(model, lambda n, p: False, (0.9, 0.95)))
    seen = []

    @run.graphed
    def train_step(step, images, noise):
        seen.append({"images": images, "noise": noise.clone(), "draw": torch.rand(()),
                     "schedule": run.scheduler.last_epoch})
        for micro in run.micro_batches(images, noise):
            with run.forward(step):
                loss, terms = pretrain.training_loss(model, *micro)
            run.backward(loss, terms)
        run.step(step)
        assert run.scheduler.last_epoch == step  # the schedule steps after the function, outside any graph

    noises = []
    for step in range(4):
        noises.append(run.masking_noise(step, 64))
        train_step(step, torch.randn(8, 3, 32, 32), noises[-1])
    assert all(s["images"] is seen[0]["images"] for s in seen)  # one buffer, refilled
    assert all(torch.equal(s["noise"], n) for s, n in zip(seen, noises))
    for step, s in enumerate(seen):
        torch.manual_seed(run.draws.dropout_seed(step))
        assert torch.equal(s["draw"], torch.rand(())), f"step {step}: dropout not seeded from (seed, step)"
        assert s["schedule"] == step
    assert observed == [(step, step) for step in range(4)] and run.scheduler.last_epoch == 4


@pytest.mark.parametrize("graph", ["--no-cuda_graph", "--cuda_graph"])
def test_non_finite_loss_in_a_resumed_run_names_the_runs_step(stage_args, tmp_path, monkeypatch, graph):
    """The non-finite flag counts steps on the device from the step the run resumed at."""
    argv = pretrain.get_args_parser().parse_args(
        stage_args(graph, "--save_every", 2, "--log_every", 1, "--output_dir", tmp_path / "r", steps=6))
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):
        pretrain.main(argv)
    nan_loss_at(monkeypatch, 2)  # the resumed run's second step: step 4
    with pytest.raises(utils.RunFailed, match="not finite at step 4"):
        pretrain.main(argv)


def test_cuda_graph_is_refused_with_torchrun_and_with_compile(tmp_path):
    model = load_mae("vit-mae-tiny")
    run = _run(tmp_path, "--cuda_graph", process=training.Process(rank=0, world=2))
    with pytest.raises(utils.UserError, match="--cuda_graph runs in one process only"):
        run.adamw(model, lambda n, p: False, (0.9, 0.95))
    run = _run(tmp_path, "--cuda_graph", "--compile")
    with pytest.raises(utils.UserError, match="--cuda_graph and --compile do not combine"):
        run.adamw(model, lambda n, p: False, (0.9, 0.95))

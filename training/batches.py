"""The images a step trains on: this process's batch of step s, from the split decoded once (--data_cache auto,
data/cache.py) or decoded by DataLoader workers (off) -- the same batches either way -- normalised on the device;
and the whole of a split in order, for evaluation and for tables computed once per image."""
import time

import torch

from data import cache


class Batches:
    """Batches of a run (args: batch_size, steps, workers, data_cache) for one process of the job; `stage`
    names the run in its notices."""

    def __init__(self, args, process, draws, preprocessing, stage: str):
        self.args, self.process, self.draws, self.stage = args, process, draws, stage
        self.local_batch = process.local_batch(args.batch_size)
        if preprocessing is not None:  # None: a text run (no images to normalise)
            self.mean = torch.tensor(preprocessing.mean, device=process.device).view(1, 3, 1, 1)
            self.std = torch.tensor(preprocessing.std, device=process.device).view(1, 3, 1, 1)
        self._splits = {}  # id(dataset) -> (dataset, (images, labels) or None: streamed)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float, scaled to [0, 1] and normalised with the model's mean/std."""
        images = images.to(self.process.device, non_blocking=True).float().div_(255)
        return (images - self.mean) / self.std

    def training(self, dataset, start_step: int):
        """(step, (images, labels, indices)) for steps start_step .. steps-1: images (B_local, 3, H, W) normalised
        on the device, labels (B_local,) and the batch's positions in `dataset` (B_local,), from draws.indices.
        A text split (models.roberta_mlm.TokenizedSplit) gives (input_ids, attention_mask), each (B_local, L), in
        place of images: its texts padded to the longest of the batch."""
        device = self.process.device
        if getattr(dataset, "is_text", False):
            for step in range(start_step, self.args.steps):
                index = self.draws.indices(len(dataset), step)
                input_ids, attention_mask, labels = self._on_device(dataset.gather(index))
                yield step, ((input_ids, attention_mask), labels, index)
            return
        store = self._decoded(dataset)
        if store is None:  # the workers decode each step's batch: the sampler yields this process's indices
            loader = iter(self._loader(dataset, batch_sampler=_StepOrder(self.draws, len(dataset), start_step,
                                                                        self.args.steps)))
        for step in range(start_step, self.args.steps):
            index = self.draws.indices(len(dataset), step)  # (B_local,)
            images, labels = next(loader) if store is None else store.gather(index)
            yield step, (self.normalize(images), labels.to(device, non_blocking=True), index)

    def evaluation(self, dataset):
        """This process's share of a dataset, in order: (images, labels) batches of B_local."""
        device = self.process.device
        indices = torch.arange(self.process.rank, len(dataset), self.process.world)
        if getattr(dataset, "is_text", False):
            for index in indices.split(self.local_batch):
                input_ids, attention_mask, labels = self._on_device(dataset.gather(index))
                yield (input_ids, attention_mask), labels
            return
        store = self._decoded(dataset)
        if store is None:
            loader = self._loader(torch.utils.data.Subset(dataset, indices.tolist()), batch_size=self.local_batch)
            for images, labels in loader:
                yield self.normalize(images), labels.to(device, non_blocking=True)
            return
        for index in indices.to(device).split(self.local_batch):
            images, labels = store.gather(index)
            yield self.normalize(images), labels.to(device, non_blocking=True)

    def ordered(self, dataset):
        """(indices, images) over the whole of `dataset` in order (every process gets all of it), in batches
        of B_local, the training steps' shape: the last batch is filled up with the first images, and
        `indices` names its real rows, which come first. For tables computed once per image."""
        n, b = len(dataset), self.local_batch
        order = torch.arange(-(-n // b) * b) % n  # whole batches
        if getattr(dataset, "is_text", False):  # (input_ids, attention_mask) in place of images
            for start, rows in zip(range(0, len(order), b), order.split(b)):
                input_ids, attention_mask, _ = self._on_device(dataset.gather(rows))
                yield rows[:n - start].to(self.process.device), (input_ids, attention_mask)
            return
        store = self._decoded(dataset)
        loader = (iter(self._loader(torch.utils.data.Subset(dataset, order.tolist()), batch_size=b))
                  if store is None else None)
        for start, rows in zip(range(0, len(order), b), order.to(self.process.device).split(b)):
            images = next(loader)[0] if store is None else store.gather(rows)[0]
            yield rows[:n - start], self.normalize(images)

    def _on_device(self, tensors):
        return tuple(t.to(self.process.device, non_blocking=True) for t in tensors)

    def is_decoded(self, dataset) -> bool:
        """Whether batches of `dataset` are gathered from its decode-once copy (else streamed)."""
        return self._decoded(dataset) is not None

    def _loader(self, dataset, **kw):
        workers = self.args.workers
        return torch.utils.data.DataLoader(
            dataset, num_workers=workers, pin_memory=self.process.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None, **kw)

    def _decoded(self, dataset):
        """The decode-once copy of `dataset` (a data.ImageDataset or a Subset of one), or None: streaming."""
        if self.args.data_cache == "off":
            return None
        base, positions = dataset, None
        if isinstance(dataset, torch.utils.data.Subset):
            base, positions = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.int64)
        if id(base) not in self._splits:
            self._splits[id(base)] = (base, self._decode(base))  # base kept: its id stays unique
        split = self._splits[id(base)][1]
        if split is None:
            return None
        images, labels = split
        return _DecodedSplit(images, labels, None if positions is None else positions.to(images.device))

    def _decode(self, dataset):
        process = self.process
        name = f"{getattr(dataset, 'name', type(dataset).__name__)} {getattr(dataset, 'split', '')}".strip()
        size = getattr(dataset, "image_size", None) or dataset[0][0].shape[-1]
        need = cache.split_bytes(len(dataset), size)
        if process.rank != 0:  # process 0 decodes and writes the disk copy first; the others then read it
            process.barrier()
        try:
            if need > cache.RAM_FRACTION * cache.available_ram():
                process.print(f"[{self.stage}] note: {name} decoded takes {need / 2**30:.1f} GiB, more than "
                              f"{cache.RAM_FRACTION:.0%} of the available memory: streaming it through the workers")
                return None
            start = time.perf_counter()
            images, labels, how = cache.load_or_decode(dataset, self.args.workers, write=process.is_main,
                                                       notice=process.print)
            where = "CPU memory"
            if process.device.type == "cuda":
                labels = labels.to(process.device)
                if need <= cache.GPU_FRACTION * torch.cuda.mem_get_info(process.device)[0]:
                    images, where = images.to(process.device), "the GPU"
            process.print(f"[{self.stage}] {name}: {len(dataset)} images {how} ({need / 2**20:.0f} MiB in "
                          f"{where}, {time.perf_counter() - start:.1f} s)")
            return images, labels
        finally:
            if process.rank == 0:
                process.barrier()


class _DecodedSplit:
    """A decoded split (data/cache.py) and, for a Subset, its positions in the split: batches by index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None):
        self.images, self.labels, self.positions = images, labels, positions

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) positions in the dataset -> (B, 3, S, S) uint8 images and (B,) labels."""
        index = index.to(self.images.device)
        if self.positions is not None:
            index = self.positions[index]
        return self.images[index], self.labels[index.to(self.labels.device)]


class _StepOrder(torch.utils.data.Sampler):
    """A DataLoader batch sampler yielding draws.indices(n, step) for steps start .. stop-1 (as lists)."""

    def __init__(self, draws, n: int, start: int, stop: int):
        self.draws, self.n, self.start, self.stop = draws, n, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.draws.indices(self.n, step).tolist()

    def __len__(self):
        return max(0, self.stop - self.start)

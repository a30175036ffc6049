"""Pre-training samples from a stream of shards (WebDataset tars, a streaming ``datasets`` dataset), split across
processes and DataLoader workers, shuffled, seeded by image key, and resumable mid-epoch.

Every epoch ``e``, the shards are put in a seeded order (``seed``, ``e``) and dealt to the ``P x W`` readers (``W``
DataLoader workers, at least 1, of each of ``P`` processes): reader ``g = rank * W + worker`` reads shards
``g, g + P*W, ...`` of that order, one after the other, so every image is read once per epoch by exactly one reader.
A reader's samples go through a shuffle buffer of ``buffer_size``: they are taken in windows of ``buffer_size``
consecutive samples, each window yielded in a seeded random order (``seed``, ``e``, ``g``, window). A reader runs
epoch after epoch without end: the run's length is ``max_steps``, and processes never wait for each other at an epoch
end.

The views and the mask of an image are seeded by ``(seed, epoch, key)`` alone (``derive_sample_seeds`` of the key's
64-bit hash), so they do not depend on the number of processes or workers, nor on the shuffle.

Resuming: every sample carries its reader's position after it, ``data_position`` (`StreamPosition`); the trainer
keeps the last position of each reader it trained on (`StreamPositions`), the checkpoint stores them, and a resumed
dataset starts every reader there: it re-reads (without decoding) the current window's samples from its first one,
never what came before it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ..distributed import process_layout
from ..errors import first_line
from .image_folder import UnreadableImageError
from .shards import StreamSample, UnreadableShardError
from .two_view_dataset import TwoViewDataset, derive_sample_seeds

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "ShardStream",
    "StreamCollator",
    "StreamPosition",
    "StreamPositions",
    "StreamingTwoViewDataset",
    "key_index",
]

logger = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE = 1000


class ShardStream(Protocol):
    """What `StreamingTwoViewDataset` reads: `WebDatasetShards` or `HFStreamingShards`."""

    name: str
    shards: list[str]
    image_size: tuple[int, int] | None

    def samples(self, shard_index: int, skip: int = 0) -> Iterator[StreamSample]: ...

    def count_images(self, tolerate: bool = False) -> int | None: ...


def key_index(key: str) -> int:
    """The 64-bit integer that stands for an image key in `derive_sample_seeds` (a hash: the same everywhere)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's seeded order of the shards."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 0x5A4D])))
    return [int(i) for i in generator.permutation(num_shards)]


@dataclass(frozen=True)
class StreamPosition:
    """A reader's place in its stream, after a sample: ``taken`` samples of window ``window`` of epoch ``epoch``,
    which starts at sample ``offset`` of the reader's ``shard``-th shard; ``skipped`` unreadable samples and
    shards so far."""

    reader: int
    readers: int
    epoch: int = 0
    shard: int = 0
    offset: int = 0
    window: int = 0
    taken: int = 0
    skipped: int = 0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.int64)

    @classmethod
    def from_values(cls, values) -> StreamPosition:
        return cls(*(int(v) for v in values))


class StreamPositions:
    """The last position of every reader of this process that the trainer trained on, and how many batches it took
    (which reader's batch comes next: a DataLoader takes its workers' batches in turn)."""

    def __init__(self) -> None:
        self.positions: dict[int, StreamPosition] = {}
        self.batches = 0

    def record(self, position: torch.Tensor) -> None:
        value = StreamPosition.from_values(position.tolist())
        self.positions[value.reader] = value
        self.batches += 1

    @property
    def skipped(self) -> int:
        return sum(position.skipped for position in self.positions.values())

    def state_dict(self) -> dict:
        return {"batches": self.batches, "positions": [list(astuple(p)) for p in self.positions.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
        self.positions = {}
        for values in state["positions"]:
            position = StreamPosition.from_values(values)
            self.positions[position.reader] = position


class StreamingTwoViewDataset(IterableDataset):
    """`TwoViewDataset`'s samples (or `BatchedTwoViewDataset`'s, as ``views`` makes them) from a `ShardStream`,
    endlessly, epoch after epoch (module docstring).

    Each sample also holds ``data_position`` (int64 [8], `StreamPosition`), and ``key`` with ``with_keys``;
    `StreamCollator` takes them out of the batch.

    Args:
        stream: the shards.
        views: the dataset whose ``views(image, augmentation_seed)`` makes a sample's views, and whose
            ``num_patches`` and ``seed`` apply (its source is not used).
        mode: the PIL mode images are decoded to.
        buffer_size: the shuffle buffer (window) of every reader; 1 reads each shard in order.
        skip_unreadable: skip (and count) undecodable samples and the rest of a truncated shard, instead of raising.
        rank, processes: this process's place; default `macrl.distributed.process_layout()` when iterated.
    """

    def __init__(
        self,
        stream: ShardStream,
        views: TwoViewDataset,
        mode: str,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        skip_unreadable: bool = False,
        with_keys: bool = False,
        rank: int | None = None,
        processes: int | None = None,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.stream = stream
        self.views = views
        self.mode = mode
        self.buffer_size = buffer_size
        self.skip_unreadable = skip_unreadable
        self.with_keys = with_keys
        self.rank, self.processes = rank, processes
        self.seed = views.seed
        self.num_patches = views.num_patches
        self.start_positions: dict[int, StreamPosition] = {}  # where each reader starts (a resumed run)
        self.worker_offset = 0  # DataLoader worker w plays reader (w + worker_offset) % W
        self.images_per_epoch: int | None = None  # when known (`ShardStream.count_images`)

    @property
    def name(self) -> str:
        return self.stream.name

    def resume_from(self, positions: StreamPositions, num_workers: int) -> None:
        """Start every reader after the last sample the trainer took from it, and the first batch from the reader
        whose turn it is."""
        self.start_positions = dict(positions.positions)
        self.worker_offset = positions.batches % max(num_workers, 1)

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if self.rank is not None:
            rank, processes = self.rank, self.processes
        else:
            layout = process_layout()
            rank, processes = layout.rank, layout.processes
        readers = processes * workers
        if len(self.stream.shards) < readers:
            from .open_data import DataError

            raise DataError(
                f"{self.name}: {len(self.stream.shards)} shards cannot be split across {processes} processes x "
                f"{workers} workers ({readers} readers, each needs a shard of its own): use more shards or fewer "
                "workers"
            )
        return rank * workers + (worker + self.worker_offset) % workers, readers

    def __iter__(self) -> Iterator[dict]:
        reader, readers = self._reader()
        start = self.start_positions.get(reader)
        if start is not None and start.readers != readers:
            from .open_data import DataError

            raise DataError(
                f"{self.name}: the data position was saved by {start.readers} readers (processes x workers), this "
                f"run has {readers}; resume with the same processes and --num-workers"
            )
        position = start or StreamPosition(reader, readers)
        skipped = position.skipped
        epoch, shard, offset = position.epoch, position.shard, position.offset
        window, taken = position.window, position.taken
        while True:
            mine = shard_order(len(self.stream.shards), self.seed, epoch)[reader::readers]
            samples = self._read(mine, shard, offset)
            yielded = False
            while True:
                batch: list[tuple[int, int, StreamSample | None]] = []
                for item in samples:
                    batch.append(item)
                    if len(batch) == self.buffer_size:
                        break
                if not batch:
                    break
                window_shard, window_offset = batch[0][0], batch[0][1]
                window_seed = np.random.SeedSequence([self.seed, epoch, reader, window])
                generator = np.random.Generator(np.random.PCG64(window_seed))
                order = generator.permutation(len(batch))
                for taken in range(taken, len(batch)):
                    sample = batch[order[taken]][2]
                    made = self._make(sample, epoch) if sample is not None else None
                    if made is None:  # an unreadable sample or the end of a truncated shard, skipped
                        skipped += 1
                        continue
                    position = StreamPosition(
                        reader, readers, epoch, window_shard, window_offset, window, taken + 1, skipped
                    )
                    made["data_position"] = position.as_tensor()
                    yielded = True
                    yield made
                window += 1
                taken = 0
            if not yielded and start is None:  # a whole epoch of this reader's shards gave no image: it never will
                from .open_data import DataError

                raise DataError(f"{self.name}: the shards of reader {reader} of {readers} hold no readable image")
            start = None
            epoch, shard, offset, window, taken = epoch + 1, 0, 0, 0, 0

    def _read(self, mine: list[int], shard: int, offset: int) -> Iterator[tuple[int, int, StreamSample | None]]:
        """(reader's shard, sample within it, sample) from shard ``shard`` sample ``offset`` on; a truncated shard
        skipped with ``skip_unreadable`` gives one ``None`` in place of its missing rest."""
        for index in range(shard, len(mine)):
            count = offset if index == shard else 0
            try:
                for sample in self.stream.samples(mine[index], skip=count):
                    yield index, count, sample
                    count += 1
            except UnreadableShardError as error:
                if not self.skip_unreadable:
                    raise
                logger.warning("skipping the rest of an unreadable shard: %s", first_line(error))
                yield index, count, None

    def _make(self, sample: StreamSample, epoch: int) -> dict | None:
        try:
            image = sample.decode(self.mode)
        except UnreadableImageError as error:
            if not self.skip_unreadable:
                raise
            logger.warning("skipping an unreadable image: %s", first_line(error))
            return None
        augmentation_seed, noise_seed = derive_sample_seeds(self.seed, epoch, key_index(sample.key))
        noise = torch.rand(self.num_patches, generator=torch.Generator().manual_seed(noise_seed))
        made = {**self.views.views(image, augmentation_seed), "noise": noise}
        if self.with_keys:
            made["key"] = sample.key
            made["epoch"] = epoch
        return made


class StreamCollator:
    """``collate_fn`` for `StreamingTwoViewDataset`: the inner collator (or the default one) on the samples, and
    the batch's ``data_position`` (its last sample's: a batch comes from one reader) unless ``positions=False``."""

    def __init__(self, inner=None, positions: bool = True) -> None:
        self.inner = inner
        self.positions = positions

    def __call__(self, samples: list[dict]) -> dict:
        positions = [sample.pop("data_position") for sample in samples]
        for sample in samples:
            sample.pop("key", None), sample.pop("epoch", None)
        batch = self.inner(samples) if self.inner is not None else default_collate(samples)
        if self.positions:
            batch["data_position"] = positions[-1]
        return batch

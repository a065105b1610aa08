"""Which B-scans each training step sees, as a ``torch.utils.data`` batch sampler over a source.

Every random draw of a step is a function of (seed, step) alone: the batch of step ``k`` comes from
a generator seeded with ``(seed, k)``, never from a stream that earlier steps advanced. So the data
order is the same whether the B-scans are in memory or streamed, whether or not a loader reads
ahead in worker processes, and after a resume, whose sampler position is just the step it
restarts from. Under DDP every process draws the same global batch of ``batch_size x world_size``
and takes its own interleaved share, which keeps the class balance per process and no B-scan
slot is drawn for two processes; ``torch.utils.data.DistributedSampler`` shards a per-epoch
permutation instead, which cannot give class-balanced batches drawn with replacement.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hrf_batch.training.source import BScanSource


def step_seed(seed: int, step: int, *more: int) -> int:
    """A 63-bit seed for the draws of one step; ``more`` (process rank, purpose) keeps draws that
    should differ between processes or uses (augmentation, dropout) apart."""
    hi, lo = np.random.SeedSequence([seed, step, *more]).generate_state(2, np.uint32).tolist()
    return ((hi << 32) | lo) >> 1


class BalancedBatchSampler(Sampler[list[int]]):
    """Index lists for steps ``start .. stop - 1``: equal-sized B-scans, half with HRF and half
    without where the chosen size has both (sizes are chosen in proportion to their B-scans)."""

    def __init__(self, counts: np.ndarray, shapes: np.ndarray, batch_size: int, seed: int, *, start: int = 0,
                 stop: int, rank: int = 0, world_size: int = 1) -> None:
        self.counts, self.batch_size, self.seed = np.asarray(counts), batch_size, seed
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size
        groups: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(np.asarray(shapes).tolist()):
            groups.setdefault(tuple(shape), []).append(i)
        self.groups = [np.array(v) for v in groups.values()]
        self.weights = np.array([len(g) for g in self.groups], dtype=float) / len(self.counts)

    def global_batch(self, step: int) -> np.ndarray:
        """The B-scans every process together sees at ``step``."""
        rng = np.random.default_rng([self.seed, step])
        size = self.batch_size * self.world_size
        group = self.groups[rng.choice(len(self.groups), p=self.weights)]
        pos = group[self.counts[group] > 0]
        neg = group[self.counts[group] == 0]
        if len(pos) == 0 or len(neg) == 0:
            return rng.choice(group, size)
        n_pos = size // 2
        return np.concatenate([rng.choice(pos, n_pos), rng.choice(neg, size - n_pos)])

    def batch(self, step: int) -> list[int]:
        """This process's share of the global batch of ``step``."""
        return self.global_batch(step)[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class BScanDataset(Dataset):
    """``(uint8 B-scan, HRF count)`` by index, read from the source when asked for."""

    def __init__(self, source: BScanSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.source.image(int(i)), int(self.source.counts[int(i)])


def collate(items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, np.ndarray]:
    """A batch as float32 ``(B, 1, H, W)`` display-scale pixels and the HRF counts."""
    pixels = np.stack([img for img, _ in items]).astype(np.float32)
    return torch.from_numpy(pixels).unsqueeze(1), np.array([c for _, c in items])

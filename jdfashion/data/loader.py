"""Turning image lists into tensors: the dataset, the PK identity sampler and the augmentation pipelines.

Randomness is keyed by (seed, epoch, position) rather than drawn from global state, so a run is
reproducible on CPU whatever the worker count, and a resumed run replays exactly the batches it
would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from jdfashion.data.deskew import Deskew
from jdfashion.data.images import load_item
from jdfashion.data.jdformat import ImageRef

Stats = tuple[float, ...]
UNREADABLE_SIZE = 64  # the black stand-in for an undecodable image; resized like any crop


def eval_transform(
    image_size: int, mean: Stats, std: Stats, rotation: float = 0.0, deskew: bool = False
) -> A.Compose:
    """The item crop is squashed to a square, as the paper's 384x384 input. ``mean``/``std`` are the
    backbone's own (``model.backbones.input_normalization``), never assumed.

    ``rotation`` (degrees, counter-clockwise) is one view of rotation TTA: the square is turned, cut
    to the largest upright box inside the turned frame (no fill corners: black ones matched every
    photo with black corners on the Grocery protocol) and resized back. A quarter turn is exact.

    ``deskew`` first turns the crop back by its own tilt (``data.deskew``), at source resolution:
    turning after the resize lost more than it won (docs/REALDATA.md).
    """
    steps: list[A.BasicTransform] = [Deskew()] if deskew else []
    steps.append(A.Resize(image_size, image_size))
    if rotation % 360:
        steps += [
            A.Rotate(limit=(rotation, rotation), border_mode=cv2.BORDER_REFLECT_101, crop_border=True, p=1.0),
            A.Resize(image_size, image_size),
        ]
    steps += [A.Normalize(mean=mean, std=std), A.ToTensorV2()]
    return A.Compose(steps)


def train_transform(
    image_size: int, mean: Stats, std: Stats, augment: str = "paper", rotate_degrees: float = 0.0
) -> A.Compose:
    """``paper``: random mirror + random crop (pad then crop, as PCB). ``strong`` adds the consumer-photo
    nuisances the paper's data has: rotation, scale, colour cast and occlusion. ``rotate_degrees``
    rotates in-plane by up to that angle (black fill): what the paper's annular parts are for."""
    pad = max(1, image_size // 16)
    steps: list[A.BasicTransform] = [
        A.Resize(image_size, image_size),
        A.HorizontalFlip(p=0.5),
        A.PadIfNeeded(image_size + 2 * pad, image_size + 2 * pad, border_mode=0, fill=0),
        A.RandomCrop(image_size, image_size),
    ]
    if augment == "strong":
        steps += [
            A.Affine(rotate=(-20, 20), scale=(0.8, 1.1), p=0.7),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.7),
            A.CoarseDropout(
                num_holes_range=(1, 2), hole_height_range=(0.1, 0.3), hole_width_range=(0.1, 0.3)
            ),
        ]
    elif augment != "paper":
        raise ValueError(f"unknown augmentation {augment!r} (expected 'paper' or 'strong')")
    if rotate_degrees > 0:
        steps.append(A.Rotate(limit=(-rotate_degrees, rotate_degrees), border_mode=0, fill=0, p=1.0))
    steps += [A.Normalize(mean=mean, std=std), A.ToTensorV2()]
    return A.Compose(steps)


@dataclass(frozen=True)
class Sample:
    ref: ImageRef
    label: int


class ItemDataset(Dataset):
    """Box crops of listed images. Indexed by ``(position, augmentation_seed)`` or a bare position.

    A crop that fails to decode yields a black image and ``ok=False`` so callers can count and
    report it without losing its place in the id list.
    """

    def __init__(self, samples: Sequence[Sample], image_root: Path, transform: A.Compose) -> None:
        self.samples = list(samples)
        self.image_root = Path(image_root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, bool]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        try:
            image = load_item(sample.ref, self.image_root)
            ok = True
        except (OSError, ValueError):
            image = np.zeros((UNREADABLE_SIZE, UNREADABLE_SIZE, 3), dtype=np.uint8)
            ok = False
        if seed is not None:
            self.transform.set_random_seed(seed)
        tensor = self.transform(image=image)["image"]
        return tensor, sample.label, index, ok


class PKBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of P identities x K images, deterministic in (seed, epoch).

    An epoch is one pass over the images (as torchreid's RandomIdentitySampler): each identity's
    images are shuffled and cut into groups of K (topped up by re-drawing when it has fewer than K),
    and each batch takes one group from each of P distinct identities, drawn in proportion to the
    groups they have left. JD identities have ~2 images, so this is about one batch slot per
    identity; datasets with many photos per item (Grocery Store) still see every photo. Yields
    ``(sample_index, augmentation_seed)`` pairs, identity-major, so a contiguous slice of a batch
    keeps identities whole (what DDP sharding relies on).
    """

    def __init__(
        self,
        labels: Sequence[int],
        identities_per_batch: int,
        images_per_identity: int,
        seed: int = 0,
    ) -> None:
        self.k = images_per_identity
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        members: dict[int, list[int]] = {}
        for index, label in enumerate(np.asarray(labels).tolist()):
            members.setdefault(label, []).append(index)
        self.groups = [np.asarray(members[label]) for label in sorted(members)]
        if len(self.groups) < 2:
            raise ValueError(f"PK sampling needs at least 2 identities, got {len(self.groups)}")
        self.p = min(identities_per_batch, len(self.groups))
        self._planned: tuple[int, list[list[tuple[int, int]]]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """``start_batch`` skips the batches a resumed run has already trained on."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return len(self.batches())

    def batches(self) -> list[list[tuple[int, int]]]:
        if self._planned is None or self._planned[0] != self.epoch:
            self._planned = (self.epoch, self._plan(np.random.default_rng([self.seed, self.epoch])))
        return self._planned[1]

    def _plan(self, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
        chunks = []
        for members in self.groups:
            shuffled = rng.permutation(members)
            if len(shuffled) < self.k:
                shuffled = np.concatenate([shuffled, rng.choice(members, self.k - len(shuffled))])
            chunks.append([shuffled[i : i + self.k] for i in range(0, len(shuffled) - self.k + 1, self.k)])
        remaining = np.array([len(c) for c in chunks], dtype=float)
        result = []
        while np.count_nonzero(remaining) >= self.p:
            chosen = rng.choice(len(chunks), size=self.p, replace=False, p=remaining / remaining.sum())
            batch = []
            for identity in chosen:
                remaining[identity] -= 1
                picks = chunks[identity][int(remaining[identity])]
                batch.extend((int(i), int(rng.integers(2**31 - 1))) for i in picks)
            result.append(batch)
        return result

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.batches()[self.start_batch :]


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's contiguous slice of every global batch (DDP): together the ranks see the global batch."""

    def __init__(self, base: PKBatchSampler, rank: int, world_size: int) -> None:
        self.base = base
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.base.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.base:
            per_rank = len(batch) // self.world_size
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]


def collate(batch: list[tuple[torch.Tensor, int, int, bool]]) -> dict[str, torch.Tensor]:
    images, labels, indices, ok = zip(*batch, strict=True)
    return {
        "images": torch.stack(images),
        "labels": torch.tensor(labels, dtype=torch.long),
        "indices": torch.tensor(indices, dtype=torch.long),
        "ok": torch.tensor(ok, dtype=torch.bool),
    }

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdfashion.data.jdformat import Box, ImageRef
from jdfashion.data.loader import (
    ItemDataset,
    PKBatchSampler,
    Sample,
    ShardedBatchSampler,
    eval_transform,
    train_transform,
)

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_pk_batches_hold_p_identities_of_k_images_each() -> None:
    groups = [i // 3 for i in range(30)]  # 10 identities x 3 images
    sampler = PKBatchSampler(groups, identities_per_batch=4, images_per_identity=2, seed=1)
    batches = sampler.batches()
    assert len(batches) == len(sampler) == 2
    for batch in batches:
        labels = [groups[index] for index, _ in batch]
        assert len(batch) == 8
        assert [labels[i] for i in range(0, 8, 2)] == [labels[i] for i in range(1, 8, 2)]  # identity-major
        assert len(set(labels)) == 4


def test_pk_sampler_is_deterministic_per_epoch_and_resumes_mid_epoch() -> None:
    groups = [i // 2 for i in range(40)]
    first = PKBatchSampler(groups, 4, 2, seed=7)
    second = PKBatchSampler(groups, 4, 2, seed=7)
    first.set_epoch(3)
    second.set_epoch(3, start_batch=2)
    assert list(first)[2:] == list(second)
    first.set_epoch(4)
    assert first.batches() != second.batches()


def test_identity_with_fewer_images_than_k_is_drawn_with_replacement() -> None:
    sampler = PKBatchSampler([0, 1, 1, 1], identities_per_batch=2, images_per_identity=3)
    (batch,) = sampler.batches()
    assert sorted(index for index, _ in batch).count(0) == 3


def test_sharded_sampler_splits_each_batch_into_whole_identities() -> None:
    groups = [i // 2 for i in range(16)]
    base = PKBatchSampler(groups, 4, 2, seed=0)
    shards = [list(ShardedBatchSampler(base, rank, 2)) for rank in range(2)]
    for whole, part0, part1 in zip(base.batches(), *shards, strict=True):
        assert part0 + part1 == whole
        assert {groups[i] for i, _ in part0}.isdisjoint({groups[i] for i, _ in part1})


def test_augmentation_is_keyed_by_seed_not_global_state(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    ref = ImageRef("a.png", Box(0, 0, 50, 40))
    dataset = ItemDataset(
        [Sample(ref, 0)], tmp_path, train_transform(32, *HALF, augment="strong", rotate_degrees=30)
    )
    a, b, c = dataset[(0, 11)][0], dataset[(0, 11)][0], dataset[(0, 12)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_undecodable_image_is_flagged_not_dropped(tmp_path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    dataset = ItemDataset(
        [Sample(ImageRef("bad.jpg", Box(0, 0, 10, 10)), 3)], tmp_path, eval_transform(32, *HALF)
    )
    image, label, index, ok = dataset[0]
    assert image.shape == (3, 32, 32) and label == 3 and index == 0 and not ok


def test_pk_sampler_rejects_a_single_identity() -> None:
    with pytest.raises(ValueError, match="at least 2 identities"):
        PKBatchSampler([0, 0, 0], 2, 2)


def test_an_epoch_covers_the_images_of_identities_with_many_photos() -> None:
    groups = [0] * 12 + [1] * 10 + [2] * 8 + [3] * 8 + [4] * 6  # items photographed many times
    sampler = PKBatchSampler(groups, identities_per_batch=2, images_per_identity=2, seed=3)
    seen = [index for batch in sampler.batches() for index, _ in batch]
    assert len(seen) == len(set(seen))  # without replacement within an epoch
    assert len(seen) >= 0.8 * len(groups)
    for batch in sampler.batches():
        labels = [groups[index] for index, _ in batch]
        assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]

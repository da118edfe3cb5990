from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from jdfashion.model.mgpa import MGPA, MGPAConfig, MGPAOutput, create_model

# resnet18 keeps these fast; at 64 px its stride-1 map is 4x4, enough for 3-way splits.
SMALL = MGPAConfig(backbone="resnet18", reduction_dim=32, num_classes=7)


def images(batch: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("branches", "parts"), [("global", 1), ("horizontal", 6), ("vertical", 6), ("annular", 6), ("all", 16)]
)
def test_output_shapes_per_branch_set(branches: str, parts: int) -> None:
    model = create_model(MGPAConfig(backbone="resnet18", branches=branches, num_classes=5))
    assert model.num_parts == parts and model.embedding_dim == parts * 256

    output = model.train()(images(batch=4))
    assert isinstance(output, MGPAOutput)
    assert len(output.logits) == parts and all(logits.shape == (4, 5) for logits in output.logits)
    assert output.parts.shape == (4, parts, 256)

    with torch.no_grad():
        feature = model.eval()(images(batch=3))
    assert feature.shape == (3, parts * 256)
    torch.testing.assert_close(feature.norm(dim=1), torch.ones(3))


def test_paper_network_gives_4096_d_unit_features_of_unit_parts() -> None:
    model = create_model(MGPAConfig(backbone="resnet18")).eval()
    with torch.no_grad():
        feature = model(images())
    assert feature.shape == (2, 4096)
    # Each 256-d part block has norm 1/sqrt(16): cosine of the concatenation = mean of part cosines.
    torch.testing.assert_close(feature.view(2, 16, 256).norm(dim=2), torch.full((2, 16), 0.25))


def test_parts_have_independent_layers() -> None:
    model = create_model(SMALL).eval()
    x = images()
    with torch.no_grad():
        before, _ = model.parts_and_logits(x)
        model.head.reduction_weight[0].add_(torch.randn_like(model.head.reduction_weight[0]))
        after, _ = model.parts_and_logits(x)
    assert not torch.equal(before[:, 0], after[:, 0])
    assert torch.equal(before[:, 1:], after[:, 1:])

    # In training, part 1's loss reaches only part 1's reduction and classifier slices.
    model.train()
    model.zero_grad()
    output = model(x)
    F.cross_entropy(output.logits[1], torch.tensor([0, 3])).backward()
    for parameter in (model.head.reduction_weight, model.head.classifier_weight):
        grad_norms = parameter.grad.flatten(1).norm(dim=1)
        assert grad_norms[1] > 0 and (grad_norms[torch.arange(16) != 1] == 0).all()
    assert model.head.reduction_weight.numel() == 16 * 32 * 512  # 16 separate 512 -> 32 layers


@pytest.mark.parametrize("pooling", ["avg", "max", "gem"])
def test_summed_part_losses_train_every_layer(pooling: str) -> None:
    model = create_model(
        MGPAConfig(backbone="resnet18", reduction_dim=16, num_classes=3, pooling=pooling)
    ).train()
    output = model(images(batch=4))
    sum(F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])) for logits in output.logits).backward()
    no_gradient = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert no_gradient == []
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0


def test_one_model_serves_several_input_sizes() -> None:
    model = create_model(SMALL).eval()
    with torch.no_grad():
        for height, width in [(96, 64), (128, 128), (64, 160)]:
            feature = model(images(height=height, width=width))
            assert feature.shape == (2, model.embedding_dim)
            torch.testing.assert_close(feature.norm(dim=1), torch.ones(2))


def test_classify_is_the_mean_part_logit_in_eval_mode() -> None:
    router = create_model(MGPAConfig(backbone="resnet18", branches="global", num_classes=3)).eval()
    x = images(batch=5)
    with torch.no_grad():
        scores = router.classify(x)
        _, logits = router.parts_and_logits(x)
    assert scores.shape == (5, 3)
    torch.testing.assert_close(scores, logits.mean(dim=1))

    features_only = create_model(MGPAConfig(backbone="resnet18", branches="global"))
    assert features_only.train()(x).logits == []
    with pytest.raises(ValueError, match="no classifiers"):
        features_only.classify(x)


def test_config_round_trips_through_json_and_validates() -> None:
    config = MGPAConfig(
        backbone="resnet101", branches="global,annular-2,annular-3", pooling="gem", num_classes=4
    )
    assert MGPAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert isinstance(create_model(MGPAConfig(backbone="resnet18", branches=config.branches)), MGPA)
    with pytest.raises(ValueError, match="unknown field"):
        MGPAConfig.from_dict({**config.to_dict(), "dropout": 0.5})
    with pytest.raises(ValueError, match="unknown branch"):
        MGPAConfig(branches="global,diagonal-2")
    with pytest.raises(ValueError, match="pooling"):
        MGPAConfig(pooling="median")
    with pytest.raises(ValueError, match="reduction_dim"):
        MGPAConfig(reduction_dim=0)

"""Training on generated images: every backbone trains, a killed run resumes exactly, DDP replicas agree."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jdfashion.checkpoint import load_trained
from jdfashion.config import TrainConfig
from jdfashion.model.mgpa import create_model
from jdfashion.paths import MODEL_CONFIG, MODEL_WEIGHTS, RESUME_CHECKPOINT, DataLayout
from jdfashion.train import load_training_data, lr_factor, model_config_for, resolved, train

TINY = {"image_size": 48, "identities_per_batch": 2, "num_workers": 0, "warmup_epochs": 1}
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone", ["resnet101", "resnet152", "resnext101", "densenet169", "efficientnet_lite0"]
)
def test_one_epoch_on_demo_data_for_each_backbone(backbone: str, demo_data: Path, tmp_path: Path) -> None:
    config = TrainConfig(backbone=backbone, category="bags", epochs=1, **TINY)
    result = train(config, demo_data, tmp_path, show_progress=False)
    assert (result.directory / MODEL_WEIGHTS).exists()
    (epoch,) = [row for row in result.metrics if "loss" in row]
    assert epoch["loss"] > 0 and epoch["images_per_second"] > 0
    loaded = load_trained(result.directory)
    assert loaded.model_config.backbone == backbone
    assert len(loaded.identities) == loaded.model_config.num_classes
    with torch.no_grad():
        features = loaded.model(torch.rand(2, 3, 48, 48))
    assert features.shape == (2, loaded.model.embedding_dim)
    assert torch.allclose(features.norm(dim=1), torch.ones(2), atol=1e-4)


def test_training_reduces_loss_and_saves_full_config(demo_data: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        backbone="resnet18", category="shoes", epochs=4, lr=1e-3, branches="horizontal", **TINY
    )
    result = train(config, demo_data, tmp_path, show_progress=False)
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[-1] < losses[0]
    saved = json.loads((result.directory / MODEL_CONFIG).read_text())
    assert saved["train"]["branches"] == "horizontal" and saved["model"]["branches"] == "horizontal"
    assert saved["train"]["lr"] == 1e-3 and len(saved["data_fingerprint"]) == 64


def test_same_seed_gives_identical_weights_on_cpu(demo_data: Path, tmp_path: Path) -> None:
    config = TrainConfig(backbone="resnet18", category="clothes", epochs=1, **TINY)
    first = train(config, demo_data, tmp_path / "a", show_progress=False)
    second = train(config, demo_data, tmp_path / "b", show_progress=False)
    a, b = load_file(first.directory / MODEL_WEIGHTS), load_file(second.directory / MODEL_WEIGHTS)
    assert all(torch.equal(a[name], b[name]) for name in a)


def state_digest(model: torch.nn.Module) -> str:
    """Hash of the trainable weights (BN running statistics are per-replica until rank 0 saves them)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().numpy().tobytes())
    return digest.hexdigest()


def run_python(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_kill_9_mid_epoch_then_resume_reaches_uninterrupted_weights(demo_data: Path, tmp_path: Path) -> None:
    config = {"backbone": "resnet18", "category": "clothes", "epochs": 3, "checkpoint_every": 1, **TINY}
    script = f"""
        import os, signal
        from pathlib import Path
        from jdfashion.config import TrainConfig
        from jdfashion.train import train
        def die(epoch, step):
            if epoch == 1 and step == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        train(TrainConfig(**{config!r}), Path({str(demo_data)!r}), Path({str(tmp_path / "killed")!r}),
              show_progress=False, on_step=die)
    """
    killed = run_python(script)
    assert killed.returncode == -9, killed.stderr
    killed_dir = tmp_path / "killed" / "clothes" / "resnet18"
    assert (killed_dir / RESUME_CHECKPOINT).exists() and not (killed_dir / MODEL_WEIGHTS).exists()

    resumed = train(TrainConfig(**config), demo_data, tmp_path / "killed", resume=True, show_progress=False)
    straight = train(TrainConfig(**config), demo_data, tmp_path / "straight", show_progress=False)
    a, b = load_file(resumed.directory / MODEL_WEIGHTS), load_file(straight.directory / MODEL_WEIGHTS)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [m["epoch"] for m in resumed.metrics if "stage" not in m] == [0, 1, 2, 3]
    assert [m.get("val_map") for m in resumed.metrics] == [m.get("val_map") for m in straight.metrics]


def test_resume_refuses_a_checkpoint_from_other_settings(demo_data: Path, tmp_path: Path) -> None:
    config = TrainConfig(backbone="resnet18", category="clothes", epochs=1, **TINY)
    train(config, demo_data, tmp_path, show_progress=False)
    changed = TrainConfig(backbone="resnet18", category="clothes", epochs=2, lr=0.1, **TINY)
    with pytest.raises(ValueError, match="lr"):
        train(changed, demo_data, tmp_path, resume=True, show_progress=False)


def test_ddp_on_two_cpu_processes_keeps_replicas_equal(demo_data: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(
        textwrap.dedent(f"""
        import os
        from pathlib import Path
        from jdfashion.config import TrainConfig
        from jdfashion.train import train
        config = TrainConfig(backbone="resnet18", category="clothes", epochs=2, image_size=48,
                             identities_per_batch=4, num_workers=0, warmup_epochs=1, validate=False)
        weights = Path({str(tmp_path / "weights")!r})
        result = train(config, Path({str(demo_data)!r}), weights, show_progress=False)
        from tests.test_train import state_digest
        Path({str(tmp_path)!r}, "rank" + os.environ["RANK"]).write_text(state_digest(result.model))
    """)
    )
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0, rank1 = (tmp_path / "rank0").read_text(), (tmp_path / "rank1").read_text()
    assert rank0 == rank1
    initial = resolved(TrainConfig(backbone="resnet18", category="clothes", identities_per_batch=4))
    classes = len(load_training_data(DataLayout(demo_data), initial).identities)
    torch.manual_seed(initial.seed)  # the initialisation train() starts from
    untrained = create_model(model_config_for(initial, classes))
    assert state_digest(untrained) != rank0  # the replicas trained, and trained alike


def test_router_trains_on_categories(demo_data: Path, tmp_path: Path) -> None:
    config = TrainConfig(backbone="resnet18", task="category", epochs=1, **TINY)
    result = train(config, demo_data, tmp_path, show_progress=False)
    assert result.directory == tmp_path / "router" / "resnet18"
    assert load_trained(result.directory).model_config.num_classes == 3


def test_learning_rate_warms_up_then_decays() -> None:
    config = TrainConfig(warmup_epochs=2, decay_epochs=(5, 8), decay_factor=0.2)
    factors = [lr_factor(epoch, config) for epoch in range(10)]
    assert factors[0] == pytest.approx(0.1) and factors[1] == pytest.approx(0.55)
    assert factors[2:5] == [1.0, 1.0, 1.0]
    assert factors[5] == pytest.approx(0.2) and factors[9] == pytest.approx(0.04)
    # Warm-up moves every iteration, not once per epoch.
    assert lr_factor(0.5, config) == pytest.approx(0.1 + 0.9 * 0.25)

"""Trained-model files: what ``train`` leaves in ``weights/<category>/<backbone>/`` and how it is read back.

Weights are safetensors; the resume checkpoint is a torch file read with ``weights_only=True``.
Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from jdfashion.atomic import atomic_path, atomic_write_text
from jdfashion.config import TrainConfig
from jdfashion.model.mgpa import MGPA, MGPAConfig, create_model
from jdfashion.paths import MODEL_CONFIG, MODEL_METRICS, MODEL_WEIGHTS, RESUME_CHECKPOINT


@dataclass
class TrainedModel:
    """A trained model with the facts feature caching and routing need about it."""

    model: MGPA
    train_config: TrainConfig
    model_config: MGPAConfig
    identities: list[list[str]]
    weights_sha256: str
    directory: Path

    @property
    def image_size(self) -> int:
        return self.train_config.image_size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_trained(
    directory: Path,
    model: torch.nn.Module,
    train_config: TrainConfig,
    model_config: MGPAConfig,
    identities: list[list[str]],
    data_fingerprint: str,
    metrics: list[dict[str, Any]],
) -> None:
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(directory / MODEL_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    description = {
        "train": train_config.to_dict(),
        "model": model_config.to_dict(),
        "identities": identities,
        "data_fingerprint": data_fingerprint,
        "torch": torch.__version__,
    }
    atomic_write_text(directory / MODEL_CONFIG, json.dumps(description, indent=1))
    write_metrics(directory, metrics)


def write_metrics(directory: Path, metrics: list[dict[str, Any]]) -> None:
    atomic_write_text(directory / MODEL_METRICS, json.dumps(metrics, indent=1))


def load_trained(directory: Path, device: torch.device | str = "cpu") -> TrainedModel:
    directory = Path(directory)
    config_path = directory / MODEL_CONFIG
    weights_path = directory / MODEL_WEIGHTS
    for required in (config_path, weights_path):
        if not required.exists():
            raise FileNotFoundError(f"{required}: missing; train this model first (jdfashion train)")
    description = json.loads(config_path.read_text())
    model_config = MGPAConfig.from_dict(description["model"])
    model = create_model(model_config)
    model.load_state_dict(load_file(str(weights_path)))
    model.to(device).eval()
    return TrainedModel(
        model=model,
        train_config=TrainConfig.from_dict(description["train"]),
        model_config=model_config,
        identities=description["identities"],
        weights_sha256=file_sha256(weights_path),
        directory=directory,
    )


def save_resume_state(directory: Path, state: dict[str, Any]) -> None:
    with atomic_path(directory / RESUME_CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_resume_state(directory: Path) -> dict[str, Any] | None:
    path = directory / RESUME_CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)

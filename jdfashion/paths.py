"""Where everything lives on disk: the one place that knows the data and weights layouts.

Data root (official layout, plus what ``jdfashion data split`` adds)::

    DATA/p.txt  q_all.txt  s.txt            official lists (q.txt accepted when q_all.txt is absent)
    DATA/gt.txt                             test ground truth (demo data only; never published for JD)
    DATA/images/<host>/<path>               images, one file per URL (see data.images.url_to_path)
    DATA/split/train.txt                    p.txt lines kept for training
    DATA/split/val/<category>/q.txt s.txt gt.txt   per-category validation queries, gallery, truth

Weights root (``weights/`` by default)::

    WEIGHTS/<category>/<backbone>/model.safetensors config.json metrics.json curves.png last.ckpt
                                  model.onnx[.json] model.int8.onnx[.json]   (jdfashion export)
    WEIGHTS/router/<backbone>/...           the tops/bags/shoes category classifier
    WEIGHTS/features/<fingerprint>/         cached features (see features.py)
    WEIGHTS/fusion.json                     fusion weights chosen on validation
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jdfashion.data.jdformat import Category


@dataclass(frozen=True)
class DataLayout:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def pairs(self) -> Path:
        return self.root / "p.txt"

    @property
    def queries(self) -> Path:
        full = self.root / "q_all.txt"
        return full if full.exists() or not (self.root / "q.txt").exists() else self.root / "q.txt"

    @property
    def gallery(self) -> Path:
        return self.root / "s.txt"

    @property
    def truth(self) -> Path:
        return self.root / "gt.txt"

    @property
    def split_dir(self) -> Path:
        return self.root / "split"

    @property
    def train_pairs(self) -> Path:
        return self.split_dir / "train.txt"

    def val_dir(self, category: Category) -> Path:
        return self.split_dir / "val" / category.label

    def val_queries(self, category: Category) -> Path:
        return self.val_dir(category) / "q.txt"

    def val_gallery(self, category: Category) -> Path:
        return self.val_dir(category) / "s.txt"

    def val_truth(self, category: Category) -> Path:
        return self.val_dir(category) / "gt.txt"


ROUTER = "router"


@dataclass(frozen=True)
class WeightsLayout:
    root: Path = Path("weights")

    def model_dir(self, task: Category | str, backbone: str) -> Path:
        """``task`` is a category (an MGPA retrieval model) or ``"router"`` (the category classifier)."""
        name = task.label if isinstance(task, Category) else task
        return self.root / name / backbone

    def trained_backbones(self, category: Category) -> list[str]:
        """The backbones trained for ``category``: folders holding both the weights and the config."""
        folder = self.root / category.label
        if not folder.is_dir():
            return []
        return [
            directory.name
            for directory in sorted(folder.iterdir())
            if (directory / MODEL_WEIGHTS).is_file() and (directory / MODEL_CONFIG).is_file()
        ]

    def trained_models(self) -> list[tuple[Category, str]]:
        """Every trained (category, backbone), for ``extract --all`` and default fusion weights.

        Only category folders hold retrieval models: ``router/`` and ``features/`` never match one.
        """
        return [(category, name) for category in Category for name in self.trained_backbones(category)]

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def fusion(self) -> Path:
        return self.root / FUSION_FILE


MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_METRICS = "metrics.json"
MODEL_CURVES = "curves.png"  # loss and validation mAP@10 per epoch, beside metrics.json
RESUME_CHECKPOINT = "last.ckpt"
MODEL_ONNX = "model.onnx"  # jdfashion export: the extractor for ONNX Runtime (+ model.onnx.json)
MODEL_ONNX_INT8 = "model.int8.onnx"  # jdfashion export --int8 (+ model.int8.onnx.json)
FUSION_FILE = "fusion.json"
LIST_FILES = ("p.txt", "q_all.txt", "q.txt", "s.txt", "gt.txt")


def fixing_command(path: Path) -> str | None:
    """The command that creates a missing layout file, recognised by its place in either layout.

    Error messages name it so that a missing file always comes with its fix.
    """
    path = Path(path)
    parts = path.parts
    for index in range(len(parts) - 1):
        if parts[index] == "split" and parts[index + 1] in ("train.txt", "val"):
            return f"jdfashion data split --data {Path(*parts[:index]) if index else Path('.')}"
    if path.name in LIST_FILES:
        return f"jdfashion data import-manifest YOUR.csv --out {path.parent}"
    if path.name == FUSION_FILE:
        return f"jdfashion fuse --tune --weights-root {path.parent}"
    exported = {name: name for name in (MODEL_ONNX, MODEL_ONNX_INT8)}
    exported.update({f"{name}.json": name for name in exported})
    if path.name in exported and len(parts) >= 3:  # written by export, for a trained model
        task, backbone, root = path.parent.parent.name, path.parent.name, path.parent.parent.parent
        int8 = " --int8" if exported[path.name] == MODEL_ONNX_INT8 else ""
        return f"jdfashion export --backbone {backbone} --category {task} --weights-root {root}{int8}"
    if path.name in (MODEL_WEIGHTS, MODEL_CONFIG) and len(parts) >= 3:
        task, backbone, root = path.parent.parent.name, path.parent.name, path.parent.parent.parent
        if task == ROUTER:
            return f"jdfashion train --task category --backbone {backbone} --weights-root {root}"
        if task in {category.label for category in Category}:
            return f"jdfashion train --backbone {backbone} --category {task} --weights-root {root}"
    return None


def missing_message(path: Path) -> str:
    """``path: missing``, with the command that creates it when the layouts know one."""
    command = fixing_command(path)
    return f"{path}: missing; create it: {command}" if command else f"{path}: missing"

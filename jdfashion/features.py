"""Batched feature extraction with a fingerprinted, resumable on-disk cache.

Cache layout: ``<cache root>/<fingerprint>/chunk_00000.safetensors ...`` (fp16 ``features``; the
chunk's undecodable urls in its metadata) and ``index.json`` (ids in order, dim, failed urls,
inputs of the fingerprint). The fingerprint covers the weights' hash, the model config, the
image list with boxes, the image size, the output head and TTA: the same inputs reuse the cache
at once, any change recomputes. Chunks are written atomically, so an extraction killed halfway
resumes at the first missing chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from jdfashion.atomic import atomic_path, atomic_write_text
from jdfashion.checkpoint import TrainedModel, load_trained
from jdfashion.data.jdformat import ImageRef
from jdfashion.data.loader import ItemDataset, Sample, collate, eval_transform
from jdfashion.distributed import barrier, shard
from jdfashion.options import Runtime
from jdfashion.progress import make_progress

Head = Literal["embedding", "probabilities"]
INDEX_FILE = "index.json"


@dataclass
class FeatureSet:
    """Features in the order of ``ids``; rows of ``failed`` urls are zeros (they match nothing).

    ``features`` is (N, D), or (V, N, D) for V views of each image (rotation TTA: :func:`stack_views`),
    which the search reduces by the best view per pair. ``parts``: how many unit parts the embedding
    concatenates (``model.mgpa.embed_parts``), which self-training maps one by one; ``part_mapped``:
    whether that map is applied, which the ranking checks when its options ask for self-training.
    """

    ids: list[str]
    features: torch.Tensor
    failed: list[str] = field(default_factory=list)
    parts: int = 1
    part_mapped: bool = False

    def __len__(self) -> int:
        return len(self.ids)


def stack_views(views: Sequence[FeatureSet]) -> FeatureSet:
    """One set of (V, N, D) features from V single-view sets of the same images; one view stays (N, D)."""
    if len(views) == 1:
        return views[0]
    if any(view.ids != views[0].ids for view in views):
        raise ValueError("views must list the same images in the same order")
    failed = sorted({url for view in views for url in view.failed})
    return FeatureSet(views[0].ids, torch.stack([view.features for view in views]), failed, views[0].parts)


def embedding_parts(trained: TrainedModel, head: Head) -> int:
    """The part structure of ``head``'s outputs: the model's parts for embeddings, none for probabilities."""
    return trained.model.num_parts if head == "embedding" else 1


Forward = Callable[[torch.Tensor], torch.Tensor]


def batch_forward(trained: TrainedModel, head: Head, runtime: Runtime, device: torch.device) -> Forward:
    """One preprocessed batch -> unit embeddings or class probabilities, by PyTorch or by the
    model's ONNX export (:mod:`jdfashion.export`; embeddings only: the router stays in PyTorch)."""
    if head == "probabilities":
        return lambda batch: trained.model.classify(batch).float().softmax(dim=1)
    if runtime != "torch":
        from jdfashion.export import OnnxRuntimeModel

        return OnnxRuntimeModel(trained, device, runtime)
    return lambda batch: trained.model(batch).float()


def model_outputs(forward: Forward, images: torch.Tensor, head: Head, flip: bool) -> torch.Tensor:
    """``forward``'s outputs; with ``flip`` the mirrored view is averaged in."""
    outputs = forward(images)
    if flip:
        outputs = outputs + forward(images.flip(3))
        outputs = F.normalize(outputs, dim=1) if head == "embedding" else outputs / 2
    return outputs


@dataclass(frozen=True)
class ExtractOptions:
    """How features are computed; ``head``, ``flip``, ``rotation`` (degrees, counter-clockwise: one
    view of rotation TTA), ``deskew`` (each image turned back by its own tilt first) and ``runtime``
    (PyTorch, or ONNX Runtime on the model's export: the same features to ~1e-7) change the
    features, the rest only the speed."""

    head: Head = "embedding"
    flip: bool = False
    batch_size: int = 64
    num_workers: int = 2
    show_progress: bool = True
    rotation: float = 0.0
    deskew: bool = False
    runtime: Runtime = "torch"

    def __post_init__(self) -> None:
        if self.runtime != "torch" and self.head != "embedding":
            raise ValueError(f"runtime {self.runtime!r} extracts embeddings only, not {self.head!r}")


@contextlib.contextmanager
def _channels_last(model: torch.nn.Module) -> Iterator[None]:
    """The model in channels_last while it extracts: oneDNN's and cuDNN's faster convolution layout
    (measured on this project's 2-core CPU: MGPA ResNet-50 forward 20.8 -> 23.3 images/s). Restored
    after, because safetensors saves only contiguous tensors."""
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def iterate_outputs(
    trained: TrainedModel,
    refs: Sequence[ImageRef],
    image_root: Path,
    options: ExtractOptions,
    description: str = "extract",
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Yield ``(outputs, failed_urls)`` per batch, in list order, with a rich progress bar."""
    device = next(trained.model.parameters()).device
    use_cuda = device.type == "cuda"
    if not use_cuda:
        torch.set_flush_denormal(True)  # denormal activations slow CPU arithmetic up to 30x
    dataset = ItemDataset(
        [Sample(ref, 0) for ref in refs],
        image_root,
        eval_transform(
            trained.image_size,
            *trained.model_config.normalization,
            rotation=options.rotation,
            deskew=options.deskew,
        ),
    )
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        collate_fn=collate,
        pin_memory=use_cuda,
    )
    forward = batch_forward(trained, options.head, options.runtime, device)
    # The PyTorch model's layout and AMP; an export runs as ONNX Runtime laid it out.
    in_torch = options.runtime == "torch"
    layout = torch.channels_last if in_torch else torch.contiguous_format
    model_layout = _channels_last(trained.model) if in_torch else contextlib.nullcontext()
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=use_cuda and in_torch)
    progress = make_progress({"rate": "{rate:.1f} img/s"}, disable=not options.show_progress)
    with progress, model_layout, torch.inference_mode(), autocast:
        task = progress.add_task(description, total=len(refs), rate=0.0)
        started = time.perf_counter()
        done = 0
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True, memory_format=layout)
            outputs = model_outputs(forward, images, options.head, options.flip)
            ok = batch["ok"]
            outputs[~ok.to(device)] = 0
            failed = [refs[i].url for i in batch["indices"][~ok].tolist()]
            done += len(ok)
            progress.update(task, advance=len(ok), rate=done / (time.perf_counter() - started))
            yield outputs.cpu(), failed


def compute_features(
    trained: TrainedModel,
    refs: Sequence[ImageRef],
    image_root: Path,
    options: ExtractOptions,
    description: str = "extract",
) -> FeatureSet:
    outputs, failed = [], []
    for batch_outputs, batch_failed in iterate_outputs(trained, refs, image_root, options, description):
        outputs.append(batch_outputs)
        failed.extend(batch_failed)
    features = torch.cat(outputs).half() if outputs else torch.zeros(0, 0, dtype=torch.float16)
    return FeatureSet([ref.url for ref in refs], features, failed, embedding_parts(trained, options.head))


def fingerprint(trained: TrainedModel, refs: Sequence[ImageRef], options: ExtractOptions) -> str:
    """Each rotation view, and a deskewed extraction, has its own; plain upright views keep the
    fingerprint they had before either option existed."""
    digest = hashlib.sha256()
    digest.update(trained.weights_sha256.encode())
    digest.update(json.dumps(trained.model_config.to_dict(), sort_keys=True).encode())
    digest.update(f"size={trained.image_size} head={options.head} flip={options.flip}\n".encode())
    if options.rotation % 360:  # "crop": the view is cut to the turned frame's largest upright box
        digest.update(f"rotation={options.rotation % 360:g} view=crop\n".encode())
    if options.deskew:
        digest.update(b"deskew=edges\n")
    if options.runtime != "torch":
        from jdfashion.export import runtime_fingerprint

        digest.update(runtime_fingerprint(trained, options.runtime).encode())
    for ref in refs:
        box = ref.box
        digest.update(f"{ref.url} {box.x1} {box.y1} {box.x2} {box.y2}\n".encode())
    return digest.hexdigest()[:32]


@dataclass
class FeatureCache:
    root: Path
    chunk_size: int = 4096

    def extract(
        self,
        trained: TrainedModel,
        refs: Sequence[ImageRef],
        image_root: Path,
        options: ExtractOptions = ExtractOptions(),
        description: str = "extract",
    ) -> FeatureSet:
        """Features for ``refs``: from the cache when the fingerprint matches, else computed by chunks.

        Under torchrun each rank computes chunks ``rank, rank + world, ...`` into the same folder
        (a filesystem every rank sees), then rank 0 writes the index: the same cache one process
        writes. Chunks from several machines can also be copied into one folder; a
        final one-process run finds them and only writes the index.
        """
        directory = self.root / fingerprint(trained, refs, options)
        index_path = directory / INDEX_FILE
        parts = embedding_parts(trained, options.head)
        if index_path.exists():
            return replace(self.load(directory), parts=parts)
        rank, world_size = shard()
        starts = range(0, len(refs), self.chunk_size)
        chunk_paths = [directory / f"chunk_{number:05d}.safetensors" for number in range(len(starts))]
        for number, (start, chunk_path) in enumerate(zip(starts, chunk_paths, strict=True)):
            if number % world_size != rank or chunk_path.exists():
                continue
            chunk = compute_features(
                trained,
                refs[start : start + self.chunk_size],
                image_root,
                options,
                f"{description} [{start}/{len(refs)}]",
            )
            with atomic_path(chunk_path) as tmp:
                save_file(
                    {"features": chunk.features.contiguous()},
                    str(tmp),
                    metadata={"failed": json.dumps(chunk.failed)},
                )
        index = {
            "ids": [ref.url for ref in refs],
            "chunk_size": self.chunk_size,
            "head": options.head,
            "flip": options.flip,
            "rotation": options.rotation,
            "deskew": options.deskew,
            "runtime": options.runtime,
            "image_size": trained.image_size,
            "weights_sha256": trained.weights_sha256,
            "model_dir": str(trained.directory),
        }
        barrier()
        missing = [p.name for p in chunk_paths if not p.exists()]
        if missing:  # every rank sees it: ranks on machines without this disk wrote them elsewhere
            raise FileNotFoundError(
                f"{directory}: {len(missing)} chunk(s) missing ({missing[0]} ...): copy them here from the "
                "machines that extracted them, then run extract again"
            )
        if rank == 0:
            atomic_write_text(index_path, json.dumps(index))
        barrier()
        return replace(self.load(directory), parts=parts)

    @staticmethod
    def load(directory: Path) -> FeatureSet:
        index = json.loads((directory / INDEX_FILE).read_text())
        parts, failed = [], []
        for chunk_path in sorted(directory.glob("chunk_*.safetensors")):
            with safe_open(str(chunk_path), framework="pt") as handle:
                parts.append(handle.get_tensor("features"))
                failed.extend(json.loads(handle.metadata()["failed"]))
        features = torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float16)
        if features.shape[0] != len(index["ids"]):
            raise ValueError(f"{directory}: cache holds {features.shape[0]} rows for {len(index['ids'])} ids")
        return FeatureSet(index["ids"], features, failed)


class FeatureExtractor:
    """The notebook entry point: ``FeatureExtractor("weights/clothes/resnet101")(refs, image_root)``;
    ``runtime="onnxruntime"`` runs the model's export (``jdfashion export``) instead of PyTorch."""

    def __init__(
        self,
        model_dir: Path | str,
        device: str | None = None,
        flip: bool = False,
        batch_size: int = 64,
        rotations: Sequence[float] = (0.0,),
        deskew: bool = False,
        runtime: Runtime = "torch",
    ) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.trained = load_trained(Path(model_dir), device)
        self.options = ExtractOptions(
            flip=flip, batch_size=batch_size, show_progress=False, deskew=deskew, runtime=runtime
        )
        self.rotations = tuple(rotations)

    def __call__(self, refs: Sequence[ImageRef], image_root: Path | str) -> FeatureSet:
        """(N, D) features, or (V, N, D) with several ``rotations`` (query views for rotation TTA)."""
        return stack_views(
            [
                compute_features(self.trained, refs, Path(image_root), replace(self.options, rotation=angle))
                for angle in self.rotations
            ]
        )


class CategoryRouter:
    """The tops/bags/shoes classifier as a function: ``CategoryRouter("weights/router/x")(refs, root)``."""

    def __init__(self, model_dir: Path | str, device: str | None = None, batch_size: int = 64) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.trained = load_trained(Path(model_dir), device)
        self.options = ExtractOptions(head="probabilities", batch_size=batch_size, show_progress=False)

    def __call__(self, refs: Sequence[ImageRef], image_root: Path | str) -> np.ndarray:
        return predicted_categories(compute_features(self.trained, refs, Path(image_root), self.options))


def predicted_categories(probabilities: FeatureSet) -> np.ndarray:
    """Category index per image (``Category(value)``); an undecodable image's zero row reads as clothes."""
    return probabilities.features.float().argmax(dim=1).numpy()

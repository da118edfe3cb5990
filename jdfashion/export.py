"""ONNX export of a trained extractor, and extraction through ONNX Runtime.

``export_onnx`` writes ``model.onnx`` beside the model's weights (dynamic batch; backbone, part
pooling, head and whitening in one graph, the retrieval embedding as its one output) and
``model.onnx.json``: what the file needs (input size, mean/std, branches, feature size) and the
hashes of the weights it came from and of the file itself. The file is checked against the PyTorch
model on real images before it replaces anything: a file whose features differ beyond
``MIN_COSINE`` is refused. ``quantize_onnx`` adds ``model.int8.onnx`` (static int8, calibrated on
training photos), which ``export_category_model`` keeps only while its validation mAP@10 stays
within ``INT8_MAP_TOLERANCE`` of the fp32 file's. ``OnnxRuntimeModel`` runs either for
:mod:`jdfashion.features` (``runtime="onnxruntime"`` / ``"onnxruntime-int8"``) and refuses a file
exported from other weights.

The part layout (which feature-map cell feeds which part) is a constant of the graph: an exported
file serves the model's own input size, which is what extraction feeds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from jdfashion.atomic import atomic_path, atomic_write_text
from jdfashion.checkpoint import TrainedModel, file_sha256
from jdfashion.data.jdformat import Category, ImageRef, read_pairs
from jdfashion.data.loader import ItemDataset, Sample, eval_transform
from jdfashion.fusion import FusionWeights
from jdfashion.options import ExportedRuntime, RetrievalOptions
from jdfashion.paths import MODEL_ONNX, MODEL_ONNX_INT8, fixing_command, missing_message
from jdfashion.workspace import Workspace, validation_set

OPSET = 18
# Exported features must match PyTorch's at least this closely (cosine, every check image). fp32
# ONNX Runtime and PyTorch differ in summation order only: 1 - cosine is ~1e-7 on real photos.
MIN_COSINE = 0.9999
# int8 is judged by retrieval, not by cosine: kept while validation mAP@10 is at most this far below
# the fp32 file's. The cosine floor only catches a broken quantization (fine int8 files measured 0.95-0.98).
INT8_MAP_TOLERANCE = 0.01
INT8_MIN_COSINE = 0.8
INPUT_NAME = "images"
CHECK_IMAGES = 8  # real photos of the model's own validation split, run through both at export
CALIBRATION_IMAGES = 64  # training photos whose activation ranges fix the int8 scales
GraphOptimisation = Literal["basic", "extended", "all"]
EXPORT_FILES: dict[ExportedRuntime, str] = {"onnxruntime": MODEL_ONNX, "onnxruntime-int8": MODEL_ONNX_INT8}


@dataclass(frozen=True)
class OnnxInfo:
    """The JSON beside an exported file: enough to feed it and to know whose weights it holds."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    branches: str
    embedding_dim: int
    parts: int
    weights_sha256: str
    onnx_sha256: str
    opset: int
    checked_images: int
    min_cosine: float  # the lowest cosine to PyTorch's features measured when the file was written
    quantization: str = "fp32"
    val_map10: float | None = None  # int8: validation mAP@10 of this file and of the fp32 file
    val_map10_fp32: float | None = None

    @classmethod
    def read(cls, path: Path) -> OnnxInfo:
        data = json.loads(path.read_text())
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})

    @property
    def summary(self) -> str:
        """One line: what the file is and how closely it matched PyTorch (and validation, for int8)."""
        held = (
            f"; validation mAP@10 {self.val_map10:.4f} against fp32's {self.val_map10_fp32:.4f}"
            if self.val_map10 is not None
            else ""
        )
        return (
            f"{self.quantization}, {self.embedding_dim}-d at {self.image_size} px, lowest cosine to PyTorch "
            f"over {self.checked_images} validation photos {self.min_cosine:.6f}{held}"
        )

    def write(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=1))


def onnx_paths(directory: Path, runtime: ExportedRuntime = "onnxruntime") -> tuple[Path, Path]:
    """The exported file for ``runtime`` and the JSON beside it."""
    path = directory / EXPORT_FILES[runtime]
    return path, path.with_name(path.name + ".json")


def check_batch(
    trained: TrainedModel, refs: Sequence[ImageRef], image_root: Path, count: int = CHECK_IMAGES
) -> torch.Tensor:
    """The first ``count`` decodable images of ``refs``, preprocessed as extraction preprocesses them."""
    dataset = ItemDataset(
        [Sample(ref, 0) for ref in refs],
        image_root,
        eval_transform(trained.image_size, *trained.model_config.normalization),
    )
    images = []
    for index in range(len(dataset)):
        image, _, _, ok = dataset[index]
        if ok:
            images.append(image)
        if len(images) == count:
            break
    if not images:
        raise ValueError(
            f"{image_root}: none of the {len(refs)} listed images decodes; nothing to check with"
        )
    return torch.stack(images)


def training_photos(workspace: Workspace, category: Category) -> list[ImageRef]:
    """The category's training photos, consumer and shop, each once: what int8 calibrates on."""
    refs = {}
    for pair in read_pairs(workspace.data.train_pairs):
        if pair.category == category:
            refs.setdefault(pair.consumer.url, pair.consumer)
            refs.setdefault(pair.shop.url, pair.shop)
    return list(refs.values())


def validation_map(
    workspace: Workspace, category: Category, backbone: str, runtime: ExportedRuntime
) -> float:
    """One model's validation mAP@10, extracted through ``runtime``'s file (and cached)."""
    from jdfashion.pipeline import evaluate_validation

    options = RetrievalOptions(runtime=runtime, show_progress=False)
    weights = FusionWeights({category.label: {backbone: 1.0}})
    return evaluate_validation(workspace, weights, [category], options).overall.map


def export_category_model(
    workspace: Workspace, category: Category, backbone: str, int8: bool = False, keep_worse_int8: bool = False
) -> list[OnnxInfo]:
    """``jdfashion export``: a trained model to ONNX, checked on its category's validation photos;
    with ``int8`` a quantized file too, kept only if validation mAP@10 holds (else ``ValueError``
    naming both scores, and no int8 file left) unless ``keep_worse_int8`` (to measure it)."""
    trained = workspace.trained(category, backbone)
    val = validation_set(workspace.data, category)
    images = workspace.data.images
    check_images = check_batch(trained, [*val.queries, *val.gallery], images)
    exported = [export_onnx(trained, check_images)]
    if not int8:
        return exported
    calibration = check_batch(trained, training_photos(workspace, category), images, CALIBRATION_IMAGES)
    quantized = quantize_onnx(trained, calibration, check_images)
    fp32_map = validation_map(workspace, category, backbone, "onnxruntime")
    int8_map = validation_map(workspace, category, backbone, "onnxruntime-int8")
    int8_path, info_path = onnx_paths(trained.directory, "onnxruntime-int8")
    if int8_map < fp32_map - INT8_MAP_TOLERANCE and not keep_worse_int8:
        int8_path.unlink()
        info_path.unlink()
        raise ValueError(
            f"{int8_path}: int8 validation mAP@10 {int8_map:.4f} is more than {INT8_MAP_TOLERANCE} below "
            f"fp32's {fp32_map:.4f}; not kept (extract with --runtime onnxruntime)"
        )
    quantized = dataclasses.replace(quantized, val_map10=int8_map, val_map10_fp32=fp32_map)
    quantized.write(info_path)
    return [*exported, quantized]


def ensure_exported(
    workspace: Workspace, category: Category, backbone: str, runtime: ExportedRuntime
) -> list[OnnxInfo]:
    """Export the model for ``runtime`` unless a current export is there (what was written, if
    anything); an int8 file is kept whatever validation says, for a caller that measures it."""
    try:
        checked_export(workspace.trained(category, backbone), runtime)
        return []
    except (FileNotFoundError, ValueError):
        int8 = runtime == "onnxruntime-int8"
        return export_category_model(workspace, category, backbone, int8, keep_worse_int8=True)


def _write_graph(model: torch.nn.Module, image_size: int, target: Path) -> None:
    """The eval-mode model traced by torch.export into ONNX, batch size left free."""
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.inference_mode():
        model(example)  # builds the part layout for this size outside the trace
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=["features"],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    program.save(str(target), external_data=False)  # one file: hashed, renamed and copied whole


def cosines(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(reference.double(), candidate.double(), dim=1)


def _write_checked(
    trained: TrainedModel,
    runtime: ExportedRuntime,
    write: Callable[[Path], None],
    check_images: torch.Tensor,
    min_cosine: float,
    quantization: str = "fp32",
) -> OnnxInfo:
    """``write`` the file to a temporary path, compare its features of ``check_images`` with the
    PyTorch model's, and only then rename it into place and write its JSON."""
    if check_images.ndim != 4 or len(check_images) == 0:
        raise ValueError("export needs at least one preprocessed check image (B, 3, S, S)")
    model = trained.model
    onnx_path, info_path = onnx_paths(trained.directory, runtime)
    device = next(model.parameters()).device
    model.cpu()
    try:
        with atomic_path(onnx_path) as tmp:
            write(tmp)
            with torch.inference_mode():
                expected = model(check_images.cpu()).float()
            worst = float(cosines(expected, run_session(open_session(tmp), check_images)).min())
            if not worst >= min_cosine:
                raise ValueError(
                    f"{onnx_path}: the exported features differ from PyTorch's (lowest cosine {worst:.6f} "
                    f"< {min_cosine} over {len(check_images)} images); the file was not written"
                )
            onnx_sha256 = file_sha256(tmp)
    finally:
        model.to(device)
    mean, std = trained.model_config.normalization
    info = OnnxInfo(
        image_size=trained.image_size,
        mean=tuple(mean),
        std=tuple(std),
        branches=trained.model_config.branches,
        embedding_dim=model.embedding_dim,
        parts=model.num_parts,
        weights_sha256=trained.weights_sha256,
        onnx_sha256=onnx_sha256,
        opset=OPSET,
        checked_images=len(check_images),
        min_cosine=worst,
        quantization=quantization,
    )
    info.write(info_path)
    return info


def export_onnx(
    trained: TrainedModel, check_images: torch.Tensor, min_cosine: float = MIN_COSINE
) -> OnnxInfo:
    """Export ``trained`` next to its weights; ``check_images`` (B, 3, S, S), preprocessed as
    extraction does, are run through both and every cosine must reach ``min_cosine``, else
    ``ValueError`` and the previous export, if any, stays as it was."""
    return _write_checked(
        trained,
        "onnxruntime",
        lambda target: _write_graph(trained.model, trained.image_size, target),
        check_images,
        min_cosine,
    )


def quantize_onnx(trained: TrainedModel, calibration: torch.Tensor, check_images: torch.Tensor) -> OnnxInfo:
    """``model.int8.onnx`` from the fp32 export: static int8 (QDQ, per-channel int8 weights, uint8
    activations) with activation ranges from ``calibration`` photos. Quality is judged by retrieval
    (``export_category_model``); the cosine floor here only refuses a broken file."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = checked_export(trained, "onnxruntime")[0]  # the fp32 export, checked current

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            arrays = calibration.float().numpy()
            self.batches = iter(
                [{INPUT_NAME: arrays[start : start + 8]} for start in range(0, len(arrays), 8)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    def write(target: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="jdfashion-int8-") as scratch, _quiet():
            prepared = Path(scratch) / "prepared.onnx"
            # symbolic shape inference fails on the exporter's Expand nodes; ONNX's own suffices
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(target),
                Batches(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
            )

    description = f"int8 static QDQ, per-channel weights, {len(calibration)} calibration photos"
    return _write_checked(trained, "onnxruntime-int8", write, check_images, INT8_MIN_COSINE, description)


@contextlib.contextmanager
def _quiet(logger: str = "") -> Iterator[None]:
    """Errors only from ``logger`` while the export runs: torch's exporter reports every step, and
    ONNX Runtime's quantizer warns on the root logger about each 1-D weight it leaves in float
    (BatchNorm scales); both expected here, and noise on a user's terminal."""
    log = logging.getLogger(logger or None)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def open_session(
    path: Path,
    device: torch.device = torch.device("cpu"),  # noqa: B008
    optimisation: GraphOptimisation = "all",
):
    """An ONNX Runtime session with as many threads as torch uses, every graph optimisation on unless
    told (the benchmark measures what each level buys), CUDA first when the device is a GPU and the
    CUDA provider is installed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimisation]
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def current_info(trained: TrainedModel, runtime: ExportedRuntime) -> OnnxInfo:
    """The JSON of ``runtime``'s file, refused when missing or written for other weights."""
    onnx_path, info_path = onnx_paths(trained.directory, runtime)
    for required in (onnx_path, info_path):
        if not required.is_file():
            raise FileNotFoundError(missing_message(required))
    info = OnnxInfo.read(info_path)
    if info.weights_sha256 != trained.weights_sha256:
        raise ValueError(
            f"{onnx_path}: exported from other weights than {trained.directory} holds now; "
            f"export again: {fixing_command(onnx_path)}"
        )
    return info


def checked_export(trained: TrainedModel, runtime: ExportedRuntime) -> tuple[Path, OnnxInfo]:
    """``runtime``'s file and its JSON, refused as :func:`current_info` refuses, and when the file no
    longer has the hash its JSON records. The file is hashed once per process while it is unchanged."""
    info = current_info(trained, runtime)
    path = onnx_paths(trained.directory, runtime)[0]
    stat = path.stat()
    if _file_hash(path, stat.st_size, stat.st_mtime_ns) != info.onnx_sha256:
        raise ValueError(
            f"{path}: does not match the hash its JSON records (changed or half-copied); "
            f"export again: {fixing_command(path)}"
        )
    return path, info


@functools.lru_cache(maxsize=32)
def _file_hash(path: Path, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


class OnnxRuntimeModel:
    """An exported model as a function of preprocessed image batches, run by ONNX Runtime."""

    def __init__(
        self,
        trained: TrainedModel,
        device: torch.device | str = "cpu",
        runtime: ExportedRuntime = "onnxruntime",
    ) -> None:
        self.path, self.info = checked_export(trained, runtime)
        # A fresh session per extraction: one reused after the loader's worker processes were forked
        # and ended ran its forward 2.2x slower here (0.54 -> 1.21 s a batch of 64, Lite0, 2 cores).
        self.session = open_session(self.path, torch.device(device))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return run_session(self.session, images).to(images.device)


def runtime_fingerprint(trained: TrainedModel, runtime: ExportedRuntime) -> str:
    """What a feature cache extracted through an export adds to its fingerprint: the file's hash as
    its JSON records it (checked against the file when the file is run)."""
    return f"runtime={runtime} onnx={current_info(trained, runtime).onnx_sha256}\n"


def run_session(session, images: torch.Tensor) -> torch.Tensor:
    array = np.ascontiguousarray(images.detach().float().cpu().numpy())
    return torch.from_numpy(session.run(None, {INPUT_NAME: array})[0])

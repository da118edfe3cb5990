"""ONNX export and extraction through ONNX Runtime: the same features as PyTorch, refused otherwise."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jdfashion.checkpoint import load_trained
from jdfashion.export import (
    MIN_COSINE,
    OnnxRuntimeModel,
    check_batch,
    cosines,
    export_onnx,
    onnx_paths,
)
from jdfashion.features import ExtractOptions, FeatureCache, FeatureExtractor
from jdfashion.model.backbones import BACKBONE_PRESETS
from jdfashion.model.mgpa import MGPAConfig

pytestmark = pytest.mark.slow


def grocery_refs(shared_data: Path, count: int):
    from jdfashion.data.jdformat import Box, ImageRef

    photos = sorted((shared_data / "grocery-store" / "dataset" / "test" / "Packages").rglob("*.jpg"))[:count]
    return [ImageRef(path.as_uri(), Box(0, 0, 100_000, 100_000)) for path in photos], Path("/")  # whole photo


def save_model(directory: Path, model_config, image_size: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model saved as ``train`` saves one (BN statistics away from (0, 1), as a
    trained model's are), so any configuration exports without downloading weights."""
    from jdfashion.checkpoint import save_trained
    from jdfashion.config import TrainConfig
    from jdfashion.model.mgpa import create_model

    torch.manual_seed(seed)
    model = create_model(model_config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        if model.whitening is not None:
            model.whitening.mean.normal_(0, 0.01)
            model.whitening.projection.normal_(0, 0.1)
    config = TrainConfig(
        backbone=model_config.backbone, image_size=image_size, branches=model_config.branches
    )
    save_trained(directory, model, config, model_config, [], "test", [])
    return model


def save_untrained(directory: Path, backbone: str, branches: str, image_size: int) -> None:
    save_model(directory, MGPAConfig(backbone=backbone, branches=branches, reduction_dim=64), image_size)


@pytest.mark.realdata
@pytest.mark.parametrize("backbone", sorted(BACKBONE_PRESETS))
def test_every_preset_exports_to_the_same_features_on_real_photos(
    backbone: str, shared_data: Path, tmp_path: Path
) -> None:
    """Each backbone preset with the paper's 16 parts: ONNX Runtime's features of real photos within
    cosine 0.9999 of PyTorch's, for a batch size other than the one the export traced."""
    save_untrained(tmp_path, backbone, "all", image_size=96)
    trained = load_trained(tmp_path)
    refs, root = grocery_refs(shared_data, 3)
    info = export_onnx(trained, check_batch(trained, refs, root))
    assert info.embedding_dim == trained.model.embedding_dim and info.parts == 16
    assert info.min_cosine >= MIN_COSINE
    images = check_batch(trained, refs, root, count=3)
    with torch.inference_mode():
        expected = trained.model(images)
    measured = OnnxRuntimeModel(trained)(images)
    assert measured.shape == expected.shape
    assert cosines(expected, measured).min() >= MIN_COSINE


def test_identity_head_with_whitening_and_max_pooling_export(shared_data: Path, tmp_path: Path) -> None:
    """The frozen reference's head, its whitening and the scatter-max pooling go through the graph too."""
    model_config = MGPAConfig(
        backbone="resnet18", branches="all", head="identity", pooling="max", whiten_dim=32
    )
    save_model(tmp_path, model_config, image_size=64, seed=1)
    trained = load_trained(tmp_path)
    refs, root = grocery_refs(shared_data, 4)
    images = check_batch(trained, refs, root)
    export_onnx(trained, images)
    with torch.inference_mode():
        expected = trained.model(images)
    assert cosines(expected, OnnxRuntimeModel(trained)(images)).min() >= MIN_COSINE


def test_a_file_that_differs_is_refused_and_the_old_export_kept(shared_data: Path, tmp_path: Path) -> None:
    save_untrained(tmp_path, "resnet18", "horizontal", image_size=64)
    trained = load_trained(tmp_path)
    refs, root = grocery_refs(shared_data, 2)
    images = check_batch(trained, refs, root)
    first = export_onnx(trained, images)
    onnx_path, info_path = onnx_paths(tmp_path)
    before = onnx_path.read_bytes(), info_path.read_text()
    with pytest.raises(ValueError, match=r"differ from PyTorch's .* not written"):
        export_onnx(trained, images, min_cosine=1.5)  # no file can reach it: the check must refuse
    assert (onnx_path.read_bytes(), info_path.read_text()) == before
    assert not list(tmp_path.glob(".model.onnx.*"))  # no temporary left behind
    assert json.loads(info_path.read_text())["onnx_sha256"] == first.onnx_sha256


def test_stale_or_altered_exports_are_refused(shared_data: Path, tmp_path: Path) -> None:
    save_untrained(tmp_path, "resnet18", "global", image_size=64)
    trained = load_trained(tmp_path)
    refs, root = grocery_refs(shared_data, 1)
    with pytest.raises(FileNotFoundError, match="jdfashion export --backbone"):
        OnnxRuntimeModel(trained)
    export_onnx(trained, check_batch(trained, refs, root))
    onnx_path = onnx_paths(tmp_path)[0]
    with open(onnx_path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match="does not match the hash"):
        OnnxRuntimeModel(trained)
    save_untrained(tmp_path, "resnet18", "global", image_size=64)
    retrained = load_trained(tmp_path)
    retrained.weights_sha256 = "0" * 64  # weights that changed since the export
    with pytest.raises(ValueError, match="exported from other weights"):
        OnnxRuntimeModel(retrained)


def test_runtime_features_are_cached_apart_and_match(shared_data: Path, tmp_path: Path) -> None:
    """The cache, with flip TTA, and the notebook API: ONNX Runtime's features equal PyTorch's (to
    the fp16 cache's rounding), under a fingerprint of their own that names the runtime."""
    save_untrained(tmp_path / "model", "resnet18", "horizontal", image_size=64)
    trained = load_trained(tmp_path / "model")
    refs, root = grocery_refs(shared_data, 6)
    export_onnx(trained, check_batch(trained, refs, root))
    cache = FeatureCache(tmp_path / "cache")
    options = ExtractOptions(batch_size=4, num_workers=0, show_progress=False, flip=True)
    eager = cache.extract(trained, refs, root, options)
    exported = cache.extract(trained, refs, root, replace(options, runtime="onnxruntime"))
    indexes = [json.loads(path.read_text()) for path in (tmp_path / "cache").rglob("index.json")]
    assert sorted(index["runtime"] for index in indexes) == ["onnxruntime", "torch"]
    assert cosines(eager.features.float(), exported.features.float()).min() >= 0.9999
    notebook = FeatureExtractor(tmp_path / "model", "cpu", flip=True, batch_size=4, runtime="onnxruntime")
    assert cosines(eager.features.float(), notebook(refs, root).features.float()).min() >= 0.9999
    with pytest.raises(ValueError, match="embeddings only"):
        ExtractOptions(head="probabilities", runtime="onnxruntime")


def test_cli_export_then_submit_through_onnxruntime_scores_the_same(
    tiny_resnet18: tuple[Path, Path, list[str | Path]], cli: Callable[..., str], tmp_path: Path
) -> None:
    """What a new user types: export, then submit with --runtime onnxruntime: the same lists."""
    data, weights, common = tiny_resnet18
    model_dir = weights / "clothes" / "resnet18"
    output = cli("export", "--backbone", "resnet18", *common[:-2])
    assert "exported" in output and (model_dir / "model.onnx").is_file()
    lists, scores = {}, {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / runtime
        cli("submit", "--team", "t", "--out", out, "--runtime", runtime, *common)
        lists[runtime] = (out / "Item_t.txt").read_text()
        scores[runtime] = json.loads(cli("score", out / "Item_t.txt", "--truth", data / "gt.txt", "--json"))
    assert scores["torch"] == scores["onnxruntime"]
    assert lists["torch"] == lists["onnxruntime"]


def test_int8_is_kept_only_while_validation_holds(
    tiny_resnet18: tuple[Path, Path, list[str | Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8 file is judged by validation mAP@10 against the fp32 file: refused (and removed)
    when it falls below the tolerance, kept with both scores recorded when it holds."""
    import jdfashion.export as export
    from jdfashion.data.jdformat import Category
    from jdfashion.workspace import Workspace

    data, weights, _ = tiny_resnet18
    workspace = Workspace.at(data, weights, "cpu")
    int8_path, info_path = onnx_paths(weights / "clothes" / "resnet18", "onnxruntime-int8")
    monkeypatch.setattr(export, "INT8_MAP_TOLERANCE", -1.0)  # int8 would have to beat fp32 by 1.0
    with pytest.raises(ValueError, match=r"int8 validation mAP@10 .* not kept"):
        export.export_category_model(workspace, Category.CLOTHES, "resnet18", int8=True)
    assert not int8_path.exists() and not info_path.exists()
    monkeypatch.setattr(export, "INT8_MAP_TOLERANCE", 1.0)
    fp32, int8 = export.export_category_model(workspace, Category.CLOTHES, "resnet18", int8=True)
    assert fp32.quantization == "fp32" and int8.quantization.startswith("int8")
    assert int8.min_cosine >= export.INT8_MIN_COSINE and int8.onnx_sha256 != fp32.onnx_sha256
    recorded = json.loads(info_path.read_text())
    assert (recorded["val_map10"], recorded["val_map10_fp32"]) == (int8.val_map10, int8.val_map10_fp32)
    assert fp32.val_map10 is None
    assert 0 <= recorded["val_map10"] <= 1 and 0 <= recorded["val_map10_fp32"] <= 1
    trained = workspace.trained(Category.CLOTHES, "resnet18")
    assert int8_path.stat().st_size < 0.5 * onnx_paths(trained.directory)[0].stat().st_size
    # Written once: a current export is reused, a missing one written again (kept, to be measured).
    assert export.ensure_exported(workspace, Category.CLOTHES, "resnet18", "onnxruntime-int8") == []
    int8_path.unlink()
    monkeypatch.setattr(export, "INT8_MAP_TOLERANCE", -1.0)
    rewritten = export.ensure_exported(workspace, Category.CLOTHES, "resnet18", "onnxruntime-int8")
    assert [info.quantization[:4] for info in rewritten] == ["fp32", "int8"] and int8_path.is_file()

"""Each command's common failures end in one line that names the file and the command that fixes it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from jdfashion.cli import main
from jdfashion.data.manifest import import_manifest
from jdfashion.data.split import make_split
from jdfashion.fusion import FusionWeights
from jdfashion.paths import MODEL_CONFIG, MODEL_WEIGHTS, DataLayout


@dataclass(frozen=True)
class Roots:
    """Data and weights roots in the states a new user meets."""

    tmp: Path
    one: Path  # one-category data, split
    unsplit: Path  # one-category data, not split
    mixed: Path  # the demo data: three categories, split
    empty: Path  # an empty p.txt
    nowhere: Path  # no lists at all
    no_weights: Path  # nothing trained
    broken: Path  # clothes/resnet18 whose files are not a model


@pytest.fixture(scope="module")
def roots(clothes_manifest: Path, demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Roots:
    tmp = tmp_path_factory.mktemp("errors")
    import_manifest(clothes_manifest, tmp / "unsplit")
    shutil.copytree(tmp / "unsplit", tmp / "one")
    make_split(tmp / "one" / "p.txt", DataLayout(tmp / "one"), distractor_fraction=0)
    (tmp / "empty").mkdir()
    (tmp / "empty" / "p.txt").write_text("")
    broken = tmp / "broken"
    (broken / "clothes" / "resnet18").mkdir(parents=True)
    for name in (MODEL_CONFIG, MODEL_WEIGHTS):
        (broken / "clothes" / "resnet18" / name).write_text("not a model")
    FusionWeights({"*": {"resnet18": 1.0}}).save(tmp / "any.json")
    return Roots(
        tmp, tmp / "one", tmp / "unsplit", demo_data, tmp / "empty", tmp / "nowhere", tmp / "w0", broken
    )


def with_lists(roots: Roots, name: str, **lists: str | int) -> Path:
    """A copy of the one-category data with some lists replaced (text) or cut to their first N lines."""
    root = roots.tmp / name
    if not root.exists():
        shutil.copytree(roots.one, root)
        for list_name, change in lists.items():
            path = root / list_name
            lines = path.read_text().splitlines(keepends=True)
            path.write_text(change if isinstance(change, str) else "".join(lines[:change]))
    return root


def write_csv(roots: Roots, name: str, text: str) -> Path:
    path = roots.tmp / name
    path.write_text(text)
    return path


HEADER = "path,identity,domain,category,role\n"
Case = tuple[str, Callable[[Roots], list[object]], Callable[[Roots], list[str]]]
CASES: list[Case] = [
    # data split: missing and empty lists
    (
        "split-missing-list",
        lambda r: ["data", "split", "--data", r.nowhere],
        lambda r: [
            f"{r.nowhere / 'p.txt'}: missing",
            f"jdfashion data import-manifest YOUR.csv --out {r.nowhere}",
        ],
    ),
    (
        "split-empty-list",
        lambda r: ["data", "split", "--data", r.empty],
        lambda r: [f"{r.empty / 'p.txt'}: lists no pairs", "jdfashion data import-manifest"],
    ),
    # data import-manifest: a missing image, an empty manifest
    (
        "manifest-missing-image",
        lambda r: [
            "data",
            "import-manifest",
            write_csv(r, "bad.csv", HEADER + "gone.jpg,A,consumer,0,train\n"),
            "--out",
            r.tmp / "bad",
        ],
        lambda r: [f"{r.tmp / 'bad.csv'}:2: path: no such file"],
    ),
    (
        "manifest-empty",
        lambda r: ["data", "import-manifest", write_csv(r, "header.csv", HEADER), "--out", r.tmp / "hdr"],
        lambda r: [f"{r.tmp / 'header.csv'}:2: rows: no images listed"],
    ),
    # train: missing data, wrong category, empty list
    (
        "train-missing-list",
        lambda r: ["train", "--data", r.nowhere, "--weights-root", r.no_weights],
        lambda r: [f"{r.nowhere / 'p.txt'}: missing", "jdfashion data import-manifest"],
    ),
    (
        "train-wrong-category",
        lambda r: ["train", "--category", "bags", "--data", r.one, "--weights-root", r.no_weights],
        lambda r: [f"{r.one / 'p.txt'}: no bags pairs (the data holds clothes)", "--category clothes"],
    ),
    (
        "train-empty-list",
        lambda r: ["train", "--data", r.empty, "--weights-root", r.no_weights],
        lambda r: [f"{r.empty / 'p.txt'}: lists no pairs", "jdfashion data import-manifest"],
    ),
    # extract: nothing trained, a named model not trained, wrong category, no split, unreadable model
    (
        "extract-nothing-trained",
        lambda r: ["extract", "--data", r.one, "--weights-root", r.no_weights],
        lambda r: [
            f"{r.no_weights / 'clothes'}: no trained clothes model",
            f"jdfashion train --backbone efficientnet_lite0 --category clothes --data {r.one} "
            f"--weights-root {r.no_weights}",
        ],
    ),
    (
        "extract-all-nothing-trained",
        lambda r: ["extract", "--all", "--data", r.one, "--weights-root", r.no_weights],
        lambda r: [f"{r.no_weights}: no trained models", "jdfashion train --backbone efficientnet_lite0"],
    ),
    (
        "extract-named-model-missing",
        lambda r: ["extract", "--backbones", "resnet101", "--data", r.one, "--weights-root", r.broken],
        lambda r: [
            f"{r.broken / 'clothes' / 'resnet101' / MODEL_CONFIG}: missing (trained for clothes: resnet18)",
            f"jdfashion train --backbone resnet101 --category clothes --data {r.one} "
            f"--weights-root {r.broken}",
        ],
    ),
    (
        "extract-wrong-category",
        lambda r: ["extract", "--category", "shoes", "--data", r.one, "--weights-root", r.broken],
        lambda r: [f"{r.one / 'p.txt'}: no shoes pairs", "--category clothes"],
    ),
    (
        "extract-not-split",
        lambda r: ["extract", "--data", r.unsplit, "--weights-root", r.broken],
        lambda r: [
            f"{r.unsplit / 'split' / 'val' / 'clothes' / 'q.txt'}: missing",
            f"jdfashion data split --data {r.unsplit}",
        ],
    ),
    (
        "extract-unreadable-model",
        lambda r: ["extract", "--data", r.one, "--weights-root", r.broken],
        lambda r: [
            f"{r.broken / 'clothes' / 'resnet18'}: cannot load the model",
            "retrain it: jdfashion train --backbone resnet18 --category clothes",
        ],
    ),
    # fuse: nothing trained, wrong category, a spec naming an untrained model
    (
        "fuse-nothing-trained",
        lambda r: ["fuse", "--tune", "--data", r.one, "--weights-root", r.no_weights],
        lambda r: [
            "no trained clothes model",
            "jdfashion train --backbone efficientnet_lite0 --category clothes",
        ],
    ),
    (
        "fuse-wrong-category",
        lambda r: ["fuse", "--tune", "--category", "bags", "--data", r.one, "--weights-root", r.broken],
        lambda r: [f"{r.one / 'p.txt'}: no bags pairs", "--category clothes"],
    ),
    (
        "fuse-spec-model-missing",
        lambda r: ["fuse", "--weights", "resnet101=1", "--data", r.one, "--weights-root", r.broken],
        lambda r: [
            "resnet101/config.json: missing",
            "jdfashion train --backbone resnet101 --category clothes",
        ],
    ),
    # submit: nothing trained, missing fusion file, mixed data without router, empty and short lists
    (
        "submit-nothing-trained",
        lambda r: ["submit", "--team", "me", "--data", r.one, "--weights-root", r.no_weights],
        lambda r: [
            "no trained clothes model",
            "jdfashion train --backbone efficientnet_lite0 --category clothes",
        ],
    ),
    (
        "submit-missing-fusion-file",
        lambda r: [
            "submit",
            "--team",
            "me",
            "--fusion",
            r.tmp / "none.json",
            "--data",
            r.one,
            "--weights-root",
            r.broken,
        ],
        lambda r: [f"{r.tmp / 'none.json'}: missing", f"jdfashion fuse --tune --data {r.one}"],
    ),
    (
        "submit-mixed-data-without-router",
        lambda r: [
            "submit",
            "--team",
            "me",
            "--fusion",
            r.tmp / "any.json",
            "--data",
            r.mixed,
            "--weights-root",
            r.broken,
        ],
        lambda r: [
            f"{r.broken / 'router' / 'efficientnet_lite0' / MODEL_WEIGHTS}: missing",
            "the data mixes categories (clothes, bags, shoes)",
            f"jdfashion train --task category --backbone efficientnet_lite0 --data {r.mixed}",
            "--category",
        ],
    ),
    (
        "submit-wrong-category",
        lambda r: [
            "submit",
            "--team",
            "me",
            "--category",
            "shoes",
            "--data",
            r.one,
            "--weights-root",
            r.broken,
        ],
        lambda r: [f"{r.one / 'p.txt'}: no shoes pairs", "--category clothes"],
    ),
    (
        "submit-empty-queries",
        lambda r: [
            "submit",
            "--team",
            "me",
            "--data",
            with_lists(r, "noq", **{"q_all.txt": ""}),
            "--weights-root",
            r.broken,
        ],
        lambda r: [
            f"{r.tmp / 'noq' / 'q_all.txt'}: lists no images",
            f"jdfashion data import-manifest YOUR.csv --out {r.tmp / 'noq'}",
        ],
    ),
    (
        "submit-small-gallery",
        lambda r: [
            "submit",
            "--team",
            "me",
            "--data",
            with_lists(r, "fews", **{"s.txt": 5}),
            "--weights-root",
            r.broken,
        ],
        lambda r: [
            f"{r.tmp / 'fews' / 's.txt'}: 5 images, fewer than the 10 results",
            "role distractor",
            "jdfashion data import-manifest",
        ],
    ),
    # score and show: empty truth, a malformed submission, missing lists
    (
        "score-empty-truth",
        lambda r: ["score", write_csv(r, "Item_x.txt", ""), "--truth", write_csv(r, "gt.txt", "")],
        lambda r: [f"{r.tmp / 'gt.txt'}: lists no queries", "jdfashion data import-manifest"],
    ),
    (
        "score-malformed-submission",
        lambda r: [
            "score",
            write_csv(r, "Item_bad.txt", "http://q/1.jpg\n1 http://g/1.jpg\n"),
            "--truth",
            r.one / "gt.txt",
        ],
        lambda r: [f"{r.tmp / 'Item_bad.txt'}:"],
    ),
    (
        "show-missing-lists",
        lambda r: ["show", write_csv(r, "Item_y.txt", ""), "--data", r.nowhere, "--out", r.tmp / "s.png"],
        lambda r: [f"{r.nowhere / 'q_all.txt'}: missing", "jdfashion data import-manifest"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_common_failures_name_the_file_and_the_fix(roots: Roots, case: Case) -> None:
    _, arguments, expected = case
    result = CliRunner().invoke(main, [str(a) for a in arguments(roots)], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    error_lines = result.stderr.splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("Error: "), result.stderr
    for part in expected(roots):
        assert part in error_lines[0], (part, error_lines[0])
    assert "Traceback" not in result.output and "[Errno" not in result.output


def test_a_failed_fuse_leaves_the_fusion_file_alone(roots: Roots) -> None:
    fusion = roots.broken / "fusion.json"
    result = CliRunner().invoke(
        main,
        ["fuse", "--weights", "resnet101=1", "--data", str(roots.one), "--weights-root", str(roots.broken)],
    )
    assert result.exit_code == 1 and not fusion.exists()


def test_an_unexpected_error_is_one_line_unless_the_traceback_is_asked_for(
    roots: Roots, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr("jdfashion.data.manifest.import_manifest", fail)
    arguments = ["data", "import-manifest", str(roots.tmp / "any.json"), "--out", str(roots.tmp / "x")]
    result = CliRunner().invoke(main, arguments, catch_exceptions=False)
    assert result.exit_code == 1
    assert "unexpected KeyError: 'boom'" in result.stderr and "JDFASHION_TRACEBACK=1" in result.stderr
    monkeypatch.setenv("JDFASHION_TRACEBACK", "1")
    with pytest.raises(KeyError):
        CliRunner().invoke(main, arguments, catch_exceptions=False)

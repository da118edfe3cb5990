"""The path a new user takes first: their own one-category data, one backbone, no router, no fusion file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from jdfashion.cli import main
from jdfashion.data.jdformat import read_images
from jdfashion.submission import validate_submission

TINY_TRAINING = ("--epochs", "1", "--image-size", "48", "--workers", "0")


def run(*args: str | Path) -> str:
    """One command as typed in a shell; a failure shows its output in the assertion."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_manifest_chain_with_one_backbone_needs_no_router_and_no_fusion_file(
    clothes_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(clothes_manifest, "my.csv")
    run("data", "import-manifest", "my.csv", "--out", "mydata")
    run("data", "split", "--data", "mydata")
    trained = run(
        "train",
        "--backbone",
        "efficientnet_lite0",
        "--pretrained",
        "package",
        "--category",
        "clothes",
        "--data",
        "mydata",
        "--weights-root",
        "w",
        *TINY_TRAINING,
    )
    assert "saved w/clothes/efficientnet_lite0" in trained
    assert "0:0…" not in trained  # off a terminal, progress is plain lines, not a cut bar

    submitted = run("submit", "--team", "me", "--data", "mydata", "--weights-root", "w")
    assert "using the trained models as they are (clothes: efficientnet_lite0 1.00)" in submitted
    assert "jdfashion fuse --tune --data mydata --weights-root w" in submitted
    item = Path("submissions/Item_me.txt")
    queries = [ref.url for ref in read_images("mydata/q_all.txt")]
    assert validate_submission(item, queries, {ref.url for ref in read_images("mydata/s.txt")}) == []
    scores = json.loads(run("score", item, "--truth", "mydata/gt.txt", "--json"))
    assert scores["all"]["num_queries"] == len(queries) and not scores["missing_queries"]
    assert 0 < scores["all"]["map"] <= 1

    # The next step the output names: tune, then submit with the tuned file (features come from cache).
    tuned = run("fuse", "--tune", "--data", "mydata", "--weights-root", "w")
    assert "fusion weights saved to w/fusion.json" in tuned
    again = run("submit", "--team", "me", "--data", "mydata", "--weights-root", "w")
    assert "fusion weights from w/fusion.json: clothes: efficientnet_lite0 1.00" in again
    run("extract", "--split", "test", "--data", "mydata", "--weights-root", "w")

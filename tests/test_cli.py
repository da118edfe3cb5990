"""The CLI on real files: each command is a thin layer, so these check wiring and error reporting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from jdfashion.cli import main
from jdfashion.cli.training import training_summary
from jdfashion.data.jdformat import read_images, read_truth
from jdfashion.metrics import evaluate
from jdfashion.submission import read_submission, write_submission


def invoke(*args: str | Path):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_demo_then_split_write_the_official_layout(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert (
        invoke(
            "data",
            "demo",
            "--out",
            data,
            "--train-identities",
            "4",
            "--test-identities",
            "2",
            "--distractors",
            "2",
            "--image-size",
            "64",
        ).exit_code
        == 0
    )
    result = invoke("data", "split", "--data", data, "--val-fraction", "0.5", "--distractor-fraction", "0")
    assert result.exit_code == 0, result.output
    assert "clothes" in result.output
    for category in ("clothes", "bags", "shoes"):
        assert read_truth(data / "split" / "val" / category / "gt.txt")


def test_malformed_list_is_reported_with_file_line_and_field(tmp_path: Path) -> None:
    good = "http://a/1.jpg 0 0 10 10 http://a/2.jpg 0 0 10 10 0\r\n"
    (tmp_path / "p.txt").write_text(good + "http://a/3.jpg 5 0 4 10 http://a/4.jpg 0 0 10 10 1\r\n")
    result = invoke("data", "split", "--data", tmp_path)
    assert result.exit_code == 1
    assert f"{tmp_path / 'p.txt'}:2: consumer_x2" in result.output
    assert "Traceback" not in result.output


def test_validate_rejects_the_official_sample_and_accepts_it_rewritten(
    shared_data: Path, tmp_path: Path
) -> None:
    example = shared_data / "jd-challenge" / "example"
    rejected = invoke(
        "validate",
        example / "sample_submission.txt",
        "--queries",
        example / "q.txt",
        "--gallery",
        example / "s.txt",
    )
    assert rejected.exit_code == 1
    assert "sample_submission.txt:10:" in rejected.output and "problem(s)" in rejected.output

    queries = [ref.url for ref in read_images(example / "q.txt")]
    gallery = [ref.url for ref in read_images(example / "s.txt")]
    fixed = tmp_path / "Item_fixed.txt"
    write_submission(
        fixed, queries, {q: gallery[i : i + 10] for i, q in enumerate(queries)}, gallery=set(gallery)
    )
    accepted = invoke("validate", fixed, "--queries", example / "q.txt", "--gallery", example / "s.txt")
    assert accepted.exit_code == 0, accepted.output


def test_score_json_agrees_with_the_metric_module(tmp_path: Path) -> None:
    gallery = [f"http://g/{i}.jpg" for i in range(30)]
    queries = [f"http://q/{i}.jpg" for i in range(3)]
    ranked = {q: gallery[i * 3 : i * 3 + 10] for i, q in enumerate(queries)}
    truth = {queries[0]: [gallery[0]], queries[1]: [gallery[5], gallery[29]], queries[2]: [gallery[28]]}
    submission = write_submission(tmp_path / "Item_t.txt", queries, ranked, gallery=set(gallery))
    (tmp_path / "gt.txt").write_text("".join(f"{q} {' '.join(t)}\n" for q, t in truth.items()))
    result = invoke("score", submission, "--truth", tmp_path / "gt.txt", "--json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.output)
    expected = evaluate(read_submission(submission), truth).to_dict()
    assert reported == expected
    assert 0 < reported["all"]["map"] < 1


def test_fuse_rejects_a_bad_weight_spec_cleanly(tmp_path: Path) -> None:
    result = invoke("fuse", "--weights", "resnet101=abc", "--data", tmp_path, "--weights-root", tmp_path)
    assert result.exit_code == 1 and "abc" in result.output and "Traceback" not in result.output


def test_offline_hub_weights_fail_with_one_message(demo_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke(
        "train",
        "--backbone",
        "resnet18",
        "--category",
        "clothes",
        "--data",
        demo_data,
        "--weights-root",
        tmp_path,
        "--epochs",
        "1",
        "--pretrained",
        "hub",
    )
    assert result.exit_code == 1
    assert "--pretrained-file" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_full_chain_through_the_cli(demo_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    weights = tmp_path / "weights"
    tiny = ["--epochs", "1", "--image-size", "48", "--identities-per-batch", "2", "--workers", "0"]
    common = ["--data", data, "--weights-root", weights]
    assert invoke("train", "--task", "category", "--backbone", "resnet18", *common, *tiny).exit_code == 0
    assert invoke("train", "--backbone", "resnet18", "--category", "all", *common, *tiny).exit_code == 0
    extracted = invoke("extract", "--all", "--split", "val", "--workers", "0", *common)
    assert extracted.exit_code == 0 and "bags/resnet18 val" in extracted.output
    tuned = invoke("fuse", "--tune", "--backbones", "resnet18", "--workers", "0", *common)
    assert tuned.exit_code == 0, tuned.output
    assert json.loads((weights / "fusion.json").read_text())

    def submit_valid(team: str, *options: str) -> Path:
        """``submit`` with ``options``; the file it writes must pass ``validate``."""
        out = tmp_path / "subs"
        fixed = ["--team", team, "--router-backbone", "resnet18", "--out", out, "--workers", "0"]
        submitted = invoke("submit", *fixed, *options, *common)
        assert submitted.exit_code == 0, submitted.output
        item = out / f"Item_{team}.txt"
        checked = invoke("validate", item, "--queries", data / "q_all.txt", "--gallery", data / "s.txt")
        assert checked.exit_code == 0, checked.output
        return item

    item = submit_valid("cli")
    scored = invoke("score", item, "--truth", data / "gt.txt", "--json")
    assert 0 <= json.loads(scored.output)["all"]["map"] <= 1
    # Transductive self-training on the routed test lists, on top of domain centring.
    submit_valid("cli-st", "--self-training", "--self-training-steps", "5", "--centring", "0.5")
    shown = invoke("show", item, "--data", data, "--out", tmp_path / "sheet.png")
    assert shown.exit_code == 0 and (tmp_path / "sheet.png").stat().st_size > 0
    assert (tmp_path / "sheet.html").exists()


def test_retrieval_flags_default_to_the_api_defaults() -> None:
    """A notebook's RetrievalOptions() and a command run without flags rank the same way."""
    import dataclasses

    from jdfashion.cli.retrieval import fuse, retrieval_options
    from jdfashion.options import RetrievalOptions
    from jdfashion.settings import option_names

    names = set(option_names(RetrievalOptions))
    with fuse.make_context("fuse", []) as context:
        defaults = {name: value for name, value in context.params.items() if name in names}
    assert set(defaults) == names
    assert dataclasses.asdict(retrieval_options(**defaults)) == dataclasses.asdict(RetrievalOptions())


def test_every_retrieval_flag_reaches_its_field_and_back() -> None:
    """Flags given on a command line become the dataclass's values (text parsed, nested settings
    switched on), and command_words writes the same flags back: one declaration, both ways."""
    from jdfashion.cli.retrieval import fuse, retrieval_options
    from jdfashion.options import ROTATION_TTA, RetrievalOptions, SelfTraining
    from jdfashion.settings import command_words, option_names

    def parsed(words: list[str]) -> RetrievalOptions:
        with fuse.make_context("fuse", ["--tune", *words]) as context:
            return retrieval_options(
                **{name: context.params[name] for name in option_names(RetrievalOptions)}
            )

    flags = "--centring 0.5 --query-augmentation 5 --rotations tta --flip --workers 0 --self-training"
    options = parsed([*flags.split(), "--self-training-steps", "7", "--score-normalisation", "zscore"])
    assert options == RetrievalOptions(
        centring=0.5,
        query_augmentation=5,
        rotations=ROTATION_TTA,
        flip=True,
        num_workers=0,
        self_training=SelfTraining(steps=7),
        score_normalisation="zscore",
    )
    assert parsed(command_words(options)) == options
    with pytest.raises(click.BadParameter, match="not in the range 0<=x<=1"):
        parsed(["--centring", "1.5"])


def test_training_summary_says_when_the_frozen_reference_shipped() -> None:
    epochs = [{"epoch": 0, "val_map": 0.4}, {"epoch": 1, "loss": 2.5, "train_accuracy": 0.5, "val_map": 0.3}]
    selected = {"stage": "selected", "epoch": 0, "val_map": 0.4}
    reference = [*epochs, selected, {"stage": "shipped", "model": "reference", "val_map": 0.5}]
    trained = [*epochs, selected, {"stage": "shipped", "model": "trained", "val_map": 0.4}]
    assert training_summary(reference) == (
        "loss 2.500  train acc 0.500  shipped the frozen reference (validation mAP@10 0.5000)"
    )
    assert training_summary(trained) == "loss 2.500  train acc 0.500  kept epoch 0 (validation mAP@10 0.4000)"


def test_train_options_are_the_config_fields_and_only_given_ones_override_the_recipe() -> None:
    """`train`'s options come from TrainConfig's fields: none given leaves every value to the recipe;
    given ones are parsed into the field's type and win over it."""
    from jdfashion.cli.training import train
    from jdfashion.config import TrainConfig, recipe_config
    from jdfashion.settings import given_options

    with train.make_context("train", []) as context:
        assert given_options(TrainConfig, context.params) == {}
    words = "--lr 0.01 --wise-alphas 0.5,0.75 --decay-epochs 3,6 --no-validate --workers 0 --pooling gem"
    with train.make_context("train", words.split()) as context:
        given = given_options(TrainConfig, context.params)
    assert given == {
        "lr": 0.01,
        "wise_alphas": (0.5, 0.75),
        "decay_epochs": (3, 6),
        "validate": False,
        "num_workers": 0,
        "pooling": "gem",
    }
    config = recipe_config("finetune", **given)
    assert (config.lr, config.wise_alphas, config.optimizer) == (0.01, (0.5, 0.75), "adamw")

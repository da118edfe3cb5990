"""What every command shares: the console, the data / weights / device options, category choices,
and the one-line errors that name the file and the fixing command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

if TYPE_CHECKING:
    from jdfashion.data.jdformat import Category
    from jdfashion.workspace import Workspace

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

console = Console()
CATEGORY_CHOICES = click.Choice(["clothes", "bags", "shoes", "all"])
TRACEBACK_VARIABLE = "JDFASHION_TRACEBACK"
PAPER_BACKBONES = ("resnet101", "resnet152", "resnext101", "densenet169")
data_option = click.option(
    "--data",
    "data_root",
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
    help="Data root in the official layout (p.txt, q_all.txt, s.txt, images/).",
)
weights_option = click.option(
    "--weights-root",
    type=click.Path(path_type=Path),
    default=Path("weights"),
    show_default=True,
    help="Where trained models, feature caches and fusion weights live.",
)
device_option = click.option(
    "--device", default=None, help="torch device (default: cuda when available, else cpu)."
)


def chosen_category(name: str | None) -> Category | None:
    """A named category, or None for ``all`` / no choice."""
    from jdfashion.data.jdformat import Category

    return None if name in (None, "all") else Category.parse(name)


def categories_of(name: str | None, workspace: Workspace) -> list[Category]:
    """``all`` (or no choice) is every category the data holds; a named one must be held too."""
    from jdfashion.workspace import resolve_categories

    return resolve_categories(workspace, chosen_category(name))


def one_line(error: BaseException) -> str:
    """The message of an expected failure, on one line; OS errors name their file and its fix."""
    from jdfashion.paths import missing_message

    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return missing_message(Path(error.filename))
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {(error.strerror or str(error)).lower()}"
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} {lines[1]} (and {len(lines) - 2} more)"


def fail_on_value_errors(function):
    """Every failure ends in one line naming the file and the fix, never a traceback.

    Expected failures (bad input, a missing file or model) already carry that message. Anything
    else is a bug: it is reported on one line too, and ``JDFASHION_TRACEBACK=1`` shows the traceback.
    """
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from jdfashion.model.backbones import WeightsUnavailableError

        try:
            return function(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (ValueError, OSError, WeightsUnavailableError) as error:
            raise click.ClickException(one_line(error)) from error
        except Exception as error:
            if os.environ.get(TRACEBACK_VARIABLE):
                raise
            raise click.ClickException(
                f"unexpected {type(error).__name__}: {one_line(error)} (a bug: rerun with "
                f"{TRACEBACK_VARIABLE}=1 and report the traceback)"
            ) from error

    return wrapper


@click.group()
@click.version_option(package_name="jdfashion")
def main() -> None:
    """Consumer-to-shop commodity retrieval: train MGPA models, fuse them, submit, score."""


backbones_option = click.option(
    "--backbones",
    default=None,
    help="Comma list of trained backbones. Default: every model trained for the category.",
)
category_option = click.option(
    "--category",
    type=CATEGORY_CHOICES,
    default=None,
    help="Default: every category the data holds.",
)


def backbone_names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None

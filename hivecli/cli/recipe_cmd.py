"""`hive recipe check FILE` and `hive recipe schema`: recipes without running anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hivecli.cli import _output

recipe_app = typer.Typer(
    name="recipe", help="Check recipes and print their schema.", no_args_is_help=True, add_completion=False
)


@recipe_app.command()
def check(
    path: Annotated[Path, typer.Argument(help="The recipe (TOML) to check.")],
    set_values: Annotated[
        list[str] | None, typer.Option("--set", help="Override a value: SECTION.KEY=VALUE (repeatable).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the resolved recipe as JSON.")] = False,
) -> None:
    """Validate a recipe and print it resolved: defaults < file < HIVE_* env vars < --set.

    Exit code 2 and one line naming the file, key, value and fix if it is not valid. Does not import torch or check that datasets and user code exist.
    """
    from hivecli.recipe import load_recipe

    recipe = load_recipe(path, set_values)
    if json_output:
        print(json.dumps(recipe.to_dict(), indent=2))
        return
    _output.stderr.print(f"{path}: ok")
    if recipe.user_code():
        _output.stderr.print(f"{path}: runs user code: {', '.join(recipe.user_code())}")
    print(recipe.to_toml(), end="")


@recipe_app.command()
def schema() -> None:
    """Print the recipe's JSON schema (for editors and validators)."""
    from hivecli.recipe import json_schema

    print(json.dumps(json_schema(), indent=2))

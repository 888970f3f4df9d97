"""The `hive` entry point: builds the command tree and maps expected errors to exit codes."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from hivecli.cli import _errors, _output
from hivecli.cli.dht_cmd import dht
from hivecli.cli.local_cmd import local
from hivecli.cli.peers_cmd import peers
from hivecli.cli.recipe_cmd import recipe_app
from hivecli.cli.state_cmd import pull_state
from hivecli.cli.train_cmd import join, start

app = typer.Typer(
    name="hive",
    help="Collaborative, decentralized deep-learning runs: find peers through a DHT and train together.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold private keys
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)
app.command(rich_help_panel="Training")(start)
app.command(rich_help_panel="Training")(join)
app.command(rich_help_panel="Training")(local)
app.command("pull-state", rich_help_panel="Training")(pull_state)
app.add_typer(recipe_app, rich_help_panel="Training")
app.command(rich_help_panel="Network")(dht)
app.command(rich_help_panel="Network")(peers)


def _version(value: bool) -> None:
    if value:
        from hivecli import __version__

        print(f"hive {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details to stderr.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _output.setup_logging(verbose)


def main() -> None:
    """Run the CLI; expected errors become one line on stderr and their exit code."""
    try:
        app()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        print("hive: interrupted", file=sys.stderr)
        sys.exit(_errors.EXIT_INTERRUPTED)
    except Exception as error:
        if _errors.exit_code_for(error) is None:
            raise
        sys.exit(_errors.report(error))


if __name__ == "__main__":
    main()

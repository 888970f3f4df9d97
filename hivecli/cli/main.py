"""The `hive` entry point: builds the command tree and maps expected errors to exit codes."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from hivecli.cli import _errors, _output
from hivecli.cli.dht_cmd import dht
from hivecli.cli.doctor_cmd import doctor
from hivecli.cli.keygen_cmd import keygen
from hivecli.cli.local_cmd import local
from hivecli.cli.monitor_cmd import monitor
from hivecli.cli.peers_cmd import peers
from hivecli.cli.recipe_cmd import recipe_app
from hivecli.cli.state_cmd import pull_state
from hivecli.cli.train_cmd import join, start


def _show_flags_without_a_type() -> None:
    """typer 0.29's rich help prints a type after every option, `--json <bool>` and `--help <bool>`
    too, though a flag takes no value (`--json true` is an error). Show flags bare, as click and
    older typers do, for every command at once."""
    option_class = getattr(getattr(typer, "core", None), "TyperOption", None)
    display_type = getattr(option_class, "display_type_rich", None)
    if display_type is None or getattr(display_type, "flags_bare", False):
        return  # another typer: nothing to fix, or fixed already

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else display_type(self, ctx)

    display_type_rich.flags_bare = True  # type: ignore[attr-defined]
    option_class.display_type_rich = display_type_rich  # type: ignore[union-attr]


_show_flags_without_a_type()

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
app.command(rich_help_panel="Network")(monitor)
app.command(rich_help_panel="Network")(keygen)
app.command(rich_help_panel="Network")(doctor)


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

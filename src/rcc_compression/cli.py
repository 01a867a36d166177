"""The ``rcc`` command line (Typer). One thin function per subcommand; the work lives in the library.

Every command takes ``-v``/``-q``; bad input (config, model name, data) prints one line and exits
with status 2. ``main(argv)`` runs the app in-process, which is how the tests call it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import RCCError

app = typer.Typer(
    name="rcc",
    help="Recursive cascade compression of vision-language models (CLIP, BLIP).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Experiment YAML file.")]  # noqa: UP007
SetOpt = Annotated[
    Optional[list[str]],  # noqa: UP007
    typer.Option("--set", "-s", help="Override a config key: --set compression.dare.pruning_rate=0.95"),
]


def _verbosity(verbose: int, quiet: bool) -> int:
    return -1 if quiet else verbose


@app.command()
def info() -> None:
    """Version, bundled models, and the compute device."""
    import torch

    from .models.registry import BUNDLED
    from .models.tiny import TINY_MODELS

    typer.echo(f"rcc-compression {__version__}")
    typer.echo(f"torch {torch.__version__}; cuda: {torch.cuda.is_available()}")
    typer.echo(f"bundled models: {', '.join(sorted(BUNDLED)) or 'none'}")
    typer.echo(f"tiny test models: {', '.join(TINY_MODELS)}")


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None, verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """Resolve a config (inherit, override, --set), validate it, and print it as YAML."""
    import yaml

    from .config import dump_config, load_config

    cfg = load_config(config, set_ or [])
    typer.echo(yaml.safe_dump(dump_config(cfg), sort_keys=False), nl=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit status (2 on bad input)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="rcc", standalone_mode=False)
    except RCCError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return int(exc.exit_code)
        raise
    return 0

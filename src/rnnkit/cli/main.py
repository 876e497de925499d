"""The ``rnnkit`` command.

Every module in this package that defines ``app`` (a ``typer.Typer``) and ``NAME`` (the group name)
is added as a command group, so a task adds its commands by adding one module here.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

from .. import __version__

app = typer.Typer(name="rnnkit", help="Recurrent neural networks from the classic literature.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rnnkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """rnnkit: every classic recurrent cell, truncated BPTT training, and the tasks they are known for."""


def _add_groups() -> None:
    from . import __path__ as pkg_path

    for mod in sorted(pkgutil.iter_modules(pkg_path), key=lambda m: m.name):
        if mod.name in ("main", "common") or mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{mod.name}")
        sub = getattr(module, "app", None)
        name = getattr(module, "NAME", None)
        if isinstance(sub, typer.Typer) and name:
            app.add_typer(sub, name=name)


_add_groups()

if __name__ == "__main__":
    app()

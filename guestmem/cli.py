"""The ``guestmem`` command line: argument parsing and printing only.

Each subcommand calls one library function and prints its result; ``main(argv)`` returns
the exit code, so tests drive the CLI without a subprocess.
"""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """guestmem: KVM guest-first memory (guest_memfd) on the real kernel or the software model."""


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--quick", is_flag=True, help="Small sizes and few repetitions (under two minutes).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also write the figure (PNG).")
def bench(names: tuple[str, ...], quick: bool, json_path: str | None, plot_path: str | None) -> None:
    """Run benchmarks NAMES (default: all) on every backend; print one row per figure."""
    from rich.console import Console

    from . import bench as gbench
    from .bench import report

    try:
        gbench.resolve(names)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAMES") from exc
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: keep rows on one line each
        console = Console(width=max(console.width, 180))
    command = " ".join(["guestmem bench", *names, *(["--quick"] if quick else []),
                        *(["--json", json_path] if json_path else []), *(["--plot", plot_path] if plot_path else [])])
    result = gbench.run_live(names, quick=quick, command=command, console=console)
    console.print(report.table(result))
    console.print(report.summary(result))
    if json_path:
        report.write_json(result, json_path)
    if plot_path:
        report.plot(result, plot_path)
    if result.failed:
        raise click.exceptions.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: sys.argv[1:]) and return the exit code."""
    try:
        cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="guestmem", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

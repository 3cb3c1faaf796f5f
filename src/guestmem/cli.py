"""The ``guestmem`` command line: argument parsing and printing only.

Each subcommand calls one library function and prints its result; ``main(argv)`` returns
the exit code, so tests drive the CLI without a subprocess.
"""

from __future__ import annotations

import json
import os
import sys

import click


def _address(text: str) -> int:
    """A guest-physical address option: decimal or 0x-prefixed hex."""
    try:
        value = int(text, 0)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an address (use e.g. 0x40000000)") from None
    if value < 0:
        raise click.BadParameter(f"{text} is negative")
    return value


_IMAGE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps")


def _check_output(path: str | None, option: str, formats: tuple[str, ...] | None = None) -> None:
    """Refuse, before any work, an output file that cannot be written or drawn."""
    if path is None:
        return
    if formats is not None:
        suffix = os.path.splitext(path)[1].lower().lstrip(".")
        if suffix not in formats:
            raise click.BadParameter(f"{path!r}: cannot draw .{suffix or '(no suffix)'}; use one of "
                                     f"{', '.join('.' + f for f in formats)}", param_hint=option)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise click.BadParameter(f"{path!r}: directory {directory} does not exist", param_hint=option)
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise click.BadParameter(f"{path!r}: not writable", param_hint=option)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="guestmem", prog_name="guestmem", message="%(prog)s %(version)s")
def cli() -> None:
    """guestmem: KVM guest-first memory (guest_memfd) on the real kernel or the software model."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--device", default=None, help="KVM device (default $GUESTMEM_KVM_DEVICE or /dev/kvm).")
def info(as_json: bool, device: str | None) -> None:
    """Report the host's KVM guest_memfd support and which backend runs each feature."""
    import json

    from rich.console import Console
    from rich.table import Table

    from .info import host_report

    report = host_report(device)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    console = Console(file=sys.stdout)
    host = Table(title="Host", show_header=False)
    host.add_row("KVM device", f"{report.device}: {'accessible' if report.kvm_accessible else 'ABSENT'}")
    if not report.kvm_accessible:
        host.add_row("why", report.kvm_reason)
        host.add_row("backend", "everything runs on the model")
    host.add_row("kernel", report.kernel_release)
    host.add_row("kvm modules", ", ".join(report.kvm_modules) or "-")
    host.add_row("model profile (profile=\"host\")", f"{report.model_profile}: {report.model_profile_reason}")
    if report.kvm_accessible:
        host.add_row("API version", str(report.api_version))
        host.add_row("VM types", ", ".join(report.vm_types))
        host.add_row("guest_memfd flags (/dev/kvm, default VM)",
                     f"{'|'.join(report.guest_memfd_flags) or '0'}, {'|'.join(report.vm_guest_memfd_flags) or '0'}")
        host.add_row("memory attributes", "|".join(report.memory_attributes) or "0 (none)")
    if report.vm_error:
        host.add_row("default VM", report.vm_error)
    console.print(host)
    if report.caps:
        caps = Table(title="Capabilities")
        for column in ("cap", "/dev/kvm", "default VM"):
            caps.add_column(column)
        def fmt(value: int | None) -> str:
            return "-" if value is None else f"{value:#x}" if value > 9 else str(value)

        for name, value in report.caps.items():
            caps.add_row(name, fmt(value), fmt(report.vm_caps.get(name)))
        console.print(caps)
    features = Table(title="Features")
    for column in ("feature", "runs on", "reason"):
        features.add_column(column)
    for f in report.features:
        features.add_row(f.name, f.backend, f.reason)
    console.print(features)


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
    _check_output(json_path, "--json")
    _check_output(plot_path, "--plot", _IMAGE_FORMATS)
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:  # a pipe or a log: rows on one line each
        console = Console(width=max(console.width, 180))
    command = " ".join(["guestmem bench", *names, *(["--quick"] if quick else []),
                        *(["--json", json_path] if json_path else []), *(["--plot", plot_path] if plot_path else [])])
    result = gbench.run_live(names, quick=quick, command=command, console=console)
    console.print(report.table(result, width=console.width))
    console.print(report.summary(result))
    if json_path:
        report.write_json(result, json_path)
    if plot_path:
        report.plot(result, plot_path)
    if result.failed:
        raise click.exceptions.Exit(1)


@cli.command()
@click.argument("workload", required=False)
@click.option("--guest", "guest_path", type=click.Path(dir_okay=False),
              help="Run your own guest: assembly (.S/.asm), an ELF, or a flat binary.")
@click.option("--entry", type=_address, default=None, help="--guest flat binary: entry GPA (default: load address).")
@click.option("--load-address", type=_address, default=None,
              help="--guest flat binary: GPA to load it at (default 0x40000000).")
@click.option("--cpl", type=click.IntRange(0, 3), default=0, show_default=True, help="--guest: start at CPL 0 or 3.")
@click.option("--backend", type=click.Choice(["auto", "model", "kvm"]), default="auto", show_default=True,
              help="auto: the kernel if it can run the workload, else the model.")
@click.option("--vcpus", type=click.IntRange(1, 64), default=2, show_default=True, help="Number of vCPUs.")
@click.option("--memory", "memory", default=None, help="Guest data memory, e.g. 64M (default: per workload).")
@click.option("--iterations", type=click.IntRange(1), default=None, help="conversions: iterations per vCPU.")
@click.option("--conversion", type=click.Choice(["auto", "in-place", "two-backings", "both"]), default="auto",
              show_default=True,
              help="Private memory layout: one guest_memfd converted in place (model: profile next), or a "
                   "guest_memfd plus a shared memfd; auto: in-place where the kernel has it; both: run each "
                   "and compare their host memory.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results only.")
@click.option("--map", "map_path", type=click.Path(dir_okay=False), help="Also write the memory map as a PNG.")
def run(workload: str | None, guest_path: str | None, entry: int | None, load_address: int | None, cpl: int,
        backend: str, vcpus: int, memory: str | None, iterations: int | None, conversion: str, as_json: bool,
        map_path: str | None) -> None:
    """Boot a VM and run WORKLOAD: conversions (default), secret or touch; or your own --guest FILE."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import workloads
    from .vmm import job
    from .vmm.runloop import GuestError

    console = Console()
    try:
        size = job.parse_size(memory) if memory else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--memory") from exc
    if size is not None and size <= 0:
        raise click.BadParameter(f"{memory!r} is not a positive size", param_hint="--memory")
    _check_output(map_path, "--map", _IMAGE_FORMATS)
    workload, options = _workload_options(workload, guest_path, entry, load_address, cpl, iterations)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True, disable=as_json)
    task = progress.add_task(workload, total=None)

    def on_backend(name: str, why: str) -> None:
        if not as_json:
            console.print(f"backend: [bold]{name}[/] ({why})")

    layouts = ["in-place", "two-backings"] if conversion == "both" else [conversion]
    results = []
    try:
        for layout in layouts:
            with progress:
                results.append(job.run_workload(
                    workloads.get(workload, **options), backend=backend, vcpus=vcpus, memory=size,
                    on_backend=on_backend, conversion=layout,
                    progress=lambda done, total: progress.update(task, completed=done, total=total)))
    except OSError as exc:
        raise click.ClickException(exc.strerror or str(exc)) from None
    except (ValueError, GuestError) as exc:
        raise click.ClickException(str(exc)) from None
    _print_results(console, results, as_json, map_path)
    if any(r.interrupted for r in results):
        raise click.exceptions.Exit(130)
    if not all(r.ok for r in results):
        raise click.exceptions.Exit(1)


def _workload_options(workload: str | None, guest_path: str | None, entry: int | None,
                      load_address: int | None, cpl: int, iterations: int | None) -> tuple[str, dict]:
    """``run``'s workload name and its options, after the checks of the options that go with it."""
    if iterations is not None and (workload or ("guest" if guest_path else "conversions")) != "conversions":
        raise click.BadParameter("only the conversions workload has iterations", param_hint="--iterations")
    if guest_path is not None:
        if workload is not None:
            raise click.UsageError(f"give either a WORKLOAD ({workload!r}) or --guest, not both")
        if cpl not in (0, 3):
            raise click.BadParameter("a guest starts at CPL 0 or 3", param_hint="--cpl")
        return "guest", {"path": guest_path, "entry": entry, "load_address": load_address, "cpl": cpl}
    for name, value in (("--entry", entry), ("--load-address", load_address)):
        if value is not None:
            raise click.UsageError(f"{name} applies only to --guest")
    workload = workload or "conversions"
    return workload, {"iterations": iterations} if iterations and workload == "conversions" else {}


def _print_results(console, results: list, as_json: bool, map_path: str | None) -> None:
    """``run``'s output: JSON, or a summary per layout and the memory map; the map as a PNG."""
    from .vmm import report

    result = results[0]
    if as_json:
        click.echo(report.to_json(result) if len(results) == 1 else report.to_json_many(results))
    else:
        for r in results:
            console.print(report.summary(r))
        console.print(report.map_bar(result))
        if len(results) > 1:
            console.print(report.layouts(results))
    if map_path:
        report.plot_map(result, map_path)
        if not as_json:
            console.print(f"memory map written to {map_path}")


@cli.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--profile", default=None, help="Model kernel profile (default: the model's default).")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), help="Append every served call to FILE.")
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def exec_(profile: str | None, trace_path: str | None, program: str, args: tuple[str, ...]) -> None:
    """Run PROGRAM with the model serving /dev/kvm to it (a drop-in /dev/kvm)."""
    from .devkvm import Unavailable, exec_program

    try:
        code = exec_program([program, *args], profile=profile, trace=trace_path)
    except (Unavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{program}: {exc.strerror or exc}") from None
    if code:
        raise click.exceptions.Exit(code)


@cli.command()
@click.option("--source", default=None, help="Kernel source tarball or tree (default: newest /usr/src/linux-source-*).")
@click.option("--profile", default=None, help="Model profile (default: the source's kernel version if the model has it).")
@click.option("-k", "keyword", default=None, help="Only tests whose name or arguments contain this.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True, help="Seconds per run.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results only.")
def kselftest(source: str | None, profile: str | None, keyword: str | None, timeout: float, as_json: bool) -> None:
    """Build the kernel's KVM selftests and run each on the host kernel and on the model."""
    import json

    from rich.console import Console
    from rich.table import Table

    from .devkvm import Unavailable, kselftest as ks

    console = Console()
    if not console.is_terminal:  # a pipe or a log file: keep rows on one line each
        console = Console(width=max(console.width, 200))

    def progress(r: "ks.Result") -> None:
        if not as_json:
            console.print(f"{r.test} {' '.join(r.args)}: host {r.host.result}, model {r.model.result}")

    try:
        profile, results = ks.run(source, profile, keyword, timeout=timeout, on_result=progress)
    except (Unavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"profile": profile, "results": [r.to_dict() for r in results]}, indent=2))
    else:
        table = Table(title=f"KVM selftests: host kernel vs model (profile {profile})")
        for column in ("test", "args", "host", "host s", "model", "model s", "detail"):
            table.add_column(column)
        for r in results:
            detail = r.model.detail if r.model.result != "pass" else r.host.detail
            table.add_row(r.test, " ".join(r.args), r.host.result, f"{r.host.seconds:.1f}", r.model.result,
                          f"{r.model.seconds:.1f}", detail)
        console.print(table)
    if not results or any(r.model.result not in ("pass", "skip") for r in results):
        raise click.exceptions.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: sys.argv[1:]) and return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # Without standalone mode, click returns a subcommand's ``Exit(code)`` instead of raising it.
        rc = cli.main(args=args, prog_name="guestmem",
                      standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        if "--json" in args and args[:1] in (["run"], ["info"]):  # machine-readable output: errors too
            click.echo(json.dumps({"error": exc.format_message(), "exit_code": exc.exit_code}))
        else:  # one line: the usage text click would add is one --help away
            click.echo(f"Error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling (click turns most into Abort)
        click.echo("Aborted.", err=True)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())

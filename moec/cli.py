"""The ``moec`` command line.

Exit codes (as black): 0 ok, 1 ``--check`` / ``--diff`` found the output would change, 2 bad spec,
usage or an output that cannot be written, 123 internal error (a moec bug: the message says so and
prints the spec hash).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from moec import __version__
from moec.errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WOULD_CHANGE,
    MoecError,
    UsageError,
    WriteConflict,
)


def cmd_build(args) -> int:
    """Validate and render every spec, then write (or --check / --diff) each package."""
    from moec.codegen import writer

    if args.output and len(args.specs) > 1:
        raise UsageError(
            "-o/--output takes one spec; with several, packages go to <out-dir>/<name>"
        )
    builds, bad = _render_all(args)
    if bad:
        if len(args.specs) > 1:
            print(
                f"error: {bad} of {len(args.specs)} specs have errors: nothing written",
                file=sys.stderr,
            )
        return EXIT_USAGE
    _refuse_shared_outputs(args.specs, builds)
    status = EXIT_OK
    for spec, out, files, render_s in builds:
        if args.check or args.diff:
            status = max(status, _check_one(out, files, args))
            continue
        start = time.perf_counter()
        result = writer.write_package(out, files, force=args.force, prune=args.prune)
        elapsed = render_s + time.perf_counter() - start
        print(f"{spec.name} -> {out}: {result.summary()} ({elapsed * 1e3:.0f} ms)", file=sys.stderr)
    return status


def _render_all(args) -> tuple[list[tuple], int]:
    """(spec, out, files, seconds) of every good spec, and how many were bad (each one reported)."""
    from moec.codegen import build_files
    from moec.spec import located_in

    builds, bad = [], 0
    for spec_path in args.specs:
        start = time.perf_counter()
        try:
            with located_in(spec_path):
                spec, out, files = build_files(spec_path, args.output, args.out_dir)
        except MoecError as exc:
            print(exc.render(), file=sys.stderr)
            bad += 1
            continue
        builds.append((spec, out, files, time.perf_counter() - start))
    return builds, bad


def _refuse_shared_outputs(spec_paths: list[str], builds: list[tuple]) -> None:
    """UsageError if two specs would write one package (the same name under --out-dir)."""
    first: dict[str, str] = {}
    for spec_path, (spec, out, _, _) in zip(spec_paths, builds, strict=True):
        key = os.path.realpath(out)
        if key in first:
            raise UsageError(
                f"{first[key]} and {spec_path} would both write {out} (name: {spec.name}): "
                "nothing written; give the specs different names"
            )
        first[key] = spec_path


def _check_one(out: Path, files: dict[str, bytes], args) -> int:
    """--check / --diff of one package: what a build would do, without writing; 1 if it would
    write or remove something, or refuse to."""
    from moec.codegen import writer

    if args.diff:
        sys.stdout.write(writer.diff(out, files))
    try:
        result = writer.plan_write(out, files, force=args.force, prune=args.prune)
    except WriteConflict as exc:
        print(exc.text("would refuse to overwrite"), file=sys.stderr)
        return EXIT_WOULD_CHANGE
    if result.stale:  # a build without --prune keeps them: no difference
        stale = ", ".join(result.stale)
        print(f"{out}: no longer generated, kept (--prune removes them): {stale}", file=sys.stderr)
    if not result.changed:
        return EXIT_OK
    print(f"{out}: {result.preview()}", file=sys.stderr)
    return EXIT_WOULD_CHANGE


def cmd_plan(args) -> int:
    from moec.plan import plan_file

    spec, plan = plan_file(args.spec)
    if args.json:
        sys.stdout.write(plan.to_json())
        return EXIT_OK
    from moec.codegen.report import sections

    _print_sections(f"Plan for {spec.name} ({args.spec})", sections(spec, plan))
    return EXIT_OK


def _print_sections(title: str, parts: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    console.print(f"[bold]{title}[/bold]")
    for part in parts:
        console.print(f"[bold]{part['title']}[/bold]")
        table = Table(show_edge=False, pad_edge=False)
        for column in part["columns"]:
            table.add_column(column)
        for row in part["rows"]:
            table.add_row(*row)
        console.print(table)
        console.print()


def cmd_check(args) -> int:
    """Validate and plan each spec (what a build would reject, without rendering or writing)."""
    from moec.plan import plan_file

    failed = []
    for path in args.specs:
        try:
            plan_file(path)
            print(f"{path}: ok", file=sys.stderr)
        except MoecError as exc:
            print(exc.render(), file=sys.stderr)
            failed.append(path)
    return EXIT_USAGE if failed else EXIT_OK


def cmd_import_hf(args) -> int:
    from moec.importers.hf import dump_spec_yaml, import_hf_config, training_only_notes
    from moec.spec import load_spec_text

    path = Path(args.config)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read a JSON config: {exc}") from None
    data = import_hf_config(config, name=args.name, layer=args.layer)
    text = dump_spec_yaml(data, f"imported from {path.name} by moec import-hf")
    load_spec_text(text, str(args.output or "<stdout>"))  # never write a spec moec would reject
    for note in training_only_notes(config):
        print(f"note: {note}", file=sys.stderr)
    if args.output:
        from moec.codegen.writer import write_file

        write_file(Path(args.output), text.encode())
        print(f"{path} -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_trace(args) -> int:
    import subprocess
    import tempfile

    from moec.codegen import build_files, writer
    from moec.spec import located_in

    script = Path(__file__).resolve().parent / "runtime" / "trace_layer.py"
    with tempfile.TemporaryDirectory(prefix="moec-trace-") as tmp:
        if args.package:
            package = Path(args.package)
        else:
            with located_in(args.spec):
                spec, _, files = build_files(args.spec)
            package = Path(tmp) / spec.name
            writer.write_package(package, files)
        command = [args.python, str(script), str(package), "-o", args.output]
        command += ["--tokens", str(args.tokens), "--seed", str(args.seed)]
        command += ["--inputs", args.inputs] if args.inputs else []
        command += ["--weights", args.weights] if args.weights else []
        try:
            return subprocess.run(command, check=False).returncode
        except OSError as exc:
            raise UsageError(f"cannot run {args.python}: {exc}") from None


EXIT_CODES = """\
exit codes:
  0    ok
  1    build --check / --diff: a build would change the package (or refuse to)
  2    a bad spec, input file or command line, or an output that cannot be written
  123  an internal error (a moec bug: the message says so and prints the spec hash)"""

BUILD = """\
Plan each spec and write its generated package: to -o, or to <out-dir>/<name>. The package is
swapped into place whole, with a MANIFEST of what moec wrote; files that are not moec's are kept.

Every spec is validated, planned and rendered before any package is written: if one has an error,
each bad spec is reported and nothing is written. Two specs that would write the same package (the
same name, without -o) are refused the same way."""


def parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="moec",
        description="A compiler for Mixture-of-Experts layers: YAML spec -> plan -> Python package.",
        epilog=EXIT_CODES,
        formatter_class=raw,
    )
    p.add_argument("--version", action="version", version=f"moec {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, description: str | None = None):
        return sub.add_parser(
            name, help=summary, description=description or summary, formatter_class=raw
        )

    b = command("build", "plan specs and write their generated packages", BUILD)
    b.add_argument("specs", nargs="+", metavar="SPEC", help="spec YAML file(s)")
    b.add_argument("-o", "--output", help="package directory (one spec); default <out-dir>/<name>")
    b.add_argument(
        "--out-dir", default="generated", help="where packages go without -o (default: generated)"
    )
    b.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a build would change the output",
    )
    b.add_argument(
        "--diff", action="store_true", help="write nothing; print the diff a build would make"
    )
    b.add_argument("--force", action="store_true", help="overwrite hand-edited or foreign files")
    b.add_argument(
        "--prune", action="store_true", help="remove generated files the spec no longer emits"
    )
    b.set_defaults(func=cmd_build)

    pl = command(
        "plan",
        "print the placement / communication / memory / cost plan",
        "Validate and plan a spec, and print the plan: expert groups, mesh, placement,\n"
        "communication, memory per rank, predicted time and kernel calls.",
    )
    pl.add_argument("spec", metavar="SPEC", help="spec YAML file")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (plan.json)")
    pl.set_defaults(func=cmd_plan)

    c = command(
        "check",
        "validate and plan specs (what build rejects), writing nothing",
        "Validate and plan each spec, as build does, without writing anything;\n"
        "every spec is checked and each error reported.",
    )
    c.add_argument("specs", nargs="+", metavar="SPEC", help="spec YAML file(s)")
    c.set_defaults(func=cmd_check)

    i = command(
        "import-hf",
        "write a spec from a Hugging Face config.json",
        "Write a spec for the MoE layer of a Hugging Face config.json (the spec is validated first).\n"
        "Training-only randomness the layer leaves out (router jitter, expert dropout) is noted on\n"
        "stderr: the layer matches transformers in eval mode.",
    )
    i.add_argument("config", help="path of a config.json")
    i.add_argument("-o", "--output", help="spec file to write (default: stdout)")
    i.add_argument("--name", help="spec name (default: from the model type)")
    i.add_argument(
        "--layer",
        type=int,
        help="decoder layer to import, 0-based (needed when the config's values differ per layer)",
    )
    i.set_defaults(func=cmd_import_hf)

    t = command(
        "trace",
        "record a routing trace (placement.trace) from the generated layer",
        "Build the spec's package in a temporary folder (or use --package), run its layer on\n"
        "hidden states and write the routing trace that placement.trace reads.",
    )
    t.add_argument("spec", metavar="SPEC", help="spec YAML file")
    t.add_argument("-o", "--output", required=True, help="trace JSON to write")
    t.add_argument("--package", help="use this generated package instead of building the spec")
    t.add_argument(
        "--inputs", help="torch.save'd hidden states [T, H] or [B, S, H] (default: random)"
    )
    t.add_argument("--weights", help="the layer's weights, as written by MoELayer.save_safetensors")
    t.add_argument(
        "--tokens", type=int, default=4096, help="random tokens when no --inputs (default: 4096)"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    t.add_argument(
        "--python", help="the Python (with torch) that runs the layer (default: this one)"
    )
    t.set_defaults(func=cmd_trace, python=sys.executable)

    from moec.tune import cmd_tune

    tu = command(
        "tune",
        "measure the expert GEMM tiles on this GPU (a tuning table)",
        "On a GPU: build the spec's package in a temporary folder, time tile configurations for\n"
        "its expert GEMMs and write the table that kernels.tuning reads.",
    )
    tu.add_argument("spec", metavar="SPEC", help="spec YAML file")
    tu.add_argument("-o", "--output", required=True, help="tuning JSON to write")
    tu.add_argument(
        "--tokens",
        default="16,256,4096,16384",
        help="token counts, the table's buckets (default: 16,256,4096,16384)",
    )
    tu.add_argument(
        "--rep-ms", type=int, default=25, help="timing budget per candidate in ms (default: 25)"
    )
    tu.add_argument("--python", help="the Python (torch, triton) to run (default: this one)")
    tu.set_defaults(func=cmd_tune, python=sys.executable)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except MoecError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # a moec bug: say so, with what is needed to report it
        print(traceback.format_exc(), file=sys.stderr)
        print(
            f"error: internal error in moec {__version__} (a bug; please report it with the spec)",
            file=sys.stderr,
        )
        _print_spec_hash(args)
        return EXIT_INTERNAL


def _print_spec_hash(args) -> None:
    try:
        from moec.spec import load_spec, spec_hash

        for path in getattr(args, "specs", None) or [getattr(args, "spec", None)]:
            if path:
                print(f"  spec {path}: sha256 {spec_hash(load_spec(path)[0])}", file=sys.stderr)
    except Exception:  # noqa: BLE001 - best effort while reporting another error
        pass


if __name__ == "__main__":
    sys.exit(main())

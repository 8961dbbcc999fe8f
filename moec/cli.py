"""The ``moec`` command line.

Exit codes (as black): 0 ok, 1 ``--check`` found the output would change, 2 bad spec or usage,
123 internal error (a moec bug: the message says so and prints the spec hash).
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
from moec.errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, EXIT_WOULD_CHANGE, MoecError, UsageError


def cmd_build(args) -> int:
    from moec.codegen import build_files, writer
    from moec.spec import located_in

    specs = [Path(p) for p in args.specs]
    if args.output and len(specs) > 1:
        raise UsageError(
            "-o/--output takes one spec; with several, packages go to <out-dir>/<name>"
        )
    status = EXIT_OK
    for spec_path in specs:
        start = time.perf_counter()
        with located_in(spec_path):
            spec, out, files = build_files(spec_path, args.output, args.out_dir)
        if args.check or args.diff:
            if args.diff:
                sys.stdout.write(writer.diff(out, files))
            result = writer.plan_write(out, files, force=True, prune=args.prune)
            if result.changed or result.stale:
                print(f"would change {out}: {result.summary()}", file=sys.stderr)
                status = EXIT_WOULD_CHANGE
            continue
        result = writer.write_package(out, files, force=args.force, prune=args.prune)
        elapsed = time.perf_counter() - start
        print(f"{spec.name} -> {out}: {result.summary()} ({elapsed * 1e3:.0f} ms)", file=sys.stderr)
    return status


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
    from moec.importers.hf import dump_spec_yaml, import_hf_config
    from moec.spec import load_spec_text

    path = Path(args.config)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read a JSON config: {exc}") from None
    data = import_hf_config(config, name=args.name, layer=args.layer)
    text = dump_spec_yaml(data, f"imported from {path.name} by moec import-hf")
    load_spec_text(text, str(args.output or "<stdout>"))  # never write a spec moec would reject
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
        print(f"{path} -> {out}", file=sys.stderr)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moec", description="A compiler for Mixture-of-Experts layers."
    )
    p.add_argument("--version", action="version", version=f"moec {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="plan a spec and write its generated package")
    b.add_argument("specs", nargs="+", help="spec YAML file(s)")
    b.add_argument("-o", "--output", help="package directory (one spec); default <out-dir>/<name>")
    b.add_argument(
        "--out-dir", default="generated", help="where packages go without -o (default: generated)"
    )
    b.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the output would change"
    )
    b.add_argument(
        "--diff", action="store_true", help="write nothing; print the diff the build would make"
    )
    b.add_argument("--force", action="store_true", help="overwrite hand-edited or foreign files")
    b.add_argument(
        "--prune", action="store_true", help="remove generated files the spec no longer emits"
    )
    b.set_defaults(func=cmd_build)

    pl = sub.add_parser("plan", help="print the placement / communication / memory / cost plan")
    pl.add_argument("spec")
    pl.add_argument("--json", action="store_true", help="print the machine-readable plan")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser(
        "check", help="validate and plan specs (what build rejects), writing nothing"
    )
    c.add_argument("specs", nargs="+")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("import-hf", help="write a spec from a Hugging Face config.json")
    i.add_argument("config", help="path of a config.json")
    i.add_argument("-o", "--output", help="spec file to write (default: stdout)")
    i.add_argument("--name", help="spec name (default: from the model type)")
    i.add_argument("--layer", type=int, help="which layer, for configs with per-layer values")
    i.set_defaults(func=cmd_import_hf)

    t = sub.add_parser(
        "trace", help="record a routing trace (placement.trace) from the generated layer"
    )
    t.add_argument("spec")
    t.add_argument("-o", "--output", required=True, help="trace JSON to write")
    t.add_argument("--package", help="use this generated package instead of building the spec")
    t.add_argument(
        "--inputs", help="torch.save'd hidden states [T, H] or [B, S, H] (default: random)"
    )
    t.add_argument("--weights", help="the layer's weights, as written by MoELayer.save_safetensors")
    t.add_argument("--tokens", type=int, default=4096, help="random tokens when no --inputs")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--python", default=sys.executable, help="the Python (with torch) that runs the layer"
    )
    t.set_defaults(func=cmd_trace)

    from moec.tune import cmd_tune

    tu = sub.add_parser("tune", help="measure the expert GEMM tiles on this GPU (a tuning table)")
    tu.add_argument("spec")
    tu.add_argument("-o", "--output", required=True, help="tuning JSON to write")
    tu.add_argument("--tokens", default="16,256,4096,16384", help="token counts (table buckets)")
    tu.add_argument("--rep-ms", type=int, default=25, help="timing budget per candidate (ms)")
    tu.add_argument("--python", default=sys.executable, help="the Python (torch, triton) to run")
    tu.set_defaults(func=cmd_tune)
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

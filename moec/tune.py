"""``moec tune SPEC -o tuning.json``: measure the expert GEMM tiles of a spec on this machine's GPU.

moec never imports torch: it builds the spec's package into a temporary folder and runs the
package's own tuner (``python -m <name>.kernels.tune``) with the given Python, then checks the
table with ``moec.plan.tuning.load_tuning`` before writing it. Naming the file in the spec
(``kernels: {tuning: tuning.json}``, relative to the spec) makes ``moec build`` bake it into the
package's ``tuning.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from moec.errors import EXIT_OK, UsageError

# Exit 3: no GPU; 4: torch or triton missing. Printed nothing else, so moec words the error.
_PREFLIGHT = """
import sys
try:
    import torch, triton  # noqa: F401
except ImportError as exc:
    print(exc); sys.exit(4)
sys.exit(0 if torch.cuda.is_available() else 3)
"""


def parse_tokens(text: str) -> list[int]:
    """``"16,256,4096"`` -> [16, 256, 4096]; UsageError unless positive integers."""
    try:
        tokens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 1:
        raise UsageError(f"--tokens: expected positive integers separated by commas (got {text!r})")
    return sorted(set(tokens))


def preflight(python: str) -> None:
    """UsageError unless ``python`` imports torch and triton and sees a CUDA GPU."""
    try:
        proc = subprocess.run(
            [python, "-c", _PREFLIGHT], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise UsageError(f"--python: cannot run {python}: {exc}") from None
    if proc.returncode == 4:
        raise UsageError(
            f"{python} cannot import torch and triton ({proc.stdout.strip()}); "
            "tuning runs the generated kernels\n  hint: pass --python with an environment that has both"
        )
    if proc.returncode == 3:
        raise UsageError(
            f"no CUDA GPU visible to {python}: tiles are measured on the GPU that will run the "
            "layer\n  hint: run `moec tune` on that machine (the table is only valid for its GPU)"
        )
    if proc.returncode != 0:
        raise UsageError(f"{python} failed to start: {proc.stderr.strip()[-500:]}")


def summary(data: dict) -> str:
    """One line: shapes, buckets and the measured gain over the heuristic (geometric mean)."""
    gains = [
        default / tuned
        for table in data["tables"]
        for default, tuned in table.get("measured_ms", {}).values()
        if tuned > 0
    ]
    buckets = sorted({int(b) for t in data["tables"] for b in t["buckets"]})
    text = f"{len(data['tables'])} shape(s) x buckets {buckets} on {data.get('gpu', '?')}"
    if gains:
        geo = 1.0
        for g in gains:
            geo *= g
        text += f"; tuned vs default tiles: {geo ** (1 / len(gains)):.2f}x geomean, {max(gains):.2f}x best"
    return text


def cmd_tune(args) -> int:
    """Build the spec's package in a temporary folder, run its tuner, validate and write the table."""
    from moec.codegen import build_files, writer
    from moec.plan.tuning import load_tuning
    from moec.spec import located_in

    tokens = parse_tokens(args.tokens)
    spec_path = Path(args.spec)
    out = Path(args.output)
    preflight(args.python)
    with tempfile.TemporaryDirectory(prefix="moec-tune-") as tmp:
        with located_in(spec_path):
            spec, _, files = build_files(spec_path)
        writer.write_package(Path(tmp) / spec.name, files)
        raw = Path(tmp) / "tuning.json"
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")])),
        )
        command = [args.python, "-m", f"{spec.name}.kernels.tune", "--out", str(raw)]
        command += ["--tokens", ",".join(map(str, tokens)), "--rep-ms", str(args.rep_ms)]
        rc = subprocess.run(command, cwd=tmp, env=env, check=False).returncode
        if rc != 0:
            raise UsageError(f"the tuner exited with status {rc} (its messages are above)")
        load_tuning(raw)  # the table moec build will read: refuse to write one it would reject
        data = json.loads(raw.read_text())
        writer.write_file(out, raw.read_bytes())
    print(f"{spec.name} -> {out}: {summary(data)}", file=sys.stderr)
    rel = Path(os.path.relpath(out.resolve(), spec_path.resolve().parent)).as_posix()
    print(
        f"  use it: add `kernels: {{tuning: {rel}}}` to {spec_path} and run `moec build {spec_path}`",
        file=sys.stderr,
    )
    return EXIT_OK

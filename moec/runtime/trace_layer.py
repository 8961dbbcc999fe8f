"""Record a routing trace from a generated package: ``python trace_layer.py PACKAGE_DIR -o trace.json``.

Run by ``moec trace`` in a subprocess, so that moec itself never imports torch. Imports only torch, the
standard library and the generated package. The trace is the planner's input format:

    {"layers": [{"counts": [c_0, ..., c_{E-1}], "pairs": [[i, j, n], ...]}]}

``counts[e]``: routing slots that chose expert e; ``pairs``: how many tokens chose both i and j (i < j).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch


def record(layer, x: torch.Tensor, num_experts: int) -> dict:
    """Counts and co-selection pairs of routing ``x`` [..., H] through ``layer`` (zero experts excluded)."""
    with torch.no_grad():
        num_seqs = x.shape[0] if x.dim() == 3 else 1
        ids_TK, _, _ = layer.route(x.reshape(-1, x.shape[-1]), num_seqs)
    ids_TK = ids_TK.masked_fill(ids_TK >= num_experts, -1)
    chosen_TE = torch.zeros(ids_TK.shape[0], num_experts + 1)
    chosen_TE.scatter_(1, ids_TK.masked_fill(ids_TK < 0, num_experts), 1.0)
    chosen_TE = chosen_TE[:, :num_experts]
    counts = chosen_TE.sum(0).long().tolist()
    together_EE = (chosen_TE.t() @ chosen_TE).long()
    i, j = torch.triu_indices(num_experts, num_experts, offset=1)
    n = together_EE[i, j]
    keep = n > 0
    pairs = torch.stack([i[keep], j[keep], n[keep]], dim=1).tolist()
    return {"counts": counts, "pairs": pairs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("package", type=Path, help="folder of a generated package")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument(
        "--inputs", type=Path, help="torch.save'd tensor [T, H] or [B, S, H] (default: random)"
    )
    parser.add_argument(
        "--weights", type=Path, help="safetensors of the layer (default: random, seeded)"
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(args.package.resolve().parent))
    pkg = importlib.import_module(args.package.resolve().name)
    torch.manual_seed(args.seed)
    kwargs = (
        {"distributed": False}
        if "distributed" in pkg.MoELayer.__init__.__code__.co_varnames
        else {}
    )
    layer = pkg.MoELayer(dtype=torch.float32, **kwargs).eval()
    if args.weights:
        layer.load_safetensors(args.weights)
    hidden = pkg.PLAN["dims"]["hidden"]
    x = torch.load(args.inputs).float() if args.inputs else torch.randn(args.tokens, hidden)
    if x.shape[-1] != hidden:
        print(f"error: inputs have width {x.shape[-1]}, the layer {hidden}", file=sys.stderr)
        return 2
    trace = {"layers": [record(layer, x, pkg.PLAN["dims"]["experts"])]}
    args.output.write_text(json.dumps(trace, separators=(",", ":")) + "\n")
    counts = trace["layers"][0]["counts"]
    print(
        f"{args.output}: {sum(counts)} slots over {len(counts)} experts, max/mean {max(counts) * len(counts) / max(sum(counts), 1):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

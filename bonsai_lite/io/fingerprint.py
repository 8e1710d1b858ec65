"""A cheap fingerprint of a model directory's content, for ranks to check they read the same model.

Hashing every byte would cost minutes per rank on a 7B checkpoint, before any useful work. Instead:
config.json, and for every safetensors file its name, size, header (names, shapes, dtypes,
offsets) and SAMPLE_BLOCKS blocks of SAMPLE_BYTES spread evenly over its data. Another fine-tune,
a conversion to another dtype or a truncated or corrupt copy differs in one of those; two copies
differing in a few bytes between the samples would not be told apart.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from bonsai_lite.errors import CheckpointError

SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 64 * 1024


def model_fingerprint(model_dir: str | Path) -> str:
    root = Path(model_dir)
    h = hashlib.sha256()
    try:
        h.update((root / "config.json").read_bytes())
        files = sorted(root.glob("*.safetensors"))
        for path in files:
            size = path.stat().st_size
            h.update(f"\0{path.name}\0{size}\0".encode())
            fd = os.open(path, os.O_RDONLY)
            try:
                head = os.pread(fd, 8, 0)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                header = os.pread(fd, min(n, size), 8)
                h.update(header)
                start, span = 8 + len(header), max(0, size - 8 - len(header))
                for i in range(SAMPLE_BLOCKS if span else 0):
                    h.update(os.pread(fd, SAMPLE_BYTES, start + (span - 1) * i // max(1, SAMPLE_BLOCKS - 1)))
            finally:
                os.close(fd)
    except OSError as e:
        raise CheckpointError(f"{model_dir}: cannot read ({e.strerror or e})") from e
    return h.hexdigest()

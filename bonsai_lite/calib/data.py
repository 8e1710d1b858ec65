"""Calibration and evaluation text -> token tensors: read, tokenise once, cut into windows, sample.

Convention (shared/data/README.md): the whole file is one string, tokenised once, cut into
non-overlapping windows of the sequence length; a trailing partial window is dropped.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from bonsai_lite.errors import DataError

log = logging.getLogger(__name__)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:  # local files only; never remote code
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{model_dir}: no usable tokenizer files ({e.__class__.__name__}); copy the parent's tokenizer") from e


def read_text(source: str | Path) -> str:
    """A text file, or a Hugging Face dataset name 'name[:config[:split]]' when `datasets` is installed."""
    path = Path(source)
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DataError(f"{path}: the text file is empty")
        return text
    if path.suffix or "/" not in str(source) and ":" not in str(source):
        raise DataError(f"{source}: text file not found")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: not a file, and `datasets` is not installed to fetch it as a dataset") from None
    name, config, split = (str(source).split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # the datasets library raises many kinds; all mean "cannot fetch"
        raise DataError(f"{source}: could not load the dataset ({e.__class__.__name__}: {e})") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(ds[column])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: the "longer than the specified maximum sequence length" warning does not apply,
    # the ids are cut into windows of at most the model's length before any forward.
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids.to(torch.long)


def windows(ids: torch.Tensor, seq_len: int, *, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [W, seq_len] covering the first `max_tokens` tokens (all by default)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def calibration_tokens(ids: torch.Tensor, *, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` distinct windows of `seq_len` tokens drawn with a seeded permutation."""
    available = ids.numel() // seq_len
    if available < samples:
        raise DataError(
            f"calibration text too short: {samples} samples x {seq_len} tokens need {samples * seq_len} tokens, "
            f"the text has {ids.numel()}; give more text, fewer --calib-samples or a shorter --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(available, generator=g)[:samples].sort().values
    return ids[: available * seq_len].reshape(available, seq_len)[pick]

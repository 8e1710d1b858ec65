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


HF_PREFIX = "hf:"  # an explicit prefix: a mistyped path must never turn into a download


def read_text(source: str | Path) -> str:
    """A text file, or a Hugging Face dataset 'hf:name[:config[:split]]' when `datasets` is installed."""
    if not str(source).startswith(HF_PREFIX):
        path = Path(source)
        if path.is_dir():
            raise DataError(f"{source}: is a directory, not a text file")
        if not path.is_file():
            raise DataError(f"{source}: text file not found (for a Hugging Face dataset write "
                            f"{HF_PREFIX}NAME[:CONFIG[:SPLIT]])")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            text = raw.decode("utf-8", errors="replace")
            bad = text.count("\ufffd")
            log.warning("%s is not valid UTF-8 (first bad byte at offset %d; %d characters replaced): is it the right "
                        "file, or another encoding (convert it with iconv -t UTF-8)?", path, e.start, bad)
        # Newlines as Python's text mode reads them (CRLF and CR become LF): the perplexity convention
        # of docs/RESULTS.md. The WikiText-2 test file has CRLF line ends; the parent's 21.97 is on LF.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            raise DataError(f"{path}: the text file is empty")
        return text
    source = str(source)[len(HF_PREFIX):]
    try:
        import datasets
    except ImportError:
        raise DataError(f"{HF_PREFIX}{source}: `datasets` is not installed to fetch this dataset "
                        "(pip install datasets, or give a text file)") from None
    name, config, split = (str(source).split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # the datasets library raises many kinds; all mean "cannot fetch"
        raise DataError(f"{HF_PREFIX}{source}: could not load the dataset ({e.__class__.__name__}: "
                        f"{' '.join(str(e).split())})") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(ds[column])


# Share of unknown or raw-byte tokens above which text is probably not what the tokenizer was made for
# (random bytes, another encoding, another language's tokenizer): ordinary English text has ~0%.
ODD_TOKEN_SHARE = 0.2


def tokenize(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: the "longer than the specified maximum sequence length" warning does not apply,
    # the ids are cut into windows of at most the model's length before any forward.
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0].to(torch.long)
    share = odd_token_share(tokenizer, ids)
    if share > ODD_TOKEN_SHARE:
        log.warning("%.0f%% of the text's %d tokens are unknown or raw-byte tokens: the text is probably not one the "
                    "model's tokenizer was made for (random bytes, a wrong encoding?); results on it mean little",
                    100 * share, ids.numel())
    return ids


def odd_token_share(tokenizer, ids: torch.Tensor) -> float:
    """Fraction of `ids` that are the unknown token, byte-fallback tokens (`<0x..>`), or stand for U+FFFD."""
    if ids.numel() == 0:
        return 0.0
    odd = set()
    if getattr(tokenizer, "unk_token_id", None) is not None:
        odd.add(int(tokenizer.unk_token_id))
    uniq = torch.unique(ids).tolist()
    for i, tok in zip(uniq, tokenizer.convert_ids_to_tokens(uniq)):
        if tok is None or (tok.startswith("<0x") and tok.endswith(">")) or "\ufffd" in tokenizer.decode([i]):
            odd.add(i)
    return float(torch.isin(ids, torch.tensor(sorted(odd), dtype=ids.dtype)).float().mean()) if odd else 0.0


def windows(ids: torch.Tensor, seq_len: int, *, max_tokens: int | None = None, skip_tokens: int = 0) -> torch.Tensor:
    """Non-overlapping windows [W, seq_len] covering `max_tokens` tokens (all by default) from token
    `skip_tokens` on (0: the start of the text)."""
    check_window_args(seq_len, max_tokens, skip_tokens)
    total = ids.numel()
    ids = ids[skip_tokens:]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        after = f" after skipping {skip_tokens:,}" if skip_tokens else ""
        raise DataError(f"the text has {total:,} tokens, {ids.numel():,}{after}: fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def check_window_args(seq_len: int, max_tokens: int | None = None, skip_tokens: int = 0) -> None:
    """A loss needs a token and the next; a token budget must be positive (a negative slice drops tokens)."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 (a token and the next to predict), got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(f"--max-tokens must be at least --seq-len ({seq_len}), got {max_tokens}")
    if skip_tokens < 0:
        raise DataError(f"--skip-tokens must be 0 or more, got {skip_tokens}")


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

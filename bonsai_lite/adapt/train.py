"""Post-pruning adaptation (paper section 4): LoRA (or full) fine-tuning + distillation, resumable.

loss = LM loss + lambda * KL(pruned || parent), the KL taken against the parent's cached top-k
logits (`adapt/teacher.py`, `adapt/distill.py`), so the parent is never in memory while training.
Defaults are the paper's Table 10: lr 1e-4, LoRA rank 128, alpha 4 x rank, lambda 0.01, LoRA on
every linear map of the blocks.

Reproducibility: the batch of step s is a function of (seed, s) alone, LoRA's initialisation is
seeded, and the run state (trainable weights, AdamW moments, step, RNG) is committed atomically
every `save_every` steps as safetensors + JSON (prune/state.py, no pickles). A run killed at any
point and restarted with the same command reaches bit-identical weights (tests/integration/test_adapt.py).
Constant learning rate (the paper gives no schedule), no weight decay on LoRA factors, gradients
clipped at norm 1.0 (a common default; it only bites on the first noisy steps).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bonsai_lite.adapt.budget import TrainShape, check_training_budget
from bonsai_lite.adapt.distill import lm_and_kl
from bonsai_lite.adapt.merge import export_adapted, lora_deltas
from bonsai_lite.adapt.teacher import build_teacher_cache, cache_bytes, tokens_sha256
from bonsai_lite.calib.data import load_tokenizer, read_text, tokenize, windows
from bonsai_lite.errors import BonsaiError, CheckpointError
from bonsai_lite.io.hf import load_causal_lm, needs_remote_code, own_model_class  # noqa: F401 (needs_remote_code: tools)
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.io.outdir import check_destination, check_free_space
from bonsai_lite.progress import METRICS_NAME, NullProgress, peak_rss_bytes, reset_peaks
from bonsai_lite.prune.state import RunState
from bonsai_lite.search.machine import check_device, detect_machine, fmt_bytes

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0
# The reported train_loss averages the last tenth of the steps: one step's loss is too noisy.
LOSS_WINDOW = 0.1


@dataclass(frozen=True)
class AdaptConfig:
    pruned: str
    out: str
    data: str
    parent: str | None = None
    seq_len: int = 512
    max_tokens: int | None = None  # only the first T tokens of the data
    batch_size: int = 4
    max_steps: int | None = None  # default: one pass over the windows
    lr: float = 1e-4  # Table 10
    rank: int = 128  # Table 10
    alpha: float | None = None  # Table 10: 4 x rank
    distill_weight: float = 0.01  # Table 10 (lambda)
    top_k: int = 64
    kl_direction: str = "reverse"  # the paper's D_KL(pruned || parent)
    full: bool = False
    save_every: int = 100
    seed: int = 0
    budget: int | None = None
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    teacher_cache: str | None = None
    teacher_values_dtype: str = "float32"
    spill_dir: str | None = None

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise BonsaiError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seq_len < 2:
            raise BonsaiError("--seq-len must be at least 2 (a token and the next)")
        if not self.full and self.rank < 1:
            raise BonsaiError("--rank must be at least 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise BonsaiError("--max-steps must be >= 0")
        if self.distill_weight < 0:
            raise BonsaiError("--distill-weight must be >= 0")
        if self.distill_weight > 0 and not self.parent:
            raise BonsaiError("distillation needs the parent: pass --parent PARENT_DIR, or --distill-weight 0")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 4 * self.rank

    def resume_key(self, *, device: str, dtype: str, tokens_hash: str, model_fingerprint: str = "") -> dict:
        """What fixes the training trajectory; a run state made with other values is not resumed."""
        d = asdict(self)
        for k in ("out", "max_steps", "save_every", "budget", "device", "dtype", "trust_remote_code",
                  "teacher_cache", "spill_dir", "data", "max_tokens", "parent"):
            d.pop(k)
        if self.full:
            d.pop("rank"), d.pop("alpha")
        return {**d, "pruned": str(Path(self.pruned).resolve()), "device": device, "dtype": dtype,
                "tokens_sha256": tokens_hash, "model_fingerprint": model_fingerprint}


def batch_rows(step: int, *, windows: int, batch: int, seed: int) -> np.ndarray:
    """Window indices of step `step`: consecutive slices of per-epoch seeded permutations."""
    rows = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, windows)
        rows.append(np.random.default_rng([seed, epoch]).permutation(windows)[i])
    return np.array(rows)


def _resolve_device(cfg: AdaptConfig) -> tuple[torch.device, torch.dtype, bool]:
    check_device(cfg.device)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cfg.dtype:
        return device, getattr(torch, cfg.dtype), False
    if not cuda:
        return device, torch.float32, False
    # Full fine-tuning keeps float32 master weights under bf16 autocast; LoRA freezes a bf16 base.
    return device, (torch.float32 if cfg.full else torch.bfloat16), cfg.full


def load_student(cfg: AdaptConfig, *, device, dtype):
    model = load_causal_lm(cfg.pruned, trust_remote_code=cfg.trust_remote_code, dtype=dtype).to(device)
    model.config.use_cache = False
    if torch.device(device).type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)  # LoRA A's initialisation
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig

    # A pruned layer may keep no heads or no MLP units: its empty projections get no adapter.
    empty = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and 0 in m.weight.shape]
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules="all-linear", lora_dropout=0.0,
                      bias="none", exclude_modules=empty or None)
    return with_lora(model, lora)


def with_lora(model, lora):
    """peft's `get_peft_model`, without the FutureWarning that peft 0.21 raises by reading a name
    transformers 5.25 deprecated (`is_gradient_checkpointing`): the user can do nothing about it."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)


class Trainer:
    """Model + AdamW + run state; `step` trains on one batch, `save`/`restore` commit and reload."""

    def __init__(self, model, cfg: AdaptConfig, state: RunState, *, autocast: bool):
        self.model, self.cfg, self.state, self.autocast = model, cfg, state, autocast
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.device = next(model.parameters()).device

    def step(self, ids: torch.Tensor, teacher) -> tuple[float, float, float]:
        self.model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=ids, use_cache=False).logits
        lm, kl = lm_and_kl(logits, ids, teacher, direction=self.cfg.kl_direction)
        loss = lm if kl is None else lm + self.cfg.distill_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item(), lm.item(), (kl.item() if kl is not None else 0.0)

    def save(self, step: int, key: dict, history: list) -> None:
        tensors = {f"param.{n}": p.detach() for n, p in self.named}
        for i, st in self.opt.state_dict()["state"].items():
            tensors.update({f"optim.{i}.{k}": v for k, v in st.items()})
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        self.state.tensors = tensors
        self.state.meta = {"key": key, "step": step, "history": history}
        self.state.commit()

    def restore(self) -> tuple[int, list]:
        t = self.state.tensors
        missing = [n for n, _ in self.named if f"param.{n}" not in t]
        if missing:
            raise BonsaiError(f"{self.state.dir}: run state lacks {missing[0]!r}; pass --restart to start over")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(t[f"param.{n}"])
        sd = self.opt.state_dict()
        state: dict[int, dict] = {}
        for name, v in t.items():
            if name.startswith("optim."):
                _, i, k = name.split(".", 2)
                state.setdefault(int(i), {})[k] = v
        sd["state"] = state
        self.opt.load_state_dict(sd)
        torch.set_rng_state(t["rng.cpu"])
        if "rng.cuda" in t and self.device.type == "cuda":
            torch.cuda.set_rng_state(t["rng.cuda"], self.device)
        return int(self.state.meta["step"]), list(self.state.meta["history"])


def adapt(cfg: AdaptConfig, *, run_dir: str | Path | None = None, restart: bool = False, overwrite: bool = False,
          progress: Callable[[int, int, float], None] | None = None, export: bool = True) -> dict:
    """Fine-tune `cfg.pruned` on `cfg.data` (distilling from `cfg.parent`), then merge and export to `cfg.out`.

    `progress(step, total, loss)` is called after every step (raising from it stops the run as a
    kill would: the state of the last save survives).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    run_dir = Path(run_dir) if run_dir else out.with_name(out.name + ".run")
    teacher_dir = Path(cfg.teacher_cache) if cfg.teacher_cache else run_dir / "teacher"
    if export:  # every check on the destination before the first forward pass
        check_destination(out, {"pruned model": Path(cfg.pruned), "parent model": cfg.parent and Path(cfg.parent)},
                          overwrite=overwrite)
        for flag, inner in (("--run-dir", run_dir), ("--teacher-cache", teacher_dir)):
            if out.resolve() == inner.resolve() or out.resolve() in inner.resolve().parents:
                raise BonsaiError(f"{flag} {inner} is inside --out {out}, which the export replaces; "
                                  f"choose a {flag} outside it")
    pruned = StreamedModel.open(cfg.pruned)  # fails fast on missing / unsupported / corrupt checkpoints
    if own_model_class(cfg.pruned) is None:  # fail fast, before the teacher pass, on foreign code
        needs_remote_code(cfg.pruned, trusted=cfg.trust_remote_code)
    tokens = windows(tokenize(load_tokenizer(cfg.pruned), read_text(cfg.data)), cfg.seq_len, max_tokens=cfg.max_tokens)
    n_windows = tokens.shape[0]
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil(n_windows / cfg.batch_size)
    device, dtype, autocast = _resolve_device(cfg)
    machine = detect_machine(device=str(device), budget=cfg.budget, spill_dir=cfg.spill_dir)
    distill = cfg.distill_weight > 0
    shape = TrainShape(batch=cfg.batch_size, seq_len=cfg.seq_len, rank=0 if cfg.full else cfg.rank, full=cfg.full,
                       param_bytes=dtype.itemsize, checkpointing=device.type == "cuda",
                       top_k=cfg.top_k if distill else 0)
    need = check_training_budget(pruned.spec, pruned.layers, shape, budget=machine.budget, cuda=device.type == "cuda")
    parent = StreamedModel.open(cfg.parent) if distill else None
    if parent is not None and parent.spec.vocab != pruned.spec.vocab:
        raise CheckpointError(f"parent vocabulary {parent.spec.vocab} != pruned {pruned.spec.vocab}; "
                              "distillation needs the same tokenizer")
    _check_disk(pruned, out if export else None, teacher_dir if distill else None,
                cache_bytes(n_windows, cfg.seq_len, cfg.top_k, cfg.teacher_values_dtype))
    log.info("adapt: %d windows of %d tokens, %d steps of %d, %s on %s (%s); predicted peak %s of %s",
             n_windows, cfg.seq_len, total, cfg.batch_size, "full fine-tuning" if cfg.full else f"LoRA rank {cfg.rank}",
             device, str(dtype).replace("torch.", ""), fmt_bytes(need), fmt_bytes(machine.budget))
    with RunState(run_dir).lock():  # one process per run directory: its state, its teacher cache
        teacher = None
        metrics = NullProgress(run_dir / METRICS_NAME)  # one JSON line per stage, as a prune run writes
        if distill:
            with metrics.stage("teacher", tokens=int(tokens.numel())):  # a resumed cache counts only its new part
                teacher = build_teacher_cache(cfg.parent, tokens, teacher_dir, k=cfg.top_k,
                                              values_dtype=cfg.teacher_values_dtype, budget=cfg.budget,
                                              device=str(device), spill_dir=cfg.spill_dir)
        state = RunState(run_dir / "train")
        if restart:
            state.discard()
        return _train_and_export(cfg, pruned, tokens, total, teacher, state, out, device=device, dtype=dtype,
                                 autocast=autocast, need=need, overwrite=overwrite, progress=progress, export=export,
                                 t0=t0, metrics=metrics)


def _check_disk(pruned: StreamedModel, out: Path | None, teacher_dir: Path | None, teacher_bytes: int) -> None:
    """Free space for the merged output and a new teacher cache, counted together when they share a disk."""
    needs: dict[int, tuple[Path, int, list[str]]] = {}
    wanted = []
    if out is not None:
        wanted.append((out.parent, pruned.ckpt.nbytes(), f"the adapted model {out}"))
    if teacher_dir is not None and not (teacher_dir / "manifest.json").is_file():
        wanted.append((teacher_dir, teacher_bytes, f"the teacher cache {teacher_dir}"))
    for folder, nbytes, what in wanted:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        dev = folder.stat().st_dev
        have = needs.get(dev, (folder, 0, []))
        needs[dev] = (have[0], have[1] + nbytes, have[2] + [what])
    for folder, nbytes, whats in needs.values():
        check_free_space(folder, nbytes, what=" and ".join(whats))


def _train_and_export(cfg: AdaptConfig, pruned: StreamedModel, tokens, total: int, teacher, state: RunState,
                      out: Path, *, device, dtype, autocast: bool, need: int, overwrite: bool, progress, export: bool,
                      t0: float, metrics) -> dict:
    n_windows, distill, state_dir = tokens.shape[0], teacher is not None, state.dir
    model = load_student(cfg, device=device, dtype=dtype)
    state = RunState(state_dir)
    trainer = Trainer(model, cfg, state, autocast=autocast)
    key = cfg.resume_key(device=device.type, dtype=str(dtype).replace("torch.", ""), tokens_hash=tokens_sha256(tokens),
                         model_fingerprint=pruned.fingerprint())
    start, history = 0, []
    if state.exists:
        state.load()
        if state.meta.get("key") != key:
            differ = sorted(k for k in key if state.meta.get("key", {}).get(k) != key[k])
            raise BonsaiError(f"{state_dir}: run state was made with other settings ({', '.join(differ)} differ); "
                              "pass --restart to start over or use another --out")
        start, history = trainer.restore()
        if start > total:
            raise BonsaiError(f"{state_dir}: run state is at step {start}, past --max-steps {total}; pass a larger "
                              "--max-steps, or --restart to start over")
        log.info("adapt: resuming at step %d of %d from %s", start, total, state_dir)
    n_trainable = sum(p.numel() for p in trainer.params)
    tick = time.perf_counter()
    reset_peaks()
    for step in range(start, total):
        rows = batch_rows(step, windows=n_windows, batch=cfg.batch_size, seed=cfg.seed)
        ids = tokens[torch.from_numpy(rows)].to(device)
        tb = teacher.batch(rows, device=device) if teacher is not None else None
        history.append(trainer.step(ids, tb))
        done = step + 1
        if done % cfg.save_every == 0 or done == total:
            trainer.save(done, key, history)
        if done == total or done % max(1, total // 20) == 0:
            rate = (time.perf_counter() - tick) / (done - start)
            log.info("adapt: step %d/%d loss %.4f (lm %.4f, kl %.4f), eta %.0f s", done, total, *history[-1],
                     rate * (total - done))
        if progress:
            progress(done, total, history[-1][0])
    metrics.record(stage="train", steps=total - start, seconds=round(time.perf_counter() - tick, 3),
                   tokens=(total - start) * cfg.batch_size * cfg.seq_len, peak_rss_bytes=peak_rss_bytes())
    result = {"out": str(out), "steps": total, "train_loss": _tail_mean(history, 0), "lm_loss": _tail_mean(history, 1),
              "kl": _tail_mean(history, 2) if distill else None, "trainable_params": n_trainable,
              "predicted_peak_bytes": need, "teacher_cache": str(teacher.root) if teacher else None}
    if export:
        merged = {}
        if cfg.full:
            replaced = {n: p for n, p in model.named_parameters()}
        else:
            replaced, merged = {}, lora_deltas(model)
        with metrics.stage("export"):
            export_adapted(cfg.pruned, out, lora=merged, replaced=replaced, overwrite=overwrite, parent_dir=cfg.parent,
                           metadata={"settings": asdict(cfg), "steps": total, "train_loss": result["train_loss"]})
    result["seconds"] = time.perf_counter() - t0
    return result


def _tail_mean(history: list, col: int) -> float | None:
    if not history:
        return None
    n = max(1, int(len(history) * LOSS_WINDOW))
    return float(np.mean([h[col] for h in history[-n:]]))

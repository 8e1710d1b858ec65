"""Scale-out on torch.distributed: the sub-models of each evaluated chunk are split across ranks.

Launched by `torchrun` or anything that sets its environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT: SLURM with a rendezvous, Kubernetes' PyTorchJob). Rank 0 runs the prune
as a single process would and alone owns the run state, the regression, the selection and the
export; every other rank only evaluates: it waits for a chunk of sub-models, evaluates its
contiguous share on its own device (`cuda:LOCAL_RANK`, or the CPU with gloo) under its own memory
budget, and sends the losses back. Because only rank 0 writes the run state, a killed run resumes
with the same or a different number of ranks.

Before any work every rank checks its own inputs (model, budget) and the ranks compare their
settings and a fingerprint of the model files; any difference or failed check is one error on
every rank. Collectives time out (`--dist-timeout`) so a rank that hangs or dies ends the others
with a clear message instead of a hang.

Messages are safetensors bytes (JSON metadata + tensors) carried by broadcast / all_gather of
uint8 tensors: nothing received from another rank is ever unpickled.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from bonsai_lite.errors import BonsaiError
from bonsai_lite.prune.faults import checkpoint

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Workers wait in a collective while rank 0 works alone (calibration text sampled from the model,
# the priors' dense pass, the regression); the timeout must cover the longest of those, so it is
# generous by default. A rank that *dies* is noticed at once (its sockets close), not after this.
DEFAULT_TIMEOUT_S = 1800.0


def shares(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) slices of n items over `world` ranks, sizes differing by at most one."""
    base, extra = divmod(n, world)
    out, lo = [], 0
    for r in range(world):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def pack(meta: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    data = {k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}
    return dump_tensors(data, metadata={"json": json.dumps(meta)})


def unpack(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = json.loads(header.get("__metadata__", {}).get("json", "{}"))
    return meta, load_tensors(data)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def agreement_facts(settings: dict, *, model_fingerprint: str, device: str | None) -> dict:
    """What every rank must share: the search settings, the model's content and the device kind.

    The model *path* is left out (nodes may mount it differently; its content is what counts), and
    so are the budget (each rank has its own), the calibration file (only rank 0 reads it) and the
    device index (each rank takes cuda:LOCAL_RANK).
    """
    facts = {k: v for k, v in _flat(settings).items()
             if k not in ("model", "budget", "out", "spill_dir", "device", "calib.text")}
    facts["model_fingerprint"] = model_fingerprint
    facts["device_kind"] = (device or "default").split(":")[0]
    return facts


def _wants_cuda(device: str | None) -> bool:
    return device.startswith("cuda") if device else torch.cuda.is_available()


def host_budget_share(ranks: "Ranks", *, device: str | None, budget: int | None, default_budget) -> int | None:
    """A CPU rank's default budget (a share of free RAM) split between the ranks on its machine.

    Without --memory-budget each process would plan for the whole of the machine's free RAM;
    `default_budget()` is that single-process default. GPU ranks each have their own device.
    """
    if budget is not None or ranks.local_world <= 1 or _wants_cuda(device):
        return budget
    share = default_budget() // ranks.local_world
    log.info("rank %d: %d ranks share this machine's RAM; planning for %.1f GiB each (--memory-budget sets it)",
             ranks.rank, ranks.local_world, share / 2**30)
    return share


@dataclass
class Ranks:
    """This process's place in the job and the collectives the prune needs."""

    rank: int
    world: int
    local_rank: int
    local_world: int  # ranks on this machine (torchrun's LOCAL_WORLD_SIZE)
    backend: str
    timeout_s: float
    comm_device: torch.device
    broken: bool = False  # a collective failed or every rank stopped together: send nothing more
    closed: bool = False

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # ---- transport -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _collective(self, what: str):
        try:
            yield
        except RuntimeError as e:  # DistBackendError and gloo's connection / timeout errors
            self.broken = True
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
            raise BonsaiError(
                f"rank {self.rank}: lost contact with the other ranks while {what} ({first}); another rank died "
                f"or hung past the {self.timeout_s:.0f} s collective timeout (--dist-timeout). Re-run the same "
                "command to resume from the last committed chunk") from e

    def broadcast_bytes(self, data: bytes | None, *, what: str) -> bytes:
        """Rank 0's `data` on every rank."""
        with self._collective(what):
            n = torch.tensor([len(data) if self.is_root else 0], dtype=torch.int64, device=self.comm_device)
            dist.broadcast(n, src=0)
            if self.is_root:
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.comm_device)
            else:
                buf = torch.empty(int(n.item()), dtype=torch.uint8, device=self.comm_device)
            dist.broadcast(buf, src=0)
        return data if self.is_root else buf.cpu().numpy().tobytes()

    def all_gather_bytes(self, data: bytes, *, what: str) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank."""
        with self._collective(what):
            n = torch.tensor([len(data)], dtype=torch.int64, device=self.comm_device)
            sizes = [torch.zeros_like(n) for _ in range(self.world)]
            dist.all_gather(sizes, n)
            sizes = [int(s.item()) for s in sizes]
            buf = torch.zeros(max(sizes), dtype=torch.uint8)
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            buf = buf.to(self.comm_device)
            bufs = [torch.empty_like(buf) for _ in range(self.world)]
            dist.all_gather(bufs, buf)
        return [b[:s].cpu().numpy().tobytes() for b, s in zip(bufs, sizes)]

    # ---- before any work ---------------------------------------------------------------------------
    def agree(self, facts: dict, *, error: str | None) -> None:
        """Raise the same BonsaiError on every rank if any rank failed its checks or differs from rank 0."""
        mine = json.dumps({"facts": facts, "error": error}, default=str).encode()
        replies = [json.loads(b) for b in self.all_gather_bytes(mine, what="comparing settings")]
        problems = [f"rank {r}: {rep['error']}" for r, rep in enumerate(replies) if rep["error"]]
        ref = replies[0]["facts"]
        for r, rep in enumerate(replies[1:], start=1):
            if replies[0]["error"] or rep["error"]:
                continue
            theirs = rep["facts"]
            diff = [f"{k} {_short(theirs.get(k))} (rank 0: {_short(ref.get(k))})"
                    for k in sorted(set(ref) | set(theirs)) if ref.get(k) != theirs.get(k)]
            if diff:
                problems.append(f"rank {r} differs from rank 0: {'; '.join(diff)}")
        if problems:
            self.broken = True  # every rank raises this same error: nobody is left to release
            raise BonsaiError("distributed run refused before any work: " + " | ".join(problems))
        log.info("rank %d/%d: settings and model fingerprint agree across ranks", self.rank, self.world)

    # ---- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, layers: list, tokens: torch.Tensor, masks: torch.Tensor, *, first: int, local,
                 extra: dict | None = None) -> torch.Tensor:
        """Rank 0: losses of `masks`, each rank evaluating its share with
        `local(layers, tokens, masks, first=..., extra=...)`; `extra` (named tensors) travels along."""
        extra = extra or {}
        msg = pack({"cmd": "eval", "first": first, "layers": layers},
                   {"tokens": tokens, "masks": masks, **{f"x:{k}": v for k, v in extra.items()}})
        self.broadcast_bytes(msg, what="sending sub-models")
        return self._share(layers, tokens, masks, first, local, extra)

    def _share(self, layers, tokens, masks, first: int, local, extra: dict) -> torch.Tensor:
        bounds = shares(len(masks), self.world)
        lo, hi = bounds[self.rank]
        try:
            nll = (local(layers, tokens, masks[lo:hi], first=first + lo, extra=extra) if hi > lo
                   else torch.empty(0))
            reply = pack({}, {"nll": nll.to(torch.float64)})
        except Exception as e:  # reported to rank 0, which stops the run with it
            log.debug("evaluation failed", exc_info=True)
            reply = pack({"error": f"{e.__class__.__name__}: {e}"})
        if not self.is_root:
            checkpoint("evaluate")
        replies = [unpack(b) for b in self.all_gather_bytes(reply, what="gathering losses")]
        errors = [f"rank {r} (sub-models {first + a}..{first + b - 1}): {m['error']}"
                  for r, ((m, _), (a, b)) in enumerate(zip(replies, bounds)) if "error" in m]
        if errors:
            self.broken = True  # every rank raises this same error: nobody is left to release
            raise BonsaiError("evaluation failed on " + "; ".join(errors))
        return torch.cat([t["nll"] for _, t in replies])

    def serve(self, local) -> int:
        """Workers: evaluate shares of what rank 0 sends until it says stop; returns sub-models evaluated."""
        done = 0
        while True:
            meta, tensors = unpack(self.broadcast_bytes(None, what="waiting for work from rank 0"))
            if meta["cmd"] == "stop":
                return done
            if meta["cmd"] == "abort":
                raise BonsaiError(f"rank 0 stopped the run: {meta['reason']}")
            masks = tensors["masks"]
            lo, hi = shares(len(masks), self.world)[self.rank]
            extra = {k[2:]: v for k, v in tensors.items() if k.startswith("x:")}
            self._share(meta["layers"], tensors["tokens"], masks, int(meta["first"]), local, extra)
            done += hi - lo

    def close(self, error: BaseException | None = None) -> None:
        """Rank 0 releases the workers (stop, or abort with its error); then the group is destroyed."""
        if self.closed:
            return
        self.closed = True
        if self.is_root and not self.broken:
            reason = str(error) or error.__class__.__name__ if error is not None else None
            meta = {"cmd": "stop"} if error is None else {"cmd": "abort", "reason": reason}
            with contextlib.suppress(BonsaiError):
                self.broadcast_bytes(pack(meta), what="releasing the other ranks")
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)


def _short(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:12] + "..." if len(s) > 15 else s


def from_env(*, device: str | None, timeout_s: float | None = None, environ=None) -> Ranks | None:
    """Join the job described by torchrun's environment; None when not launched with WORLD_SIZE > 1."""
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE") in (None, "", "1"):
        return None
    missing = [k for k in ENV_KEYS if not env.get(k)]
    if missing:
        raise BonsaiError(f"WORLD_SIZE={env['WORLD_SIZE']} but {', '.join(missing)} not set; launch with torchrun "
                          "(or set all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError as e:
        raise BonsaiError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if timeout_s <= 0:
        raise BonsaiError(f"--dist-timeout must be positive, got {timeout_s}")
    if device and device.startswith("cuda:"):
        raise BonsaiError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
    if _wants_cuda(device):
        if not torch.cuda.is_available():
            raise BonsaiError(f"rank {rank}: --device cuda but no CUDA device is visible")
        if local >= torch.cuda.device_count():
            raise BonsaiError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                              "use at most that many --nproc-per-node")
        torch.cuda.set_device(local)  # "cuda" now means cuda:LOCAL_RANK for the planner and the loader
        backend, comm = "nccl", torch.device("cuda", local)
    else:
        backend, comm = "gloo", torch.device("cpu")
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
        raise BonsaiError(f"rank {rank}: could not join the {world}-rank job at {env['MASTER_ADDR']}:"
                          f"{env['MASTER_PORT']} ({why})") from e
    log.info("rank %d of %d (local rank %d): %s backend, collective timeout %.0f s", rank, world, local, backend,
             timeout_s)
    local_world = int(env.get("LOCAL_WORLD_SIZE") or 1)
    return Ranks(rank=rank, world=world, local_rank=local, local_world=local_world, backend=backend,
                 timeout_s=timeout_s, comm_device=comm)

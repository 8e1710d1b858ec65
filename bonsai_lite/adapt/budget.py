"""Will fine-tuning fit? Training memory from parameter counts, before anything is loaded.

peak = weights + trainable copies (parameters, gradients, two AdamW moments) + saved activations
       + logits and loss temporaries, times the planner's fragmentation factor, plus its fixed overhead.

A deliberately simple upper-ish estimate (named constants below say where each number comes from);
`check_training_budget` refuses with the smallest setting that would fit, so a user can act on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from bonsai_lite.errors import BudgetError
from bonsai_lite.search.machine import fmt_bytes
from bonsai_lite.search.planner import FIXED_OVERHEAD, FRAGMENTATION
from bonsai_lite.structure import LayerStructure, ModelSpec

# Bytes of the trainable parameters' state per parameter beyond the weights themselves: gradient +
# AdamW's exp_avg and exp_avg_sq, all in the parameter's dtype (torch keeps the moments in it).
ADAM_COPIES = 3
# peft keeps LoRA factors in float32 even on a bf16 base (`autocast_adapter_dtype`).
LORA_BYTES = 4
# Activations autograd saves per token and layer without checkpointing, in hidden-state dtype units:
# attention: residual, normed input, q, k, v, rotated q and k, SDPA output, o_proj input
# (~ 3 hidden + 4 head widths + 3 kv widths); MLP: residual, normed input, gate, up, act(gate), product
# (~ 2 hidden + 4 widths); each LoRA module adds its rank-r intermediate (7 modules). RMSNorm keeps
# float32 copies of its input (2 x hidden x 4 bytes).
SAVED_HIDDEN, SAVED_HEADS, SAVED_KV, SAVED_WIDTH, LORA_MODULES = 5, 4, 3, 4, 7
# Logits per token and vocabulary entry: the model's logits in its dtype, then float32 copies for
# log_softmax, its gradient, and the masked copy behind the KL's tail bucket.
LOGIT_F32_COPIES = 3


@dataclass(frozen=True)
class TrainShape:
    batch: int
    seq_len: int
    rank: int  # 0 for full fine-tuning
    full: bool
    param_bytes: int  # bytes per weight element (4 fp32 CPU, 2 bf16 CUDA)
    checkpointing: bool
    top_k: int = 0


def lora_params(spec: ModelSpec, layers: tuple[LayerStructure, ...], rank: int) -> int:
    """Parameters of rank-r LoRA on every linear map of every block (LM head excluded, as peft's 'all-linear')."""
    total = 0
    for s in layers:
        heads, kv, width = len(s.heads) * spec.head_dim, len(s.kv) * spec.head_dim, len(s.mlp)
        shapes = [(spec.hidden, heads), (spec.hidden, kv), (spec.hidden, kv), (heads, spec.hidden),
                  (spec.hidden, width), (spec.hidden, width), (width, spec.hidden)]
        total += sum(rank * (i + o) for i, o in shapes if i and o)
    return total


def training_bytes(spec: ModelSpec, layers: tuple[LayerStructure, ...], shape: TrainShape) -> dict[str, int]:
    """Breakdown of the predicted peak (bytes) of one training step."""
    b = shape.param_bytes
    params = spec.non_embedding_params(layers) + spec.embedding_params()
    tokens = shape.batch * shape.seq_len
    out = {"weights": params * b}
    if shape.full:
        out["grads_and_adam"] = params * b * ADAM_COPIES
    else:
        out["lora_and_adam"] = lora_params(spec, layers, shape.rank) * LORA_BYTES * (1 + ADAM_COPIES)
    heads = max(len(s.heads) for s in layers) * spec.head_dim
    kv = max(len(s.kv) for s in layers) * spec.head_dim
    width = max(len(s.mlp) for s in layers)
    per_layer = ((SAVED_HIDDEN * spec.hidden + SAVED_HEADS * heads + SAVED_KV * kv + SAVED_WIDTH * width
                  + LORA_MODULES * shape.rank) * b + 2 * spec.hidden * 4)
    if shape.checkpointing:  # block inputs only, plus one block's recomputation during backward
        out["activations"] = tokens * (len(layers) * spec.hidden * b + per_layer)
    else:
        out["activations"] = tokens * len(layers) * per_layer
    out["logits"] = tokens * spec.vocab * (b + 4 * LOGIT_F32_COPIES)
    out["teacher_batch"] = tokens * shape.top_k * 12
    return out


def predicted_peak(spec, layers, shape: TrainShape, *, cuda: bool) -> int:
    total = sum(training_bytes(spec, layers, shape).values())
    return int(total * FRAGMENTATION) + FIXED_OVERHEAD["cuda" if cuda else "cpu"]


def check_training_budget(spec, layers, shape: TrainShape, *, budget: int, cuda: bool) -> int:
    """The predicted peak; BudgetError with the smallest budget (batch 1, and LoRA if --full) when over."""
    need = predicted_peak(spec, layers, shape, cuda=cuda)
    if need <= budget:
        return need
    smallest = TrainShape(**{**shape.__dict__, "batch": 1})
    hints = [f"--batch-size 1 needs {fmt_bytes(predicted_peak(spec, layers, smallest, cuda=cuda))}"]
    if shape.full:
        lora = TrainShape(**{**smallest.__dict__, "full": False, "rank": 16})
        need_lora = predicted_peak(spec, layers, lora, cuda=cuda)
        hints.append(f"LoRA rank 16 (no --full) at batch 1 needs {fmt_bytes(need_lora)}")
    minimum = min(predicted_peak(spec, layers, s, cuda=cuda) for s in ([smallest] + ([lora] if shape.full else [])))
    bd = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in training_bytes(spec, layers, shape).items() if v)
    raise BudgetError(
        f"fine-tuning needs about {fmt_bytes(need)} ({bd}), over the {fmt_bytes(budget)} budget; "
        f"{'; '.join(hints)}; or a shorter --seq-len (try --memory-budget {math.ceil(need / 2**20)}MiB)",
        minimum_bytes=minimum)

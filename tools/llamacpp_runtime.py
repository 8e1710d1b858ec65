"""llama.cpp side of tools/bench_infer.py (--runtime llama.cpp): GGUF export, quantisation, timing.

A model directory is exported with `bonsai_lite.export.gguf.export_gguf` (f16), quantised with
llama.cpp's own quantiser (`llama_model_quantize`, as the `llama-quantize` tool) and timed through
llama-cpp-python: prompt processing = one `eval` of a prefill_len-token prompt from an empty cache;
generation = tokens/s of new_tokens single-token `eval`s after a prompt_len-token prompt. Medians
of --repeats runs after --warmup; the same threads for every model.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

QUANT_FTYPES = {"q8_0": 7, "q4_0": 2}  # llama_ftype values (llama.h: LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_0)


def make_ggufs(model_dir: Path, out_dir: Path, quants: list[str]) -> dict[str, Path]:
    """{quant: path} for "f16" (our exporter) and each llama.cpp quantisation of it."""
    import llama_cpp

    from bonsai_lite.export.gguf import export_gguf

    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / f"{model_dir.name}-f16.gguf"
    export_gguf(model_dir, f16, dtype="f16", tokenizer=False, overwrite=True)
    files = {"f16": f16}
    for q in quants:
        if q == "f16":
            continue
        dst = out_dir / f"{model_dir.name}-{q}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANT_FTYPES[q]
        with _stdout_to_stderr():  # the quantiser prints its log on stdout; stdout carries our JSON
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not quantise {f16} to {q}")
        files[q] = dst
    return files


@contextlib.contextmanager
def _stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def model_params(*, extra_bufts: bool = True):
    """Llama() objects built inside take llama.cpp's model defaults, with `use_extra_bufts` set as
    given. False keeps weights in plain CPU buffers: no AMX or repacked copies. llama-cpp-python's
    Llama() has no argument for it. On this VM the AMX kernel dies with SIGILL on `tileloadd`
    inside the Q8_0 matmul (gdb backtrace: ggml_backend_amx_mul_mat), though the CPU advertises
    amx_int8 and the kernel grants the tile permission."""
    import llama_cpp.llama as LL

    real = LL.llama_cpp.llama_model_default_params

    def params():
        p = real()
        p.use_extra_bufts = extra_bufts
        return p

    LL.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        LL.llama_cpp.llama_model_default_params = real


def measure_gguf(path: Path, *, vocab: int, prefill_len: int, prompt_len: int, new_tokens: int, threads: int,
                 warmup: int, repeats: int, seed: int, extra_bufts: bool = True) -> dict:
    import llama_cpp

    rng = np.random.default_rng(seed)
    prefill = rng.integers(0, vocab, prefill_len).tolist()
    prompt = rng.integers(0, vocab, prompt_len).tolist()
    gen = rng.integers(0, vocab, new_tokens).tolist()
    with model_params(extra_bufts=extra_bufts):
        llm = llama_cpp.Llama(str(path), n_ctx=max(prefill_len, prompt_len + new_tokens) + 8, n_batch=prefill_len,
                              n_ubatch=prefill_len, n_threads=threads, n_threads_batch=threads, verbose=False)

    # CPU seconds of the process (all threads) beside wall seconds: on a shared machine wall time
    # swings with other jobs, CPU time much less (it still counts cache misses caused by them).
    cpu: dict[str, list[float]] = {"pp": [], "tg": []}

    def pp() -> float:
        llm.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        llm.eval(prefill)
        cpu["pp"].append(time.process_time() - c0)
        return time.perf_counter() - t0

    def tg() -> float:
        llm.reset()
        llm.eval(prompt)
        t0, c0 = time.perf_counter(), time.process_time()
        for tok in gen:
            llm.eval([tok])
        cpu["tg"].append(time.process_time() - c0)
        return time.perf_counter() - t0

    try:
        for _ in range(warmup):
            pp(), tg()
        pps = [pp() for _ in range(repeats)]
        tgs = [tg() for _ in range(repeats)]
    finally:
        llm.close()
    p, t = statistics.median(pps), statistics.median(tgs)
    pc, tc = statistics.median(cpu["pp"][-repeats:]), statistics.median(cpu["tg"][-repeats:])
    return {"bytes": path.stat().st_size,
            "prompt": {"seconds": p, "tokens_per_s": prefill_len / p, "times": pps,
                       "cpu_seconds": pc, "tokens_per_cpu_s": prefill_len / pc},
            "generation": {"seconds": t, "tokens_per_s": new_tokens / t, "times": tgs,
                           "cpu_seconds": tc, "tokens_per_cpu_s": new_tokens / tc}}

"""Memory planner on real 7-8B shapes (config.json only, no weights): fits, refuses, monotone, precision."""
from __future__ import annotations

import json

import pytest
import torch

from bonsai_lite.errors import BudgetError
from bonsai_lite.search.machine import (
    cpu_bf16_factor, detect_machine, fmt_bytes, nominal_machine, parse_bytes, search_dtype,
)
from bonsai_lite.search.planner import Plan, Work, make_plan
from bonsai_lite.structure import load_spec

pytestmark = pytest.mark.unit

GB = 2**30
CONFIGS = {
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
        torch_dtype="bfloat16", tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
        hidden_act="silu", max_position_embeddings=8192),
    "mistral-7b": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
        torch_dtype="bfloat16", tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu",
        sliding_window=None, max_position_embeddings=32768),
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
        torch_dtype="bfloat16", tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu",
        use_sliding_window=False, max_position_embeddings=32768),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
        torch_dtype="bfloat16", tie_word_embeddings=True, rms_norm_eps=1e-5, hidden_act="silu"),
}
BIG = ["llama3-8b", "mistral-7b", "qwen2.5-7b"]
BUDGETS_GB = [8, 12, 16, 24]
WORKS = {"paper": Work(200, 32, 2048), "small": Work(32, 8, 2048)}


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    out = {}
    for name, cfg in CONFIGS.items():
        d = tmp_path_factory.mktemp(name)
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = load_spec(d)
    return out


def h100(budget: int):
    return nominal_machine(device="cuda", budget=budget, gpu_name="H100")


def test_shapes_are_the_real_models(specs):
    s = specs["llama3-8b"]
    assert (s.hidden, s.n_layers, s.n_heads, s.n_kv, s.intermediate, s.vocab) == (4096, 32, 32, 8, 14336, 128256)
    assert 7.9e9 < s.non_embedding_params() + s.embedding_params() < 8.1e9  # Llama-3-8B: 8.03B
    assert 7.1e9 < specs["mistral-7b"].non_embedding_params() + specs["mistral-7b"].embedding_params() < 7.3e9
    q = specs["qwen2.5-7b"]  # 7.61B with biases (ignored by block_params: a few hundred thousand)
    assert 7.5e9 < q.non_embedding_params() + q.embedding_params() < 7.7e9 and not q.tie_embeddings


@pytest.mark.parametrize("work", list(WORKS))
@pytest.mark.parametrize("model", BIG)
def test_fits_every_budget_and_is_monotone(specs, model, work):
    spec, w = specs[model], WORKS[work]
    weights = (spec.non_embedding_params() + spec.embedding_params()) * 2
    plans = []
    for gb in BUDGETS_GB:
        plan = make_plan(spec, spec.layers, w, h100(gb * GB))
        assert isinstance(plan, Plan)
        assert plan.predicted_peak_bytes <= gb * GB, plan.describe()
        assert plan.budget_bytes == gb * GB and plan.dtype == "bfloat16" and plan.predicted_seconds > 0
        assert 1 <= plan.tile_rows <= plan.group_rows <= w.rows
        if weights > gb * GB:  # the model does not fit: weights must stream
            assert plan.order != "resident", plan.describe()
        plans.append(plan)
    times = [p.predicted_seconds for p in plans]
    assert times == sorted(times, reverse=True), times  # a larger budget never predicts a slower plan


@pytest.mark.parametrize("model", BIG)
def test_monotone_on_a_fine_budget_grid(specs, model):
    spec = specs[model]
    times = [make_plan(spec, spec.layers, WORKS["small"], h100(int(gb * GB))).predicted_seconds
             for gb in (2, 3, 4, 6, 8, 10, 14, 20, 32, 48, 80)]
    assert times == sorted(times, reverse=True), times


@pytest.mark.parametrize("model", BIG)
def test_impossible_budget_names_the_minimum_and_the_minimum_works(specs, model):
    spec, w = specs[model], WORKS["paper"]
    with pytest.raises(BudgetError) as e:
        make_plan(spec, spec.layers, w, h100(1 * GB))
    need = e.value.minimum_bytes
    assert need is not None and need > 1 * GB
    msg = str(e.value)
    assert fmt_bytes(need) in msg and "--memory-budget" in msg
    suggested = msg.split("--memory-budget ")[1].split(",")[0]
    assert parse_bytes(suggested) >= need  # the suggestion itself is enough
    plan = make_plan(spec, spec.layers, w, h100(need))  # consistency: the minimum is sufficient...
    assert plan.predicted_peak_bytes <= need
    with pytest.raises(BudgetError):  # ...and really the minimum
        make_plan(spec, spec.layers, w, h100(need - 1))


def test_8bit_weights_lower_the_minimum_on_cuda(specs):
    spec, w = specs["llama3-8b"], WORKS["small"]
    with pytest.raises(BudgetError) as full:
        make_plan(spec, spec.layers, w, h100(GB))
    with pytest.raises(BudgetError) as eight:
        make_plan(spec, spec.layers, w, h100(GB // 2), allow_8bit=True)
    assert "8-bit" in str(full.value)
    assert eight.value.minimum_bytes < full.value.minimum_bytes
    plan = make_plan(spec, spec.layers, w, h100(eight.value.minimum_bytes), allow_8bit=True)
    assert plan.weights_8bit and plan.dtype == "bfloat16"


def test_cpu_machine_picks_float32_and_ignores_8bit(specs):
    spec = specs["smollm2-135m"]
    w = Work(8, 2, 128)
    for machine in (nominal_machine(device="cpu", budget=2 * GB), detect_machine(device="cpu", budget=2 * GB)):
        plan = make_plan(spec, spec.layers, w, machine, allow_8bit=True)
        assert plan.device == "cpu" and plan.dtype == "float32" and not plan.weights_8bit
        assert plan.predicted_peak_bytes <= 2 * GB
    assert make_plan(spec, spec.layers, w, h100(8 * GB)).dtype == "bfloat16"
    v100 = nominal_machine(device="cuda", budget=16 * GB, gpu_name="Tesla V100-SXM2-16GB")
    assert make_plan(spec, spec.layers, w, v100).dtype == "float16"


def test_cpu_bf16_factor_drives_the_time_model_and_the_search_dtype(specs):
    # The time model uses the machine's own bf16/fp32 GEMM ratio; auto picks bf16 for a CPU search
    # only where it is much faster (AMX) and the model is large (7-8B), never on a GPU (the planner's).
    from dataclasses import replace

    w = Work(8, 1, 128)
    cpu = nominal_machine(device="cpu", budget=8 * GB)
    big, small = specs["llama3-8b"], specs["smollm2-135m"]
    slow = make_plan(big, big.layers, w, replace(cpu, bf16_factor=0.5), dtype="bfloat16").predicted_seconds
    fast = make_plan(big, big.layers, w, replace(cpu, bf16_factor=5.0), dtype="bfloat16").predicted_seconds
    fp32 = make_plan(big, big.layers, w, cpu, dtype="float32").predicted_seconds
    assert fast < fp32 < slow
    assert search_dtype(replace(cpu, bf16_factor=5.0), big) == "bfloat16"
    assert search_dtype(replace(cpu, bf16_factor=5.0), small) is None  # 135M: float32, as benchmarked
    assert search_dtype(replace(cpu, bf16_factor=1.2), big) is None
    assert search_dtype(h100(8 * GB), big) is None
    assert cpu_bf16_factor() > 0 and detect_machine(device="cpu", budget=2 * GB).bf16_factor == cpu_bf16_factor()


def test_the_measured_gemm_rate_sets_the_cpu_time_model(specs, monkeypatch):
    # A probed CPU is planned from its own one-core GEMM rate per thread, so a machine twice as fast is
    # predicted (almost) twice as fast; the probe's rate is a real measurement.
    from bonsai_lite.search import machine

    rate, factor = machine.cpu_gemm_probe()
    assert rate > 1e9 and factor > 0
    spec, w = specs["llama3-8b"], Work(8, 1, 128)
    seconds = {}
    for probed in (50e9, 100e9):
        monkeypatch.setattr(machine, "cpu_gemm_probe", lambda probed=probed: (probed, 1.0))
        m = detect_machine(device="cpu", budget=8 * GB)
        assert m.flops == pytest.approx(probed * torch.get_num_threads())
        plan = make_plan(spec, spec.layers, w, m, dtype="float32")
        seconds[probed] = plan.breakdown["compute_s"]
    assert 1.8 < seconds[50e9] / seconds[100e9] <= 2.0


def test_flap_column_read_is_priced_at_the_disk_rate_unless_cached(specs):
    # ColumnNorms reads every o_proj and down_proj once: 32 x (4096^2 + 4096 x 14336) bf16 values at 8B.
    from dataclasses import replace

    from bonsai_lite.search.pass_costs import column_norm_seconds

    spec = specs["llama3-8b"]
    src = 32 * (4096 * 4096 + 4096 * 14336) * 2
    cpu = replace(nominal_machine(device="cpu", budget=8 * GB, host_ram=16 * GB), disk_bps=1e9)
    slow, fast = column_norm_seconds(spec, cpu), column_norm_seconds(spec, replace(cpu, disk_bps=2e9))
    assert slow - fast == pytest.approx(src / 2e9)
    fits = column_norm_seconds(spec, replace(cpu, page_cache=64 * GB))  # the 16 GB checkpoint fits
    assert fits < fast
    # in the page cache at the start (it does not fit the planner's share of RAM, but it is there)
    assert column_norm_seconds(spec, replace(cpu, cached=1.0)) == pytest.approx(fits)
    half = column_norm_seconds(spec, replace(cpu, cached=0.5))
    assert half == pytest.approx((slow + fits) / 2)
    taken = column_norm_seconds(spec, cpu, read=False)  # from the dense pass's weights: no read, no buffers
    assert 0 < taken < fits and taken == column_norm_seconds(spec, replace(cpu, disk_bps=2e9), read=False)


def test_describe_states_peak_and_time(specs):
    plan = make_plan(specs["smollm2-135m"], specs["smollm2-135m"].layers, WORKS["paper"], h100(8 * GB))
    text = plan.describe()
    assert fmt_bytes(plan.predicted_peak_bytes) in text and f"{plan.predicted_seconds:.1f} s" in text


def test_host_ram_and_disk_limits_are_reported(specs):
    spec = specs["llama3-8b"]
    starved = nominal_machine(device="cuda", budget=80 * GB, gpu_name="H100", host_ram=2**20, disk=2**20)
    with pytest.raises(BudgetError, match="host RAM"):
        make_plan(spec, spec.layers, WORKS["paper"], starved)


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * GB == parse_bytes("8 GiB") == parse_bytes("8g")
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1.5G") == int(1.5 * GB)
    assert parse_bytes(12345) == 12345 and parse_bytes("100") == 100
    with pytest.raises(BudgetError, match="8GB"):
        parse_bytes("lots")


def test_cold_read_rate_drives_the_weight_reads(specs):
    # Passes the page cache cannot serve read the whole checkpoint at the machine's cold rate, so
    # halving it doubles the weight-read time of every pass; when the checkpoint fits the cache only
    # the first (cold) read moves. The plan itself is fixed, so only the rate can change the figure.
    from dataclasses import replace

    from bonsai_lite.search.planner import candidate_cost

    big = specs["llama3-8b"]
    w = Work(8, 1, 128)
    src = 2 * (big.non_embedding_params() + big.vocab * big.hidden)  # bf16 blocks + LM head
    for cache_bytes in (0, 10**15):
        cpu = replace(nominal_machine(device="cpu", budget=8 * GB), page_cache=cache_bytes)
        kw = dict(dtype="float32", order="mask-group-major", cache="device", group_rows=4, tile_rows=4,
                  head_chunk=4096, prefetch=False, weights_8bit=False, src_bytes=2)
        slow = candidate_cost(big, big.layers, w, replace(cpu, disk_bps=0.5e9), **kw)[2]["weights_io_s"]
        fast = candidate_cost(big, big.layers, w, replace(cpu, disk_bps=1e9), **kw)[2]["weights_io_s"]
        cold_reads = 2 if cache_bytes == 0 else 1  # 8 rows in passes of 4
        assert slow - fast == pytest.approx(cold_reads * src * (1 / 0.5e9 - 1 / 1e9), rel=1e-3)
        # a checkpoint already in the page cache at the start: its first read is not a cold one
        warm = [candidate_cost(big, big.layers, w, replace(cpu, disk_bps=bps, cached=0.75), **kw)[2]["weights_io_s"]
                for bps in (0.5e9, 1e9)]
        assert warm[0] - warm[1] == pytest.approx((cold_reads - 0.75) * src * (1 / 0.5e9 - 1 / 1e9), rel=1e-3)


def test_a_slow_spell_during_the_probe_leaves_the_bf16_factor(monkeypatch):
    # A VM that halves its speed partway through the probe: timed one dtype after the other, the
    # bf16 calls all fell in the slow spell and the factor read 2.5 instead of 5. Alternating the
    # dtypes call by call gives both the fast calls, so the best of each keeps the true ratio.
    import time as time_module

    from bonsai_lite.search import machine

    clock = [0.0]
    cost = {torch.float32: 1e-3, torch.bfloat16: 2e-4}  # one core: bf16 five times faster

    def matmul(a, b, *, out):
        clock[0] += cost[a.dtype] * (2.0 if clock[0] > machine.PROBE_SECONDS / 3 else 1.0)
        return out

    monkeypatch.setattr(torch, "matmul", matmul)
    monkeypatch.setattr(time_module, "perf_counter", lambda: clock[0])
    machine.cpu_gemm_probe.cache_clear()
    try:
        rate, factor = machine.cpu_gemm_probe()
    finally:
        machine.cpu_gemm_probe.cache_clear()
    m, k, n = machine.PROBE_SHAPE
    assert rate == pytest.approx(2 * m * k * n / 1e-3)
    assert factor == pytest.approx(5.0)


def test_weight_handling_prices_the_loaders_copies(specs):
    # The loader reads each checkpoint tensor whole, copies the kept units out of a pruned projection
    # and casts what is not in the compute dtype (io/blocks.py). An unpruned bf16 model computed in
    # bf16 is only read; pruning the MLPs reads the same bytes and adds their sliced copies, so it
    # costs more weight handling per pass, not less (the planner once priced the kept bytes only,
    # and three copies of them whatever the dtypes).
    from dataclasses import replace

    from bonsai_lite.search import planner
    from bonsai_lite.search.planner import candidate_cost

    big = specs["llama3-8b"]
    cpu = replace(nominal_machine(device="cpu", budget=8 * GB), page_cache=10**15, cached=1.0, fresh_page_bps=2e9)
    kw = dict(order="mask-group-major", cache="device", group_rows=8, tile_rows=8, head_chunk=4096,
              prefetch=False, weights_8bit=False, src_bytes=2)
    w = Work(8, 1, 128)
    head = big.vocab * big.hidden
    src = 2 * (sum(big.block_params(s) for s in big.layers) + head)
    read = src / planner.MAPPED_BPS  # mapped from the page cache (Checkpoint.map): no read buffer

    def io(layers, dtype):
        return candidate_cost(big, layers, w, cpu, dtype=dtype, **kw)[2]["weights_io_s"]

    assert io(big.layers, "bfloat16") == pytest.approx(read, rel=1e-3)
    cast = 4 * (sum(big.block_params(s) for s in big.layers) + head)
    assert io(big.layers, "float32") == pytest.approx(
        read + cast / planner.HOST_COPY_BPS + cast / cpu.fresh_page_bps, rel=1e-3)
    halved = tuple(replace(s, mlp=s.mlp[: len(s.mlp) // 2]) for s in big.layers)
    sliced = 2 * 3 * big.hidden * (big.intermediate // 2) * len(halved)
    assert io(halved, "bfloat16") == pytest.approx(
        read + sliced / planner.HOST_COPY_BPS + sliced / cpu.fresh_page_bps, rel=1e-3)
    assert io(halved, "bfloat16") > io(big.layers, "bfloat16")


def test_a_probed_cpu_prices_fresh_pages_at_its_own_rate(specs, monkeypatch):
    # Every copy the loader makes is a fresh mapping (bound_host_allocator): the EPYC VM faults its
    # pages in at ~2.2 GB/s, the Xeon VM at ~3. detect_machine measures the rate, and the loader's
    # pages are priced at it: halving it adds the pass's fresh bytes (here the float32 casts of a
    # bf16 checkpoint) once more at the old rate.
    from bonsai_lite.search import machine
    from bonsai_lite.search.planner import candidate_cost

    assert 1e8 < machine.fresh_page_probe() < 1e12
    big = specs["llama3-8b"]
    kw = dict(dtype="float32", order="mask-group-major", cache="device", group_rows=8, tile_rows=8,
              head_chunk=4096, prefetch=False, weights_8bit=False, src_bytes=2)
    io = {}
    for rate in (1e9, 2e9):
        monkeypatch.setattr(machine, "fresh_page_probe", lambda rate=rate: rate)
        m = detect_machine(device="cpu", budget=8 * GB)
        assert m.fresh_page_bps == rate
        io[rate] = candidate_cost(big, big.layers, Work(8, 1, 128), m, **kw)[2]["weights_io_s"]
    cast = 4 * (sum(big.block_params(s) for s in big.layers) + big.vocab * big.hidden)
    assert io[1e9] - io[2e9] == pytest.approx(cast / 2e9, rel=1e-3)


def test_a_partly_cached_checkpoint_hides_only_the_disk_blocks_reads(specs):
    # A pass over a checkpoint larger than the page cache finds some blocks there and reads the rest
    # from disk. A block's read hides behind its neighbour's compute only, so the disk blocks' reads
    # cannot hide behind the cached blocks' compute: with a disk so slow that its half of the reads
    # outlasts the whole pass's compute, the pass takes those reads plus the cached half's compute
    # (the planner once predicted max(compute, reads), as if any read could hide anywhere).
    from dataclasses import replace

    from bonsai_lite.search.planner import candidate_cost

    big = specs["llama3-8b"]
    cpu = replace(nominal_machine(device="cpu", budget=8 * GB), page_cache=0, disk_bps=0.02e9, cached=0.5)
    kw = dict(dtype="bfloat16", order="layer-major", cache="device", group_rows=8, tile_rows=8, head_chunk=4096,
              weights_8bit=False, src_bytes=2)
    w = Work(8, 1, 128)
    src = 2 * (big.non_embedding_params() + big.vocab * big.hidden)
    _, overlapped, bd, _ = candidate_cost(big, big.layers, w, cpu, prefetch=True, **kw)
    _, serial, _, _ = candidate_cost(big, big.layers, w, cpu, prefetch=False, **kw)
    disk_half = 0.5 * src / cpu.disk_bps
    assert disk_half > bd["compute_s"]  # the case this test is about
    assert overlapped == pytest.approx(disk_half + 0.5 * (serial - bd["weights_io_s"]), rel=1e-3)
    assert overlapped < serial  # the cached half's reads still hide behind its compute


def test_a_slow_disk_never_gets_the_hidden_states_spilled_to_it(specs):
    # When every block is read from a slow disk every candidate waits on the disk, and the near-tie
    # rule (smallest peak) once chose to spill the hidden states to that same disk, whose writes and
    # reads compete with the weights'. An 8B-shaped pass on the 24 GB Xeon VM planned that way took
    # 25-29 s against 13-16 s for the device cache (docs/PERFORMANCE.md, twenty-ninth session).
    from dataclasses import replace

    big = specs["llama3-8b"]
    cpu = replace(nominal_machine(device="cpu", budget=8 * GB), flops=380e9, bf16_factor=4.8, fresh_page_bps=12e9,
                  page_cache=5 * GB, disk_bps=0.82e9, cached=0.0)
    plan = make_plan(big, big.layers, Work(8, 1, 128), cpu, dtype="bfloat16")
    assert plan.cache == "device", plan.describe()


def test_on_a_gpu_each_pass_pays_its_weight_copies(specs):
    # The loader queues its host-to-device copies on the compute stream and loads each pass's first
    # block and LM head in the main thread, so on a GPU every extra pass costs at least its copies,
    # however long the compute. The planner once priced passes as free whenever compute outweighed
    # the stream; the near-tie rule (smallest peak) then chose 4 passes of 64 rows where one pass of
    # 256 fitted, and an H200 ran that choice 1.2x slower (23.5 s against 19.3 s, docs/PERFORMANCE.md).
    from dataclasses import replace

    from bonsai_lite.search.planner import H2D_BPS, candidate_cost

    big = specs["llama3-8b"]
    w = Work(32, 8, 2048)
    kw = dict(dtype="bfloat16", cache="device", tile_rows=16, head_chunk=4096, prefetch=True, weights_8bit=False,
              src_bytes=2)
    gpu = replace(h100(12 * GB), cached=1.0)  # the checkpoint in the page cache: no pass waits on the disk
    _, one, _, _ = candidate_cost(big, big.layers, w, gpu, order="layer-major", group_rows=w.rows, **kw)
    _, four, _, _ = candidate_cost(big, big.layers, w, gpu, order="mask-group-major", group_rows=w.rows // 4, **kw)
    copies = 2 * (big.non_embedding_params() + big.vocab * big.hidden) / H2D_BPS["pinned"]
    assert four - one >= 3 * copies
    plan = make_plan(big, big.layers, w, gpu, dtype="bfloat16")
    assert plan.group_rows == w.rows, plan.describe()  # one pass fits in 12 GB: the weights stream once


def test_prune_estimates_plan_8bit_weights_when_allowed(specs):
    """`prune --allow-8bit` plans the run's passes with 8-bit weights allowed: some budgets too small
    for every 16-bit plan become runs, and allowing them never makes a run impossible."""
    from bonsai_lite.prune.presets import PRESETS, estimate

    spec, kw = specs["llama3-8b"], dict(method="bonsai", sparsity=0.5, regression="unit", allocation="prior")

    def fits(budget, allow):
        try:
            return estimate(spec, PRESETS["quick"], machine=h100(budget), allow_8bit=allow, **kw).seconds
        except BudgetError:
            return None

    budgets = [int(256 * 2**20 * 1.25**i) for i in range(14)]
    runs = [(b, fits(b, False), fits(b, True)) for b in budgets]
    assert all(eight is not None for _, full, eight in runs if full is not None)
    only_8bit = [b for b, full, eight in runs if full is None and eight is not None]
    assert only_8bit and runs[-1][1] is not None  # the grid spans both minimums

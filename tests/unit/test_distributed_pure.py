"""Pure pieces of the distributed run: share bounds, the message format, what ranks must agree on,
the model fingerprint."""
from __future__ import annotations

import shutil

import pytest
import torch

from bonsai_lite.errors import BonsaiError
from bonsai_lite.io.fingerprint import model_fingerprint
from bonsai_lite.prune.distributed import (
    Ranks, agreement_facts, from_env, host_budget_share, pack, shares, unpack,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (8, 3), (200, 8), (5, 1)])
def test_shares_cover_everything_once_and_evenly(n, world):
    b = shares(n, world)
    assert len(b) == world and b[0][0] == 0 and b[-1][1] == n
    assert all(b[r][1] == b[r + 1][0] for r in range(world - 1))
    sizes = [hi - lo for lo, hi in b]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


def test_messages_round_trip_without_pickle():
    masks = torch.rand(5, 7) > 0.5
    data = pack({"cmd": "eval", "first": 3, "layers": [{"heads": [0, 1]}]},
                {"masks": masks, "tokens": torch.arange(6).view(2, 3), "nll": torch.empty(0, dtype=torch.float64)})
    meta, t = unpack(data)
    assert meta == {"cmd": "eval", "first": 3, "layers": [{"heads": [0, 1]}]}
    assert torch.equal(t["masks"], masks) and t["tokens"].tolist() == [[0, 1, 2], [3, 4, 5]] and t["nll"].numel() == 0
    assert unpack(pack({"error": "x"})) == ({"error": "x"}, {})


def test_agreement_ignores_what_may_differ_per_rank():
    settings = {"model": "/a/m", "calib": {"text": "/a/c.txt", "samples": 4}, "search": {"seed": 1}, "device": "cuda",
                "dtype": None}
    a = agreement_facts(settings, model_fingerprint="f", device="cuda")
    other_node = {**settings, "model": "/b/m", "calib": {"text": "/b/c.txt", "samples": 4}}
    assert agreement_facts(other_node, model_fingerprint="f", device="cuda") == a
    assert agreement_facts({**settings, "search": {"seed": 2}}, model_fingerprint="f", device="cuda") != a
    assert agreement_facts(settings, model_fingerprint="g", device="cuda") != a
    assert agreement_facts(settings, model_fingerprint="f", device="cpu") != a


def test_from_env_single_process_and_bad_environments():
    assert from_env(device="cpu", environ={}) is None
    assert from_env(device="cpu", environ={"WORLD_SIZE": "1"}) is None
    with pytest.raises(BonsaiError, match="MASTER_ADDR"):
        from_env(device="cpu", environ={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "1"})
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(BonsaiError, match="cuda:LOCAL_RANK"):
        from_env(device="cuda:1", environ=env)
    with pytest.raises(BonsaiError, match="positive"):
        from_env(device="cpu", environ=env, timeout_s=0)


def test_model_fingerprint_sees_weights_not_paths(tiny_models, tmp_path):
    src = tiny_models["llama-gqa-tied"]
    copy = shutil.copytree(src, tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(src)
    shard = sorted(copy.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the data lies in the last sampled block
    shard.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(src)
    assert model_fingerprint(copy) != model_fingerprint(tiny_models["mistral-gqa"])


def test_cpu_ranks_on_one_machine_share_its_ram_by_default():
    ranks = Ranks(rank=1, world=4, local_rank=1, local_world=2, backend="gloo", timeout_s=1.0,
                  comm_device=torch.device("cpu"))
    assert host_budget_share(ranks, device="cpu", budget=None, default_budget=lambda: 1000) == 500
    assert host_budget_share(ranks, device="cpu", budget=300, default_budget=lambda: 1000) == 300  # given: kept
    assert host_budget_share(ranks, device="cuda", budget=None, default_budget=lambda: 1000) is None  # own GPU


def test_only_prune_runs_under_torchrun(monkeypatch, capsys, tmp_path):
    from bonsai_lite.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "t.txt"), "--seq-len", "4"]) == 2
    assert "only `prune` runs under torchrun (WORLD_SIZE=2)" in capsys.readouterr().err

"""--first-step: the share each iteration removes (`config.removal_schedule`)."""
import math

import pytest

from bonsai_lite.config import SearchConfig, removal_schedule
from bonsai_lite.errors import BonsaiError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("sparsity,p_iter", [(0.5, 0.05), (0.2, 0.05), (0.35, 0.05), (0.3, 0.1), (0.22, 0.05)])
def test_equal_steps_are_the_paper_s_to_the_last_bit(sparsity, p_iter):
    # what runs before --first-step computed: (i + 1) p_iter, capped at the sparsity
    old = [min(sparsity, (i + 1) * p_iter) for i in range(math.ceil(sparsity / p_iter - 1e-9))]
    assert list(removal_schedule(sparsity, p_iter)) == old
    assert SearchConfig(sparsity=sparsity, p_iter=p_iter).iterations == len(old)


def test_a_first_step_then_p_iter_steps():
    assert removal_schedule(0.5, 0.05, 0.2) == pytest.approx((0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5))
    assert removal_schedule(0.2, 0.05, 0.2) == (0.2,)
    assert removal_schedule(0.22, 0.05, 0.2) == pytest.approx((0.2, 0.22))
    s = SearchConfig(sparsity=0.35, p_iter=0.05, first_step=0.2)
    assert s.iterations == 4 and [round(s.step(i), 9) for i in range(4)] == [0.2, 0.05, 0.05, 0.05]
    assert sum(s.step(i) for i in range(s.iterations)) == pytest.approx(0.35)


@pytest.mark.parametrize("first", [-0.1, 0.6, 0.5])
def test_bad_first_steps_are_refused(first):
    with pytest.raises(BonsaiError, match="--first-step"):
        SearchConfig(sparsity=0.55, p_iter=0.05, first_step=first)


def test_runs_without_a_first_step_keep_their_resume_key():
    from bonsai_lite.config import CalibConfig, RunConfig

    cfg = RunConfig(model="m", out="o", calib=CalibConfig(text=None), search=SearchConfig())
    assert "first_step" not in cfg.resume_key()["search"]
    stepped = RunConfig(model="m", out="o", calib=CalibConfig(text=None), search=SearchConfig(first_step=0.2))
    assert stepped.resume_key()["search"]["first_step"] == 0.2


def test_runs_without_8bit_weights_keep_their_resume_key():
    from bonsai_lite.config import CalibConfig, RunConfig

    cfg = RunConfig(model="m", out="o", calib=CalibConfig(text=None), search=SearchConfig())
    assert "allow_8bit" not in cfg.resume_key()  # runs from before the setting resume
    assert RunConfig(model="m", out="o", calib=CalibConfig(text=None), search=SearchConfig(),
                     allow_8bit=True).resume_key()["allow_8bit"] is True  # 8-bit losses differ: a new run


def test_a_larger_step_gets_more_dense_pass_windows():
    # the priors' windows per parameter removed stay those of a p_iter step: 0.2 at p_iter 0.05 is 4x
    s = SearchConfig(sparsity=0.35, p_iter=0.05, first_step=0.2)
    assert [s.dense_scale(i) for i in range(s.iterations)] == [4, 1, 1, 1]
    assert SearchConfig(sparsity=0.35, p_iter=0.05, first_step=0.12).dense_scale(0) == 2  # rounded
    assert SearchConfig(sparsity=0.35, p_iter=0.05, first_step=0.02).dense_scale(0) == 1  # at least one
    assert [SearchConfig(sparsity=0.35, p_iter=0.05).dense_scale(i) for i in range(7)] == [1] * 7  # the paper's steps
    assert SearchConfig(method="flap", sparsity=0.35, p_iter=0.05, first_step=0.2).dense_scale(0) == 1  # one pass anyway


def test_prior_memory_needs_a_prior_on_one_scale_and_keeps_old_resume_keys():
    from bonsai_lite.config import CalibConfig, RunConfig

    with pytest.raises(BonsaiError, match="--prior-memory"):
        SearchConfig(prior="wanda", prior_memory=1.0)  # per-iteration scales: an average would mix them
    with pytest.raises(BonsaiError, match="--prior-memory"):
        SearchConfig(prior_memory=-1.0)
    cfg = RunConfig(model="m", out="o", calib=CalibConfig(text=None), search=SearchConfig(prior_memory=0))
    assert "prior_memory" not in cfg.resume_key()["search"]  # runs from before the setting resume
    on = RunConfig(model="m", out="o", calib=CalibConfig(text=None), search=SearchConfig(prior_memory=1.0))
    assert on.resume_key()["search"]["prior_memory"] == 1.0


def test_unit_positions_in_the_parent_layout_match_a_slot_lookup():
    import torch

    from bonsai_lite.structure import LayerStructure, positions_in_parent

    parent = (LayerStructure(heads=(0, 1, 2, 3), kv_of_head=(0, 0, 1, 1), mlp=tuple(range(6))),
              LayerStructure(heads=(1, 3), kv_of_head=(0, 1), mlp=(0, 2, 5, 7)))  # already cut once
    cut = (parent[0].keep(heads=torch.tensor([1, 0, 1, 1]), mlp=torch.tensor([0, 1, 1, 0, 0, 1])),
           parent[1].keep(heads=torch.tensor([0, 1]), mlp=torch.tensor([1, 0, 0, 1])))
    flat = [(l, kind, u) for l, s in enumerate(parent) for kind, units in (("h", s.heads), ("m", s.mlp)) for u in units]
    naive = [flat.index((l, kind, u)) for l, s in enumerate(cut) for kind, units in (("h", s.heads), ("m", s.mlp))
             for u in units]
    assert positions_in_parent(cut, parent).tolist() == naive


def test_prior_memory_auto_is_on_only_for_bonsai_ranking_by_flaps_prior_alone():
    from bonsai_lite.config import PRIOR_MEMORY_AUTO

    assert SearchConfig(regression="none").prior_memory == PRIOR_MEMORY_AUTO  # flap-parent, the default prior
    assert SearchConfig(regression="none", prior="flap-anchored").prior_memory == PRIOR_MEMORY_AUTO
    assert SearchConfig(regression="none", prior="wanda").prior_memory == 0  # a scale per iteration
    assert SearchConfig(regression="unit").prior_memory == 0  # not measured with the sub-models
    assert SearchConfig(method="flap").prior_memory == 0
    assert SearchConfig(regression="none", prior_memory=0).prior_memory == 0

"""The ENAS controller: its log-probabilities, its samples as supernet weights, REINFORCE."""

import math

import pytest
import torch
import torch.nn.functional as F

from oneshot import genotypes as G
from oneshot.controller import Controller, Reinforce
from oneshot.genotypes import GenotypeError, NB201Genotype
from oneshot.spaces import DartsSupernet, NB201Network

SPACES = ["nb201", "darts"]
NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


# Nets this small gain nothing from a second thread; on a busy 2-core machine the OpenMP
# hand-off made each forward ~50x slower (200 ms instead of 4 ms).
pytestmark = pytest.mark.usefixtures("one_thread")


def supernet(space, **kw):
    # 3 DARTS layers, not 2: with 2 both cells reduce and the normal weights would never run.
    return NB201Network(C=4, N=1, **kw) if space == "nb201" else DartsSupernet(C=4, layers=3, **kw)


def normalized(weights):
    return {
        t: [tuple(sorted(w)) if isinstance(w, tuple) else w for w in ws]
        for t, ws in weights.items()
    }


@pytest.mark.parametrize("space", SPACES)
def test_log_prob_is_the_sum_of_the_decisions_and_matches_teacher_forcing(space):
    ctrl = Controller.for_supernet(supernet(space))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        s = ctrl.sample(generator=g)
        steps = [F.log_softmax(d.logits, -1)[d.choice] for d in s.decisions]
        assert torch.allclose(s.log_prob, torch.stack(steps).sum(), atol=1e-5)
        ent = sum(
            -(F.softmax(d.logits, -1) * F.log_softmax(d.logits, -1)).sum() for d in s.decisions
        )
        assert torch.allclose(s.entropy, ent, atol=1e-5) and s.entropy > 0
        # tanh caps every logit at the tanh constant (2.5): no decision can become certain.
        assert all(d.logits.abs().max() <= 2.5 for d in s.decisions)
        for arch in (s, s.choices, s.decisions, s.genotype):
            assert torch.allclose(ctrl.log_prob_of(arch), s.log_prob, atol=1e-5)
    n = 6 if space == "nb201" else 2 * 4 * 4  # two inputs + two ops per node, 4 nodes, 2 cells
    assert len(s.decisions) == n
    (s.log_prob + s.entropy).backward()
    assert all(p.grad is not None for p in ctrl.parameters())


@pytest.mark.parametrize("space", SPACES)
def test_sample_weights_run_in_the_supernet_and_equal_weights_for_genotype(space):
    net = supernet(space)
    ctrl = Controller.for_supernet(net)
    g = torch.Generator().manual_seed(1)
    saw_same_input_twice = False
    for _ in range(4):
        s = ctrl.sample(generator=g)
        assert normalized(net.weights_for(s.genotype)) == normalized(s.weights)
        saw_same_input_twice |= any(isinstance(w, tuple) for ws in s.weights.values() for w in ws)
    assert net(torch.randn(2, 3, 8, 8), weights=s.weights).shape == (2, 10)
    if space == "darts":
        assert saw_same_input_twice  # the tuple form was exercised
        for t in net.cell_types:  # exactly two inputs per node: 2 * steps used edge slots
            assert sum(len(w) if isinstance(w, tuple) else w is not None for w in s.weights[t]) == 8


def test_darts_concat_follows_the_supernet_multiplier():
    net = DartsSupernet(C=4, layers=3, steps=3, multiplier=2)
    s = Controller.for_supernet(net).sample(generator=torch.Generator().manual_seed(0))
    assert s.genotype.normal_concat == (3, 4) and s.genotype.steps == 3
    assert normalized(net.weights_for(s.genotype)) == normalized(s.weights)
    assert net(torch.randn(2, 3, 8, 8), weights=s.weights).shape == (2, 10)


@pytest.mark.parametrize("space", SPACES)
def test_same_generator_seed_same_sample_and_global_rng_untouched(space):
    ctrl = Controller.for_supernet(supernet(space))
    state = torch.get_rng_state()
    a = ctrl.sample(generator=torch.Generator().manual_seed(7))
    b = ctrl(generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert (
        a.choices == b.choices and a.genotype == b.genotype and torch.equal(a.log_prob, b.log_prob)
    )
    others = {
        tuple(ctrl.sample(generator=torch.Generator().manual_seed(k)).choices) for k in range(5)
    }
    assert len(others) > 1


@pytest.mark.parametrize("space", SPACES)
def test_genotypes_round_trip_and_greedy_is_the_argmax(space):
    ctrl = Controller.for_supernet(supernet(space))
    g = torch.Generator().manual_seed(3)
    for s in [ctrl.sample(generator=g) for _ in range(3)] + [ctrl.most_likely()]:
        assert G.parse(str(s.genotype)) == s.genotype
    best = ctrl.most_likely()
    assert all(d.choice == int(d.logits.argmax()) for d in best.decisions)
    assert torch.allclose(ctrl.log_prob_of(best.genotype), best.log_prob, atol=1e-5)


def test_warm_started_edges_index_their_own_candidates():
    # After a warm start edges keep different ops; indices are into each edge's own tuple.
    cands = {"cell": [tuple(NB201_OPS[(e + k) % 5] for k in range(2)) for e in range(6)]}
    net = NB201Network(C=4, N=1, candidates=cands)
    ctrl = Controller.for_supernet(net)
    assert set(ctrl.op_names) == set(NB201_OPS)
    s = ctrl.sample(generator=torch.Generator().manual_seed(0))
    assert s.genotype.edge_ops == tuple(
        cands["cell"][e][i] for e, i in enumerate(s.weights["cell"])
    )
    not_there = NB201Genotype.from_edge_ops([cands["cell"][0][0]] * 6)  # edge 1 lacks "none"
    with pytest.raises(GenotypeError, match="not a candidate"):
        ctrl.log_prob_of(not_there)
    for wrong in ([0, 1], [0] * 7, [0, 0, 0, 0, 0, 2]):
        with pytest.raises(ValueError, match="do not fit"):
            ctrl.log_prob_of(wrong)


def test_reinforce_baseline_is_an_ema_buffer_and_the_loss_is_the_policy_gradient():
    ctrl = Controller.for_supernet(supernet("nb201"))
    rl = Reinforce(baseline_decay=0.9, entropy_weight=0.1)
    s = ctrl.sample(generator=torch.Generator().manual_seed(0))
    # The first reward initialises the baseline: zero advantage, only the entropy bonus.
    assert torch.allclose(rl.loss(s, 1.0), -0.1 * s.entropy)
    loss = rl.loss(s, torch.tensor(0.0))
    assert torch.allclose(loss, -(0.0 - 1.0) * s.log_prob - 0.1 * s.entropy)
    assert math.isclose(rl.baseline.item(), 0.9, rel_tol=1e-6)
    state = rl.state_dict()
    assert set(state) == {"baseline", "num_updates"} and state["num_updates"] == 2
    # ENAS' form: a gradient-free entropy bonus inside the reward.
    enas = Reinforce(baseline_decay=0.9, entropy_weight=0.1, entropy_in_reward=True)
    enas.load_state_dict(state)
    r = 0.5 + 0.1 * s.entropy.detach()
    assert torch.allclose(enas.loss(s, 0.5), -(r - 0.9) * s.log_prob)


def test_bandit_reinforce_finds_the_rewarded_architecture():
    """Reward 1 for one architecture, 0 for the rest: REINFORCE + Adam must find it.

    Two ops per edge (a warm-started NB201 space, 64 architectures) so that random sampling hits
    the target at all: with 5 ops the uniform policy meets it once in 15625 draws. With 5 ops the
    tanh constant 2.5 would also cap the target's probability at (e^2.5 / (e^2.5 + 4e^-2.5))^6 =
    0.85. Adam lr 1e-2 (not ENAS' 3.5e-4) and 4 samples per update (ENAS aggregates 10) keep it
    to ~100 updates; the probability is exact, exp(log_prob_of(target)).
    """
    cands = {"cell": [tuple(NB201_OPS[(e + k) % 5] for k in range(2)) for e in range(6)]}
    ctrl = Controller.for_supernet(NB201Network(C=4, N=1, candidates=cands))
    target = NB201Genotype.from_edge_ops([c[1] for c in cands["cell"]])
    rl, opt = Reinforce(), torch.optim.Adam(ctrl.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    entropy_before = ctrl.most_likely().entropy.item()
    assert math.isclose(ctrl.log_prob_of(target).exp().item(), 1 / 64, rel_tol=0.2)
    for _ in range(200):
        samples = [ctrl.sample(generator=g) for _ in range(4)]
        loss = sum(rl.loss(s, float(s.genotype == target)) for s in samples) / len(samples)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            if ctrl.log_prob_of(target).exp() > 0.9:
                break
    with torch.no_grad():
        assert ctrl.log_prob_of(target).exp() > 0.9
        assert ctrl.most_likely().genotype == target
        assert ctrl.most_likely().entropy.item() < entropy_before / 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("space", SPACES)
def test_cuda_controller_with_a_cpu_generator_draws_as_on_cpu(space):
    ctrl = Controller.for_supernet(supernet(space))
    on_cpu = ctrl.sample(generator=torch.Generator().manual_seed(5))
    ctrl, rl = ctrl.cuda(), Reinforce().cuda()
    on_gpu = ctrl.sample(generator=torch.Generator().manual_seed(5))
    assert on_gpu.choices == on_cpu.choices and on_gpu.log_prob.device.type == "cuda"
    assert torch.allclose(on_gpu.log_prob.cpu(), on_cpu.log_prob, atol=1e-4)
    rl.loss(on_gpu, torch.tensor(1.0)).backward()
    assert ctrl.most_likely().log_prob.device.type == "cuda"

"""The ENAS controller: an LSTM policy that samples an architecture one decision at a time.

Pham, Guan, Zoph, Le, Dean, "Efficient Neural Architecture Search via Parameter Sharing",
ICML 2018 (code: github.com/melodyguan/enas, ``src/cifar10/micro_controller.py``).

* NB201 space: one decision per edge, its op. The LSTM starts from a learned ``g_emb`` and is fed
  the embedding of each sampled op (ENAS' macro controller).
* DARTS space: per cell type (normal, then reduce, the LSTM state carrying over as in ENAS), per
  intermediate node: input 1, input 2, op 1, op 2 - the order of ENAS' code. Inputs are picked by
  ENAS' attention: every earlier node leaves an anchor (its LSTM output; zeros for the two cell
  inputs) and the logit of input ``j`` is ``v . tanh(W1 anchor_j + W2 h)``. Attention rather than a
  per-node linear head because it is what ENAS does and it needs no head per node count.
* A model space (``oneshot.spaces.model``, issue 15): one LSTM step per decision (a LayerChoice,
  an InputChoice or a Repeat), in the supernet's order, each with its own softmax head over its
  candidates and its own embedding of the choice, fed to the next step as in ENAS' macro search.

Logits pass through ``tanh_constant * tanh(logits / temperature)`` (Zoph & Le 2017, ENAS). Op
logits and op embeddings are keyed by op *name*, so after a warm start that leaves different ops
on different edges, "sep_conv_3x3" means the same unit everywhere.

``Reinforce`` is ENAS' update: an exponential-moving-average reward baseline and an entropy bonus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oneshot.arch import Arch
from oneshot.genotypes import DartsGenotype, GenotypeError, NB201Genotype
from oneshot.spaces.darts import DartsSupernet, cell_edges
from oneshot.spaces.model import ModelSpace
from oneshot.spaces.nb201 import EDGES as NB201_EDGES
from oneshot.spaces.nb201 import NB201Network


@dataclass
class Decision:
    """One sampled choice: ``logits`` after temperature and tanh, so ``log_softmax(logits)[choice]``
    is this decision's log-probability."""

    name: str  # "cell/2<-1/op", "normal/3/input0", "reduce/3/op1"
    logits: torch.Tensor
    choice: int


@dataclass
class Sample:
    """An architecture drawn from the controller.

    ``weights`` is what ``supernet(x, weights=...)`` takes: cell type -> one entry per edge (an op
    index into that edge's candidates, ``None`` for an unused DARTS edge, a tuple of two indices
    when both inputs of a node chose the same input). ``log_prob`` and ``entropy`` are sums over the
    decisions and carry gradients to the controller."""

    weights: dict[str, list]
    genotype: NB201Genotype | DartsGenotype
    log_prob: torch.Tensor
    entropy: torch.Tensor
    decisions: list[Decision]

    @property
    def choices(self) -> list[int]:
        return [d.choice for d in self.decisions]


class Controller(nn.Module):
    """ENAS policy over an NB201 or DARTS supernet's edges (see the module docstring).

    Defaults: ``hidden_size=100``, ``temperature=5.0``, ``tanh_constant=2.5`` as the paper states;
    the authors' CIFAR code (``main.py``, ``cifar10_micro_search.sh``) runs a 1-layer LSTM of 64
    units, tanh 1.1, ``op_tanh_reduce=2.5`` and no temperature. ``num_layers=1`` as there (their
    ``MicroController`` class default is 2). Not reproduced: that code's fixed bias towards its
    first two ops (its sep convs), which is tied to its op order."""

    def __init__(
        self,
        space: str,
        candidates: dict[str, list[tuple[str, ...]]],
        steps: int = 4,
        concat: tuple[int, ...] | None = None,
        hidden_size: int = 100,
        num_layers: int = 1,
        temperature: float | None = 5.0,
        tanh_constant: float | None = 2.5,
        op_tanh_reduce: float = 1.0,
        values: dict[str, list] | None = None,
    ):
        super().__init__()
        if space not in ("nb201", "darts", "model"):
            raise ValueError(f"unknown space {space!r}; the controller knows 'nb201', 'darts' and 'model'")
        self.space, self.steps = space, steps
        self.cell_types = {"nb201": ("cell",), "darts": ("normal", "reduce"), "model": tuple(candidates)}[space]
        # model: each decision's architecture value per candidate (``Arch`` values), and its kind
        self.values = {t: list(values[t]) for t in self.cell_types} if space == "model" else None
        self.kinds: dict[str, str] = {}  # model: label -> choice kind, for decision names
        self.candidates = {t: [tuple(c) for c in candidates[t]] for t in self.cell_types}
        self.concat = tuple(concat) if concat is not None else tuple(range(2, steps + 2))
        self.temperature, self.tanh_constant = temperature, tanh_constant
        self.op_tanh_reduce = op_tanh_reduce  # ENAS' CIFAR script softens op logits further: 2.5
        # One vocabulary of op names over all edges; `_op_ids[t][e]` maps edge e's tuple into it.
        ops = (op for t in self.cell_types for c in self.candidates[t] for op in c)
        self.op_names = tuple(dict.fromkeys(ops))
        vocab = {op: i for i, op in enumerate(self.op_names)}
        self._op_ids = {
            t: [[vocab[op] for op in c] for c in self.candidates[t]] for t in self.cell_types
        }
        self._edge_index = {edge: e for e, edge in enumerate(cell_edges(steps))}
        n_edges = {"nb201": len(NB201_EDGES), "darts": len(self._edge_index), "model": 1}[space]
        if any(len(self.candidates[t]) != n_edges for t in self.cell_types):
            raise ValueError(f"the {space} controller needs candidates for {n_edges} edges")

        H = hidden_size
        self.lstm = nn.ModuleList(nn.LSTMCell(H, H) for _ in range(num_layers))
        self.g_emb = nn.Parameter(torch.empty(1, H))  # the input of the first step of each node
        self.op_emb = nn.Embedding(len(self.op_names), H)
        self.op_head = nn.Linear(H, len(self.op_names))
        if space == "darts":
            self.w_attn_1 = nn.Linear(H, H, bias=False)
            self.w_attn_2 = nn.Linear(H, H, bias=False)
            self.v_attn = nn.Linear(H, 1, bias=False)
        if space == "model":  # per decision its own head and embedding (ModuleList: labels may hold dots)
            self.heads = nn.ModuleList(nn.Linear(H, len(self.candidates[t][0])) for t in self.cell_types)
            self.embeddings = nn.ModuleList(nn.Embedding(len(self.candidates[t][0]), H) for t in self.cell_types)
        for p in self.parameters():  # ENAS: every controller parameter ~ U[-0.1, 0.1]
            nn.init.uniform_(p, -0.1, 0.1)

    @classmethod
    def for_supernet(cls, supernet: nn.Module, **kwargs) -> Controller:
        """A controller for ``supernet``'s structure; DARTS concat follows the supernet's
        ``multiplier`` (the last nodes), so ``supernet.weights_for(sample.genotype)`` accepts it."""
        cands = {t: supernet.candidates[t] for t in supernet.cell_types}
        if isinstance(supernet, NB201Network):
            return cls("nb201", cands, **kwargs)
        if isinstance(supernet, DartsSupernet):
            s, m = supernet.steps, supernet.multiplier
            return cls("darts", cands, steps=s, concat=tuple(range(2 + s - m, s + 2)), **kwargs)
        if isinstance(supernet, ModelSpace):
            values = {t: [c.value_of(n) for n in c.names] for t, c in supernet.choices.items()}
            controller = cls("model", cands, values=values, **kwargs)
            controller.kinds = {t: c.kind for t, c in supernet.choices.items()}
            return controller
        raise ValueError(f"no ENAS controller for {type(supernet).__name__}: only NB201, DARTS and model spaces")

    # --- the three ways to walk the policy: sample, greedy, teacher-forced --------------------

    def forward(self, generator: torch.Generator | None = None) -> Sample:
        return self.sample(generator)

    def sample(self, generator: torch.Generator | None = None) -> Sample:
        """Draw an architecture. With ``generator`` every draw comes from it, so DDP ranks that
        seed equal generators (and hold equal controller weights) draw the same architecture. The
        draw happens on the generator's device, so a CPU generator works with a CUDA controller
        and gives the same architecture on any device."""

        def draw(_, logits):
            probs = torch.softmax(logits.detach(), dim=-1)
            if generator is not None:
                probs = probs.to(generator.device)
            return int(torch.multinomial(probs, 1, generator=generator))

        return self._rollout(draw)

    @torch.no_grad()
    def most_likely(self) -> Sample:
        """The greedy architecture: the argmax at every step (no gradients)."""
        return self._rollout(lambda _, logits: int(logits.argmax()))

    def log_prob_of(self, arch) -> torch.Tensor:
        """Log-probability of an architecture (a genotype, a ``Sample``, its decisions or its
        choices) under the current policy, teacher-forcing its choices through the LSTM."""
        if isinstance(arch, Sample):
            arch = arch.choices
        elif isinstance(arch, NB201Genotype | DartsGenotype | Arch):
            arch = self.choices_of(arch)
        choices = [d.choice if isinstance(d, Decision) else int(d) for d in arch]
        wrong = ValueError(f"choices {choices} do not fit this controller's decisions")

        def forced(k, logits):
            if k >= len(choices) or not 0 <= choices[k] < logits.numel():
                raise wrong
            return choices[k]

        sample = self._rollout(forced)
        if len(sample.decisions) != len(choices):
            raise wrong
        return sample.log_prob

    def choices_of(self, genotype) -> list[int]:
        """The decision sequence that produces ``genotype`` (its concat is not a decision)."""
        if self.space == "model":
            if not isinstance(genotype, Arch) or set(genotype) != set(self.cell_types):
                raise GenotypeError(f"{genotype} is not an architecture of this model (labels {', '.join(self.cell_types)})")
            norm = [sorted(v) if isinstance(v, list) else v for v in (genotype[t] for t in self.cell_types)]
            if any(v not in self.values[t] for t, v in zip(self.cell_types, norm)):
                raise GenotypeError(f"{genotype} names a value that is not a candidate of this model")
            return [self.values[t].index(v) for t, v in zip(self.cell_types, norm)]
        if self.space == "nb201":
            if not isinstance(genotype, NB201Genotype):
                raise GenotypeError(f"genotype {genotype} is not an NB201 genotype")
            return [self._op_index("cell", e, op) for e, op in enumerate(genotype.edge_ops)]
        if not isinstance(genotype, DartsGenotype) or genotype.steps != self.steps:
            raise GenotypeError(f"{genotype} is not a DARTS genotype with {self.steps} nodes")
        choices = []
        for t in self.cell_types:
            pairs = getattr(genotype, t)
            for k in range(self.steps):
                (op_a, a), (op_b, b) = pairs[2 * k], pairs[2 * k + 1]
                node = k + 2
                choices += [a, b, self._op_index(t, self._edge_index[(node, a)], op_a)]
                choices.append(self._op_index(t, self._edge_index[(node, b)], op_b))
        return choices

    def _op_index(self, t: str, e: int, op: str) -> int:
        ops = self.candidates[t][e]
        if op not in ops:
            raise GenotypeError(f"op {op!r} is not a candidate of {t} edge {e}: {ops}")
        return ops.index(op)

    # --- the rollout ----------------------------------------------------------------------------

    def _squash(self, logits: torch.Tensor, tanh_constant: float | None) -> torch.Tensor:
        # A high temperature then a bounded tanh keep early policies near uniform and stop any
        # single logit from running away: max prob of an op is bounded by the tanh constant.
        if self.temperature is not None:
            logits = logits / self.temperature
        if tanh_constant is not None:
            logits = tanh_constant * torch.tanh(logits)
        return logits

    def _rollout(self, choose) -> Sample:
        """Walk the decision sequence; ``choose(k, logits) -> int`` makes decision ``k``."""
        H = self.g_emb.shape[1]
        state = [(self.g_emb.new_zeros(1, H), self.g_emb.new_zeros(1, H)) for _ in self.lstm]
        decisions: list[Decision] = []
        op_tanh = None if self.tanh_constant is None else self.tanh_constant / self.op_tanh_reduce

        def step(x):
            for i, cell in enumerate(self.lstm):
                state[i] = cell(x, state[i])
                x = state[i][0]
            return x

        def decide(name, logits, tanh_constant):
            logits = self._squash(logits.reshape(-1), tanh_constant)
            decisions.append(Decision(name, logits, choose(len(decisions), logits)))
            return decisions[-1].choice

        def decide_op(t, e, h, name):
            ids = self._op_ids[t][e]
            i = decide(name, self.op_head(h)[0, ids], op_tanh)
            return i, self.op_emb.weight[ids[i]].unsqueeze(0)

        weights, genotype = {}, {}
        x = self.g_emb
        for k, t in enumerate(self.cell_types):
            if self.space == "model":  # one step per decision, its own head and embedding
                i = decide(f"{t}/{self.kinds.get(t, 'choice')}", self.heads[k](step(x)), op_tanh)
                weights[t], genotype[t] = [i], self.values[t][i]
                x = self.embeddings[k].weight[i].unsqueeze(0)
                continue
            if self.space == "nb201":
                ops = []
                for e, (target, source) in enumerate(NB201_EDGES):
                    i, x = decide_op(t, e, step(x), f"{t}/{target}<-{source}/op")
                    ops.append(i)
                weights[t] = ops
                names = [c[i] for c, i in zip(self.candidates[t], ops)]
                genotype[t] = NB201Genotype.from_edge_ops(names)
                continue
            # DARTS: anchors of the two cell inputs are zeros, their keys come from two LSTM steps.
            anchors, keys = [], []
            for _ in range(2):
                h = step(self.g_emb)
                anchors.append(torch.zeros_like(h))
                keys.append(self.w_attn_1(h))
            entries: list = [None] * len(self._edge_index)
            pairs = []
            for node in range(2, self.steps + 2):
                x, inputs = self.g_emb, []
                for k in range(2):
                    query = torch.tanh(torch.cat(keys) + self.w_attn_2(step(x)))  # [node, H]
                    j = decide(f"{t}/{node}/input{k}", self.v_attn(query), self.tanh_constant)
                    inputs.append(j)
                    x = anchors[j]
                for k, j in enumerate(inputs):
                    e = self._edge_index[(node, j)]
                    i, x = decide_op(t, e, step(x), f"{t}/{node}/op{k}")
                    pairs.append((self.candidates[t][e][i], j))
                    # The same input twice: the mixed op sums both ops (a tuple entry).
                    entries[e] = i if entries[e] is None else (entries[e], i)
                h = step(x)  # the node's anchor: the LSTM output after its last op
                anchors.append(h)
                keys.append(self.w_attn_1(h))
            weights[t], genotype[t] = entries, tuple(pairs)

        if self.space == "darts":
            g = DartsGenotype(genotype["normal"], self.concat, genotype["reduce"], self.concat)
        elif self.space == "model":
            g = Arch(genotype)
        else:
            g = genotype["cell"]
        logits = [d.logits for d in decisions]
        log_prob = sum(F.log_softmax(lg, -1)[d.choice] for lg, d in zip(logits, decisions))
        entropy = sum(-(F.softmax(lg, -1) * F.log_softmax(lg, -1)).sum() for lg in logits)
        return Sample(weights, g, log_prob, entropy, decisions)


class Reinforce(nn.Module):
    """ENAS' REINFORCE update (Williams 1992), to be stepped with Adam on the controller.

    ``loss = -(reward - baseline) * log_prob - entropy_weight * entropy`` with the baseline an
    exponential moving average of the rewards, kept as a buffer so checkpoints restore it.
    Defaults from the authors' CIFAR code: ``baseline_decay=0.99`` (``controller_bl_dec``),
    ``entropy_weight=1e-4``. Adam lr: the paper says 3.5e-4 (the authors' CIFAR micro script 3.5e-3).

    Two deliberate differences from ENAS' code, both documented choices:

    * the advantage uses the baseline *before* this reward enters it (unbiased; ENAS updates first,
      which only scales the advantage by ``decay``), and the first reward initialises the baseline
      instead of 0, so the first updates do not reward whatever was sampled;
    * the entropy is a differentiable bonus in the loss (the exact entropy gradient). ENAS instead
      adds ``entropy_weight * entropy`` (no gradient) to the reward: ``entropy_in_reward=True``.

    Under DDP, all-reduce the reward (e.g. the mean validation accuracy) before calling, so every
    rank updates the same baseline.
    """

    def __init__(self, baseline_decay=0.99, entropy_weight=1e-4, entropy_in_reward=False):
        super().__init__()
        self.baseline_decay, self.entropy_weight = baseline_decay, entropy_weight
        self.entropy_in_reward = entropy_in_reward
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def loss(self, sample: Sample, reward) -> torch.Tensor:
        """The policy-gradient loss of one sample; updates the baseline with ``reward``."""
        reward = torch.as_tensor(reward, dtype=self.baseline.dtype, device=self.baseline.device)
        reward = reward.detach()
        if self.entropy_in_reward:
            reward = reward + self.entropy_weight * sample.entropy.detach().to(reward.device)
        with torch.no_grad():
            if self.num_updates == 0:
                self.baseline.copy_(reward)
            advantage = reward - self.baseline
            self.baseline.mul_(self.baseline_decay).add_((1 - self.baseline_decay) * reward)
            self.num_updates += 1
        loss = -advantage.to(sample.log_prob.device) * sample.log_prob
        if not self.entropy_in_reward:
            loss = loss - self.entropy_weight * sample.entropy
        return loss

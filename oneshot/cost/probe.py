"""Every candidate of a space in its place, and the fixed part around them.

A probe runs the network once at batch 1 with every candidate computed (the softmax mixture)
and records, by forward hooks on the choices, what each candidate receives. A candidate's cost
is then the cost of that candidate module alone on that input; the fixed part's cost is that of
the network with every choice replaced by a module that returns the recorded output and computes
nothing (``_Const``). The candidates are in the form the deployed network has them:

* NB201: the benchmark's discrete network (affine BN, ReLU-Conv-BN), at the retrained sizes;
* DARTS: the evaluation network's ops (``make_op(op, C, C, stride, affine=True)``), which differ
  from the supernet's (no affine BN there, an extra BN after pools); input shapes from a supernet
  of the evaluation sizes built on the meta device (shapes only, no memory);
* model spaces: the user's candidate modules themselves, as ``oneshot.fix`` keeps them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from oneshot.ops import make_op


class _Const(nn.Module):
    """A choice's stand-in in the fixed part: returns the recorded output, computes nothing."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out


class _SumInputs(nn.Module):
    """An InputChoice candidate: the sum of the chosen inputs."""

    def __init__(self, chosen):
        super().__init__()
        self.chosen = list(chosen)

    def forward(self, inputs):
        out = inputs[self.chosen[0]]
        for i in self.chosen[1:]:
            out = out + inputs[i]
        return out


class _Call(nn.Module):
    """``module(x, *extra)``: a network whose forward needs fixed extra arguments."""

    def __init__(self, module, *extra):
        super().__init__()
        self.module, self.extra = module, extra

    def forward(self, x):
        return self.module(x, *self.extra)


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, list | tuple):
        return type(obj)(_detached(o) for o in obj)
    return obj


def shapes_of(obj):
    if isinstance(obj, torch.Tensor):
        return list(obj.shape)
    if isinstance(obj, list | tuple):
        return [shapes_of(o) for o in obj]
    return repr(obj)


@dataclass
class Entry:
    """One candidate instance: ``module(*inputs)`` at batch 1 (inputs recorded in the probe)."""

    module: nn.Module
    inputs: tuple

    @property
    def key(self) -> str:
        """Equal modules on equal shapes cost the same: measured once (NB201's cells of a stage)."""
        return f"{self.module!r}@{shapes_of(self.inputs)}"


@dataclass
class Probe:
    space: str
    candidates: dict[str, list[tuple[str, ...]]]
    entries: dict[tuple[str, int, int], list[Entry]]
    fixed: nn.Module
    fixed_inputs: tuple
    meta: dict = field(default_factory=dict)


def _capture(modules, run):
    """Inputs and outputs of ``modules`` during ``run()`` (no grad): ``{id: (args, output)}``."""
    seen, hooks = {}, []
    for m in modules:

        def hook(mod, args, out):
            seen.setdefault(id(mod), (_detached(args), _detached(out)))

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _node_tensor(arg):
    return arg.x if hasattr(arg, "x") and not isinstance(arg, torch.Tensor) else arg


def probe_nb201(supernet, input_shape, network, num_classes) -> Probe:
    from oneshot.mixed import MixedOp
    from oneshot.spaces.nb201 import EDGES, NB201Cell, NB201Network

    C, N = network.get("C", supernet.C), network.get("N", supernet.N)
    net = NB201Network(C=C, N=N, num_classes=num_classes, in_channels=input_shape[0], image_size=input_shape[1],
                       candidates=supernet.candidates, affine=True, search=True).eval()  # fmt: skip
    x = torch.randn(1, *input_shape)
    mixed = [m for m in net.modules() if isinstance(m, MixedOp)]
    seen = _capture(mixed, lambda: net(x))
    entries: dict = {}
    fixed = copy.deepcopy(net)
    cells = [(c, fc) for c, fc in zip(net.cells, fixed.cells) if isinstance(c, NB201Cell)]
    for cell, fixed_cell in cells:
        for e, op in enumerate(cell.edges):
            args, out = seen[id(op)]
            node_x = _node_tensor(args[0])
            for k, candidate in enumerate(op.ops):
                entries.setdefault(("cell", e, k), []).append(Entry(candidate, (node_x,)))
            fixed_cell.edges[e] = _Const(torch.zeros_like(out))
    fixed.alphas = nn.ParameterDict()  # architecture parameters are not part of the network
    fixed = _Call(fixed, {"cell": [0] * len(EDGES)})
    return Probe("nb201", supernet.candidates, entries, fixed.eval(), (x,), {"C": C, "N": N})


def darts_sizes(supernet, network) -> tuple[int, int]:
    stem_c = supernet.stem[0].out_channels // 3
    return int(network.get("C", stem_c)), int(network.get("layers", len(supernet.cells)))


def first_genotype(candidates, steps: int, multiplier: int):
    """A valid DARTS genotype (inputs 0 and 1 of every node, their first non-``none`` op)."""
    from oneshot.genotypes import DartsGenotype

    def cell(cands):
        pairs, start = [], 0
        for node in range(steps):
            for j in (0, 1):
                pairs.append((next(n for n in cands[start + j] if n != "none"), j))
            start += node + 2
        return tuple(pairs)

    concat = tuple(range(2 + steps - multiplier, steps + 2))
    return DartsGenotype(cell(candidates["normal"]), concat, cell(candidates["reduce"]), concat)


def probe_darts(supernet, input_shape, network, num_classes) -> Probe:
    from oneshot.mixed import MixedOp
    from oneshot.spaces.darts import DartsNetwork, DartsSupernet

    C, layers = darts_sizes(supernet, network)
    steps, multiplier = supernet.steps, supernet.multiplier
    if True:  # input shapes only (batch 1, no grad; the meta device is slower here)
        shaped = DartsSupernet(C=C, layers=layers, num_classes=num_classes, in_channels=input_shape[0],
                               image_size=input_shape[1], steps=steps, multiplier=multiplier,
                               candidates=supernet.candidates, edge_normalization=False)  # fmt: skip
        x_meta = torch.zeros(1, *input_shape)
    seen = _capture([m for m in shaped.modules() if isinstance(m, MixedOp)], lambda: shaped(x_meta))
    entries, made = {}, {}
    for cell in shaped.cells:
        t = "reduce" if cell.reduction else "normal"
        for e, op in enumerate(cell.edges):
            shape = tuple(_node_tensor(seen[id(op)][0][0]).shape)
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            for k, name in enumerate(op.candidates):
                key = (name, shape, op.stride)
                if key not in made:  # cells of a stage share shapes: one module, one input
                    made[key] = (make_op(name, shape[1], shape[1], op.stride, True).eval(), x)
                module, x_k = made[key]
                entries.setdefault((t, e, k), []).append(Entry(module, (x_k,)))
    genotype = first_genotype(supernet.candidates, steps, multiplier)
    net = DartsNetwork(genotype, C=C, layers=layers, num_classes=num_classes, in_channels=input_shape[0],
                       image_size=input_shape[1], auxiliary=False).eval()  # fmt: skip
    x = torch.randn(1, *input_shape)
    ops = [op for cell in net.cells for op in cell.ops]
    seen = _capture(ops, lambda: net(x))
    for cell in net.cells:
        for k, op in enumerate(cell.ops):
            cell.ops[k] = _Const(torch.zeros_like(seen[id(op)][1]))
    meta = {"C": C, "layers": layers, "steps": steps, "multiplier": multiplier}
    return Probe("darts", supernet.candidates, entries, net, (x,), meta)


def probe_model(supernet, input_shape, network, num_classes) -> Probe:
    from oneshot.nn import InputChoice, LayerChoice, Repeat, choices_of

    space = copy.deepcopy(supernet).cpu().float().eval()
    if getattr(supernet, "partial_channels", 1) > 1:
        # PC-DARTS builds factory candidates at C/K; the deployed network (what a cost is of) at C.
        if supernet.model_config is None:
            raise ValueError("cost: a PC-DARTS model space built from a module has no full-width candidates to "
                             "measure; give space.model as a config, or space.supernet.partial_channels=1")  # fmt: skip
        from oneshot.spaces.model import ModelSpace

        head = supernet.model_config
        space = ModelSpace(head, num_classes=num_classes, in_channels=input_shape[0], image_size=input_shape[-1],
                           candidates=supernet.candidates, check_shapes=False).eval()  # fmt: skip
    found = choices_of(space.model)
    paths = [p for p, _ in found]
    for p in paths:
        outer = next((q for q in paths if q != p and p.startswith(q + ".")), None)
        if outer is not None:
            raise ValueError(f"cost: choice {p!r} sits inside choice {outer!r}; the additive cost model needs "
                             "choices that do not nest (write the inner choice's candidates out in the outer one)")  # fmt: skip
    blocks = [b for _, c in found if isinstance(c, Repeat) for b in c._modules.values()]
    x = torch.randn(1, *input_shape)
    seen = _capture([c for _, c in found] + blocks, lambda: space(x))
    entries: dict = {}
    for _, choice in found:
        label = choice.label
        args, out = seen[id(choice)]
        for k, name in enumerate(choice.names):
            if isinstance(choice, LayerChoice):
                todo = [Entry(choice._modules[name], args)]
            elif isinstance(choice, InputChoice):
                todo = [Entry(_SumInputs(choice.value_of(name)), args)]
            else:  # Repeat: depth d runs the first d blocks
                todo = [
                    Entry(choice._modules[str(i)], seen[id(choice._modules[str(i)])][0])
                    for i in range(int(name))
                ]
            entries.setdefault((label, 0, k), []).extend(todo)
    fixed = copy.deepcopy(space.model)
    for path, choice in found:
        parent, _, child = path.rpartition(".")
        holder = fixed.get_submodule(parent) if parent else fixed
        holder._modules[child] = _Const(torch.zeros_like(seen[id(choice)][1]))
    kinds = {choice.label: choice.kind for _, choice in found}
    return Probe("model", supernet.candidates, entries, fixed.eval(), (x,), {"kinds": kinds})


def probe_space(supernet, input_shape, network=None, num_classes=None) -> Probe:
    """The probe of any registered space (``network``: the deployed sizes, e.g. ``{"C": 16, "N": 5}``)."""
    from oneshot.spaces import DartsSupernet, ModelSpace, NB201Network

    network = {k: v for k, v in dict(network or {}).items() if k in ("C", "N", "layers")}
    if num_classes is None:
        head = getattr(supernet, "classifier", None)
        num_classes = head.out_features if isinstance(head, nn.Linear) else None
    probes = {NB201Network: probe_nb201, DartsSupernet: probe_darts, ModelSpace: probe_model}
    for cls, probe in probes.items():
        if isinstance(supernet, cls):
            out = probe(supernet, tuple(input_shape), network, num_classes)
            out.meta["num_classes"] = num_classes
            return out
    raise ValueError(f"cost: no cost model for a {type(supernet).__name__}; valid: NB201Network, DartsSupernet, "
                     "ModelSpace (space=nb201|darts|model|mobilenet)")  # fmt: skip


def network_of(supernet, genotype, cost) -> nn.Module:
    """The deployed network of ``genotype`` at the sizes ``cost`` was built for (eval mode; the
    DARTS evaluation network without its auxiliary head, which only training uses)."""
    meta = cost.meta
    sizes = {"num_classes": meta["num_classes"], "in_channels": meta["input_shape"][0],
             "image_size": meta["input_shape"][1]}  # fmt: skip
    if cost.space == "nb201":
        from oneshot.spaces.nb201 import nb201_network

        return nb201_network(genotype, C=meta["C"], N=meta["N"], **sizes).eval()
    if cost.space == "darts":
        from oneshot.spaces.darts import DartsNetwork

        return DartsNetwork(
            genotype, C=meta["C"], layers=meta["layers"], auxiliary=False, **sizes
        ).eval()
    from oneshot.spaces.model import fix

    return fix(supernet, genotype).eval()

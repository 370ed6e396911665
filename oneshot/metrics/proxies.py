"""Zero-cost proxies: score an untrained network from one batch, ``f(model, inputs, targets=None)``.

Each proxy follows its authors' reference code, named in its docstring; where that code does
something unexpected we keep it and say so. All of them, like ``ntk_condition_number``:

* work on a **copy** re-initialised from ``seed`` (``init``: ``"default"`` is PyTorch's own
  initialisation, the one every reference below scores NAS-Bench-201 with; ``"fan_in"`` /
  ``"fan_out"`` TE-NAS' Kaiming normal; ``"gaussian"`` Zen-NAS' N(0, 1); ``None`` keeps the
  model's weights), so the model passed in is never changed;
* run the copy in **train mode** (BatchNorm normalises with the batch's statistics), as the
  references do;
* take ``forward_kwargs`` for the model's forward (a supernet's ``{"weights": masks}``);
* average over ``num_inits`` seeded initialisations (1 by default, as the references).

Higher is better for every proxy here (``HIGHER_IS_BETTER``); of TE-NAS' two indicators the
NTK condition number is the one where lower is better. Loss-based proxies (``snip``, ``grasp``,
``fisher``, ``grad_norm``) need ``targets`` and use cross-entropy, as zero-cost-nas does.

References: Abdelfattah et al., "Zero-Cost Proxies for Lightweight NAS", ICLR 2021
(github.com/SamsungLabs/zero-cost-nas, ``foresight/pruners/measures/*.py``); Mellor et al.,
"Neural Architecture Search without Training", ICML 2021 (github.com/BayesWatch/
nas-without-training, ``score_networks.py``); Lin et al., "Zen-NAS", ICCV 2021
(github.com/idstcv/ZenNAS, ``ZeroShotProxy/compute_zen_score.py``).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from oneshot.metrics.ntk import reinit_
from oneshot.mixed import NodeInput

WEIGHTED = (nn.Conv2d, nn.Linear)  # the layers zero-cost-nas scores (``get_layer_metric_array``)
LOSS_PROXIES = ("snip", "grasp", "fisher", "grad_norm")


# --- shared plumbing ---------------------------------------------------------------------------


def _arch_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.arch_parameters()} if hasattr(model, "arch_parameters") else set()


def reinit_copy(model: nn.Module, init: str | None, seed: int, device=None) -> nn.Module:
    """A deep copy of ``model`` initialised by ``init`` from ``seed`` (see the module docstring),
    in train mode. The global RNG is left as it was."""
    net = copy.deepcopy(model)
    if init is None:
        return net.train()
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    if init == "default":
        # PyTorch's own initialisation, as freshly built, but seeded: every module's
        # reset_parameters(), but a supernet's own (it may reset architecture parameters).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in net.modules():
                if hasattr(m, "reset_parameters") and not hasattr(m, "arch_parameters"):
                    m.reset_parameters()
    elif init in ("fan_in", "fan_out"):
        reinit_(net, init, generator)
    elif init == "gaussian":  # Zen-NAS' network_weight_gaussian_init
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, WEIGHTED):
                    nn.init.normal_(m.weight, generator=generator)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.affine:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
    else:
        raise ValueError(
            f"unknown init {init!r}; valid: 'default', 'fan_in', 'fan_out', 'gaussian', None"
        )
    return net.train()


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # DARTS' (logits, auxiliary) in train mode


def _weighted_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, WEIGHTED)]


def _averaged(fn, model, inputs, targets, num_inits, seed, init, **kw) -> float:
    if num_inits < 1:
        raise ValueError(f"num_inits must be >= 1, got {num_inits}")
    values = [
        fn(reinit_copy(model, init, seed + i, inputs.device), inputs, targets, **kw)
        for i in range(num_inits)
    ]
    return sum(values) / len(values)


def _need_targets(name: str, targets) -> None:
    if targets is None:
        raise ValueError(f"{name} is a loss-based proxy: it needs the batch's targets (labels)")


# --- NASWOT -------------------------------------------------------------------------------------


@contextlib.contextmanager
def unshared_relus():
    """Every op runs its own ReLU while active. Our supernets and cells compute a node's ReLU
    once for all the ops leaving it (``oneshot.mixed.NodeInput``); the benchmark's network, the
    one NASWOT's reference hooks, has one ReLU per op, each adding the node's pattern to K."""
    shared = NodeInput.relu

    def own(self, module):
        return torch.relu(self.x) if getattr(module, "inplace", False) else module(self.x)

    NodeInput.relu = own
    try:
        yield
    finally:
        NodeInput.relu = shared


def naswot_kernel(net: nn.Module, inputs: torch.Tensor, forward_kwargs=None) -> torch.Tensor:
    """NASWOT's ``K_H`` (float64, N x N): for every ReLU the forward runs, with binary codes
    ``c = (relu input > 0)`` per sample, ``K += c c^T + (1 - c)(1 - c)^T``: the number of units
    on which two samples agree (``N_A`` minus their Hamming distance), summed over the ReLUs.
    As the reference, "a ReLU" is any module whose type name contains ``ReLU``: NB201's
    ``ReLUConvBN`` sees the same input as its inner ReLU, so each such op counts twice."""
    n = inputs.shape[0]
    K = torch.zeros(n, n, dtype=torch.float64, device=inputs.device)

    def count(module, args, output):
        nonlocal K
        c = (args[0].reshape(n, -1) > 0).to(torch.float32)  # 0/1 sums are exact to 2^24 units
        # c c^T + (1 - c)(1 - c)^T = 2 c c^T - s_i - s_j + units, s = c's row sums: one matmul
        s = c.sum(1, dtype=torch.float64)
        K = K + 2 * (c @ c.T).double() - s[:, None] - s[None, :] + c.shape[1]

    hooks = [m.register_forward_hook(count) for m in net.modules() if "ReLU" in type(m).__name__]
    try:
        with torch.no_grad(), unshared_relus():
            net(inputs, **(forward_kwargs or {}))
    finally:
        for h in hooks:
            h.remove()
    return K


def _naswot(net, inputs, targets, forward_kwargs=None) -> float:
    return float(torch.linalg.slogdet(naswot_kernel(net, inputs, forward_kwargs)).logabsdet)


def naswot(model, inputs, targets=None, *, seed=0, init="default", num_inits=1, forward_kwargs=None) -> float:  # fmt: skip
    """NASWOT (Mellor et al., ICML 2021; ``score_networks.py``, score ``hook_logdet``):
    ``log |det K_H|`` of the ReLU-pattern kernel over the batch (``naswot_kernel``; 128 images
    on NAS-Bench-201 in the paper). Higher is better: inputs the network tells apart get
    distinct codes. The reference counts only ReLUs a prior backward reached; with NB201's
    ``none`` written as ``x * 0`` that is every ReLU the forward runs, which we count.
    ``-inf`` for a singular kernel (two inputs with the same code everywhere)."""
    return _averaged(_naswot, model, inputs, targets, num_inits, seed, init, forward_kwargs=forward_kwargs)  # fmt: skip


# --- synflow ------------------------------------------------------------------------------------


def _without_batchnorm(net: nn.Module) -> nn.Module:
    """Every BatchNorm replaced by the identity (zero-cost-nas scores synflow with ``bn=False``)."""
    for name, child in list(net.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(net, name, nn.Identity())
        else:
            _without_batchnorm(child)
    return net


def _synflow(net, inputs, targets, forward_kwargs=None) -> float:
    net = _without_batchnorm(net).double()
    arch = _arch_ids(net)
    with torch.no_grad():
        for p in net.parameters():
            if id(p) not in arch:
                p.abs_()
    ones = torch.ones((1, *inputs.shape[1:]), dtype=torch.float64, device=inputs.device)
    layers = _weighted_layers(net)
    weights = [m.weight for m in layers]
    out = _logits(net(ones, **(forward_kwargs or {}))).sum()
    grads = torch.autograd.grad(out, weights, allow_unused=True)
    return float(sum((w * g).detach().abs().sum() for w, g in zip(weights, grads) if g is not None))


def synflow(model, inputs, targets=None, *, seed=0, init="default", num_inits=1, forward_kwargs=None) -> float:  # fmt: skip
    """SynFlow (Tanaka et al., NeurIPS 2020) as zero-cost-nas scores it (``synflow.py``, ``bn=False``):
    every BatchNorm removed, every parameter made absolute, the network in float64 fed one
    all-ones input; the score is ``sum |theta * dR/dtheta|`` over conv and linear weights, with
    ``R`` the sum of the outputs. Higher is better. Only ``inputs``' shape is used. Architecture
    parameters are not network weights and keep their sign."""
    return _averaged(_synflow, model, inputs, targets, num_inits, seed, init, forward_kwargs=forward_kwargs)  # fmt: skip


# --- the loss-based proxies: one gradient pass for all four ------------------------------------


def _loss_proxies(net, inputs, targets, names, forward_kwargs=None) -> dict[str, float]:
    """``snip``, ``grasp``, ``fisher``, ``grad_norm`` from one forward pass (``grasp`` adds one
    Hessian-vector product): they all start from the cross-entropy's gradient."""
    layers = _weighted_layers(net)
    weights = [m.weight for m in layers]
    acts: dict[int, torch.Tensor] = {}
    hooks = []
    if "fisher" in names:

        def keep(module, args, output):
            acts[id(module)] = output

        hooks = [m.register_forward_hook(keep) for m in layers]
    try:
        logits = _logits(net(inputs, **(forward_kwargs or {})))
    finally:
        for h in hooks:
            h.remove()
    loss = F.cross_entropy(logits, targets)
    # Layers the forward never ran have no activation and no gradient: they score 0.
    act_list = [acts[id(m)] for m in layers if id(m) in acts]
    grads = torch.autograd.grad(
        loss, weights + act_list, create_graph="grasp" in names, allow_unused=True
    )
    g_w, g_a = grads[: len(weights)], grads[len(weights) :]
    out = {}
    if "grad_norm" in names:  # grad_norm.py: per-layer ||dL/dW||_2, summed over layers
        out["grad_norm"] = float(sum(g.detach().norm() for g in g_w if g is not None))
    if "snip" in names:  # snip.py: |dL/d mask| at mask = 1, which is |W * dL/dW|
        out["snip"] = float(
            sum((w * g).detach().abs().sum() for w, g in zip(weights, g_w) if g is not None)
        )
    if "fisher" in names:
        out["fisher"] = _fisher(layers, acts, act_list, g_a)
    if "grasp" in names:  # grasp.py: -theta * Hg with g the gradient, summed over weights
        used = [(w, g) for w, g in zip(weights, g_w) if g is not None]
        z = sum((g.detach() * g).sum() for _, g in used)
        hg = torch.autograd.grad(z, [w for w, _ in used], allow_unused=True)
        out["grasp"] = float(
            sum((-w.detach() * h).sum() for (w, _), h in zip(used, hg) if h is not None)
        )
    return out


def _fisher(layers, acts, act_list, g_a) -> float:
    """fisher.py: per output channel ``0.5 * mean_n (sum_hw a * dL/da)^2``, then each channel's
    value repeated over the channel's weights before summing (``reshape_elements``), i.e.
    times ``C_in / groups * kh * kw``: the reference's number, quirk included."""
    grad_of = dict(zip([id(a) for a in act_list], g_a))
    total = 0.0
    for m in layers:
        a = acts.get(id(m))
        g = None if a is None else grad_of.get(id(a))
        if g is None:
            continue
        a, g = a.detach(), g.detach()
        g_nk = (a * g).sum(tuple(range(2, a.dim()))) if a.dim() > 2 else a * g
        per_channel = 0.5 * g_nk.pow(2).mean(0)
        total += float(per_channel.sum()) * m.weight[0].numel()
    return total


def _one_loss_proxy(name):
    def measure(net, inputs, targets, forward_kwargs=None):
        return _loss_proxies(net, inputs, targets, (name,), forward_kwargs)[name]

    return measure


def loss_proxies(model, inputs, targets, names=LOSS_PROXIES, *, seed=0, init="default", num_inits=1, forward_kwargs=None) -> dict[str, float]:  # fmt: skip
    """Several loss-based proxies at once, sharing the forward and the gradient: the same
    numbers as calling each alone."""
    _need_targets(", ".join(names), targets)
    unknown = sorted(set(names) - set(LOSS_PROXIES))
    if unknown:
        raise ValueError(f"not loss-based proxies: {unknown}; valid: {', '.join(LOSS_PROXIES)}")
    totals = dict.fromkeys(names, 0.0)
    for i in range(num_inits):
        net = reinit_copy(model, init, seed + i, inputs.device)
        for k, v in _loss_proxies(net, inputs, targets, tuple(names), forward_kwargs).items():
            totals[k] += v / num_inits
    return totals


def snip(model, inputs, targets=None, *, seed=0, init="default", num_inits=1, forward_kwargs=None) -> float:  # fmt: skip
    """SNIP (Lee et al., ICLR 2019) as zero-cost-nas scores it (``snip.py``): the connection
    sensitivity ``sum |W * dL/dW|`` over conv and linear weights, ``L`` the cross-entropy of
    the batch (64 images on NAS-Bench-201). Higher is better."""
    _need_targets("snip", targets)
    return _averaged(_one_loss_proxy("snip"), model, inputs, targets, num_inits, seed, init, forward_kwargs=forward_kwargs)  # fmt: skip


def grad_norm(model, inputs, targets=None, *, seed=0, init="default", num_inits=1, forward_kwargs=None) -> float:  # fmt: skip
    """Gradient norm (zero-cost-nas, ``grad_norm.py``): the Euclidean norm of the
    cross-entropy's gradient w.r.t. each conv and linear weight, summed over layers (not the
    norm of the whole gradient). Higher is better."""
    _need_targets("grad_norm", targets)
    return _averaged(_one_loss_proxy("grad_norm"), model, inputs, targets, num_inits, seed, init, forward_kwargs=forward_kwargs)  # fmt: skip


def grasp(model, inputs, targets=None, *, seed=0, init="default", num_inits=1, forward_kwargs=None) -> float:  # fmt: skip
    """GraSP (Wang et al., ICLR 2020) as zero-cost-nas scores it (``grasp.py``, T=1, one
    iteration): ``sum -W * (H g)`` over conv and linear weights, ``g`` the cross-entropy's
    gradient and ``H`` its Hessian (a Hessian-vector product through the double backward). The
    reference negates GraSP's own sign because accuracy correlated negatively; higher is better
    for the number returned."""
    _need_targets("grasp", targets)
    return _averaged(_one_loss_proxy("grasp"), model, inputs, targets, num_inits, seed, init, forward_kwargs=forward_kwargs)  # fmt: skip


def fisher(model, inputs, targets=None, *, seed=0, init="default", num_inits=1, forward_kwargs=None) -> float:  # fmt: skip
    """Fisher (Theis et al. 2018; Turner et al., BlockSwap 2020) as zero-cost-nas scores it
    (``fisher.py``): per channel of each conv / linear output ``a``, ``0.5 * mean_n (sum_hw a
    dL/da)^2``, summed (see ``_fisher`` for the reference's weighting). Higher is better."""
    _need_targets("fisher", targets)
    return _averaged(_one_loss_proxy("fisher"), model, inputs, targets, num_inits, seed, init, forward_kwargs=forward_kwargs)  # fmt: skip


# --- jacob_cov ----------------------------------------------------------------------------------


def jacob_cov_score(jacobian: torch.Tensor, k: float = 1e-5) -> float:
    """``-sum_i log(v_i + k) + 1 / (v_i + k)`` over the eigenvalues of the rows' correlation
    matrix (``jacob_cov.py::eval_score``); ``-inf`` where it is undefined (a constant row)."""
    corr = torch.corrcoef(jacobian.reshape(jacobian.shape[0], -1).double())
    if not torch.isfinite(corr).all():
        return -math.inf
    v = torch.linalg.eigvalsh(corr)
    score = -float((torch.log(v + k) + 1.0 / (v + k)).sum())
    return score if math.isfinite(score) else -math.inf


def _jacob_cov(net, inputs, targets, forward_kwargs=None) -> float:
    x = inputs.detach().clone().requires_grad_(True)
    y = _logits(net(x, **(forward_kwargs or {})))
    (jac,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    return jacob_cov_score(torch.zeros_like(x) if jac is None else jac)


def jacob_cov(model, inputs, targets=None, *, seed=0, init="default", num_inits=1, forward_kwargs=None) -> float:  # fmt: skip
    """Jacobian covariance (Mellor et al., NASWOT v1; zero-cost-nas ``jacob_cov.py``): the
    gradient of the summed outputs w.r.t. each input image, and ``jacob_cov_score`` of the
    correlations between images. Higher is better (less correlated Jacobians)."""
    return _averaged(_jacob_cov, model, inputs, targets, num_inits, seed, init, forward_kwargs=forward_kwargs)  # fmt: skip


# --- Zen-score ----------------------------------------------------------------------------------


def _features_before_pooling(net, x, forward_kwargs):
    """The input of the last global average pool (ZenNAS' ``forward_pre_GAP``; NAS-Bench-Suite-
    Zero hooks the AdaptiveAvgPool2d the same way); the output itself for a net without one."""
    pools = [m for m in net.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    seen = []
    hook = pools[-1].register_forward_hook(lambda m, a, o: seen.append(a[0])) if pools else None
    try:
        out = _logits(net(x, **(forward_kwargs or {})))
    finally:
        if hook is not None:
            hook.remove()
    return seen[-1] if seen else out


def _zen(net, inputs, targets, forward_kwargs=None, mixup_gamma=1e-2, seed=0) -> float:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.reset_running_stats()  # a freshly built network's statistics, as the reference's
    g = torch.Generator(device=inputs.device).manual_seed(seed)
    x = torch.randn(inputs.shape, generator=g, device=inputs.device, dtype=inputs.dtype)
    x2 = torch.randn(inputs.shape, generator=g, device=inputs.device, dtype=inputs.dtype)
    with torch.no_grad():
        out = _features_before_pooling(net, x, forward_kwargs)
        mixed = _features_before_pooling(net, x + mixup_gamma * x2, forward_kwargs)
        delta = (out - mixed).abs().flatten(1).sum(1).mean()
        log_bn = 0.0
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_var is not None:
                log_bn += float(torch.log(torch.sqrt(m.running_var.mean())))
    return float(torch.log(delta)) + log_bn


def zen(model, inputs, targets=None, *, seed=0, init="gaussian", num_inits=1, forward_kwargs=None, mixup_gamma=1e-2) -> float:  # fmt: skip
    """Zen-score (Lin et al., ICCV 2021; ``compute_zen_score.py``): with N(0, 1) weights and two
    Gaussian batches ``x``, ``x'`` of ``inputs``' shape (seeded), ``log E_n ||f(x) - f(x +
    gamma x')||_1`` of the features before global pooling, plus ``sum log sqrt(mean running_var)``
    over the BatchNorm2d layers, whose running statistics the two train-mode forwards updated,
    as in the reference. ``gamma = 1e-2``. Higher is better. Only ``inputs``' shape is used.
    ``num_inits`` is the reference's ``repeat`` (it keeps running statistics across repeats;
    here each repeat starts fresh)."""
    if num_inits < 1:
        raise ValueError(f"num_inits must be >= 1, got {num_inits}")
    values = [
        _zen(reinit_copy(model, init, seed + i, inputs.device), inputs, targets, forward_kwargs, mixup_gamma, seed + i)  # fmt: skip
        for i in range(num_inits)
    ]
    return sum(values) / len(values)


# --- baselines ----------------------------------------------------------------------------------


def _used_modules(model, inputs, forward_kwargs):
    """The modules a forward of one input runs (a masked op does not), with their outputs."""
    ran = []
    hooks = [m.register_forward_hook(lambda m, a, o: ran.append((m, a, o))) for m in model.modules()]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(inputs[:1], **(forward_kwargs or {}))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return ran


def params(model, inputs=None, targets=None, *, forward_kwargs=None, **_) -> float:
    """Parameter count (a baseline in NAS-Bench-Suite-Zero and Abdelfattah et al.): the
    network's weights, not its architecture parameters; with ``inputs``, only those of modules
    a forward runs (a masked supernet's surviving ops). Higher is better. No initialisation."""
    arch = _arch_ids(model)
    if inputs is None:
        return float(sum(p.numel() for p in model.parameters() if id(p) not in arch))
    seen, total = set(), 0
    for m, _, _ in _used_modules(model, inputs, forward_kwargs):
        for p in m.parameters(recurse=False):
            if id(p) not in arch and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return float(total)


def flops(model, inputs, targets=None, *, forward_kwargs=None, **_) -> float:
    """Multiply-accumulates of one input through the conv and linear layers the forward runs
    (NB201's ``get_model_infos`` counts the same layers). Higher is better (a baseline)."""
    total = 0
    for m, _, out in _used_modules(model, inputs, forward_kwargs):
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return float(total)


HIGHER_IS_BETTER = {
    "naswot": True, "synflow": True, "snip": True, "grasp": True, "fisher": True,
    "grad_norm": True, "jacob_cov": True, "zen": True, "params": True, "flops": True,
    "ntk": False, "regions": True,
}  # fmt: skip
PROXIES = {
    "naswot": naswot, "synflow": synflow, "snip": snip, "grasp": grasp, "fisher": fisher,
    "grad_norm": grad_norm, "jacob_cov": jacob_cov, "zen": zen, "params": params, "flops": flops,
}  # fmt: skip

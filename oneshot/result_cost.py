"""What the result of a run costs (issue 17; ``report.json["cost"]`` and the final print):
parameters and FLOPs of the deployed network, exact, its latency measured with the cost table's
protocol (``oneshot.latency.measure_latency`` with the run's ``cost.*``), and the budget's verdict
on both the measured value and the cost table's additive one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("oneshot")
#: Above this relative error of the additive latency model on the result, the run warns.
ADDITIVE_WARN = 0.10


def network_cost(network: nn.Module, example: torch.Tensor) -> dict:
    """Parameters and FLOPs of the network as deployed (eval mode, the auxiliary head unused),
    exactly: ``sum(p.numel())`` and ``torch.utils.flop_counter`` on one image (a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = network.training
    network.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            network(example[:1])
    finally:
        network.train(was)
    params = sum(p.numel() for n, p in network.named_parameters() if "auxiliary" not in n)
    return {"parameters": params, "flops": int(counter.get_total_flops())}


def latency_protocol(cfg) -> dict:
    """``measure_latency``'s settings from a run's ``cost.*`` (the table's protocol), with its defaults."""
    from omegaconf import OmegaConf

    def setting(key, default):
        value = OmegaConf.select(cfg, f"cost.{key}", default=None) if cfg is not None else None
        return default if value is None else value

    return {"device": setting("device", "cpu"), "batch_size": setting("batch_size", 1), "threads": setting("threads", None),
            "warmup": setting("warmup", 10), "repeats": setting("repeats", 50)}  # fmt: skip


def result_cost(network: nn.Module, input_shape, cfg=None, exported: dict | None = None) -> dict:
    """What the deployed network costs: parameters and FLOPs per image, exact (``network_cost``),
    and its PyTorch latency measured with the cost table's protocol (``cost.*``) - each taken from
    the export's report where the export measured it already, so nothing is measured twice."""
    from oneshot.latency import measure_latency

    protocol = latency_protocol(cfg)
    device = torch.device(protocol["device"])
    network = network.eval().to(device)
    x = torch.randn(
        protocol["batch_size"], *input_shape, generator=torch.Generator().manual_seed(0)
    ).to(device)
    if exported and "flops" in exported:  # the export counted them on the same network
        cost = {"parameters": exported["parameters"], "flops": exported["flops"]}
    else:
        cost = network_cost(network, x)
    if exported and isinstance(exported.get("pytorch"), dict):
        latency = exported["pytorch"]["latency"]
    else:
        latency = measure_latency(network, (x,), warmup=protocol["warmup"], repeats=protocol["repeats"], device=device,
                                  threads=protocol["threads"])  # fmt: skip
    return {**cost, "latency": latency, "batch_size": protocol["batch_size"]}


def against_budget(cost: dict, budget, genotype) -> dict:
    """``cost`` (``result_cost``) with the budget's verdict: the measured value of the budget's
    metric (exact for params and FLOPs; the median latency of the whole network) and the cost
    table's additive value (``CostModel.of_genotype``), each against ``budget.max``."""
    from oneshot.cost.model import fits

    measured = {"params": cost["parameters"] / 1e6, "flops": cost["flops"] / 1e6,
                "latency": cost["latency"]["median_ms"]}[budget.metric]  # fmt: skip
    table = float(budget.cost.of_genotype(genotype))
    verdict = {"metric": budget.metric, "unit": budget.cost.unit, "max": budget.max, "measured": measured,
               "table": table, "within": fits(measured, budget.max), "table_within": fits(table, budget.max)}  # fmt: skip
    if budget.metric == "latency":  # the additive model against the whole network, measured alike
        verdict["additive_error"] = abs(table - measured) / measured if measured > 0 else None
        calibration = budget.cost.meta.get("calibration")
        if calibration:
            verdict["calibration"] = {k: calibration[k] for k in ("scale", "median_error_before", "median_error_after")}
        if verdict["additive_error"] is not None and verdict["additive_error"] > ADDITIVE_WARN:
            log.warning("the latency table predicts %.4g ms for this network, measured %.4g ms: the additive "
                        "model is %.0f%% off (over %.0f%%). The latency budget was held on the table's value; "
                        "measure the table on a quiet device, or raise cost.calibrate", table, measured,
                        100 * verdict["additive_error"], 100 * ADDITIVE_WARN)  # fmt: skip
    return {**cost, "budget": verdict}


def cost_lines(cost: dict) -> list[str]:
    """The final print's lines for report.json's ``cost``."""
    lat = cost["latency"]
    line = (f"cost: {cost['parameters'] / 1e6:.4g} M params, {cost['flops'] / 1e6:.4g} MFLOPs per image, "
            f"{lat['median_ms']:.3f} ms measured (batch {cost.get('batch_size', 1)}, {lat['device']}, "
            f"{lat['threads']} thread(s))")  # fmt: skip
    b = cost.get("budget")
    if not b:
        return [line]
    unit = b["unit"]
    verdict = "within" if b["within"] else "OVER"
    error = b.get("additive_error")
    off = f" ({100 * error:.0f}% off)" if error is not None else ""
    return [line, f"budget: {b['metric']} <= {b['max']:g} {unit}: {b['measured']:.4g} {unit} measured ({verdict}), "
                  f"{b['table']:.4g} {unit} by the cost table{off}"]  # fmt: skip

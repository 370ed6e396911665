"""Measure a latency table on this machine, for a search elsewhere (``cost.table=...``):

    python -m oneshot.cost space=nb201 size=paper data=cifar10 cost.batch_size=1 cost.cache_dir=tables

takes the same overrides as ``oneshot-search`` (the space, its sizes, the data's image shape,
``cost.*``), builds the table of the deployed network's candidates on ``cost.device`` and prints
its path and a summary as JSON. The data is not loaded: only its shape is needed.
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> dict:
    import oneshot
    from oneshot.cost.budget import cost_model_from_cfg
    from oneshot.data import dataset_info
    from oneshot.lightning_modules.pipeline import build_supernet
    from oneshot.validate import ConfigError, check_values

    cfg = oneshot.compose("search", list(sys.argv[1:] if argv is None else argv))
    try:
        check_values(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    options = {k: v for k, v in cfg.data.items() if k == "image_size" and v is not None}
    info = dataset_info(cfg.data.name, **options)
    cost = cost_model_from_cfg(cfg, build_supernet(cfg, info), info, metric="latency")
    summary = {
        "table": cost.meta["cache_file"],
        "cache": cost.meta["cache"],
        "space": cost.space,
        "device_name": cost.meta["device_name"],
        "batch_size": cost.meta["batch_size"],
        "fixed_ms": round(cost.fixed, 4),
        "cheapest_ms": round(cost.cheapest(), 4),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

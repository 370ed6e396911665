"""A deployable model out of a run (issue 17): ``oneshot-export RUN_DIR --format onnx|torchscript``.

The network a run trained (``network.pt`` of a retraining; a model-space search's supernet
checkpoint fixed to its ``arch.json``) is written as ``model.onnx`` (``torch.onnx.export``, the
``torch.export``-based exporter, batch dimension dynamic) and ``model.pt`` (TorchScript,
``torch.jit.trace``), each checked against the PyTorch network on real inputs - a batch of the
run's test images - as the largest absolute difference of the outputs (ONNX run by onnxruntime,
TorchScript reloaded from the file), and timed with ``oneshot.latency.measure_latency``, the
protocol the cost table uses, so the number sits next to the budget. ``export.json`` beside the
files holds all of it; the retraining writes both files by default (``retrain.export``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from oneshot.result_cost import network_cost
from oneshot.run_network import ExportError, load_run_network, real_inputs  # noqa: F401 - ExportError: the API's

log = logging.getLogger("oneshot")

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
PARITY_IMAGES = 64  # test images the exported and the PyTorch network are compared on
PARITY_WARN = 1e-3  # float32 graphs of these sizes agree to ~1e-5; more means an export went wrong


# ---- inputs, files, parity, latency --------------------------------------------------------------


@contextmanager
def _atomic_path(path: Path):
    """A temporary name beside ``path``, renamed to it when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def _quiet_export():
    """torch.onnx prints its progress, its optimizer (onnxscript, onnx_ir) logs every pass at
    INFO, and torch.jit warns it is deprecated (it is kept for TorchScript runtimes, LibTorch C++
    above all); none of it is a message for the user. Errors still propagate."""
    import contextlib
    import io

    loggers = [
        logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def missing_onnx_packages() -> list[str]:
    """What ONNX export and its check need that is not installed (the ``onnx`` extra)."""
    import importlib.util

    return [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def export_onnx(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX via ``torch.export`` with a dynamic batch dimension (any batch size runs)."""
    # torch.export specialises a dimension of size 1: the example has two images, and batch 1 still runs.
    example = example[torch.arange(2) % len(example)]
    with _quiet_export(), _atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(network, (example,), str(tmp), dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                          input_names=["images"], output_names=["logits"])  # fmt: skip


def export_torchscript(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Traced without autograd: ops with a training-only path (``MaxPool3x3``) take their plain one."""
    with _quiet_export(), _atomic_path(path) as tmp, torch.no_grad():
        traced = torch.jit.trace(network, (example,), check_trace=False)
        torch.jit.save(traced, str(tmp))


def onnx_runner(path: Path, threads: int | None = None, device="cpu"):
    """A callable ``x -> logits`` running the file with onnxruntime, on ``threads`` intra-op
    threads (torch's count when None, so both runtimes are timed alike)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "checking an ONNX file needs onnxruntime: pip install 'oneshot[onnx]'"
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    providers = ["CPUExecutionProvider"]
    if (
        torch.device(device).type == "cuda"
        and "CUDAExecutionProvider" in ort.get_available_providers()
    ):
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    run.providers = session.get_providers()
    return run


def load_torchscript(path: Path, device="cpu"):
    with _quiet_export():
        return torch.jit.load(str(path), map_location=device).eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max())


def export_network(
    network: nn.Module,
    out_dir,
    inputs: torch.Tensor,
    formats=FORMATS,
    *,
    inputs_description: str = "",
    batch_size: int = 1,
    device="cpu",
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
    keep_going: bool = False,
) -> dict:
    """Write ``formats`` of ``network`` into ``out_dir``; check each against the network on
    ``inputs`` (max abs difference of the logits) and time it at ``batch_size`` with the latency
    protocol (PyTorch itself timed too, for comparison). Returns the report (``export.json``).
    ``keep_going``: a format that fails to export is recorded (``{"error": ...}``) and warned
    about instead of raised (the retraining: its weights are saved whatever the exporter does)."""
    from oneshot.latency import measure_latency

    out_dir = Path(out_dir)
    device = torch.device(device)
    network = network.eval().to(device)
    inputs = inputs.to(device)
    timed = inputs[torch.arange(batch_size) % len(inputs)]  # the deployed batch size, real images
    with torch.no_grad():
        reference = network(inputs)
    protocol = {"batch_size": batch_size, "warmup": warmup, "repeats": repeats}
    report = {
        "inputs": inputs_description or f"{len(inputs)} images",
        "input_shape": list(inputs.shape[1:]),
        **network_cost(network, inputs),
        "pytorch": {
            "latency": measure_latency(
                network, (timed,), warmup=warmup, repeats=repeats, device=device, threads=threads
            ),
            **protocol,
        },  # fmt: skip
    }
    for fmt in formats:
        path = out_dir / FILES[fmt]
        try:
            if fmt == "onnx":
                export_onnx(network, timed, path)
                run = onnx_runner(path, threads, device)
                runtime = f"onnxruntime ({run.providers[0]})"
            else:
                export_torchscript(network, timed, path)
                run, runtime = load_torchscript(path, device), "torch.jit"
            with torch.no_grad():
                diff = max_abs_diff(run(inputs), reference)
        except Exception as e:
            if not keep_going:
                raise
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            log.warning("%s export failed (%s); the trained weights are in network.pt", fmt, why)
            report[fmt] = {"file": None, "error": why}
            continue
        if diff > PARITY_WARN:
            log.warning(
                "%s differs from the PyTorch network by up to %.3g on %s",
                path.name,
                diff,
                report["inputs"],
            )
        latency = measure_latency(
            run, (timed,), warmup=warmup, repeats=repeats, device=device, threads=threads
        )
        report[fmt] = {"file": path.name, "runtime": runtime, "parity_max_abs_diff": diff,
                       "latency": latency, **protocol}  # fmt: skip
    return report


def summary_lines(report: dict, out_dir) -> list[str]:
    lat = report["pytorch"]["latency"]
    where = f"batch {report['pytorch']['batch_size']}, {lat['device']}, {lat['threads']} thread(s)"
    lines = [f"pytorch: {lat['median_ms']:.3f} ms median ({where}); {report['parameters']:,} parameters, "
             f"{report['flops'] / 1e6:.3f} MFLOPs per image"]  # fmt: skip
    for fmt in FORMATS:
        if fmt in report and report[fmt].get("error"):
            lines.append(f"{fmt}: not exported ({report[fmt]['error']})")
        elif fmt in report:
            r = report[fmt]
            lines.append(f"{fmt}: {Path(out_dir) / r['file']}  max |{fmt} - pytorch| = {r['parity_max_abs_diff']:.3g} "
                         f"on {report['inputs']}; {r['latency']['median_ms']:.3f} ms median ({r['runtime']})")  # fmt: skip
    return lines


# ---- oneshot-export ------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="oneshot-export",
        description="Write a run's trained network as ONNX (model.onnx) and TorchScript (model.pt), each checked "
        "against PyTorch on the run's test images and timed; the numbers go to export.json.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="an oneshot-retrain run, or an oneshot-search run"
    )
    parser.add_argument("--format", dest="formats", action="append", metavar="FORMAT",
                        help=f"{' | '.join(FORMATS)} (repeat, or onnx,torchscript; default: both)")  # fmt: skip
    parser.add_argument(
        "--out", metavar="DIR", help="where to write (default: beside the run's network.pt)"
    )
    parser.add_argument("--force", action="store_true", help="replace exports already there")
    parser.add_argument(
        "--batch-size", type=_positive, default=1, help="the batch size timed (default 1)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument(
        "--threads", type=_positive, default=None, help="intra-op threads (default: torch's)"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=_positive, default=50)
    parser.add_argument(
        "--images", type=_positive, default=PARITY_IMAGES, help="test images for the parity check"
    )
    parser.add_argument(
        "--trust", metavar="TARGET", help="your model class a model-space run names (pkg.mod.Class)"
    )
    args = parser.parse_args(argv)
    try:
        formats = _check_args(args)
        from oneshot.quiet import quiet_libraries

        quiet_libraries()
        run = load_run_network(args.run_dir, trust=args.trust)
        out_dir = Path(args.out).expanduser() if args.out else run.out_dir
        there = [FILES[f] for f in formats if (out_dir / FILES[f]).exists()]
        if there and not args.force:
            raise ExportError(
                f"{out_dir} already holds {', '.join(there)}; replace them with --force, or give --out DIR"
            )
        inputs, described = real_inputs(run.data, args.images, run.input_shape)
        report = export_network(run.network, out_dir, inputs, formats, inputs_description=described,
                                batch_size=args.batch_size, device=args.device, threads=args.threads,
                                warmup=args.warmup, repeats=args.repeats)  # fmt: skip
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    report = {"genotype": run.genotype, "weights": str(run.source), **report}
    with _atomic_path(out_dir / "export.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join([*summary_lines(report, out_dir), f"report: {out_dir / 'export.json'}"]))


def _check_args(args) -> tuple[str, ...]:
    formats = tuple(
        dict.fromkeys(f.strip() for spec in (args.formats or FORMATS) for f in spec.split(","))
    )
    for fmt in formats:
        if fmt not in FORMATS:
            raise ExportError(f"--format {fmt} is not a format; valid: {', '.join(FORMATS)}")
    missing = missing_onnx_packages() if "onnx" in formats else []
    if missing:
        raise ExportError(
            f"--format onnx needs {', '.join(missing)}: pip install 'oneshot[onnx]' (or --format torchscript)"
        )
    device = (
        torch.device(args.device)
        if args.device in ("cpu", "cuda") or args.device.startswith("cuda:")
        else None
    )
    if device is None:
        raise ExportError(f"--device {args.device} is not a device; valid: cpu, cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"--device {args.device}: there is no CUDA device here; valid: cpu")
    if args.warmup < 0:
        raise ExportError(f"--warmup {args.warmup} must be >= 0")
    return formats


if __name__ == "__main__":
    main()

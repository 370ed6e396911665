"""A deployable model out (issue 17): ``oneshot-export`` and the exports the retraining writes.

Parity is checked twice: by ``export_network`` itself (its report), and here independently, by
loading the written files with onnxruntime / torch.jit and comparing them with the PyTorch
network on a batch size the export never saw."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from oneshot import export
from oneshot.genotypes import resolve
from oneshot.result_cost import network_cost
from oneshot.spaces import build_network
from oneshot.spaces.model import ModelSpace, fix

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MOBILENET = {"_target_": "oneshot.spaces.mobilenet.MobileNetSpace", "width_mult": 0.25, "first_channels": 16,
             "stages": [[16, 2, 2], [24, 2, 2]], "last_channels": 32, "stem_stride": 2,
             "small_image_stride1_stages": 0}  # fmt: skip
SHAPE = (1, 8, 8)  # digits: 8x8 grey images


def nb201():
    return build_network(
        resolve("NB201_RESNET"), C=4, N=1, num_classes=10, in_channels=1, image_size=8
    )


def darts():
    return build_network(
        resolve("DARTS_V2"), C=4, layers=3, num_classes=10, in_channels=1, image_size=8
    )


def mobilenet():
    space = ModelSpace(MOBILENET, num_classes=10, in_channels=1, image_size=8)
    with torch.no_grad():  # an arbitrary architecture of the space, a skip among its blocks
        for a in space.alphas.values():
            a.copy_(torch.randn_like(a))
    net = fix(MOBILENET | {"num_classes": 10, "in_channels": 1, "image_size": 8}, space.genotype())
    net.arch = space.genotype()
    return net


def net_arch(net):
    return net.arch


def trained_like(net):
    """BN statistics away from their initial 0/1, so eval-mode BN is not the identity."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, *SHAPE))
    return net.eval()


@pytest.mark.parametrize("make", [nb201, darts, mobilenet], ids=["nb201", "darts", "mobilenet"])
def test_exported_files_compute_what_the_network_computes(make, tmp_path):
    net = trained_like(make())
    x, described = export.real_inputs({"name": "digits"}, 16, SHAPE)
    assert described == "16 test images of digits" and x.shape == (16, *SHAPE)
    report = export.export_network(
        net, tmp_path, x, inputs_description=described, warmup=1, repeats=3
    )
    with torch.no_grad():
        other = torch.randn(3, *SHAPE)  # a batch size the export never saw
        expected = net(other)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-4)
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    torch.testing.assert_close(scripted(other), expected, atol=1e-6, rtol=1e-5)
    for fmt in export.FORMATS:
        assert 0 <= report[fmt]["parity_max_abs_diff"] < 1e-4
        assert report[fmt]["latency"]["repeats"] == 3 and report[fmt]["latency"]["median_ms"] > 0
    # the report's parity number is the max abs difference on its own inputs, recomputed here
    with torch.no_grad():
        ref = net(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert report["onnx"]["parity_max_abs_diff"] == pytest.approx(
        float((got.double() - ref.double()).abs().max()), abs=1e-9
    )
    assert report["parameters"] == sum(
        p.numel() for n, p in net.named_parameters() if "auxiliary" not in n
    )


def test_flops_are_the_flop_counter_of_the_fixed_network_and_a_hand_count():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 10),
    )
    cost = network_cost(net, torch.randn(5, *SHAPE))
    # 2 FLOPs per multiply-add: conv 8*8 pixels * 4 channels * 9 taps; linear 256*10
    assert cost == {"parameters": 36 + 2570, "flops": 2 * (64 * 4 * 9) + 2 * 2560}


def run_dir_of(net, genotype, tmp_path, data="digits", **kwargs):
    """A run directory as oneshot-retrain leaves it: config.yaml and network.pt."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"name": data, "root": None}}))
    sizes = {"num_classes": 10, "in_channels": 1, "image_size": 8, **kwargs}
    torch.save(
        {"genotype": str(genotype), "network_kwargs": sizes, "state_dict": net.state_dict()},
        run / "network.pt",
    )
    return run


def test_oneshot_export_writes_both_formats_and_a_report(tmp_path, capsys):
    net = trained_like(nb201())
    run = run_dir_of(net, resolve("NB201_RESNET"), tmp_path, C=4, N=1)
    export.main([str(run), "--repeats", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    report = json.loads((run / "export.json").read_text())
    assert report["genotype"] == str(resolve("NB201_RESNET")) and report["inputs"].endswith(
        "test images of digits"
    )
    for fmt in export.FORMATS:
        assert (run / export.FILES[fmt]).is_file() and f"max |{fmt} - pytorch|" in out
        assert report[fmt]["parity_max_abs_diff"] < 1e-4
    scripted = torch.jit.load(str(run / "model.pt"))
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
    # again: refused (nothing overwritten) unless --force; --format picks one
    before = (run / "model.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        export.main([str(run), "--format", "torchscript"])
    assert exit_.value.code == 2 and "--force" in capsys.readouterr().err
    assert (run / "model.pt").read_bytes() == before


def test_unavailable_data_falls_back_to_random_inputs_and_says_so(tmp_path):
    x, described = export.real_inputs({"name": "cifar10", "root": str(tmp_path)}, 4, (3, 32, 32))
    assert x.shape == (4, 3, 32, 32) and described.startswith("4 random normal images (cifar10")


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        export.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert "no such run directory" in _refused([str(tmp_path / "missing")], capsys)
    assert not (tmp_path / "missing").exists()
    search = (
        tmp_path / "search"
    )  # a cell-space search without retraining: no weights of its network
    search.mkdir()
    (search / "genotype.txt").write_text(str(resolve("NB201_RESNET")) + "\n")
    err = _refused([str(search)], capsys)
    assert "no trained weights" in err and "oneshot-retrain genotype=RUN_DIR" in err
    assert sorted(p.name for p in search.iterdir()) == ["genotype.txt"]
    run = run_dir_of(trained_like(nb201()), resolve("NB201_RESNET"), tmp_path, C=4, N=1)
    listing = sorted(p.name for p in run.iterdir())
    err = _refused([str(run), "--format", "tflite"], capsys)
    assert "--format tflite is not a format; valid: onnx, torchscript" in err
    assert "--device tpu is not a device" in _refused([str(run), "--device", "tpu"], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA device" in _refused([str(run), "--device", "cuda"], capsys)
    (tmp_path / "bad.pt").write_text("not torch")
    (run / "network.pt").write_bytes((tmp_path / "bad.pt").read_bytes())
    assert "cannot be loaded safely" in _refused([str(run)], capsys)
    assert sorted(p.name for p in run.iterdir()) == listing


def test_a_user_model_class_named_by_a_run_is_not_imported_without_trust(tmp_path, capsys):
    net = mobilenet()
    arch = "{}"
    run = run_dir_of(net, arch, tmp_path, model={**MOBILENET, "_target_": "evil.Net"})
    err = _refused([str(run)], capsys)
    assert "evil.Net" in err and "--trust evil.Net" in err


def test_a_model_space_run_exports_its_network(tmp_path, capsys):
    net = trained_like(mobilenet())
    arch = str(net_arch(net))
    run = run_dir_of(net, arch, tmp_path, model=MOBILENET)
    export.main([str(run), "--format", "torchscript", "--repeats", "2", "--warmup", "0"])
    assert (
        json.loads((run / "export.json").read_text())["torchscript"]["parity_max_abs_diff"] < 1e-5
    )
    assert not (run / "model.onnx").exists()
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(run / "model.pt"))(x), net(x))


# ---- the retraining writes the exports (the real pipeline, tiny sizes) ---------------------------

RETRAIN = ["data=digits", "network.C=4", "network.N=1", "retrain.trainer.max_epochs=1", "retrain.batch_size=16",
           "+retrain.trainer.limit_train_batches=2", "+retrain.trainer.limit_val_batches=1"]  # fmt: skip


@pytest.mark.slow
def test_retraining_writes_both_exports_by_default_and_oneshot_export_redoes_them(tmp_path):
    import subprocess
    import sys

    import oneshot
    from oneshot.data import sample_batch

    run = tmp_path / "run"
    report = oneshot.retrain(
        oneshot.compose("retrain", ["genotype=NB201_RESNET", f"run_dir={run}", *RETRAIN])
    )
    exported = report["retrain"]["export"]
    assert exported == json.loads((run / "report.json").read_text())["export"]
    net = oneshot.load_network(run / "network.pt")  # the retrained weights, rebuilt independently
    x, _ = sample_batch("digits", 64, train=False)
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(torch.jit.load(str(run / "model.pt"))(x), expected)
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert exported["inputs"] == "64 test images of digits"
    for fmt in export.FORMATS:
        assert (
            exported[fmt]["parity_max_abs_diff"] < 1e-4
            and exported[fmt]["latency"]["median_ms"] > 0
        )
    assert exported["parameters"] == report["retrain"]["parameters"]
    # the console script on the same run: refuses to overwrite, then --force redoes TorchScript
    exe = Path(sys.executable).parent / "oneshot-export"
    done = subprocess.run([str(exe), str(run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--force" in done.stderr
    done = subprocess.run([str(exe), str(run), "--format", "torchscript", "--force", "--repeats", "3"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "max |torchscript - pytorch| = 0 on 64 test images of digits" in done.stdout
    torch.testing.assert_close(torch.jit.load(str(run / "model.pt"))(x), expected)


def test_retrain_export_off_and_in_a_debugging_run(tmp_path):
    import oneshot

    fast = [
        "genotype=NB201_RESNET",
        "data=digits",
        "network.C=4",
        "network.N=1",
        "+trainer.fast_dev_run=true",
    ]
    report = oneshot.retrain(
        oneshot.compose("retrain", [*fast, f"run_dir={tmp_path / 'a'}", "retrain.export=[]"])
    )
    assert "export" not in report["retrain"]
    report = oneshot.retrain(oneshot.compose("retrain", [*fast, f"run_dir={tmp_path / 'b'}"]))
    assert report["retrain"]["export"] == {"skipped": "trainer.fast_dev_run"}
    for d in ("a", "b"):
        assert (tmp_path / d / "network.pt").is_file() and not (tmp_path / d / "model.pt").exists()


@pytest.mark.slow
def test_a_model_space_search_without_retraining_exports_its_searched_weights(tmp_path, capsys):
    """The supernet's last checkpoint fixed to arch.json: the export computes what the trained
    supernet computes with every decision one-hot on the architecture (a different code path)."""
    import sys

    import oneshot
    from oneshot.arch import load_arch

    sys.path.insert(0, str(Path(__file__).parent))
    from user_models_example import one_hot_output

    run = tmp_path / "search"
    oneshot.search(oneshot.compose("search", [
        "space=model", "++space.model._target_=user_models_example.TinyNet", "++space.model.width=4",
        "data=digits", "data.batch_size=16", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1", "retrain.enabled=false", "logger.pictures=false", f"run_dir={run}",
    ]))  # fmt: skip
    err = _refused([str(run)], capsys)  # the user's class: not imported on a run's word
    assert "--trust user_models_example.TinyNet" in err
    export.main(
        [
            str(run),
            "--trust",
            "user_models_example.TinyNet",
            "--format",
            "torchscript",
            "--repeats",
            "2",
        ]
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    config = ckpt["hyper_parameters"]["supernet"]  # what the search built its supernet from
    supernet = ModelSpace(**{k: v for k, v in config.items() if not k.startswith("_")})
    supernet.load_state_dict({k.removeprefix("supernet."): v for k, v in ckpt["state_dict"].items()
                              if k.startswith("supernet.")})  # fmt: skip
    supernet.eval()
    x, _ = sample_digits(8)
    with torch.no_grad():
        expected = one_hot_output(supernet, load_arch(run / "arch.json"), x)
        torch.testing.assert_close(
            torch.jit.load(str(run / "model.pt"))(x), expected, atol=1e-5, rtol=1e-4
        )


def sample_digits(n):
    from oneshot.data import sample_batch

    return sample_batch("digits", n, train=False)

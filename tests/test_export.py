"""t2sda export: ONNX (run in onnxruntime) and TorchScript (torch.jit.load) files against eager
PyTorch, dynamic shapes, uint8 vs float input, labels output, the sidecar, one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from t2sda import model_export
from t2sda.__main__ import main
from t2sda.data import digits
from t2sda.inference import load_trained
from t2sda.model_export import Deployable
from t2sda.models import build_model

pytest.importorskip("onnxruntime")


def _image(shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _assert_close(got, expected):
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.999


@pytest.fixture(scope="module")
def onnx_logits(run_dir, tmp_path_factory):
    """The run's student as a dynamic uint8 -> logits ONNX file."""
    module = Deployable(load_trained(run_dir=run_dir).models["student"])
    path = tmp_path_factory.mktemp("onnx") / "logits.onnx"
    model_export.export(module, path, fmt="onnx", size=(64, 64), dynamic=True)
    return module, path


def test_onnx_runs_in_onnxruntime_at_any_size(onnx_logits):
    module, path = onnx_logits
    checks = model_export.verify(module, path, fmt="onnx", size=(64, 64), dynamic=True)
    assert [c["input"] for c in checks] == [[1, 3, 64, 64], [2, 3, 104, 88]]
    import onnx

    graph = onnx.load(str(path)).graph
    assert [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (graph.input[0], graph.output[0])] == [["batch", 3, "height", "width"],
                                                            ["batch", 11, "height", "width"]]
    run = model_export.load_runner(path, "onnx")
    for shape in ((1, 3, 64, 64), (3, 3, 40, 72)):  # a size the export never saw
        image = _image(shape)
        got = run(image)
        assert got.dtype == torch.float32 and tuple(got.shape) == (shape[0], 11, *shape[2:])
        with torch.no_grad():
            _assert_close(got, module(image))


def test_torchscript_uint8_float_labels(tmp_path):
    """Each input/output variant traced to a file and loaded back: float input = uint8 / 255,
    labels = argmax of the logits, all at a size other than the traced one."""
    segmentor = build_model("small_cnn", num_classes=5)
    runs = {}
    for i in model_export.INPUTS:
        for o in model_export.OUTPUTS:
            module = Deployable(segmentor, input=i, output=o)
            path = tmp_path / f"{i}-{o}.pt"
            model_export.export(module, path, fmt="torchscript", size=(64, 64), dynamic=True)
            model_export.verify(module, path, fmt="torchscript", size=(64, 64), dynamic=True)
            runs[i, o] = model_export.load_runner(path, "torchscript")
    image = _image((2, 3, 48, 80), seed=3)
    logits = runs["uint8", "logits"](image)
    with torch.no_grad():
        _assert_close(logits, Deployable(segmentor)(image))
    assert logits.shape == (2, 5, 48, 80)
    assert torch.equal(runs["float", "logits"](image.float() / 255), logits)
    labels = runs["uint8", "labels"](image)
    assert labels.dtype == torch.int64 and torch.equal(labels, logits.argmax(1))
    assert torch.equal(runs["float", "labels"](image.float() / 255), labels)


def test_cli_onnx_float_labels(run_dir, onnx_logits, tmp_path, caplog):
    """The command: a float -> labels ONNX file and its sidecar; its labels equal the argmax of
    the uint8 -> logits file's (same checkpoint) on the same pixels."""
    out = tmp_path / "model" / "labels.onnx"
    with caplog.at_level("INFO", logger="t2sda"):
        assert main(["export", "--run-dir", str(run_dir), "--out", str(out), "--output", "labels",
                     "--input", "float", "--dynamic", "--size", "64x64"]) == 0
    printed = caplog.text
    assert "argmax agreement 100.0000 %" in printed and "input 2x3x104x88" in printed
    info = json.loads((tmp_path / "model" / "labels.onnx.json").read_text())
    assert info["class_names"] == list(digits.CLASS_NAMES) and len(info["palette"]) == 11
    assert info["step"] == 7 and info["model"] == "small_cnn" and info["network"] == "student"
    assert info["input"]["dtype"] == "float32" and info["input"]["shape"] == ["N", 3, "H", "W"]
    assert info["output"] == {**info["output"], "name": "labels", "dtype": "int64",
                              "shape": ["N", "H", "W"]}
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.onnx", "labels.onnx.json"]
    image = _image((2, 3, 56, 40), seed=5)
    labels = model_export.load_runner(out, "onnx")(image.float() / 255)
    assert labels.dtype == torch.int64 and labels.shape == (2, 56, 40)
    assert torch.equal(labels, model_export.load_runner(onnx_logits[1], "onnx")(image).argmax(1))


# daformer_mitb5 through the ONNX (dynamo) exporter takes ~5 min on two cores, a third of the
# suite's budget: it runs with T2SDA_HEAVY_TESTS=1 and in scripts/bench_export.py
# (results/bench_export/daformer: 100 % argmax agreement); TorchScript covers it in CI.
_HEAVY = pytest.mark.skipif(not os.environ.get("T2SDA_HEAVY_TESTS"),
                            reason="set T2SDA_HEAVY_TESTS=1 (~5 min on 2 cores)")


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", [
    ("deeplabv2_r101", "onnx"), ("deeplabv2_r101", "torchscript"),
    pytest.param("daformer_mitb5", "onnx", marks=_HEAVY), ("daformer_mitb5", "torchscript"),
])
def test_big_models_export(name, fmt, tmp_path):
    module = Deployable(build_model(name, num_classes=19))
    path = tmp_path / f"{name}.{fmt}"
    model_export.export(module, path, fmt=fmt, size=(64, 64), dynamic=True)
    for check in model_export.verify(module, path, fmt=fmt, size=(64, 64), dynamic=True):
        assert check["agreement"] >= 0.999 and check["max_abs_diff"] < 1e-3 * max(1, check["scale"])
    image = _image((1, 3, 96, 64), seed=2)  # a third size
    with torch.no_grad():
        _assert_close(model_export.load_runner(path, fmt)(image), module(image))


def _export(run_dir, out, *extra):
    return main(["export", "--run-dir", str(run_dir), "--out", str(out), "--format", "torchscript",
                 *extra])


def test_errors_are_one_line_and_keep_files(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    out.write_bytes(b"earlier export")
    cases = [
        ((), "exists (pass --overwrite"),
        (("--overwrite", "--size", "64"), "--size '64': expected HxW"),
        (("--overwrite", "--size", "16x64"), "must be >= 32"),
        (("--overwrite", "--model", "both"), "--model both"),
        (("--overwrite", "--device", "cuda"), "traces on the CPU"),
    ]
    for extra, message in cases:
        assert _export(run_dir, out, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert _export(run_dir, out / "sub.pt") == 2  # its parent is a file
    assert "not writable" in capsys.readouterr().err
    assert main(["export", "--run-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not found" in capsys.readouterr().err

    real = model_export.importlib.util.find_spec
    monkeypatch.setattr(model_export.importlib.util, "find_spec",
                        lambda name: None if name == "onnxscript" else real(name))
    assert _export(run_dir, tmp_path / "m.onnx", "--format", "onnx") == 2
    assert 'needs onnxscript (not installed): pip install -e ".[export]"' in capsys.readouterr().err
    monkeypatch.undo()

    # A file that disagrees with eager is an error (exit 1): the earlier file stays as it was.
    good = model_export.load_runner
    monkeypatch.setattr(model_export, "load_runner", lambda path, fmt: lambda x: good(path, fmt)(x) + 0.5)
    assert _export(run_dir, out, "--overwrite") == 1
    assert "max abs logit difference 0.5 vs eager exceeds" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]

"""Export a trained segmentor for deployment (ONNX, TorchScript) and check the file against eager.

The exported graph is the whole inference path, so a deployer needs nothing of this project:

    image (N, 3, H, W) RGB, uint8 0..255 or float32 in [0, 1]
      -> /255 (uint8 only) -> (x - ImageNet mean) / std (the models' own normalise)
      -> segmentor logits at its output stride -> bilinear upsampling to (H, W)
      -> logits (N, C, H, W) float32, or labels (N, H, W) int64 = argmax over C

ONNX goes through ``torch.onnx.export(dynamo=True)`` (the torch.export-based exporter, the
default since torch 2.9; it needs onnxscript). The TorchScript-based ONNX exporter still runs
on torch 2.14 but warns that it will be removed, so it is not used. TorchScript files are
traced (``torch.jit.trace``): the timm backbones are not scriptable, and a trace records the
shape arithmetic, so one traced file runs at other sizes too (checked by ``verify``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("t2sda")

FORMATS = ("onnx", "torchscript")
OUTPUTS = ("logits", "labels")
INPUTS = ("uint8", "float")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# A file passes when its logits are within ATOL x max(1, max |eager logit|) of eager PyTorch and
# its argmax agrees on at least MIN_AGREEMENT of the pixels (ties of near-equal logits may flip).
ATOL = 1e-3
MIN_AGREEMENT = 0.999


class ExportError(Exception):
    """Bad export input or a failed export: printed as one line."""


class VerifyError(ExportError):
    """The exported file disagrees with eager PyTorch beyond the tolerance."""


class Deployable(nn.Module):
    """A ``Segmentor`` as a deployment graph: raw image in, full-resolution logits or labels out."""

    def __init__(self, segmentor: nn.Module, *, input: str = "uint8", output: str = "logits"):
        super().__init__()
        if input not in INPUTS:
            raise ExportError(f"--input {input!r}: expected one of {', '.join(INPUTS)}")
        if output not in OUTPUTS:
            raise ExportError(f"--output {output!r}: expected one of {', '.join(OUTPUTS)}")
        self.segmentor = segmentor.eval()
        self.uint8 = input == "uint8"
        self.labels = output == "labels"
        self.eval()

    def forward(self, image: Tensor) -> Tensor:
        x = image.float() / 255 if self.uint8 else image  # the segmentor normalises [0, 1] itself
        logits = self.segmentor(x)[0].float()  # (N, C, H / s, W / s)
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(dim=1) if self.labels else logits  # (N, H, W) or (N, C, H, W)


def check_packages(fmt: str) -> None:
    """A missing optional dependency of ``fmt`` is one ExportError naming the extra."""
    if fmt != "onnx":
        return
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)} (not installed): "
                          'pip install -e ".[export]"')


def example_input(module: Deployable, size: tuple[int, int], *, batch: int = 1,
                  seed: int = 0) -> Tensor:
    """A random image of the graph's input type: uint8 0..255 or float32 in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (batch, 3, *size), generator=gen, dtype=torch.uint8)
    return image if module.uint8 else image.float() / 255


def export(module: Deployable, path: Path, *, fmt: str, size: tuple[int, int],
           dynamic: bool) -> None:
    """Write ``module`` to ``path`` as ``fmt``, traced at ``size`` (H, W).

    ``dynamic``: batch, height and width are free in the file (ONNX: symbolic axes). The example
    then has batch 2: torch.export specialises a dimension of size 1 to a constant.
    """
    check_packages(fmt)
    if dynamic and hasattr(module.segmentor, "detail_stride"):
        raise ExportError("--dynamic: an HRDA model (model.hrda) runs a number of detail windows "
                          "that depends on the image size; export it at a fixed --size")
    example = example_input(module, size, batch=2 if dynamic else 1)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.14 marks torch.jit deprecated; it still is what "TorchScript" means.
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if fmt == "torchscript":
            torch.jit.trace(module, (example,), check_trace=False).save(str(path))
        elif fmt == "onnx":
            _export_onnx(module, example, path, dynamic=dynamic)
        else:
            raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def _export_onnx(module: Deployable, example: Tensor, path: Path, *, dynamic: bool) -> None:
    dims = torch.export.Dim
    shapes = {"image": {0: dims.DYNAMIC, 2: dims.DYNAMIC, 3: dims.DYNAMIC}} if dynamic else None
    output = "labels" if module.labels else "logits"
    # The exporter prints a line per stage and its graph optimiser logs each pass at INFO;
    # keep the terminal to our own progress lines.
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"],
                                        output_names=[output], dynamic_shapes=shapes)
    except Exception as err:  # torch.export's errors are long; the first line names the op
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"ONNX export failed: {first}") from err
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    program.save(str(path), external_data=False)  # one file (models here are far below 2 GB)
    if dynamic:
        _name_axes(path)


def _name_axes(path: Path) -> None:
    """Call the exporter's symbolic axes ("s40", ...) batch, height and width everywhere."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    names = {dims[i].dim_param: name for i, name in ((0, "batch"), (2, "height"), (3, "width"))
             if dims[i].dim_param}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    onnx.save(model, str(path))


def load_runner(path: Path, fmt: str):
    """A callable (N, 3, H, W) tensor -> output tensor running the file as a deployer would."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")

        def run(image: Tensor) -> Tensor:
            with torch.no_grad():
                return scripted(image)
        return run
    check_packages(fmt)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda image: torch.from_numpy(session.run(None, {name: image.numpy()})[0])


def compare(module: Deployable, run, image: Tensor) -> dict:
    """Max abs logit difference (None for labels) and argmax agreement of ``run`` vs eager."""
    with torch.no_grad():
        expected = module(image)
    got = run(image)
    if tuple(got.shape) != tuple(expected.shape):
        raise VerifyError(f"exported output has shape {tuple(got.shape)}, eager "
                          f"{tuple(expected.shape)} (input {tuple(image.shape)})")
    if module.labels:
        return {"input": list(image.shape), "max_abs_diff": None, "scale": None,
                "agreement": (got == expected).float().mean().item()}
    return {"input": list(image.shape), "max_abs_diff": (got - expected).abs().max().item(),
            "scale": expected.abs().max().item(),
            "agreement": (got.argmax(1) == expected.argmax(1)).float().mean().item()}


def verify(module: Deployable, path: Path, *, fmt: str, size: tuple[int, int],
           dynamic: bool) -> list[dict]:
    """Run the file on random images (export size; with ``dynamic`` also batch 2 at another
    size) and compare with eager PyTorch. Raises VerifyError past the tolerance."""
    run = load_runner(path, fmt)
    height, width = size
    shapes = [(1, size)] + ([(2, (height + height // 2 + 8, width + width // 4 + 8))] if dynamic else [])
    checks = []
    for seed, (batch, shape) in enumerate(shapes):
        image = example_input(module, shape, batch=batch, seed=seed + 1)
        try:
            check = compare(module, run, image)
        except VerifyError:
            raise
        except Exception as err:  # e.g. onnxruntime refusing a shape the graph fixed
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise VerifyError(f"{path}: fails on input {tuple(image.shape)}: {first[:300]}") from err
        checks.append(check)
        diff, scale = check["max_abs_diff"], check["scale"]
        if diff is not None and not diff <= ATOL * max(1.0, scale):  # `not <=` catches NaN
            raise VerifyError(f"{path}: max abs logit difference {diff:.3g} vs eager exceeds "
                              f"{ATOL:g} x max(1, {scale:.3g}) on input {tuple(image.shape)}")
        if check["agreement"] < MIN_AGREEMENT:
            raise VerifyError(f"{path}: argmax agrees with eager on {100 * check['agreement']:.3f} % "
                              f"of pixels (< {100 * MIN_AGREEMENT:g} %) on input {tuple(image.shape)}")
    return checks


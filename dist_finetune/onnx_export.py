"""ONNX: `export --format onnx` writes the graph, and the onnx backend of predict, serve and `Classifier` runs it
under onnxruntime (no torch model, no DeepSpeed).

The graph takes `input_ids` (batch, seq) and `lengths` (batch), both int64, with dynamic batch and sequence axes,
and returns `logits` (batch, classes): the pooling is inside the graph. The folder holds model.onnx beside the
native export's model_config.json and labels.json, so texts are cut and padded by the same recipe.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from .formats import optional
from .model import GPTClassifier
from .weights import WeightsError

ONNX_WEIGHTS = "model.onnx"
ONNX_DATA = "model.onnx.data"  # the tensors of a graph over _EXTERNAL_BYTES (a protobuf holds at most 2 GiB)
ONNX_EXPORT_SUBDIR = "export_onnx"  # where training writes it (checkpoint.export_formats: [onnx])
INPUTS = ("input_ids", "lengths")
OUTPUT = "logits"
TOLERANCE = 1e-4  # onnxruntime's logits against torch's on the export's own check
_EXTERNAL_BYTES = 1536 * 2**20
_REEXPORT = "export it again: python -m dist_finetune.export --run RUN_DIR --format onnx --out DIR"


def check_installed(what: str = "export --format onnx") -> None:
    """The exporter (onnx, onnxscript) and the runtime that checks its output: one line naming the extra."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        optional(module, "onnx", what)


def _example(model: GPTClassifier, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq = max(2, min(8, max_length))
    ids = torch.randint(0, model.config.vocab_size, (3, seq), generator=torch.Generator().manual_seed(0))
    return ids, torch.tensor([seq, 1, seq // 2 + 1])


def write_onnx(model: GPTClassifier, path: Path, max_length: int) -> None:
    """The fp32 graph at `path` (and `model.onnx.data` beside it for a big model), checked against torch on
    padded inputs before it is kept."""
    check_installed()
    model = model.to("cpu", torch.float32).eval()
    batch = torch.export.Dim("batch", min=1, max=2**20)
    seq = torch.export.Dim("seq", min=1, max=model.config.context_length)
    big = sum(p.numel() * 4 for p in model.parameters()) > _EXTERNAL_BYTES
    example = _example(model, max_length)
    with _quiet_exporter():
        torch.onnx.export(model, example, str(path), input_names=list(INPUTS), output_names=[OUTPUT],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "lengths": {0: batch}},
                          dynamo=True, optimize=True, external_data=big)
    _check_against_torch(model, path, example)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress prints and its notes on optional operator sets (torchvision's) are not the user's
    business; its errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check_against_torch(model: GPTClassifier, path: Path, example: tuple[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        want = model(*example).numpy()
    got = OnnxModel(path, torch.device("cpu"), want.shape[1])(*example).numpy()
    gap = float(np.abs(got - want).max())
    if not gap <= TOLERANCE:
        raise WeightsError(f"{path}: onnxruntime's logits differ from the model's by {gap:.2e} (more than "
                           f"{TOLERANCE:g}); the ONNX graph is not kept: export --format native instead")


class OnnxModel:
    """An ONNX export under onnxruntime, called like the torch model: (input_ids, lengths) -> fp32 logits."""

    def __init__(self, path: Path, device: torch.device, num_classes: int):
        ort = optional("onnxruntime", "onnx", f"the onnx backend ({path})")
        self.session = ort.InferenceSession(str(path), _session_options(ort), providers=_providers(ort, device))
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        width = outputs[0].shape[-1] if outputs else None
        if tuple(inputs) != INPUTS or [o.name for o in outputs] != [OUTPUT] or width != num_classes:
            raise WeightsError(f"{path}: the graph takes {inputs} and gives {[o.name for o in outputs]} of width "
                               f"{width}; an export of this tool takes {list(INPUTS)} and gives {OUTPUT} of width "
                               f"{num_classes} (labels.json): {_REEXPORT}")

    def __call__(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                "lengths": lengths.cpu().numpy().astype(np.int64)}
        return torch.from_numpy(self.session.run([OUTPUT], feed)[0])

    def to(self, device: torch.device) -> OnnxModel:
        return self  # the session's providers were chosen for the device already

    def eval(self) -> OnnxModel:
        return self


def load_onnx(path: Path, device: torch.device, num_classes: int, max_length: int | None = None,
              pad_id: int = 0) -> OnnxModel:
    """A damaged or foreign file is one WeightsError naming it; so is a graph that cannot read `max_length` tokens
    (model_config.json of another model: it fails on the first long text otherwise)."""
    if not path.is_file():
        raise WeightsError(f"{path} not found: {path.parent} is not an ONNX export; {_REEXPORT}")
    try:
        model = OnnxModel(path, device, num_classes)
    except WeightsError:
        raise
    except Exception as exc:  # onnxruntime raises its own types for a bad file
        raise WeightsError(f"{path}: onnxruntime cannot load it ({_first_line(exc)}); {_REEXPORT}") from None
    if max_length is not None:
        try:
            model(torch.full((1, max_length), pad_id), torch.tensor([max_length]))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types
            raise WeightsError(f"{path}: the graph cannot read max_length={max_length} tokens (model_config.json) "
                               f"({_first_line(exc)}); the two files are of different models: {_REEXPORT}") from None
    return model


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def _session_options(ort):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its notes on unused initializers are not the user's business
    # torch's thread budget (distributed.cpu_threads splits the cores among ranks), and no busy-waiting between
    # calls: a server's event loop and other ranks share these cores.
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _providers(ort, device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise WeightsError("--device cuda with --backend onnx needs onnxruntime-gpu (its CUDAExecutionProvider); "
                           "pip install onnxruntime-gpu, or use --device cpu or --backend torch")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]

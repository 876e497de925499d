"""Export trained models to ONNX and run them with onnxruntime (the ``export`` extra).

    from rnnkit.export import to_onnx, OnnxRunner
    result = to_onnx(model, (tokens, h0, c0), input_names=[...], output_names=[...],
                     dynamic_axes={"tokens": {0: "T", 1: "B"}})
    result.save("model.onnx"); print(result.describe())     # which mapping each recurrent layer got
"""

from __future__ import annotations

try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - depends on the installed extras
    from ..errors import UserError

    raise UserError(f"ONNX export needs the 'export' extra ({e.name} is not installed): "
                    f"pip install 'rnnkit[export]'") from None

from .graph import DEFAULT_OPSET, ExportResult, to_onnx
from .recurrent import LayerMapping, operator_for
from .runner import OnnxRunner

__all__ = ["to_onnx", "ExportResult", "LayerMapping", "OnnxRunner", "operator_for", "DEFAULT_OPSET"]

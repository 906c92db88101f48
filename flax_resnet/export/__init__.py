"""Export for serving: a trained model as ONNX or StableHLO, BatchNorm folded, its input contract stated.

:func:`export` is the entry point (``flax-resnet export``). Modules, each depending only on
those before it: ``graph`` (the model's folded inference graph, read off its layers),
``onnx_graph`` (that graph as ONNX), ``stablehlo`` (that graph through ``jax.export``),
``source`` (a plain-layer model from a run or a weights file), ``exporting`` (the whole:
contract, files, verification).
"""

from flax_resnet.export.exporting import FORMATS, ExportResult, contract_path_for, export, input_contract
from flax_resnet.models.graph import Graph, Op, run, trace
from flax_resnet.export.onnx_graph import to_onnx
from flax_resnet.export.source import ExportSource, from_run, from_weights, plain_model

__all__ = ["FORMATS", "ExportResult", "ExportSource", "Graph", "Op", "contract_path_for", "export", "from_run",
           "from_weights", "input_contract", "plain_model", "run", "to_onnx", "trace"]

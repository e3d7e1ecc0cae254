"""What the orchestration does once instead of at every call must give what it gave before."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


def _tiny_onnx() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_explicit_onnx_requirements_are_what_mlflow_infers(tmp_path):
    """log_model is given onnx_requirements() so that it skips inferring them in a fresh interpreter: the
    environment files of the logged model must come out exactly as MLflow's inference writes them."""
    import mlflow.onnx

    from ottimo.registry.logged_model import onnx_requirements

    example = np.zeros((2, 3), dtype=np.float32)
    common = {"input_example": example, "save_as_external_data": False,
              "onnx_execution_providers": ["CPUExecutionProvider"]}
    mlflow.onnx.save_model(_tiny_onnx(), tmp_path / "inferred", **common)
    mlflow.onnx.save_model(_tiny_onnx(), tmp_path / "given", pip_requirements=list(onnx_requirements()), **common)
    for name in ("requirements.txt", "conda.yaml", "python_env.yaml"):
        assert (tmp_path / "given" / name).read_text() == (tmp_path / "inferred" / name).read_text(), name

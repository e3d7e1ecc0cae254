"""Graph fusion: the attention pass rewrites the dynamo-exported nn.MultiheadAttention blocks as
com.microsoft.Attention; onnxruntime's optimizer fuses residual + LayerNorm only when asked (its CPU kernel is
slower); the graph shrinks and the logits stay."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ottimo.compress import fusion
from ottimo.compress.quantize import QuantOption, op_counts, quantize
from ottimo.onnx.measure import predict, scores, session
from tests.helpers.tiny_encoder import export, tokens

LAYERS = 2


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return export(tmp_path_factory.mktemp("fusion") / "fp32.onnx", layers=LAYERS)[0]


@pytest.fixture(scope="module")
def fused(fp32):
    dst = fp32.with_name("fused.onnx")
    return dst, fusion.optimize(fp32, dst, num_heads=4, check_rows=tokens(16), atol=1e-4)


def test_fusion_shrinks_the_graph_and_fuses_attention_and_layernorm(fused):
    path, report = fused
    ops = op_counts(path)
    assert report.nodes_after < report.nodes_before / 2
    assert ops["Attention"] == LAYERS and report.attention_fused == report.attention_blocks == LAYERS
    assert "Softmax" not in ops and "Transpose" not in ops
    assert report.fused == {"Attention": LAYERS}  # residual + LayerNorm left as Add + LayerNormalization
    assert report.not_fused == () and "attention 2/2" in report.summary


def test_fused_logits_match_fp32(fp32, fused):
    path, report = fused
    X = tokens(64, seed=5)  # padded and unpadded rows
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert np.abs(scores(session(path), X) - scores(session(fp32), X)).max() < 1e-4
    assert np.abs(scores(session(path), X[:1]) - scores(session(fp32), X[:1])).max() < 1e-4  # batch 1 too


def test_head_count_is_inferred_from_the_scale(fp32, tmp_path):
    report = fusion.optimize(fp32, tmp_path / "auto.onnx", check_rows=tokens(8), atol=1e-4)
    assert report.attention_fused == LAYERS
    attn = [n for n in onnx.load(str(tmp_path / "auto.onnx")).graph.node if n.op_type == "Attention"]
    assert {helper.get_attribute_value(a) for n in attn for a in n.attribute if a.name == "num_heads"} == {4}


def test_onnxruntime_alone_does_not_match_the_dynamo_attention(fp32, tmp_path):
    """Why the attention pass exists (onnxruntime 1.32): its optimizer fuses LayerNorms but no attention here."""
    report = fusion.optimize(fp32, tmp_path / "ort.onnx", attention=False, skip_layer_norm=True,
                             check_rows=tokens(8), atol=1e-4)
    assert "Attention" not in report.ops_after and "SkipLayerNormalization" in report.fused
    assert report.ops_after["Softmax"] == LAYERS


def test_skip_layer_norm_is_fused_only_when_asked(fp32, tmp_path):
    """SkipLayerNormalization runs slower than Add + LayerNormalization on onnxruntime's CPU provider (1.32): the
    default leaves them; skip_layer_norm=True fuses them, with the same logits."""
    report = fusion.optimize(fp32, tmp_path / "skip.onnx", num_heads=4, skip_layer_norm=True, check_rows=tokens(8),
                             atol=1e-4)
    assert report.fused["SkipLayerNormalization"] >= LAYERS and report.fused["Attention"] == LAYERS
    assert "no SkipLayerNormalization" not in " ".join(report.passes)


def test_a_masked_block_is_left_alone_with_the_reason(fp32, tmp_path):
    """An Add before the Softmax (as an attention mask writes it) is not plain MHA: not fused, said why."""
    model = onnx.load(str(fp32))
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.op_type == "Softmax")
    soft = nodes[at]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((1,), np.float32), "mask_zero"))
    add = helper.make_node("Add", [soft.input[0], "mask_zero"], ["masked_scores"], name="mask_add")
    soft.input[0] = "masked_scores"
    nodes.insert(at, add)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model, blocks, done, why = fusion.fuse_attention(model, num_heads=4)
    assert (blocks, done) == (LAYERS, LAYERS - 1)
    assert len(why) == 1 and "not plain MHA" in why[0]
    onnx.save(model, str(tmp_path / "masked.onnx"))
    assert np.abs(scores(session(tmp_path / "masked.onnx"), tokens(8)) - scores(session(fp32), tokens(8))).max() < 1e-4


def test_a_wrong_result_raises(fp32, tmp_path, monkeypatch):
    monkeypatch.setattr(fusion, "max_abs_diff", lambda a, b, X: 0.5)
    with pytest.raises(fusion.FusionError, match="attention=False"):
        fusion.optimize(fp32, tmp_path / "bad.onnx", check_rows=tokens(4), atol=1e-4)


def test_dynamic_int8_of_the_fused_graph_uses_qattention(fp32, fused, tmp_path):
    q = quantize(fused[0], tmp_path / "fused_dyn.onnx", QuantOption("dynamic"))
    ops = op_counts(q)
    assert ops["QAttention"] == LAYERS and ops["MatMulInteger"] >= 2 * LAYERS
    X = tokens(128, seed=6)
    assert (predict(session(q), X) == predict(session(fp32), X)).mean() >= 0.9


def test_a_graph_without_attention_passes_through(tmp_path):
    import json

    import torch

    from ottimo.models.builtin import mlp
    from ottimo.onnx.export import export_onnx
    from ottimo.spec import InputSpec

    torch.manual_seed(0)
    src = export_onnx(mlp.build(InputSpec.tabular(12), 3).eval(), InputSpec.tabular(12), tmp_path / "mlp.onnx")
    X = np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32)
    report = fusion.optimize(src, tmp_path / "mlp_f.onnx", check_rows=X, atol=1e-5)
    assert report.attention_blocks == 0 and report.fused == {} and report.max_abs_diff <= 1e-5
    assert json.loads(json.dumps(report.as_dict()))["summary"] == report.summary

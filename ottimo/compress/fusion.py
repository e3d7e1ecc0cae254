"""Graph fusion before quantization: a fused FP32 candidate of its own, and the base INT8 starts from.

Two passes, each reported by what it changed:

1. **Attention** (`fuse_attention`, Ottimo's own pass). torch's dynamo exporter writes `nn.MultiheadAttention`
   (batch_first, no mask) as a packed in-projection MatMul, a QKV split (Reshape/Unsqueeze/Transpose/Squeeze/
   Gather), per-head Reshape/Transpose, a scaled MatMul-Softmax-MatMul and an out-projection Gemm. ONNX Runtime's
   transformer optimizer (every `model_type`, every `opt_level`, with or without `quant_pre_process` first, checked
   on onnxruntime 1.32) does not match that pattern. This pass finds each block by its structure (one Softmax
   between a (D, 3D) in-projection and a (D, D) out-projection, nothing leaving the block but its output) and writes
   it as one `com.microsoft.Attention` node (which `quantize_dynamic` turns into `QAttention`) followed by the
   out-projection MatMul + Add. A block it cannot prove equivalent (a mask, an unknown op, an outside consumer)
   stays as it is, with the reason in the report.
2. **ONNX Runtime's transformer optimizer** (`onnxruntime.transformers.optimizer.optimize_model`, `model_type`
   "bert" by default): LayerNormalization, Gelu / FastGelu / BiasGelu where the graph has them (the built-in
   transformer uses ReLU: nothing to fuse there). Not SkipLayerNormalization (residual Add + LayerNorm) unless
   asked (`skip_layer_norm`): onnxruntime 1.32's CPU kernel for it is ~4x slower than the Add + LayerNormalization
   it replaces (one node on a (1, 128, 128) input: 89 us against 23 us; at batch 64: 5.6 ms against 1.5 ms, 1
   thread); in a 4-layer d_model-128 encoder at 128 tokens its 7 nodes took 0.6 ms of the fused graph's 3.8 ms and
   of dynamic INT8's 2.1 ms (1.6 ms without them).

`optimize` runs both, checks the result against the source on a few rows (`max_abs_diff`) and returns a
`FusionReport` with op counts before and after.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ottimo.onnx.export import INPUT, OUTPUT, shaped
from ottimo.onnx.measure import session

FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization",
             "EmbedLayerNormalization", "Gelu", "FastGelu", "BiasGelu", "BiasAdd")
# ops a dynamo-exported, mask-free nn.MultiheadAttention block is made of
BLOCK_OPS = {"Transpose", "MatMul", "Gemm", "Add", "Reshape", "Unsqueeze", "Squeeze", "Gather", "Shape", "Slice",
             "Concat", "Mul", "Div", "Softmax", "Sqrt", "Cast", "Constant"}


class FusionError(RuntimeError):
    """The optimised graph does not reproduce the source model's outputs within tolerance."""


@dataclass(frozen=True)
class FusionReport:
    """What `optimize` changed: node and op counts before/after, the fused ops present after, how many attention
    blocks there were and how many fused (with the reason for each that did not), and the largest output difference
    against the source on the check rows."""

    src: str
    dst: str
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    attention_blocks: int
    attention_fused: int
    not_fused: tuple[str, ...] = ()  # one line per attention block left as it was, with why
    max_abs_diff: float | None = None  # None: no check rows given
    model_type: str = "bert"
    passes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        """Every field plus `fused` and `summary`, JSON-ready (for MLflow and the report)."""
        return asdict(self) | {"fused": self.fused, "summary": self.summary}

    @property
    def fused(self) -> dict[str, int]:
        """Fused op types present after optimisation that were fewer (or absent) before -> how many were added."""
        return {op: self.ops_after.get(op, 0) - self.ops_before.get(op, 0) for op in FUSED_OPS
                if self.ops_after.get(op, 0) > self.ops_before.get(op, 0)}

    @property
    def summary(self) -> str:
        fused = ", ".join(f"{op} x{n}" for op, n in self.fused.items()) or "nothing"
        diff = "" if self.max_abs_diff is None else f"; max |diff| {self.max_abs_diff:.2e}"
        left = f"; not fused: {'; '.join(self.not_fused)}" if self.not_fused else ""
        return (f"{self.nodes_before} -> {self.nodes_after} nodes; fused {fused}; attention "
                f"{self.attention_fused}/{self.attention_blocks} blocks{diff}{left}")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return dict(sorted(Counter(n.op_type for n in nodes).items()))


# ---- the attention pass -------------------------------------------------------------------------------------------

class _Graph:
    """Look-ups over one graph: producer and consumers of each value, initializers as arrays."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.init = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def array(self, name: str) -> np.ndarray | None:
        if name in self.init:
            return numpy_helper.to_array(self.init[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
        return None

    def weight(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The constant second input of a MatMul/Gemm, as the (in, out) matrix it multiplies by."""
        if len(node.input) < 2:
            return None
        w = self.array(node.input[1])
        if w is None or w.ndim != 2:
            return None
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return None
            return w.T if attrs.get("transB", 0) else w
        return w

    def ancestors(self, start: str, stop: set[str], until=None) -> set[int]:
        """ids of the nodes `start` is computed from, not walking past values in `stop` nor above nodes for which
        `until(node)` holds (those are included)."""
        seen, todo = set(), [start]
        while todo:
            v = todo.pop()
            n = self.producer.get(v)
            if v in stop or n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if until is None or not until(n):
                todo.extend(n.input)
        return seen

    def only_consumer(self, value: str) -> onnx.NodeProto | None:
        c = self.consumers.get(value, [])
        return c[0] if len(c) == 1 and value not in self.outputs else None


@dataclass(frozen=True)
class _Block:
    x: str  # the block's input (batch, seq, D)
    y: str  # its output (batch, seq, D)
    nodes: tuple[int, ...]  # ids of the nodes it replaces
    w_in: np.ndarray  # (D, 3D)
    b_in: np.ndarray  # (3D,)
    w_out: np.ndarray  # (D, D)
    b_out: np.ndarray | None
    scale: float
    name: str


def _walk_out(g: _Graph, av: onnx.NodeProto):
    """From the attention-times-V MatMul down to the block's output: layout ops, the out-projection (Gemm, or MatMul
    [+ Add bias]), layout ops. Returns (out-projection node, weight, bias, output value, the bias Add or None) or why
    it does not match."""
    n = av
    while True:
        n = g.only_consumer(n.output[0])
        if n is None or n.op_type not in {"Transpose", "Reshape", "Gemm", "MatMul"}:
            return "no single out-projection after the attention MatMul"
        if n.op_type in {"Gemm", "MatMul"}:
            break
    proj, w = n, g.weight(n)
    if w is None or w.shape[0] != w.shape[1]:
        return f"out-projection {proj.name} has no constant square weight"
    bias = g.array(proj.input[2]) if proj.op_type == "Gemm" and len(proj.input) > 2 and proj.input[2] else None
    last, add = proj, None
    nxt = g.only_consumer(last.output[0])
    if proj.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add":
        other = [i for i in nxt.input if i != last.output[0]]
        b = g.array(other[0]) if other else None
        if b is not None and b.shape == (w.shape[1],):
            bias, last, add = b, nxt, nxt
    while (nxt := g.only_consumer(last.output[0])) is not None and nxt.op_type in {"Reshape", "Transpose"}:
        last = nxt
    return proj, w, bias, last.output[0], add


def _in_projection(g: _Graph, region: set[int], d: int):
    """The (D, 3D) MatMul among the Softmax's ancestors, its bias and the block input: (matmul, w, b, x, the bias Add
    or None) or why not. The dynamo export feeds it Transpose(x, perm=[1, 0, 2]) of the batch-first input."""
    mms = [n for n in g.graph.node if id(n) in region and n.op_type == "MatMul"
           and (w := g.weight(n)) is not None and w.shape == (d, 3 * d)]
    if len(mms) != 1:
        return f"{len(mms)} packed (D, 3D) in-projections above it (one expected)"
    mm = mms[0]
    w = g.weight(mm)
    add = g.only_consumer(mm.output[0])
    other = [i for i in add.input if i != mm.output[0]] if add is not None and add.op_type == "Add" else []
    b = g.array(other[0]) if other else None
    if b is None or b.shape != (3 * d,):
        b, add = np.zeros(3 * d, dtype=w.dtype), None
    t = g.producer.get(mm.input[0])
    perm = [helper.get_attribute_value(a) for a in t.attribute if a.name == "perm"] if t is not None else []
    if t is None or t.op_type != "Transpose" or not perm or list(perm[0]) != [1, 0, 2]:
        return "in-projection input is not the batch-first input transposed (perm [1, 0, 2])"
    return mm, w, b, t.input[0], add


def _scale(g: _Graph, nodes: list[onnx.NodeProto]) -> float | str:
    """The product of the scalar constants the block multiplies (divides) q, k or the scores by."""
    s = 1.0
    for n in nodes:
        if n.op_type not in {"Mul", "Div"}:
            continue
        consts = [g.array(i) for i in n.input[1:]]
        if len(consts) != 1 or consts[0] is None or consts[0].size != 1:
            return f"{n.op_type} {n.name} is not by a scalar constant"
        c = float(consts[0].reshape(()))
        s = s * c if n.op_type == "Mul" else s / c
    return s


def _block(g: _Graph, softmax: onnx.NodeProto) -> _Block | str:
    """The mask-free multi-head attention block around one Softmax, or why it is not one."""
    av = g.only_consumer(softmax.output[0])
    if av is None or av.op_type != "MatMul" or av.input[0] != softmax.output[0]:
        return "Softmax output does not feed one attention-times-V MatMul"
    out = _walk_out(g, av)
    if isinstance(out, str):
        return out
    proj, w_out, b_out, y, out_add = out
    d = w_out.shape[0]
    def packed(n: onnx.NodeProto) -> bool:
        return n.op_type == "MatMul" and (w := g.weight(n)) is not None and w.shape == (d, 3 * d)

    up = g.ancestors(softmax.output[0], set(), packed) | g.ancestors(av.input[1], set(), packed)
    found = _in_projection(g, up, d)
    if isinstance(found, str):
        return found
    mm, w_in, b_in, x, in_add = found
    region = g.ancestors(y, {x})
    nodes = [n for n in g.graph.node if id(n) in region]
    why = _closed(g, nodes, y, x)
    if why:
        return why
    ops = Counter(n.op_type for n in nodes)
    biases = {id(n) for n in (in_add, out_add) if n is not None}
    extra = [n.name for n in nodes if n.op_type == "Add" and id(n) not in biases]
    if ops["Softmax"] != 1 or extra:
        return (f"{ops['Softmax']} Softmax, Add {extra} besides the projection biases (a mask or bias term?): "
                "not plain MHA")
    scale = _scale(g, [n for n in nodes if n is not proj])
    if isinstance(scale, str):
        return scale
    return _Block(x, y, tuple(id(n) for n in nodes), w_in, b_in, w_out, b_out, scale, softmax.name)


def _closed(g: _Graph, nodes: list[onnx.NodeProto], y: str, x: str) -> str | None:
    """Why the block cannot be cut out (an op outside BLOCK_OPS, a value used outside it, an input that is neither
    x nor a constant), or None."""
    ids = {id(n) for n in nodes}
    inside = {o for n in nodes for o in n.output}
    for n in nodes:
        if n.op_type not in BLOCK_OPS:
            return f"{n.op_type} {n.name} inside the block"
        for o in n.output:
            if o != y and (o in g.outputs or any(id(c) not in ids for c in g.consumers.get(o, []))):
                return f"{n.name}'s output {o} is used outside the block"
        for i in n.input:
            if i and i != x and i not in inside and g.array(i) is None:
                return f"{n.name} reads {i}, neither the block input nor a constant"
    return None


def _heads(block: _Block, num_heads: int) -> int | str:
    """num_heads as given (checked against the block's scale) or, with 0, as the scale 1/sqrt(head_dim) implies."""
    d = block.w_out.shape[0]
    if num_heads:
        if d % num_heads:
            return f"hidden size {d} is not divisible by num_heads {num_heads}"
        return num_heads
    head_dim = 1.0 / block.scale**2
    heads = d / head_dim
    if abs(heads - round(heads)) > 1e-3 or round(heads) < 1 or d % round(heads):
        return f"scale {block.scale:.6g} is not 1/sqrt(head_dim) for any head count of {d}; pass num_heads"
    return int(round(heads))


def _rewrite(model: onnx.ModelProto, g: _Graph, block: _Block, heads: int, k: int) -> None:
    """Replace the block's nodes with Attention(x, W_in, b_in) -> MatMul(W_out) [-> Add(b_out)] writing `y`."""
    d = block.w_out.shape[0]
    pre = f"ottimo_attn_{k}"
    inits = [numpy_helper.from_array(block.w_in.astype(np.float32), f"{pre}_qkv_weight"),
             numpy_helper.from_array(block.b_in.astype(np.float32), f"{pre}_qkv_bias"),
             numpy_helper.from_array(block.w_out.astype(np.float32), f"{pre}_out_weight")]
    attrs = {"num_heads": heads}
    if not math.isclose(block.scale, 1.0 / math.sqrt(d / heads), rel_tol=1e-5):
        attrs["scale"] = float(block.scale)
    new = [helper.make_node("Attention", [block.x, inits[0].name, inits[1].name], [f"{pre}_ctx"],
                            name=f"{pre}_Attention", domain="com.microsoft", **attrs)]
    if block.b_out is None:
        new.append(helper.make_node("MatMul", [f"{pre}_ctx", inits[2].name], [block.y], name=f"{pre}_out_MatMul"))
    else:
        inits.append(numpy_helper.from_array(block.b_out.astype(np.float32), f"{pre}_out_bias"))
        new += [helper.make_node("MatMul", [f"{pre}_ctx", inits[2].name], [f"{pre}_out"], name=f"{pre}_out_MatMul"),
                helper.make_node("Add", [f"{pre}_out", inits[3].name], [block.y], name=f"{pre}_out_Add")]
    drop = set(block.nodes)
    kept = [n for n in model.graph.node if id(n) not in drop]
    at = next(i for i, n in enumerate(model.graph.node) if id(n) in drop)
    before = sum(1 for n in model.graph.node[:at] if id(n) not in drop)
    del model.graph.node[:]
    model.graph.node.extend(kept[:before] + new + kept[before:])
    model.graph.initializer.extend(inits)


def fuse_attention(model: onnx.ModelProto, num_heads: int = 0) -> tuple[onnx.ModelProto, int, int, tuple[str, ...]]:
    """Rewrite every mask-free multi-head attention block of a dynamo-exported graph as com.microsoft.Attention, in
    place. Returns (model, blocks found, blocks fused, why each other block was left). `num_heads` 0: from each
    block's scale (1/sqrt(head_dim)); give it when the model scales differently."""
    softmaxes = [n.name for n in model.graph.node if n.op_type == "Softmax"]
    fused, why = 0, []
    for k, name in enumerate(softmaxes):
        g = _Graph(model.graph)  # rebuilt after each rewrite: node identities change
        node = next(n for n in model.graph.node if n.name == name)
        block = _block(g, node)
        heads = block if isinstance(block, str) else _heads(block, num_heads)
        if isinstance(heads, str):
            why.append(f"Softmax {name}: {heads}")
            continue
        _rewrite(model, g, block, heads, k)
        fused += 1
    if fused and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(model)
    return model, len(softmaxes), fused, tuple(why)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# ---- the whole step -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """The transformer optimizer logs every fusion at INFO/WARNING and prints progress bars."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def ort_optimize(model: onnx.ModelProto, num_heads: int, hidden_size: int, model_type: str = "bert",
                 opt_level: int = 0, skip_layer_norm: bool = False) -> onnx.ModelProto:
    """onnxruntime.transformers.optimizer.optimize_model on a ModelProto: its Python fusions; opt_level 1 runs
    onnxruntime's basic graph optimizations first, 2 / 99 its extended / layout ones, which write provider-specific
    ops into the file (a session applies them at load anyway). `skip_layer_norm` False leaves residual Add +
    LayerNormalization unfused (SkipLayerNormalization is slower on onnxruntime's CPU provider: the module's note)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = skip_layer_norm
    with _quiet():
        return optimize_model(model, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                              opt_level=opt_level, optimization_options=options).model


def with_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """The model with every value's type and shape recorded (onnxruntime's symbolic shape inference, which knows the
    com.microsoft ops), so the quantizers can type the outputs of fused nodes; (model, False) when inference fails."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        with _quiet():
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True), True
    except Exception:  # noqa: BLE001 - inference is an aid; the quantizer falls back to a default type
        return model, False


def max_abs_diff(a: Path, b: Path, X: np.ndarray) -> float:
    """Largest |logits_a - logits_b| over rows X (flat or shaped; fed through `shaped`)."""
    sa, sb = session(a), session(b)
    ya = sa.run([OUTPUT], {INPUT: shaped(sa, X)})[0]
    yb = sb.run([OUTPUT], {INPUT: shaped(sb, X)})[0]
    return float(np.abs(ya - yb).max())


def optimize(src: Path, dst: Path, num_heads: int = 0, hidden_size: int = 0, *, attention: bool = True,
             model_type: str = "bert", opt_level: int = 0, skip_layer_norm: bool = False,
             check_rows: np.ndarray | None = None, atol: float = 1e-3) -> FusionReport:
    """Fuse `src` into `dst`: the attention pass (when `attention`), then onnxruntime's transformer optimizer
    (`model_type`, `opt_level`; 0 keeps the file portable across CPUs; SkipLayerNormalization only with
    `skip_layer_norm`, slower on the CPU provider), then symbolic shape inference (so the
    quantizers can type fused outputs). With `check_rows` (a few input rows), the
    fused file must reproduce the source's logits within `atol` or FusionError is raised (dst is left for
    inspection): pass them, the attention pass proves structure, only this check proves numbers. num_heads /
    hidden_size 0: inferred from the graph."""
    model = onnx.load(str(src))
    before = op_counts(model)
    passes, blocks, fused, why = [], 0, 0, ()
    if attention:
        model, blocks, fused, why = fuse_attention(model, num_heads)
        passes.append(f"attention ({fused}/{blocks})")
    model = ort_optimize(model, num_heads, hidden_size, model_type, opt_level, skip_layer_norm)
    passes.append(f"onnxruntime.transformers {model_type} opt_level {opt_level}"
                  + ("" if skip_layer_norm else ", no SkipLayerNormalization"))
    model, typed = with_shapes(model)
    passes.append("symbolic shapes" if typed else "symbolic shapes failed: quantize with DefaultTensorType FLOAT")
    onnx.save(model, str(dst))
    diff = None
    if check_rows is not None:
        diff = max_abs_diff(src, dst, check_rows)
        if not diff <= atol:
            raise FusionError(f"fused {dst} differs from {src} by {diff:.2e} (> {atol:.0e}) on {len(check_rows)} "
                              "rows; run optimize(..., attention=False) to see whether the attention pass is why")
    return FusionReport(str(src), str(dst), sum(before.values()), sum(op_counts(model).values()), before,
                        op_counts(model), blocks, fused, why, diff, model_type, tuple(passes))

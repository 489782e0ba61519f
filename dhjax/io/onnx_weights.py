"""Importer of insightface ArcFace iresnet weights from ONNX files.

insightface's model zoo distributes its ArcFace recognisers as ONNX files (for example the
``w600k_r50.onnx`` of the buffalo_l pack, or ``glint360k_r100.onnx``), exported from
arcface_torch's iresnet. `load_iresnet_onnx` reads such a file with the ``onnx`` package (an
optional dependency: ``pip install onnx``), recovers the architecture from the graph and returns
the variables of `dhjax.nn.iresnet.IResNet` (this module does not import it: the names below are
the contract, see that module's docstring).

How the graph is read. The walk follows the data from the graph input through the layers and
expects, in order (``[X]`` = optional, ``X*`` = repeated):

    stem   Conv 3x3 (stride 1, pad 1, 3 input channels) -> [BatchNormalization] -> PRelu
    block* BatchNormalization -> Conv 3x3 -> [BatchNormalization] -> PRelu
           -> Conv 3x3 (stride 1 or 2) -> [BatchNormalization] -> Add(., shortcut)
           shortcut = the block input itself, or Conv 1x1 (stride 2) -> [BatchNormalization]
    head   BatchNormalization -> Flatten (axis 1) or Reshape -> Gemm, or MatMul [-> Add bias]
           -> [BatchNormalization] -> graph output

* Identity, Dropout and Cast nodes on the data path are skipped (dhjax computes in float32),
  Shape nodes reading it are ignored (the Reshape they feed may take its shape from them).
* Weights may be initializers or constants computed from them by Constant, Identity,
  Unsqueeze, Squeeze, Reshape or Cast nodes (PyTorch's exporters write PReLU slopes as [C, 1, 1]
  or as Unsqueeze of a [C] initializer; both work, as does [1, C, 1, 1] or a single slope).
* BatchNorm folded into the convolution before it (PyTorch's exporter does this in eval mode,
  as in insightface's released files: the Conv then carries a bias and no BatchNormalization
  follows) is imported as an identity BatchNorm (scale 1, mean 0, variance 1 - eps) whose bias
  is the convolution's bias; the names of those layers are listed in ``config["folded_bn"]``.
  In eval mode this is exact. Training such a network with batch statistics (train=True)
  starts from a different function, because the folded layers renormalise.
* A convolution bias in front of a kept BatchNormalization is moved into its mean; BatchNorm
  epsilons other than the model's 1e-5 are moved into the variance (exact).
* Stages are inferred from the blocks: a block with a downsample shortcut starts a stage. There
  must be 4 stages whose widths double from the stem's width, every stage's first block has
  stride 2, the others stride 1 and identity shortcuts, and the FC input is 8 * width * 7 * 7
  (a 112x112 input).
* Weights of any floating dtype (fp16 included) are returned as float32.
Not supported (an error names the node that does not fit): graphs with input normalisation
inside (Sub/Mul in front of the first Conv, as in the older MXNet conversions), MobileFaceNet
and other architectures, grouped or dilated convolutions, Conv with auto_pad, dynamic weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dhjax.io._common import existing_file

__all__ = ["load_iresnet_onnx"]

BN_EPS = 1e-5  # the epsilon dhjax.nn.iresnet.IResNet uses (insightface's)
_PASS_THROUGH = ("Identity", "Dropout", "Cast")  # on the data path; computed in float32


class _Graph:
    """Lookup helpers over an onnx GraphProto; errors name the file."""

    def __init__(self, graph, path: Path, numpy_helper):
        self.path = path
        self._nh = numpy_helper
        self.nodes = list(graph.node)
        self.init = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.producer = {}
        self.users = {}
        for node in self.nodes:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.users.setdefault(i, []).append(node)
        self._const = {}
        inputs = [i.name for i in graph.input if i.name not in self.init]
        if len(inputs) != 1:
            self.fail(f"expected one data input, found {inputs}")
        self.input = inputs[0]

    def fail(self, msg: str):
        raise ValueError(f"{self.path}: not a supported iresnet ONNX graph: {msg}")

    @staticmethod
    def describe(node) -> str:
        return f"{node.op_type} node '{node.name or node.output[0]}'"

    # -- constants ---------------------------------------------------------------------------
    def const(self, name: str):
        """The value of a constant tensor (initializer or constant-computed), else None."""
        if name in self._const:
            return self._const[name]
        value = None
        if name in self.init:
            value = self._nh.to_array(self.init[name])
        elif name in self.producer:
            node = self.producer[name]
            op = node.op_type
            args = [self.const(i) if i else None for i in node.input]
            attrs = {a.name: a for a in node.attribute}
            if op == "Constant":
                a = attrs.get("value")
                if a is not None:
                    value = self._nh.to_array(a.t)
                elif "value_float" in attrs:
                    value = np.asarray(attrs["value_float"].f, np.float32)
                elif "value_floats" in attrs:
                    value = np.asarray(list(attrs["value_floats"].floats), np.float32)
                elif "value_int" in attrs:
                    value = np.asarray(attrs["value_int"].i, np.int64)
                elif "value_ints" in attrs:
                    value = np.asarray(list(attrs["value_ints"].ints), np.int64)
            elif args and args[0] is not None:
                x = args[0]
                axes = args[1] if len(args) > 1 and args[1] is not None else (
                    list(attrs["axes"].ints) if "axes" in attrs else None)
                if op == "Identity":
                    value = x
                elif op == "Cast":
                    value = x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x
                elif op == "Unsqueeze" and axes is not None:
                    out_rank = x.ndim + len(axes)
                    value = x
                    for ax in sorted(int(a) % out_rank for a in np.ravel(axes)):
                        value = np.expand_dims(value, ax)
                elif op == "Squeeze":
                    value = np.squeeze(x, axis=None if axes is None else
                                       tuple(int(a) % x.ndim for a in np.ravel(axes)))
                elif op == "Reshape" and len(args) > 1 and args[1] is not None:
                    shape = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(args[1])]
                    value = x.reshape(shape)
        if value is not None:
            value = np.asarray(value)
            if np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float32)
        self._const[name] = value
        return value

    def weight(self, node, index: int, what: str) -> np.ndarray:
        name = node.input[index] if index < len(node.input) else ""
        value = self.const(name) if name else None
        if value is None:
            self.fail(f"{self.describe(node)}: {what} (input {index}, '{name}') is not a constant")
        return value

    # -- data flow ---------------------------------------------------------------------------
    def consumers(self, tensor: str):
        """Nodes reading `tensor` on the data path, looking through Identity/Dropout/Cast and
        ignoring Shape nodes (they read the shape only, e.g. for a dynamic Reshape)."""
        out = []
        for node in self.users.get(tensor, []):
            if node.op_type == "Shape":
                continue
            if node.op_type in _PASS_THROUGH:
                out.extend(self.consumers(node.output[0]))
            else:
                out.append(node)
        return out

    def source(self, tensor: str):
        """The node producing `tensor`, looking back through Identity/Dropout/Cast."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in _PASS_THROUGH:
            tensor = node.input[0]
            node = self.producer.get(tensor)
        return node, tensor

    def canonical(self, tensor: str) -> str:
        return self.source(tensor)[1]

    def next(self, tensor: str, ops, after: str):
        """The single consumer of `tensor`, which must be one of `ops`."""
        users = self.consumers(tensor)
        if len(users) != 1:
            found = ", ".join(self.describe(n) for n in users) or "nothing"
            self.fail(f"after {after}: expected one {'/'.join(ops)}, found {found}")
        node = users[0]
        if node.op_type not in ops:
            self.fail(f"after {after}: expected {'/'.join(ops)}, found {self.describe(node)}")
        return node

    def maybe_next(self, tensor: str, op: str):
        users = self.consumers(tensor)
        if len(users) == 1 and users[0].op_type == op:
            return users[0]
        return None


def _attrs(node, onnx):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Reader:
    """Walks an iresnet graph and collects flax variables (float32 numpy)."""

    def __init__(self, g: _Graph, onnx):
        self.g = g
        self.onnx = onnx
        self.params = {}
        self.stats = {}
        self.folded = []

    # -- layers ------------------------------------------------------------------------------
    def conv(self, node, cin: int, k: int, stride: int | None, where: str):
        """Checks a Conv node; returns (HWIO kernel, bias or None, stride, cout)."""
        g = self.g
        if node.op_type != "Conv":
            g.fail(f"{where}: expected Conv, found {g.describe(node)}")
        w = g.weight(node, 1, "weight")
        if w.ndim != 4 or w.shape[1] != cin or w.shape[2:] != (k, k):
            g.fail(f"{g.describe(node)} ({where}): weight '{node.input[1]}' has shape "
                   f"{tuple(w.shape)}, expected [out, {cin}, {k}, {k}]")
        a = _attrs(node, self.onnx)
        s = list(a.get("strides", [1, 1]))
        p = (k - 1) // 2
        if (a.get("group", 1) != 1 or list(a.get("dilations", [1, 1])) != [1, 1]
                or list(a.get("pads", [0, 0, 0, 0])) != [p] * 4 or s[0] != s[1]
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or (stride is not None and s[0] != stride) or s[0] not in (1, 2)):
            g.fail(f"{g.describe(node)} ({where}): unsupported attributes {a} (expected "
                   f"group 1, dilation 1, pads {p}, strides {stride or '1 or 2'})")
        bias = g.weight(node, 2, "bias") if len(node.input) > 2 and node.input[2] else None
        if bias is not None and bias.shape != (w.shape[0],):
            g.fail(f"{g.describe(node)} ({where}): bias '{node.input[2]}' has shape "
                   f"{tuple(bias.shape)}, expected [{w.shape[0]}]")
        return np.transpose(w, (2, 3, 1, 0)), bias, s[0], w.shape[0]

    def bn(self, node, c: int, where: str, conv_bias=None):
        """BatchNormalization node -> (scale, bias, mean, var) for epsilon BN_EPS."""
        g = self.g
        vals = [g.weight(node, i, n) for i, n in enumerate(("scale", "bias", "mean", "variance"), 1)]
        for i, v in enumerate(vals, 1):
            if v.size != c:
                g.fail(f"{g.describe(node)} ({where}): '{node.input[i]}' has {v.size} values, "
                       f"expected {c}")
        scale, bias, mean, var = (v.reshape(c) for v in vals)
        a = _attrs(node, self.onnx)
        if a.get("training_mode", 0):
            g.fail(f"{g.describe(node)} ({where}): exported in training mode")
        eps = float(a.get("epsilon", 1e-5))
        var = var + np.float32(eps - BN_EPS)
        if conv_bias is not None:
            mean = mean - conv_bias
        return scale, bias, mean, var

    def put_bn(self, scope, name, values):
        scale, bias, mean, var = (np.asarray(v, np.float32) for v in values)
        _put(self.params, scope + (name,), {"scale": scale, "bias": bias})
        _put(self.stats, scope + (name,), {"mean": mean, "var": var})

    def conv_bn(self, node, cin, k, stride, scope, conv_name, bn_name, where):
        """Conv [-> BN]; stores both; returns (output tensor, stride, cout)."""
        kernel, cbias, s, cout = self.conv(node, cin, k, stride, where)
        _put(self.params, scope + (conv_name,), {"kernel": kernel})
        out = node.output[0]
        bn_node = self.g.maybe_next(out, "BatchNormalization")
        if bn_node is not None:
            self.put_bn(scope, bn_name, self.bn(bn_node, cout, where, cbias))
            out = bn_node.output[0]
        else:
            b = np.zeros(cout, np.float32) if cbias is None else cbias
            self.put_bn(scope, bn_name, (np.ones(cout), b, np.zeros(cout),
                                         np.full(cout, 1.0 - BN_EPS)))
            self.folded.append("/".join(scope + (bn_name,)))
        return out, s, cout

    def prelu(self, tensor, c, scope, where):
        g = self.g
        node = g.next(tensor, ("PRelu",), where)
        slope = g.weight(node, 1, "slope")
        if slope.size == 1:
            slope = np.full(c, slope.reshape(()), np.float32)
        elif slope.size != c or sorted(slope.shape)[:-1] != [1] * (slope.ndim - 1):
            g.fail(f"{g.describe(node)} ({where}): slope '{node.input[1]}' has shape "
                   f"{tuple(slope.shape)}, expected {c} values ([{c}], [{c}, 1, 1], ...)")
        _put(self.params, scope + ("prelu",), {"slope": slope.reshape(c).astype(np.float32)})
        return node.output[0]

    # -- network -----------------------------------------------------------------------------
    def read(self):
        g = self.g
        first = g.next(g.input, ("Conv",), f"the graph input '{g.input}'")
        x, _, width = self.conv_bn(first, 3, 3, 1, (), "conv1", "bn1", "stem")
        x = self.prelu(x, width, (), "stem")

        blocks = []  # (stage, index, stride, cout)
        c = width
        while True:
            users = g.consumers(x)
            bns = [n for n in users if n.op_type == "BatchNormalization"]
            if len(bns) != 1:
                found = ", ".join(g.describe(n) for n in users) or "nothing"
                g.fail(f"after '{x}': expected one BatchNormalization (next block or head), "
                       f"found {found}")
            after_bn = g.consumers(bns[0].output[0])
            if len(after_bn) == 1 and after_bn[0].op_type in ("Flatten", "Reshape"):
                if len(users) != 1:
                    g.fail(f"'{x}' feeds the head and also "
                           + ", ".join(g.describe(n) for n in users if n is not bns[0]))
                break
            # a residual block
            stage = len({b[0] for b in blocks}) if blocks else 0
            down = any(n.op_type == "Conv" for n in users)
            if not blocks and not down:
                g.fail(f"the first block (after '{x}') has no Conv 1x1 downsample shortcut")
            if down:
                stage += 1
            index = 0 if down else sum(1 for b in blocks if b[0] == stage)
            scope = (f"layer{stage}_{index}",)
            where = f"block {len(blocks) + 1} (layer{stage}.{index})"
            x, stride, cout = self.block(x, users, bns[0], c, scope, where, down)
            if down and stride != 2:
                g.fail(f"{where}: a stage's first block must have stride 2, found {stride}")
            blocks.append((stage, index, stride, cout))
            c = cout

        layers = tuple(sum(1 for b in blocks if b[0] == s) for s in (1, 2, 3, 4))
        n_stages = len({b[0] for b in blocks})
        if n_stages != 4:
            g.fail(f"found {n_stages} stages (blocks per stage "
                   f"{[sum(1 for b in blocks if b[0] == s) for s in range(1, n_stages + 1)]}), "
                   "an iresnet has 4")
        for s in (1, 2, 3, 4):
            first_block = next(b for b in blocks if b[0] == s)
            if first_block[3] != width * 2 ** (s - 1):
                g.fail(f"stage {s} has {first_block[3]} channels, expected "
                       f"{width * 2 ** (s - 1)} (stem width {width} doubled per stage)")
        self.head(x, bns[0], c)
        return layers, width

    def block(self, x, users, bn1, cin, scope, where, down):
        g = self.g
        if len(users) != 2:  # bn1, and the Add (identity shortcut) or the downsample Conv
            g.fail(f"{where}: block input '{x}' feeds "
                   + (", ".join(g.describe(n) for n in users) or "nothing")
                   + f", expected {'BatchNormalization and a Conv 1x1' if down else 'BatchNormalization and Add'}")
        self.put_bn(scope, "bn1", self.bn(bn1, cin, where))
        conv1 = g.next(bn1.output[0], ("Conv",), f"{where} bn1")
        y, _, c = self.conv_bn(conv1, cin, 3, 1, scope, "conv1", "bn2", f"{where} conv1")
        y = self.prelu(y, c, scope, where)
        conv2 = g.next(y, ("Conv",), f"{where} prelu")
        y, stride, c2 = self.conv_bn(conv2, c, 3, None, scope, "conv2", "bn3", f"{where} conv2")
        if c2 != c:
            g.fail(f"{g.describe(conv2)} ({where}): {c2} output channels, expected {c}")
        add = g.next(y, ("Add",), f"{where} conv2")
        others = [i for i in add.input if g.canonical(i) != g.canonical(y)]
        if len(others) != 1:
            g.fail(f"{g.describe(add)} ({where}): expected the residual branch and a shortcut")
        short = g.canonical(others[0])
        if down:
            dconv = next(n for n in users if n.op_type == "Conv")
            d, dstride, dc = self.conv_bn(dconv, cin, 1, stride, scope, "downsample_conv",
                                          "downsample_bn", f"{where} downsample")
            if g.canonical(d) != short or dc != c:
                g.fail(f"{g.describe(add)} ({where}): the shortcut is not the downsample branch "
                       f"{g.describe(dconv)} with {c} channels")
        else:
            if short != g.canonical(x):
                node, _ = g.source(short)
                what = g.describe(node) if node is not None else f"'{short}'"
                g.fail(f"{g.describe(add)} ({where}): shortcut from {what}, expected the block "
                       "input (identity) or a Conv 1x1 downsample")
            if stride != 1 or c != cin:
                g.fail(f"{where}: identity shortcut with stride {stride} and {cin} -> {c} "
                       "channels (only the first block of a stage may change them)")
        return add.output[0], stride, c

    def head(self, x, bn_node, c):
        g = self.g
        self.put_bn((), "bn2", self.bn(bn_node, c, "head bn2"))
        flat = g.next(bn_node.output[0], ("Flatten", "Reshape"), "head bn2")
        if flat.op_type == "Flatten" and _attrs(flat, self.onnx).get("axis", 1) != 1:
            g.fail(f"{g.describe(flat)}: expected axis 1")
        n_in = c * 7 * 7
        fc = g.next(flat.output[0], ("Gemm", "MatMul"), "head flatten")
        if fc.op_type == "Gemm":
            a = _attrs(fc, self.onnx)
            if a.get("transA", 0):
                g.fail(f"{g.describe(fc)}: transA is not supported")
            w = g.weight(fc, 1, "weight")
            kernel = (w.T if a.get("transB", 0) else w) * np.float32(a.get("alpha", 1.0))
            if len(fc.input) > 2 and fc.input[2]:
                bias = g.weight(fc, 2, "bias") * np.float32(a.get("beta", 1.0))
            else:
                bias = np.zeros(kernel.shape[-1], np.float32)
            out = fc.output[0]
        else:
            kernel = g.weight(fc, 1, "weight")
            out = fc.output[0]
            add = g.maybe_next(out, "Add")
            bias = None
            if add is not None:
                other = [i for i in add.input if g.canonical(i) != g.canonical(out)]
                bias = g.const(other[0]) if len(other) == 1 else None
                if bias is None:
                    g.fail(f"{g.describe(add)} after the FC MatMul: expected a constant bias")
                out = add.output[0]
            else:
                bias = np.zeros(kernel.shape[-1] if kernel.ndim == 2 else 0, np.float32)
        if kernel.ndim != 2 or kernel.shape[0] != n_in:
            g.fail(f"{g.describe(fc)}: weight '{fc.input[1]}' gives an FC of shape "
                   f"{tuple(kernel.shape)} [in, out], expected in = {c} * 7 * 7 = {n_in} "
                   "(a 112x112 input)")
        emb = kernel.shape[1]
        if bias.size != emb:
            g.fail(f"{g.describe(fc)}: bias has {bias.size} values, expected {emb}")
        self.params["fc"] = {"kernel": np.ascontiguousarray(kernel, np.float32),
                             "bias": bias.reshape(emb).astype(np.float32)}
        feat = g.maybe_next(out, "BatchNormalization")
        if feat is not None:
            self.put_bn((), "features", self.bn(feat, emb, "head features"))
            out = feat.output[0]
        else:
            self.put_bn((), "features", (np.ones(emb), np.zeros(emb), np.zeros(emb),
                                         np.full(emb, 1.0 - BN_EPS)))
            self.folded.append("features")
        if out not in g.outputs and not any(g.canonical(o) == g.canonical(out) for o in g.outputs):
            users = ", ".join(g.describe(n) for n in g.consumers(out)) or "nothing"
            g.fail(f"the features '{out}' are not the graph output (followed by {users})")
        return emb


def _put(tree: dict, path: tuple, value: dict):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def load_iresnet_onnx(path: str | os.PathLike):
    """Reads an insightface ArcFace iresnet ONNX file into `dhjax.nn.iresnet.IResNet` variables.

    Args:
      path: the .onnx file (e.g. insightface's ``w600k_r50.onnx`` or ``glint360k_r100.onnx``).

    Returns:
      config: {"layers": (n1, n2, n3, n4), "width": int, "embedding": int, "bn_eps": 1e-5,
        "folded_bn": [names of BatchNorms that were folded into a Conv in the file],
        "source": str(path)}; `dhjax.nn.iresnet.model_from_config(config)` builds the module.
      variables: {"params": ..., "batch_stats": ...} nested dicts of float32 numpy arrays
        (conv kernels HWIO, FC kernel [8 w 7 7, E] for the channel-major flatten).

    Raises:
      ImportError: the onnx package is missing.
      FileNotFoundError: no such file.
      ValueError: not an ONNX file, or a graph this importer does not recognise (the message
        names the node or initializer that does not fit; see the module docstring).
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_iresnet_onnx needs the onnx package (an optional dependency): pip install onnx"
        ) from e
    path = existing_file(path)
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf raises various types
        raise ValueError(f"{path}: cannot be read as an ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node:
        raise ValueError(f"{path}: cannot be read as an ONNX model (the graph has no nodes)")
    g = _Graph(model.graph, path, numpy_helper)
    reader = _Reader(g, onnx)
    layers, width = reader.read()
    config = {
        "layers": layers,
        "width": int(width),
        "embedding": int(reader.params["fc"]["kernel"].shape[1]),
        "bn_eps": BN_EPS,
        "folded_bn": list(reader.folded),
        "source": str(path),
    }
    return config, {"params": reader.params, "batch_stats": reader.stats}

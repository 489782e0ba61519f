"""ArcFace ONNX importer: a small PyTorch iresnet (arcface_torch layout, random weights and
BatchNorm statistics) exported by PyTorch's TorchScript exporter with BatchNorms folded into the
convolutions (as in insightface's released files) and kept, loaded and run through
dhjax.nn.iresnet and compared with PyTorch; variants of the graph; errors."""

import sys

import numpy as np
import pytest

import jax

from dhjax.io.onnx_weights import load_iresnet_onnx
from dhjax.nn import iresnet as ir

from iresnet_common import export_onnx, torch_forward, torch_input, torch_iresnet

pytestmark = [
    pytest.mark.peers,
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

TINY = dict(layers=(1, 2, 1, 1), width=8, embedding=32)


@pytest.fixture(scope="module")
def net():
    return torch_iresnet(**TINY, seed=0)


@pytest.fixture(scope="module")
def x_ref(net):
    x = torch_input(batch=2, seed=1)
    return x, torch_forward(net, x)


def run_flax(config, variables, x_nchw):
    model = ir.model_from_config(config)
    return np.asarray(jax.jit(model.apply)(variables, np.transpose(x_nchw, (0, 2, 3, 1))))


def check_close(out, ref):
    np.testing.assert_allclose(out, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("fold", [True, False], ids=["bn_folded", "bn_kept"])
def test_matches_torch(net, x_ref, tmp_path, fold):
    path = export_onnx(net, tmp_path / "r_tiny.onnx", fold=fold)
    config, variables = load_iresnet_onnx(path)
    assert config["layers"] == (1, 2, 1, 1)
    assert (config["width"], config["embedding"], config["source"]) == (8, 32, str(path))
    if fold:  # every BatchNorm after a Conv was folded by the exporter; bn1s, bn2 and features stay
        assert "layer2_1/bn3" in config["folded_bn"] and "bn1" in config["folded_bn"]
        assert "layer2_1/bn1" not in config["folded_bn"] and "features" not in config["folded_bn"]
    else:
        assert config["folded_bn"] == []
    # same tree as the flax module's, float32 everywhere
    shapes = jax.eval_shape(ir.model_from_config(config).init, jax.random.key(0),
                            np.zeros((1, 112, 112, 3), np.float32))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    for a, b in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(variables)):
        assert a.shape == b.shape and b.dtype == np.float32
    x, ref = x_ref
    check_close(run_flax(config, variables, x), ref)
    # embeddings of [0, 1] images are the normalised features
    emb = np.asarray(jax.jit(ir.embed)(variables, (np.transpose(x, (0, 2, 3, 1)) + 1) / 2))
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-4)


def test_other_layout_and_epsilon(tmp_path):
    # another stage layout and width, and a BatchNorm epsilon other than the model's 1e-5
    net = torch_iresnet(layers=(1, 1, 2, 1), width=4, embedding=16, seed=3, eps=2e-3)
    path = export_onnx(net, tmp_path / "r_eps.onnx", fold=False)
    config, variables = load_iresnet_onnx(path)
    assert (config["layers"], config["width"], config["embedding"]) == ((1, 1, 2, 1), 4, 16)
    x = torch_input(batch=1, seed=2)
    check_close(run_flax(config, variables, x), torch_forward(net, x))


def test_matmul_head_and_slope_shapes(net, x_ref, tmp_path):
    # rewrite the exported graph: FC as MatMul + Add, PReLU slopes as [1, C, 1, 1] initializers
    from onnx import helper, numpy_helper

    model = onnx.load(str(export_onnx(net, tmp_path / "a.onnx", fold=True)))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for node in g.node:
        if node.op_type == "Gemm":
            w = numpy_helper.to_array(inits[node.input[1]])
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "fc_wT"))
            nodes.append(helper.make_node("MatMul", [node.input[0], "fc_wT"], ["fc_mm"], name="fc_mm"))
            nodes.append(helper.make_node("Add", ["fc_bias_c", "fc_mm"], node.output, name="fc_add"))
            nodes.append(helper.make_node("Identity", [node.input[2]], ["fc_bias_c"], name="fc_b"))
            continue
        if node.op_type == "PRelu" and node.input[1] in inits:
            s = numpy_helper.to_array(inits[node.input[1]]).reshape(1, -1, 1, 1)
            name = node.input[1] + "_4d"
            g.initializer.append(numpy_helper.from_array(s, name))
            node.input[1] = name
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    path = tmp_path / "b.onnx"
    onnx.save(model, str(path))
    config, variables = load_iresnet_onnx(path)
    x, ref = x_ref
    check_close(run_flax(config, variables, x), ref)


def test_dynamic_batch_reshape_head(net, x_ref, tmp_path):
    # x.view(B, -1) with a dynamic batch exports Shape -> Gather -> ... -> Reshape, not Flatten
    class ViewHead(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            b = self.body
            x = b.prelu(b.bn1(b.conv1(x)))
            x = b.bn2(b.layer4(b.layer3(b.layer2(b.layer1(x)))))
            return b.features(b.fc(x.view(x.size(0), -1)))

    path = tmp_path / "view.onnx"
    torch.onnx.export(ViewHead(net).eval(), (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False,
                      input_names=["input.1"], dynamic_axes={"input.1": {0: "batch"}})
    assert "Shape" in {n.op_type for n in onnx.load(str(path)).graph.node}
    config, variables = load_iresnet_onnx(path)
    x, ref = x_ref
    check_close(run_flax(config, variables, x), ref)


class Plain(torch.nn.Module):
    """Not an iresnet: conv -> relu -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, 1, 1)
        self.fc = torch.nn.Linear(4 * 28 * 28, 8)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x))[..., ::4, ::4], 1))


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        load_iresnet_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf at all" * 7)
    with pytest.raises(ValueError, match="junk.onnx"):
        load_iresnet_onnx(junk)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(Plain().eval(), (torch.zeros(1, 3, 112, 112),), str(plain), dynamo=False)
    with pytest.raises(ValueError, match=r"plain\.onnx: not a supported iresnet.*expected PRelu, found Relu"):
        load_iresnet_onnx(plain)
    # an iresnet with 3 stages only
    net3 = torch_iresnet(**TINY)
    net3.layer4 = torch.nn.Identity()
    net3.bn2 = torch.nn.BatchNorm2d(32).eval()
    net3.fc = torch.nn.Linear(32 * 14 * 14, 32)
    three = export_onnx(net3.eval(), tmp_path / "three.onnx")
    with pytest.raises(ValueError, match=r"three\.onnx.*found 3 stages"):
        load_iresnet_onnx(three)
    # the onnx package missing
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="pip install onnx"):
        load_iresnet_onnx(plain)

"""A small PyTorch iresnet (insightface arcface_torch layout) used as the reference in
tests/test_nn_iresnet.py and tests/test_io_onnx_weights.py; imports torch lazily so that
collecting the tests works without it."""

import numpy as np


def torch_iresnet(layers=(1, 2, 1, 1), width=8, embedding=32, seed=0, eps=1e-5):
    """Builds the reference network with random weights, random BatchNorm statistics and random
    PReLU slopes, in eval mode. Input [B, 3, 112, 112] -> [B, embedding]."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, c, stride, down):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin, eps=eps)
            self.conv1 = nn.Conv2d(cin, c, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c, eps=eps)
            self.prelu = nn.PReLU(c)
            self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(c, eps=eps)
            self.downsample = (nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False),
                                             nn.BatchNorm2d(c, eps=eps)) if down else None)

        def forward(self, x):
            y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            return y + (x if self.downsample is None else self.downsample(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width, eps=eps)
            self.prelu = nn.PReLU(width)
            cin = width
            for s, n in enumerate(layers):
                c = width * 2 ** s
                blocks = [Block(cin if b == 0 else c, c, 2 if b == 0 else 1, b == 0) for b in range(n)]
                setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
                cin = c
            self.bn2 = nn.BatchNorm2d(cin, eps=eps)
            self.dropout = nn.Dropout(0.0)
            self.fc = nn.Linear(cin * 7 * 7, embedding)
            self.features = nn.BatchNorm1d(embedding, eps=eps)

        def forward(self, x):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
            return self.features(self.fc(x))

    torch.manual_seed(seed)
    net = Net()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.5 * torch.rand(m.weight.shape[0], generator=g))
    return net.eval()


def torch_input(batch=2, seed=0):
    """[B, 3, 112, 112] float32 in [-1, 1] (numpy)."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)


def torch_forward(net, x_nchw):
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x_nchw)).numpy()


def export_onnx(net, path, fold=True):
    """Exports with PyTorch's TorchScript exporter; fold=True (its eval default) folds the
    BatchNorms after convolutions into them, fold=False keeps every BatchNormalization and
    writes PReLU slopes through Unsqueeze nodes."""
    import torch

    x = torch.zeros(1, 3, 112, 112)
    torch.onnx.export(net, (x,), str(path), dynamo=False, do_constant_folding=fold,
                      input_names=["input.1"], output_names=["features"])
    return path


def flax_variables_from_torch(net):
    """Maps the reference network's state dict onto dhjax.nn.iresnet.IResNet variables (an
    importer written independently of dhjax.io.onnx_weights, to test the module on its own)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    params, stats = {}, {}

    def conv(dst, key):
        dst["kernel"] = np.transpose(sd[key + ".weight"], (2, 3, 1, 0))

    def bn(p, s, key):
        p["scale"], p["bias"] = sd[key + ".weight"], sd[key + ".bias"]
        s["mean"], s["var"] = sd[key + ".running_mean"], sd[key + ".running_var"]

    def scope(name):
        return params.setdefault(name, {}), stats.setdefault(name, {})

    conv(params.setdefault("conv1", {}), "conv1")
    bn(*(d.setdefault("bn1", {}) for d in (params, stats)), "bn1")
    params["prelu"] = {"slope": sd["prelu.weight"]}
    blocks = sorted({tuple(k.split(".")[:2]) for k in sd if k.startswith("layer")})
    for layer, b in blocks:
        p, s = scope(f"{layer}_{b}")
        t = f"{layer}.{b}"
        for c in ("conv1", "conv2"):
            conv(p.setdefault(c, {}), f"{t}.{c}")
        for n in ("bn1", "bn2", "bn3"):
            bn(p.setdefault(n, {}), s.setdefault(n, {}), f"{t}.{n}")
        p["prelu"] = {"slope": sd[f"{t}.prelu.weight"]}
        if f"{t}.downsample.0.weight" in sd:
            conv(p.setdefault("downsample_conv", {}), f"{t}.downsample.0")
            bn(p.setdefault("downsample_bn", {}), s.setdefault("downsample_bn", {}),
               f"{t}.downsample.1")
    bn(params.setdefault("bn2", {}), stats.setdefault("bn2", {}), "bn2")
    params["fc"] = {"kernel": sd["fc.weight"].T.copy(), "bias": sd["fc.bias"]}
    bn(params.setdefault("features", {}), stats.setdefault("features", {}), "features")
    stats = {k: v for k, v in stats.items() if v}
    return {"params": params, "batch_stats": stats}

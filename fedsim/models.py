"""Model factories. Each is called as ``factory(input_shape, num_classes)`` and returns an
``nn.Module`` mapping a float32 batch to logits. No BatchNorm anywhere (GroupNorm instead): the
parameter vector is the whole state of a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.params import check_no_buffers
from fedsim.seeding import torch_seed

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str) -> Callable[[], nn.Module]:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"model.activation={name!r} is not one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class LogisticRegression(nn.Sequential):
    """Multinomial logistic regression on flattened inputs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


class MLP(nn.Sequential):
    """Fully connected network on flattened inputs."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (128,), activation: str = "relu"
    ) -> None:
        act = _activation(activation)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), act()]
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class ConvNet(nn.Sequential):
    """conv-act-pool blocks, then fully connected layers: LeNet and the small CNNs of the papers.

    ``channels`` are the conv widths (kernel ``kernel``, padding ``padding``), each followed by
    the activation and a 2x2 pool (``max`` or ``avg``); ``hidden`` are the widths of the fully
    connected layers before the classifier.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        channels: Sequence[int] = (16, 32),
        kernel: int = 5,
        padding: int = 0,
        hidden: Sequence[int] = (128,),
        activation: str = "relu",
        pool: str = "max",
    ) -> None:
        if len(input_shape) != 3:
            raise ConfigError(
                f"a convolutional model needs image inputs (C, H, W), the dataset gives {tuple(input_shape)}; "
                "use model=mlp or model=logreg"
            )
        if pool not in ("max", "avg"):
            raise ConfigError(f"model.pool={pool!r} is not max or avg")
        act = _activation(activation)
        pool_cls = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        c, h, w = (int(v) for v in input_shape)
        layers: list[nn.Module] = []
        for out in channels:
            h, w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
            if h < 2 or w < 2:
                raise ConfigError(
                    f"images of {tuple(input_shape)} are too small for this model's convolutions "
                    f"(kernel {kernel}, {len(channels)} blocks); use model=mlp or a model for small images"
                )
            layers += [nn.Conv2d(c, int(out), kernel, padding=padding), act(), pool_cls(2)]
            c, h, w = int(out), h // 2, w // 2
        layers.append(nn.Flatten())
        width = c * h * w
        for size in hidden:
            layers += [nn.Linear(width, int(size)), act()]
            width = int(size)
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class PflCNN(nn.Sequential):
    """The small CNN of pfl-research's CIFAR-10 benchmarks (Granqvist et al. 2024, "pfl-research:
    simulation framework for accelerating research in private federated learning",
    arXiv 2404.06430; ``simple_cnn`` in their ``benchmarks/model/pytorch/cnn.py``), written here
    from its description: conv 3x3 (C -> 32, no padding) - relu - conv 3x3 (32 -> 64) - relu -
    2x2 max pool - fc (64 x 14 x 14 -> 128) - relu - fc (128 -> classes); 1,626,442 parameters
    on CIFAR-10. Weights Glorot-uniform (as theirs, to match their TensorFlow model), biases
    PyTorch's default.

    One difference: theirs has dropout (0.25 after the pool, 0.5 before the classifier); here
    there is none. A fedsim model is a deterministic function of its parameter vector: dropout
    would draw from torch's global generator, not from the node's own stream, so a node's update
    would depend on where and after what it ran, and it has no batching rule for the vectorised
    cohort path. The layers, parameter count and arithmetic per example are theirs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        if len(input_shape) != 3:
            raise ConfigError(
                f"model=pfl_cnn needs image inputs (C, H, W), the dataset gives {tuple(input_shape)}; use model=mlp"
            )
        c, h, w = (int(v) for v in input_shape)
        if h < 6 or w < 6:
            raise ConfigError(f"model=pfl_cnn needs images of at least 6x6 pixels, the dataset gives {h}x{w}")
        super().__init__(
            nn.Conv2d(c, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)


def resnet18_gn(input_shape: Sequence[int], num_classes: int, *, groups: int = 2) -> nn.Module:
    """torchvision's ResNet-18 with GroupNorm(``groups``) in place of BatchNorm. For small images
    (<= 64 px) the stem is the usual CIFAR one: 3x3 conv, stride 1, no max-pool."""
    from torchvision.models import resnet18

    if len(input_shape) != 3:
        raise ConfigError(f"resnet18 needs image inputs (C, H, W), the dataset gives {tuple(input_shape)}")
    model = resnet18(num_classes=num_classes, norm_layer=lambda ch: nn.GroupNorm(groups, ch))
    in_ch, height = int(input_shape[0]), int(input_shape[1])
    if height <= 64:
        model.conv1 = nn.Conv2d(in_ch, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_ch != 3:
        model.conv1 = nn.Conv2d(in_ch, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.avgpool = GlobalMean()
    return model


class GlobalMean(nn.Module):
    """The mean over height and width, (N, C, H, W) -> (N, C, 1, 1): ResNet's global average
    pool. ``AdaptiveAvgPool2d(1)`` computes the same (bit for bit on the CPU), but its CUDA
    backward has no deterministic kernel, so torch refuses it under
    ``use_deterministic_algorithms`` (fedsim's mode on a GPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class RandomFourierSVM(nn.Module):
    """A linear SVM head on random Fourier features of the RBF kernel exp(-gamma ||x - x'||^2)
    (Rahimi & Recht 2007): phi(x) = sqrt(2/D) cos(W x + b), W ~ N(0, 2 gamma I), b ~ U[0, 2 pi),
    then a linear layer to the class scores. The features are fixed by ``feature_seed`` (the same
    on every node, not parameters, never trained or averaged), so nodes train and the server
    averages only the head: a parameter-averageable FLORAL head (docs/methods/floral.md).
    Train it with ``strategy.client.objective=hinge`` (multi-class SVM loss) and weight decay."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        features: int = 500,
        gamma: float = 0.5,
        feature_seed: int = 0,
    ) -> None:
        super().__init__()
        if features < 1 or gamma <= 0:
            raise ConfigError("rff_svm: need features >= 1 and gamma > 0")
        gen = torch.Generator().manual_seed(int(feature_seed))
        dim = math.prod(input_shape)
        # Plain tensor attributes: not parameters (untrained) and not buffers (not state).
        self.omega = torch.randn(dim, features, generator=gen) * math.sqrt(2.0 * gamma)
        self.phase = torch.rand(features, generator=gen) * (2.0 * math.pi)
        self.scale = math.sqrt(2.0 / features)
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.cos(x.flatten(1) @ self.omega + self.phase)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class StackedLSTM(nn.Module):
    """LEAF's Shakespeare model (Caldas et al. 2018, ``models/shakespeare/stacked_lstm.py``):
    inputs are token ids (as float32, exact), embedded in ``embed`` dimensions, two LSTM layers of
    ``hidden`` units, and a dense layer from the last time step's output to the classes.

    Initialised as LEAF's TensorFlow model: Glorot-uniform embedding, LSTM kernels (over the
    stacked [input, hidden] -> 4 hidden kernel, as TF's BasicLSTMCell) and dense kernel; zero
    biases, with the forget gates' input bias at 1.0 (TF adds a constant forget_bias of 1.0;
    here it is the initial value of a trained bias). torch's LSTM has two bias vectors per layer
    where TF has one: 4 x hidden more parameters per layer (819,920 in all against LEAF's 817,872).

    Not for the cohort path (``cluster.vectorize=true``): torch.func's vmap has no batching rule
    for the LSTM layer and falls back to a loop over the nodes, about 5x slower than training one
    node after another (measured: 251 against 48 ms per node and minibatch of 10, one thread)."""

    vectorizable = False
    not_vectorized = (
        "torch.func has no batching rule for the LSTM layer; its fallback is slower than one node at a time"
    )

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, *, embed: int = 8, hidden: int = 256, layers: int = 2
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ConfigError(
                f"model=lstm needs sequences of token ids (seq_len,), the dataset gives {tuple(input_shape)}; "
                "use it with dataset=shakespeare"
            )
        self.num_classes = int(num_classes)
        self.embedding = nn.Embedding(int(num_classes), int(embed))
        self.lstm = nn.LSTM(int(embed), int(hidden), num_layers=int(layers), batch_first=True)
        self.head = nn.Linear(int(hidden), int(num_classes))
        with torch.no_grad():
            self.embedding.weight.uniform_(-1, 1).mul_(math.sqrt(6.0 / (num_classes + embed)))
            for layer in range(int(layers)):
                w_ih = getattr(self.lstm, f"weight_ih_l{layer}")
                w_hh = getattr(self.lstm, f"weight_hh_l{layer}")
                bound = math.sqrt(6.0 / (w_ih.shape[1] + hidden + 4 * hidden))
                w_ih.uniform_(-bound, bound)
                w_hh.uniform_(-bound, bound)
                getattr(self.lstm, f"bias_ih_l{layer}").zero_()[hidden : 2 * hidden] = 1.0  # gates i, f, g, o
                getattr(self.lstm, f"bias_hh_l{layer}").zero_()
            bound = math.sqrt(6.0 / (hidden + num_classes))
            self.head.weight.uniform_(-bound, bound)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embedding(x.long())
        out, _ = self.lstm(h)
        return self.head(out[:, -1])


def build_model(
    factory: Callable[..., nn.Module], input_shape: Sequence[int], num_classes: int, *, seed: int
) -> nn.Module:
    """Build a model with initial weights drawn from the stream (seed, "init"), leaving torch's
    global RNG as it was. Checks that it has no buffers and accepts the input shape."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, "init"))
        model = factory(tuple(input_shape), int(num_classes))
    try:
        check_no_buffers(model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    with torch.no_grad():
        try:
            out = model(torch.zeros(2, *input_shape))
        except RuntimeError as exc:
            raise ConfigError(f"model does not accept inputs of shape {tuple(input_shape)}: {exc}") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"model outputs shape {tuple(out.shape[1:])}, expected ({num_classes},)")
    return model

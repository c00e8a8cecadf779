"""PyTorch twin of `search_spaces.model.Net`, for speed comparisons (benchmarks/candidate_speed.py).

Same blocks (ds, mb with optional squeeze-and-excite, skip), channel arithmetic
(`Layer.expanded_channels`, `Layer.se_channels`), BatchNorm (eps 1e-5, momentum 0.1 = Flax's
0.9), activations and gates (hard-sigmoid SE gate with hswish, sigmoid otherwise), so the
parameter count equals `evaluators.cost.analytic_cost(arch).params` and the MACs are the same.
Padding is symmetric k//2: for odd kernels that gives SAME's output size at every input
size; the pixels differ from SAME only where SAME pads asymmetrically (stride 2, even input),
which does not change the cost. Needs the optional `bench` extra (torch==2.13.0).
"""

from __future__ import annotations

import torch
from torch import nn

from search_spaces.architecture import Architecture, Layer

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish}


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, act: str = "", groups: int = 1) -> nn.Sequential:
    mods = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)]
    if act:
        mods.append(ACTS[act]())
    return nn.Sequential(*mods)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int, gate: str):
        super().__init__()
        self.reduce = nn.Linear(channels, reduced)
        self.expand = nn.Linear(reduced, channels)
        self.gate = nn.Hardsigmoid() if gate == "hsigmoid" else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = self.gate(self.expand(torch.relu(self.reduce(s))))
        return x * s[:, :, None, None]


class Block(nn.Module):
    def __init__(self, ly: Layer):
        super().__init__()
        self.residual = ly.residual
        mods: list[nn.Module] = []
        if ly.block == "skip":
            if not ly.residual:
                mods.append(_conv_bn(ly.in_channels, ly.out_channels, 1, ly.stride))
        elif ly.block == "ds":
            mods += [_conv_bn(ly.in_channels, ly.in_channels, ly.kernel, ly.stride, ly.act, groups=ly.in_channels),
                     _conv_bn(ly.in_channels, ly.out_channels, 1, 1, ly.act)]
        else:
            e = ly.expanded_channels
            if e != ly.in_channels:
                mods.append(_conv_bn(ly.in_channels, e, 1, 1, ly.act))
            mods.append(_conv_bn(e, e, ly.kernel, ly.stride, ly.act, groups=e))
            if ly.se:
                mods.append(SqueezeExcite(e, ly.se_channels, "hsigmoid" if ly.act == "hswish" else "sigmoid"))
            mods.append(_conv_bn(e, ly.out_channels, 1, 1))
        self.body = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual and len(self.body) else y


class TorchNet(nn.Module):
    """The network of `arch` in PyTorch (NCHW tensors; use channels_last memory format for speed)."""

    def __init__(self, arch: Architecture):
        super().__init__()
        a = arch
        self.stem = _conv_bn(a.in_channels, a.stem.channels, a.stem.kernel, a.stem.stride, a.stem.act)
        self.layers = nn.Sequential(*[Block(ly) for ly in a.layers])
        last = a.layers[-1].out_channels if a.layers else a.stem.channels
        self.head = _conv_bn(last, a.head.channels, 1, 1, a.head.act)
        self.dropout = nn.Dropout(a.head.dropout)
        self.classifier = nn.Linear(a.head.channels, a.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.layers(self.stem(x)))
        return self.classifier(self.dropout(x.mean(dim=(2, 3))))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

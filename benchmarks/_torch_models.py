"""PyTorch twin of `search_spaces.model.Net`, for speed comparisons (benchmarks/candidate_speed.py).

Same blocks (ds, mb with optional squeeze-and-excite, skip), channel arithmetic
(`Layer.expanded_channels`, `Layer.se_channels`), BatchNorm (eps 1e-5, momentum 0.1 = Flax's
0.9), activations and gates (hard-sigmoid SE gate with hswish, sigmoid otherwise), so the
parameter count equals `evaluators.cost.analytic_cost(arch).params` and the MACs are the same.
Padding is symmetric k//2: for odd kernels that gives SAME's output size at every input
size; the pixels differ from SAME only where SAME pads asymmetrically (stride 2, even input),
which does not change the cost. Below the model: the PyTorch measurements of
benchmarks/candidate_speed.py, for a process that runs PyTorch alone. Needs the optional `bench`
extra (torch==2.13.0).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from evaluators.cost import analytic_cost
from evaluators.datasets import Dataset
from evaluators.optim import TrainConfig
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


# ---- measurements for benchmarks/candidate_speed.py, in a process that runs PyTorch alone
def warm_up() -> None:
    """Start PyTorch's thread pool before any clock runs (a user's process has done this once)."""
    (torch.ones(64, 64) @ torch.ones(64, 64)).sum().item()


def model(arch: Architecture, compiled: bool) -> nn.Module:
    """The twin in channels_last, its parameter count checked against `analytic_cost`; wrapped
    in `torch.compile` (its defaults) when `compiled`."""
    m = TorchNet(arch).to(memory_format=torch.channels_last)
    expect = analytic_cost(arch).params
    assert num_params(m) == expect, f"PyTorch twin has {num_params(m)} parameters, analytic cost {expect}"
    return torch.compile(m) if compiled else m


def _optimizer(m: nn.Module, cfg: TrainConfig, total_steps: int):
    opt = torch.optim.AdamW(m.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total_steps))


def train_step_fn(arch: Architecture, batch: int, compiled: bool):
    """`(run, first_s)`: `run()` does one train step (AdamW, cross-entropy, BatchNorm in training
    mode) at `batch`; `first_s` is the first call's time (with torch.compile: the compile)."""
    torch.manual_seed(0)
    m = model(arch, compiled).train()
    opt, _ = _optimizer(m, TrainConfig(batch_size=batch), 100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, arch.in_channels, arch.resolution, arch.resolution, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, arch.num_classes, (batch,), generator=g)
    lossf = nn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = lossf(m(x), y)
        loss.backward()
        opt.step()
        loss.item()

    t = time.perf_counter()
    run()
    return run, time.perf_counter() - t


def infer_fn(arch: Architecture, batch: int, compiled: bool):
    """`run()`: one forward pass in eval mode under inference_mode at `batch` (called once here)."""
    m = model(arch, compiled).eval()
    x = torch.randn(batch, arch.in_channels, arch.resolution, arch.resolution).contiguous(
        memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            m(x)

    run()
    return run


def candidate(arch: Architecture, data: Dataset, epochs: int, batch: int, compiled: bool) -> dict[str, float]:
    """A fresh candidate, the loop of `evaluators.train.train` in PyTorch: model construction,
    `epochs` epochs of AdamW + cosine over shuffled full batches (last partial one dropped),
    validation after each."""
    t = time.perf_counter()
    cfg = TrainConfig(epochs=epochs, batch_size=batch)
    torch.manual_seed(0)

    def nchw(a):
        return torch.from_numpy(np.array(a.transpose(0, 3, 1, 2))).contiguous(memory_format=torch.channels_last)

    xt, yt = nchw(data.x_train), torch.from_numpy(data.y_train.astype(np.int64))
    xv, yv = nchw(data.x_val), torch.from_numpy(data.y_val.astype(np.int64))
    m = model(arch, compiled)
    steps = len(yt) // batch
    opt, sched = _optimizer(m, cfg, steps * epochs)
    lossf = nn.CrossEntropyLoss()
    order = np.random.default_rng([cfg.seed, 1])
    acc, first_epoch_s = 0.0, 0.0
    for epoch in range(epochs):
        m.train()
        perm = torch.from_numpy(order.permutation(len(yt))[: steps * batch].reshape(steps, batch))
        for rows in perm:
            opt.zero_grad(set_to_none=True)
            loss = lossf(m(xt[rows]), yt[rows])
            loss.backward()
            opt.step()
            sched.step()
        m.eval()
        with torch.inference_mode():
            correct = sum(int((m(xv[i:i + 256]).argmax(1) == yv[i:i + 256]).sum()) for i in range(0, len(yv), 256))
        acc = correct / len(yv)
        if epoch == 0:
            first_epoch_s = time.perf_counter() - t
    wall = time.perf_counter() - t
    return {"wall_s": wall, "first_epoch_s": first_epoch_s, "val_accuracy": acc}


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "torch_threads": str(torch.get_num_threads())}

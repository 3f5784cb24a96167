"""The integer pipeline (torchquant.graph): pattern matching on traced models, fake-quant vs converted parity on
every pattern, the float reference, fallbacks, save/load, report and CLI."""
import collections
import copy
import dataclasses
import json
import operator
import os
from collections import Counter
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import torchquant as tq
from torchquant import graph
from torchquant.config import QuantConfig, QuantSpec
from torchquant.nn import QuantConv2d, QuantLinear
from torchquant.reference import qrange
from torchquant.report import build_report
from conftest import integer_tensors, requires_aoti

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PIPELINE = QuantConfig.preset("int8-pipeline")
INTEGER_OUT = dataclasses.replace(PIPELINE, integer_output=True)


class ConvBnReLU(nn.Module):
    """Conv + BatchNorm + each activation form the pipeline fuses, then max-pool, flatten and a Linear."""

    def __init__(self, act: str):
        super().__init__()
        self.act = act
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU() if act == "module" else nn.ReLU6() if act == "relu6_module" else None
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.act in ("module", "relu6_module"):
            y = self.relu(y)
        elif self.act == "F.relu":
            y = F.relu(y)
        elif self.act == "torch.relu":
            y = torch.relu(y)
        elif self.act == "method":
            y = y.relu()
        elif self.act == "hardtanh":
            y = F.hardtanh(y, -0.5, 0.75)
        y = self.pool(F.relu(self.conv2(y)))
        return self.fc(torch.flatten(y, 1))


class BasicBlockNet(nn.Module):
    """A stem and two residual blocks (identity and 1x1 shortcut), `+` and torch.add, F.relu after the add, global
    average pooling, view and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a1_bn = nn.BatchNorm2d(8)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a2_bn = nn.BatchNorm2d(8)
        self.b1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b2 = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.stem_bn(self.stem(x)))
        x = F.max_pool2d(x, 3, 2, 1)
        y = self.a2_bn(self.a2(self.relu(self.a1_bn(self.a1(x)))))
        x = self.relu(y + x)
        y = self.b2(F.relu(self.b1(x)))
        x = F.relu(torch.add(y, self.down(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.head(x.view(x.size(0), -1))


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1, 3x3 (stride), 1x1 convs with BatchNorm, an optional downsampling
    shortcut (1x1 conv + BatchNorm) computed after the main path, `out += identity` in place, ReLU in place."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class BottleneckNet(nn.Module):
    """A stem, a downsampling bottleneck and an identity one, global average pooling and a Linear head. At width 16
    every conv of the blocks reads and writes multiples of 16 channels: on Hopper each is a CUTLASS conv, the first
    block's last one with its residual add."""

    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(2 * width)
        self.blocks = nn.Sequential(Bottleneck(2 * width, width, stride=2), Bottleneck(4 * width, width))
        self.head = nn.Linear(4 * width, 5)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem_bn(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Conv1dResidualNet(nn.Module):
    """1-d convs with a residual add whose conv is the second input (x + conv(...)), then a ReLU method."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 12, 3, padding=1)
        self.a = nn.Conv1d(12, 12, 3, padding=1)
        self.b = nn.Conv1d(12, 12, 5, padding=2)
        self.head = nn.Linear(12 * 10, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = (x + self.b(F.relu(self.a(x)))).relu()
        return self.head(x.flatten(1))


class KeywordSpottingNet(nn.Module):
    """A keyword-spotting 1-d CNN: Conv1d + BatchNorm1d + ReLU, a MaxPool1d module, F.max_pool1d with padding and
    ceil mode after torch.relu, a dilated conv, and an average pool into the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 5, padding=2, bias=False)
        self.stem_bn = nn.BatchNorm1d(16)
        self.pool = nn.MaxPool1d(2)
        self.a = nn.Conv1d(16, 24, 3, padding=1)
        self.b = nn.Conv1d(24, 24, 3, padding=2, dilation=2)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.stem_bn(self.stem(x))))
        x = F.max_pool1d(torch.relu(self.a(x)), 3, 2, 1, ceil_mode=True)
        x = F.relu(self.b(x))
        return self.head(torch.flatten(F.adaptive_avg_pool1d(x, 1), 1))


class BroadcastResidualNet(nn.Module):
    """A conv's output added to an integer tensor it broadcasts with (a max-pooled one), then ReLU: the add is the
    conv's epilogue in the prepared model, and runs in float in the converted one (the residual has another shape)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.head(F.relu(self.conv(x) + F.max_pool2d(x, 6)))


class CatNet(nn.Module):
    """Two branches concatenated (their scales shared), an in-place residual add, reshape, an MLP with a folded
    BatchNorm1d and torch.relu."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(2, 4, 3, padding=1)
        self.right = nn.Conv2d(2, 4, 1)
        self.merge = nn.Conv2d(8, 4, 1)
        self.skip = nn.Conv2d(2, 4, 1)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc1_bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.left(x)), self.right(x)], dim=1)
        y = self.merge(y)
        y += self.skip(x)
        y = torch.relu(self.fc1_bn(self.fc1(y.reshape(y.shape[0], -1))))
        return self.fc2(y)


class InvertedResidualNet(nn.Module):
    """MobileNetV2's block: a 1x1 expansion and a depthwise 3x3, each with ReLU6, a 1x1 projection added to its input
    (no activation after the add), global average pooling, dropout and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 64, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(64)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(64)
        self.project = nn.Conv2d(64, 16, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(16)
        self.relu6 = nn.ReLU6(inplace=True)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu6(self.stem_bn(self.stem(x)))
        y = self.relu6(self.expand_bn(self.expand(x)))
        y = self.relu6(self.depthwise_bn(self.depthwise(y)))
        x = x + self.project_bn(self.project(y))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(self.drop(x))


class HardswishBlockNet(InvertedResidualNet):
    """MobileNetV3's block: InvertedResidualNet's layers with hardswish (a module, in place, and F.hardswish) in
    place of ReLU6, then hardsigmoid before a 1x1 conv head: every activation reads an integer tensor and an integer
    op reads its output."""

    def __init__(self):
        super().__init__()
        self.hardswish = nn.Hardswish(inplace=True)
        self.gate = nn.Hardsigmoid()
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.hardswish(self.stem_bn(self.stem(x)))
        y = self.hardswish(self.expand_bn(self.expand(x)))
        y = F.hardswish(self.depthwise_bn(self.depthwise(y)))
        x = x + self.project_bn(self.project(y))
        return self.head(self.gate(x)).flatten(1)


class SmoothActivationNet(nn.Module):
    """SiLU (module and F.silu in place), GELU, sigmoid (torch function and tensor method) and tanh between integer
    layers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.c = nn.Conv2d(12, 8, 1)
        self.d = nn.Linear(8 * 6 * 6, 16)
        self.e = nn.Linear(16, 4)
        self.silu = nn.SiLU()
        self.gelu = nn.GELU()

    def forward(self, x):
        y = self.silu(self.a(x))
        y = F.silu(self.b(y), inplace=True)
        y = torch.sigmoid(self.gelu(self.c(y)))
        y = self.d(y.flatten(1)).sigmoid()
        return self.e(torch.tanh(y))


class BroadcastAddNet(nn.Module):
    """Integer adds whose inputs broadcast: a scalar or a pooled tensor on either side, in place too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        y = y.mean() + self.mid(y + y.mean(dim=1, keepdim=True))
        y += y.mean(dim=(2, 3), keepdim=True)
        return self.head(y)


class SpectrogramViewNet(nn.Module):
    """A spectrogram CNN that moves its integers between layers of other layouts: unsqueeze into a Conv2d with a
    folded BatchNorm2d, squeeze into a Conv1d, transpose (method and function), swapaxes, permute and movedim
    between Conv1d and Linear layers (features as channels, then last), unsqueeze and a max-pool on a transposed
    tensor."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.freq = nn.Conv2d(8, 8, (4, 1), stride=(4, 1))
        self.temporal = nn.Conv1d(8, 16, 3, padding=1)
        self.proj = nn.Linear(16, 12)
        self.mix = nn.Conv1d(12, 12, 1)
        self.token = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):  # [B, 4 bins, T]
        y = F.relu(self.stem_bn(self.stem(x.unsqueeze(1))))  # [B, 8, 4, T]
        y = F.relu(self.freq(y)).squeeze(2)  # [B, 8, T]
        y = torch.relu(self.temporal(y)).unsqueeze(-1)  # [B, 16, T, 1]
        y = F.relu(self.proj(y.squeeze(-1).transpose(1, 2)))  # [B, T, 12]
        y = self.mix(torch.transpose(y, 1, 2)).relu()  # [B, 12, T]
        y = F.max_pool2d(y.swapaxes(1, 2).unsqueeze(1), (2, 1)).squeeze(1)  # [B, T / 2, 12]
        y = torch.relu(self.token(y.permute(0, 2, 1).movedim(1, 2)))  # [B, T / 2, 12]
        return self.head(y)


class TextCNNNet(nn.Module):
    """Kim's text CNN on embedded tokens [B, T, E]: three Conv1d widths + ReLU, each max-pooled over time with its
    kernel read from its shape (F.max_pool1d(a, a.size(2)), kernel_size=b.shape[-1]) or an AdaptiveMaxPool1d(1),
    and reduced over time with the tensor idioms (a.max(dim=2)[0], torch.max(b, 2).values, `values, _ = c.max(-1)`,
    c.mT.amin(1)); a Conv2d branch pooled globally three ways (AdaptiveMaxPool2d((1, 1)),
    F.adaptive_max_pool2d(z, 1), F.max_pool2d(z, z.shape[2:])); all squeezed and concatenated into a Linear head."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(8, 6, k, padding=k // 2) for k in (3, 4, 5)])
        self.pool = nn.AdaptiveMaxPool1d(1)
        self.conv2d = nn.Conv2d(1, 6, 3, padding=1)
        self.pool2d = nn.AdaptiveMaxPool2d((1, 1))
        self.head = nn.Linear(6 * 10, 4)

    def forward(self, x):
        a, b, c = [F.relu(conv(x.transpose(1, 2))) for conv in self.convs]
        pooled = [F.max_pool1d(a, a.size(2)).squeeze(2), F.max_pool1d(b, kernel_size=b.shape[-1]).squeeze(-1),
                  self.pool(c).squeeze(2)]
        c_max, _ = c.max(-1)
        pooled += [a.max(dim=2)[0], torch.max(b, 2).values, c_max, c.mT.amin(1)]
        z = F.relu(self.conv2d(x.unsqueeze(1)))
        pooled += [self.pool2d(z).flatten(1), F.adaptive_max_pool2d(z, 1).flatten(1),
                   F.max_pool2d(z, z.shape[2:]).flatten(1)]
        return self.head(torch.cat(pooled, dim=1))


class ShuffleBlockNet(nn.Module):
    """ShuffleNetV2's unit: a stem conv + BatchNorm + ReLU and a max-pool; the channels split in two
    (x.chunk(2, dim=1)), one half through 1x1 conv-BN-ReLU, a depthwise 3x3 conv-BN and 1x1 conv-BN-ReLU,
    concatenated with the other half and shuffled (view, transpose, contiguous, view); a side conv reads a flipped
    slice (y[:, :4].flip(3)), another conv a stack of its halves (torch.stack([top, bottom], 1).flatten(1, 2),
    `top, bottom = y.split(4, 1)`); global
    average and max pools into a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4),
                                    nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.side = nn.Conv2d(4, 6, 3, padding=1)
        self.mix = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(8 + 6 + 6, 5)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        left, right = x.chunk(2, dim=1)
        y = torch.cat([left, self.branch(right)], dim=1)
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        s = F.relu(self.side(y[:, :4].flip(3)))
        top, bottom = y.split(4, 1)
        m = F.relu(self.mix(torch.stack([top, bottom], 1).flatten(1, 2)))
        return self.head(torch.cat([F.adaptive_avg_pool2d(y, 1).flatten(1), s.amax((2, 3)), m.amax((2, 3))], 1))


class PaddedNet(nn.Module):
    """Padding between integer layers: nn.ZeroPad2d before an unpadded stride-2 conv (asymmetric "same" padding),
    F.pad with zeros of a conv output whose zero point lies inside its range (the padding is that zero point),
    nn.ReflectionPad2d, and F.pad in replicate mode; global max pools into a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.down = nn.Conv2d(8, 8, 3, stride=2)
        self.mid = nn.Conv2d(8, 8, 3)
        self.reflect = nn.ReflectionPad2d(1)
        self.side = nn.Conv2d(8, 4, 3)
        self.head = nn.Linear(8 + 4, 5)

    def forward(self, x):  # [B, 3, 8, 8]
        y = self.down(self.pad(F.relu(self.stem(x))))  # 4 x 4, no activation
        z = F.relu(self.mid(F.pad(y, (1, 1, 1, 1))))
        s = F.pad(F.relu(self.side(self.reflect(z))), (1, 1, 1, 1), mode="replicate")
        return self.head(torch.cat([z.amax((2, 3)), s.amax((2, 3))], 1))


class PaddingModesNet(nn.Module):
    """Convs whose padding_mode is 'reflect' (with BatchNorm), 'replicate' and 'circular' (its output added to the
    block's input: the residual add in its epilogue), between integer layers; a global max pool into a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate")
        self.b = nn.Conv2d(8, 8, (3, 5), padding=(1, 2), padding_mode="circular")
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.b(F.relu(self.a(x))) + x)
        return self.head(x.amax((2, 3)))


class AvgPoolNet(nn.Module):
    """Average pools of a fixed window between integer layers: a DenseNet transition (nn.AvgPool2d(2) on an odd
    size), an Inception branch (F.avg_pool2d(y, 3, 1, 1), padding counted) added back, a ResNet-D shortcut
    (ceil_mode, padding not counted: its last windows overhang the input), a 1-d pool of the flattened map and a
    head pool with divisor_override in ceil mode."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.transition = nn.Sequential(nn.Conv2d(8, 8, 1), nn.AvgPool2d(2))
        self.branch = nn.Conv2d(8, 8, 1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False), nn.Conv2d(8, 8, 1))
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 5 + 8 * 4, 3)

    def forward(self, x):  # [B, 3, 11, 11]
        y = self.transition(self.stem(x))  # 5 x 5
        y = y + self.branch(F.avg_pool2d(y, 3, 1, 1))
        y = F.relu(self.down(y) + self.shortcut(y))  # 3 x 3
        z = self.conv1d(F.avg_pool1d(y.flatten(2), 3, 2, 1, count_include_pad=False))  # 5
        w = F.avg_pool2d(y, 2, 2, 1, ceil_mode=True, divisor_override=3)  # 2 x 2 (a third window would start past)
        return self.head(torch.cat([z.flatten(1), w.flatten(1)], 1))


class AdaptivePoolNet(nn.Module):
    """Adaptive average pools to sizes other than 1 between integer layers: a transition conv + pool to a size that
    divides the input's (a fixed window), a branch pooled to its own size (windows of one element) added back, a
    module whose windows differ in size (6 -> 4: windows of 2 and 3), one keeping a dim (None), and a 1-d pool of the
    flattened map."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.transition = nn.Sequential(nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(6))
        self.branch = nn.Conv2d(8, 8, 1)
        self.uneven = nn.AdaptiveAvgPool2d(4)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16 + 8 * 6 + 8 * 5, 3)

    def forward(self, x):  # [B, 3, 12, 12]
        y = self.transition(self.stem(x))  # 6 x 6
        y = F.relu(y + self.branch(F.adaptive_avg_pool2d(y, (6, None))))
        b = self.uneven(y)  # 4 x 4
        c = F.adaptive_avg_pool2d(y, (None, 1))  # 6 x 1
        d = self.conv1d(F.adaptive_avg_pool1d(y.flatten(2), 5))  # 36 -> 5: windows of 8 and 9
        return self.head(torch.cat([b.flatten(1), c.flatten(1), d.flatten(1)], 1))


class SqueezeExcitationNet(nn.Module):
    """Squeeze-excitation blocks (MobileNetV3's, EfficientNet's): a mean over H and W, two 1x1 convs and a gate
    (hardsigmoid, sigmoid) whose [B, C, 1, 1] output multiplies the block's input (x * s, torch.mul(s, x)), then a
    product of two tensors of one shape (y * tanh(y)) before the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.reduce1, self.expand1 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.gate = nn.Hardsigmoid()
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.reduce2, self.expand2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):  # [B, 3, 8, 8]
        x = F.hardswish(self.stem_bn(self.stem(x)))
        x = x * self.gate(self.expand1(F.relu(self.reduce1(x.mean((2, 3), keepdim=True)))))
        y = F.silu(self.mid(x))
        y = torch.mul(torch.sigmoid(self.expand2(F.silu(self.reduce2(F.adaptive_avg_pool2d(y, 1))))), y)
        return self.head(y * torch.tanh(y)).flatten(1)


class UNetNet(nn.Module):
    """A small U-Net: down by max-pools, up by nearest-neighbour upsampling (F.interpolate to a skip tensor's size
    read from its shape, an nn.Upsample module, F.interpolate in "nearest-exact" mode with a scale factor), each
    upsampled tensor concatenated with its skip connection."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(3, 8, 3, padding=1)
        self.enc2 = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.dec2 = nn.Conv2d(16, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.dec1 = nn.Conv2d(16, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):  # [B, 3, 10, 10]
        e1 = F.relu(self.enc1(x))
        e2 = F.relu(self.enc2(F.max_pool2d(e1, 2)))  # 5 x 5
        m = F.relu(self.mid(F.max_pool2d(e2, 2)))  # 2 x 2
        d2 = F.relu(self.dec2(torch.cat([F.interpolate(m, size=e2.shape[2:]), e2], dim=1)))
        d1 = F.relu(self.dec1(torch.cat([self.up(d2), e1], dim=1)))
        return self.head(F.interpolate(d1, scale_factor=1.5, mode="nearest-exact"))


class DropoutNet(nn.Module):
    """Dropout modules between integer layers (the identity in evaluation)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout2d(0.5), nn.Conv2d(8, 4, 3), nn.Flatten(),
                                 nn.Dropout(0.5), nn.Linear(4 * 4 * 4, 3))

    def forward(self, x):
        return self.net(x)


class TransposedFeaturesNet(nn.Module):
    """A Conv1d's output read through .mT by a Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8, 6)

    def forward(self, x):  # [B, 4, T]
        return self.fc(F.relu(self.conv(x)).mT)


class ViewsProbeNet(nn.Module):
    """Nearest upsampling of a conv output into a conv, a global max-pool of that into a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.b(F.interpolate(F.relu(self.a(x)), scale_factor=2)))
        return self.fc(F.adaptive_max_pool2d(y, 1).flatten(1))


class ExtremaProbeNet(nn.Module):
    """amax of a conv output into a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.a(x)).amax((2, 3)))


class AttributeProbeNet(nn.Module):
    """A conv output's .data into a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(F.relu(self.a(x)).flatten(1).data)


class IndexingProbeNet(nn.Module):
    """Two conv outputs flipped, stacked, concatenated (torch.concat) and split, each into a conv."""

    def __init__(self):
        super().__init__()
        self.a, self.a2 = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
        self.flipped, self.stacked = nn.Conv2d(8, 4, 1), nn.Conv2d(16, 4, 1)
        self.joined, self.top = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y, w = F.relu(self.a(x)), F.relu(self.a2(x))
        top, _ = y.split(4, 1)
        return (self.flipped(y.flip(3)) + self.stacked(torch.stack([y, w], 1).flatten(1, 2))
                + self.joined(torch.concat([y, w], 1)) + self.top(top))


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.2
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model.eval()


def _batches(shape, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


MODELS = {
    **{f"conv-bn-{act}": (lambda act=act: ConvBnReLU(act), (4, 3, 8, 8))
       for act in ("module", "F.relu", "torch.relu", "method", "relu6_module", "hardtanh", "none")},
    "basic-blocks": (BasicBlockNet, (2, 3, 12, 12)),
    "bottleneck": (BottleneckNet, (2, 3, 12, 12)),
    "wide-bottleneck": (lambda: BottleneckNet(16), (2, 3, 12, 12)),
    "conv1d-residual": (Conv1dResidualNet, (3, 2, 10)),
    "keyword-spotting": (KeywordSpottingNet, (3, 4, 20)),
    "broadcast-residual": (BroadcastResidualNet, (2, 3, 6, 6)),
    "cat": (CatNet, (3, 2, 6, 6)),
    "inverted-residual": (InvertedResidualNet, (2, 3, 12, 12)),
    "hardswish-block": (HardswishBlockNet, (2, 3, 12, 12)),
    "smooth-activations": (SmoothActivationNet, (3, 3, 6, 6)),
    "broadcast-add": (BroadcastAddNet, (2, 3, 6, 6)),
    "spectrogram-views": (SpectrogramViewNet, (3, 4, 10)),
    "text-cnn": (TextCNNNet, (3, 10, 8)),
    "unet": (UNetNet, (2, 3, 10, 10)),
    "shuffle-block": (ShuffleBlockNet, (2, 3, 8, 8)),
    "padded": (PaddedNet, (2, 3, 8, 8)),
    "padding-modes": (PaddingModesNet, (2, 3, 7, 9)),
    "avg-pools": (AvgPoolNet, (2, 3, 11, 11)),
    "adaptive-pools": (AdaptivePoolNet, (2, 3, 12, 12)),
    "squeeze-excitation": (SqueezeExcitationNet, (2, 3, 8, 8)),
}


def _prepared(name, config=PIPELINE):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = _randomize_bn(factory())
    batches = _batches(shape)
    prepared = tq.calibrate(tq.prepare(model, config), batches, progress=False)
    return model, prepared, batches


def _assert_integers_match(converted_q, prepared_y, scale, zero_point):
    """The converted pipeline's integers against the fake-quant model's output on the same grid. Each integer op
    gives the fake-quant integers, or one step apart where float summation order moved a value across a rounding
    boundary (rarely); through a few layers such steps can add up to two."""
    expected = torch.round(prepared_y / scale) + zero_point
    diff = (converted_q.float() - expected).abs()
    assert diff.max() <= 2, diff.max()
    assert (diff > 0).float().mean() <= 0.1


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_pipeline_computes_the_fake_quant_function(name):
    model, prepared, batches = _prepared(name, INTEGER_OUT)
    assert graph.is_pipeline(prepared)
    with torch.no_grad():
        expected = [prepared(b) for b in batches]
    converted = tq.convert(prepared)
    (qparams,) = graph.output_qparams(converted)
    for batch, y in zip(batches, expected):
        with torch.no_grad():
            q = converted(batch)
        assert q.dtype == torch.uint8
        _assert_integers_match(q, y, *qparams)


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_pipeline_is_close_to_float_and_fake_quant(name):
    model, prepared, batches = _prepared(name)
    with torch.no_grad():
        fake = prepared(batches[0])
        converted = tq.convert(prepared)
        y = converted(batches[0])
        ref = model(batches[0])
    assert y.dtype == torch.float32
    assert tq.functional.quantization_error(ref, y)["sqnr_db"] > 20
    # a one-step difference inside can move the float output by about one output step
    assert (y - fake).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("name", ["basic-blocks", "bottleneck", "wide-bottleneck", "conv1d-residual",
                                  "keyword-spotting", "cat", "spectrogram-views", "text-cnn", "unet", "shuffle-block",
                                  "padded", "padding-modes", "hardswish-block", "smooth-activations", "avg-pools",
                                  "adaptive-pools", "squeeze-excitation"])
@pytest.mark.parametrize("bits", [8, 7], ids=["uint8", "uint7"])
def test_pipeline_integers_are_identical_on_every_cpu_path_and_cuda(name, bits, device, isa, monkeypatch):
    """7-bit activations on inputs twice the calibration's spread, so that their clamps act."""
    _, prepared, batches = _prepared(name, _with_activation_bits(INTEGER_OUT, bits))
    batches = batches if bits == 8 else [2 * b for b in batches]
    converted = tq.convert(prepared)
    monkeypatch.setenv("TORCHQUANT_CPU_ISA", "scalar")
    with torch.no_grad():
        reference = [converted(b) for b in batches]
    if isa is not None:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
    converted.to(device)
    with torch.no_grad():
        for b, expected in zip(batches, reference):
            assert torch.equal(converted(b.to(device)).cpu(), expected)


def _with_activation_bits(config, bits, signed=False):
    return dataclasses.replace(config, activation=dataclasses.replace(config.activation, bits=bits, signed=signed))


# activations of fewer bits: every op that writes an integer tensor clamps it to their range, as their fake-quant does
FEWER_BITS = {"uint7": (7, False), "uint4": (4, False), "int6": (6, True)}


@pytest.mark.parametrize("bits", FEWER_BITS.values(), ids=FEWER_BITS.keys())
@pytest.mark.parametrize("name", list(MODELS))
def test_pipeline_of_fewer_activation_bits_computes_the_fake_quant_function(name, bits):
    """Inputs twice the calibration batches' size leave the calibrated ranges, so each integer op's output clamps
    where its fake-quant does; every integer tensor of the converted pipeline lies in the bits' range."""
    _, prepared, batches = _prepared(name, _with_activation_bits(INTEGER_OUT, *bits))
    qmin, qmax = qrange(*bits)
    with torch.no_grad():
        expected = [prepared(2 * b) for b in batches]
    converted = tq.convert(prepared)
    (qparams,) = graph.output_qparams(converted)
    clamped = False
    for batch, y in zip(batches, expected):
        with torch.no_grad():
            q = converted(2 * batch)
        assert q.dtype == (torch.int8 if bits[1] else torch.uint8)
        _assert_integers_match(q, y, *qparams)
        for node, t in integer_tensors(converted, 2 * batch):
            assert qmin <= int(t.min()) and int(t.max()) <= qmax, node
            clamped |= int(t.max()) == qmax
    assert clamped


def test_pipeline_notes_name_the_activation_bits():
    _, prepared, _ = _prepared("basic-blocks", _with_activation_bits(PIPELINE, 7))
    layers, _ = graph.pipeline_notes(tq.convert(prepared))
    assert layers["stem"] == "integer input, ReLU fused, uint7 output"
    assert layers["a2"] == "integer input, residual add + ReLU fused, uint7 output"
    assert layers["head"] == "integer input, float output"


def _graph_targets(model):
    return [n.target for n in model.graph.nodes]


def test_patterns_are_fused_and_run_on_integers():
    _, prepared, batches = _prepared("basic-blocks")
    converted = tq.convert(prepared)
    targets = _graph_targets(converted)
    # each block's last conv (a2, b2) runs its residual add and ReLU in its epilogue
    assert targets.count(graph.integer_layer) == 5
    assert targets.count(graph.integer_conv_add) == 2 and targets.count(graph.integer_add) == 0
    # the input alone: the global average pool reads the last add's integers and requantizes for the head
    assert targets.count(graph.quantize_input) == 1 and targets.count(graph.integer_mean) == 1
    assert targets.count(graph.dequantize_output) == 0
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in converted.modules())
    layers, notes = graph.pipeline_notes(converted)
    assert layers["stem"] == "integer input, ReLU fused, uint8 output"
    assert layers["a2"] == "integer input, residual add + ReLU fused, uint8 output"
    assert layers["b2"] == "integer input, residual add + ReLU fused, uint8 output"  # (the pool reads it)
    assert layers["down"] == "integer input, uint8 output"
    assert layers["head"] == "integer input, float output"
    assert "2 integer add(s) (2 fused into a conv's epilogue)" in notes[0] and "1 integer mean(s)" in notes[0]


def _converted_with_nothing_kept_float(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prepare warns of what it keeps float between integer layers
        _, prepared, _ = _prepared(name)
        return tq.convert(prepared)


def test_depthwise_block_and_dropout_run_on_integers():
    converted = _converted_with_nothing_kept_float("inverted-residual")
    targets = _graph_targets(converted)
    assert targets.count(graph.integer_layer) == 4 and targets.count(graph.integer_conv_add) == 1
    layers, _ = graph.pipeline_notes(converted)
    assert layers["project"] == "integer input, residual add fused, uint8 output"  # (the pool reads it)
    assert layers["depthwise"] == "integer input, clamp [0.0, 6.0] fused, uint8 output"
    assert layers["head"] == "integer input, float output"  # through the pool's requantize and the dropout
    assert targets.count(graph.integer_mean) == 1 and targets.count(graph.quantize_input) == 1


def test_1d_max_pools_run_on_integers():
    converted = _converted_with_nothing_kept_float("keyword-spotting")
    targets = _graph_targets(converted)
    assert targets.count(tq.functional.quantized_max_pool1d) == 2
    assert targets.count(graph.integer_layer) == 4 and targets.count(graph.quantize_input) == 1
    assert targets.count(graph.integer_mean) == 1
    layers, _ = graph.pipeline_notes(converted)
    assert layers["stem"] == "integer input, ReLU fused, uint8 output"  # (BatchNorm1d folded)
    assert layers["a"] == "integer input, ReLU fused, uint8 output"
    assert layers["b"] == "integer input, ReLU fused, uint8 output"  # (the average pool reads it)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.MaxPool1d)) for m in converted.modules())


def test_squeeze_transpose_and_permute_run_on_integers():
    # each of them was a float op between integer layers: dequantized, moved, quantized again
    converted = _converted_with_nothing_kept_float("spectrogram-views")
    targets = _graph_targets(converted)
    assert targets.count(graph.integer_layer) == 7 and targets.count(graph.quantize_input) == 1
    assert targets.count(graph.dequantize_output) == 0 and targets.count(tq.functional.quantized_max_pool2d) == 1
    layers, _ = graph.pipeline_notes(converted)
    assert all(layers[name] == "integer input, ReLU fused, uint8 output"
               for name in ("stem", "freq", "temporal", "proj", "mix", "token"))
    assert layers["head"] == "integer input, float output"


def test_global_max_pools_run_on_integers():
    # adaptive max-pools and max-pools sized from their input's shape were float ops between integer layers, and so
    # were max / min over a dim (three as torch.max values, x.mT.amin(1))
    converted = _converted_with_nothing_kept_float("text-cnn")
    targets = _graph_targets(converted)
    assert targets.count(torch.amax) == 9 and targets.count(graph.integer_layer) == 5
    assert [n.target for n in converted.graph.nodes if n.op == "call_method"].count("amin") == 1
    assert torch.max not in targets and graph.max_values not in targets  # (nothing computes indices)
    assert targets.count(graph.dequantize_output) == 0
    assert not any(isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)) for m in converted.modules())
    layers, _ = graph.pipeline_notes(converted)
    assert layers["conv2d"] == "integer input, ReLU fused, uint8 output"


def test_splits_slices_and_shuffles_run_on_integers():
    # chunk / split read by indexing, slices, flip, stack and the channel shuffle's views were float ops between
    # integer layers
    converted = _converted_with_nothing_kept_float("shuffle-block")
    targets = _graph_targets(converted)
    assert targets.count(graph.integer_layer) == 7 and targets.count(graph.quantize_input) == 1
    assert targets.count(graph.dequantize_output) == 0 and targets.count(graph.integer_mean) == 1
    assert {"chunk", "split", "flip", "reshape"} <= {n.target for n in converted.graph.nodes if n.op == "call_method"}
    layers, _ = graph.pipeline_notes(converted)
    assert layers["side"] == layers["mix"] == "integer input, ReLU fused, uint8 output"


def test_padding_runs_on_integers():
    # zeros are the zero point of the padded integers, reflect / replicate copy them; they were float ops between
    # integer layers
    converted = _converted_with_nothing_kept_float("padded")
    targets = _graph_targets(converted)
    assert targets.count(graph.integer_pad) == 4 and targets.count(graph.integer_layer) == 5
    assert targets.count(graph.quantize_input) == 1 and targets.count(graph.dequantize_output) == 0
    pads = [n for n in converted.graph.nodes if n.target is graph.integer_pad]
    assert [n.args[2] for n in pads] == ["constant", "constant", "reflect", "replicate"]
    padded_conv = next(n for n in pads if n.args[0].target is graph.integer_layer and n.args[1] == (1, 1, 1, 1))
    assert converted.get_submodule(padded_conv.args[3].target).qparams[2] > 0  # not the padding of a ReLU output


@pytest.mark.parametrize("pad", [lambda y: F.pad(y, (1, 1, 1, 1), value=0.5), nn.ConstantPad2d(1, -1.0)],
                         ids=["F.pad value=0.5", "nn.ConstantPad2d(1, -1.0)"])
def test_padding_with_a_nonzero_constant_stays_float(pad):
    class PadBetweenConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.pad, self.conv2 = nn.Conv2d(3, 4, 3), pad, nn.Conv2d(4, 2, 3)

        def forward(self, x):
            return self.conv2(self.pad(F.relu(self.conv1(x))))

    torch.manual_seed(0)
    model = PadBetweenConvs().eval()
    batches = _batches((2, 3, 8, 8))
    with pytest.warns(UserWarning, match="pad"):
        prepared = tq.calibrate(tq.prepare(model, PIPELINE), batches, progress=False)
    converted = tq.convert(prepared)
    targets = _graph_targets(converted)
    assert graph.integer_pad not in targets and targets.count(graph.dequantize_output) == 1
    with torch.no_grad():
        assert tq.functional.quantization_error(model(batches[0]), converted(batches[0]))["sqnr_db"] > 20


GLOBAL_POOL_DIMS = {"F.max_pool2d(x, x.shape[2:])": (lambda x: F.max_pool2d(x, x.shape[2:]), (2, 3)),
                    "F.max_pool2d(x, x.size()[-2:])": (lambda x: F.max_pool2d(x, x.size()[-2:]), (-2, -1)),
                    "F.max_pool2d(x, (x.size(2), x.size(3)), x.shape[2:])":
                        (lambda x: F.max_pool2d(x, (x.size(2), x.size(3)), x.shape[2:]), (2, 3)),
                    "F.max_pool1d(x, x.shape[-1])": (lambda x: F.max_pool1d(x, x.shape[-1]), (-1,)),
                    "F.adaptive_max_pool2d(x, (1, 1))": (lambda x: F.adaptive_max_pool2d(x, (1, 1)), (-2, -1)),
                    "nn.AdaptiveMaxPool1d(1)": (nn.AdaptiveMaxPool1d(1), (-1,)),
                    # not global on every input: on an unbatched [C, H, W], (x.size(2), x.size(-1)) is W x W
                    "F.max_pool2d(x, (x.size(2), x.size(-1)))": (lambda x: F.max_pool2d(x, (x.size(2), x.size(-1))),
                                                                 None),
                    "F.max_pool2d(x, x.shape[2:], x.shape[-2:])":
                        (lambda x: F.max_pool2d(x, x.shape[2:], x.shape[-2:]), None),
                    "F.max_pool2d(x, x.shape[1:])": (lambda x: F.max_pool2d(x, x.shape[1:]), None),
                    "F.adaptive_max_pool2d(x, (1, None))": (lambda x: F.adaptive_max_pool2d(x, (1, None)), None)}


@pytest.mark.parametrize("pool", list(GLOBAL_POOL_DIMS))
def test_global_max_pool_dims_are_the_pooled_ones_on_every_input(pool):
    # x.shape[2:] of an unbatched [C, H, W] is (W,), which max_pool2d takes as a W x W window: a global pool read
    # over dims (-2, -1) would have pooled all of H; over (2, 3) it fails as the float model does not
    fn, dims = GLOBAL_POOL_DIMS[pool]

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = fn if isinstance(fn, nn.Module) else None

        def forward(self, x):
            return self.pool(x) if self.pool is not None else fn(x)

    traced = torch.fx.symbolic_trace(Pool())
    modules = dict(traced.named_modules())
    pools = (F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d)
    (node,) = [n for n in traced.graph.nodes if n.op == "call_module" or n.target in pools]
    assert graph._global_max_pool_dims(node, modules) == dims
    if dims is not None:  # the dims pool the batched input as the float op does
        x = torch.randn(2, 3, 5, 4) if len(dims) == 2 else torch.randn(2, 3, 7)
        torch.testing.assert_close(torch.amax(x, dims, keepdim=True), traced(x), rtol=0, atol=0)


NOT_GLOBAL_POOLS = {"F.max_pool1d(y, 3)": lambda y: F.max_pool1d(y, 3),
                    "F.max_pool1d(y, y.size(1))": lambda y: F.max_pool1d(y, y.size(1)),
                    "F.max_pool1d(y, y.size(2), 1)": lambda y: F.max_pool1d(y, y.size(2), 1),
                    "F.max_pool1d(y, y.size(-1), padding=1)": lambda y: F.max_pool1d(y, y.size(-1), padding=1),
                    "F.adaptive_max_pool1d(y, 2)": lambda y: F.adaptive_max_pool1d(y, 2),
                    "F.adaptive_max_pool1d(y, 1, True)[0]": lambda y: F.adaptive_max_pool1d(y, 1, True)[0],
                    # (its indices asked for positionally: a float op, not an integer max-pool)
                    "F.max_pool1d(y, 2, 2, 0, 1, False, True)[0]":
                        lambda y: F.max_pool1d(y, 2, 2, 0, 1, False, True)[0]}


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_nearest_upsampling_runs_on_integers(signed):
    # it was a float op between integer layers; int8 integers go through float32 (torch has no int8 kernel)
    config = dataclasses.replace(INTEGER_OUT, activation=dataclasses.replace(INTEGER_OUT.activation, signed=signed))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, prepared, batches = _prepared("unet", config)
    with torch.no_grad():
        expected = [prepared(b) for b in batches]
    converted = tq.convert(prepared)
    targets = _graph_targets(converted)
    assert targets.count(graph.integer_layer) == 6 and targets.count(graph.quantize_input) == 1
    assert targets.count(graph.dequantize_output) == 0 and targets.count("float") == (3 if signed else 0)
    (qparams,) = graph.output_qparams(converted)
    for batch, y in zip(batches, expected):
        with torch.no_grad():
            q = converted(batch)
        assert q.dtype == (torch.int8 if signed else torch.uint8)
        _assert_integers_match(q, y, *qparams)


@pytest.mark.parametrize("pool", list(NOT_GLOBAL_POOLS))
def test_max_pools_that_are_not_global_stay_what_they_are(pool):
    # only a window of the whole input is a torch.amax: the others pool as the float model does
    class PoolNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3)
            self.head = nn.Conv1d(4, 2, 1)

        def forward(self, x):
            return self.head(NOT_GLOBAL_POOLS[pool](F.relu(self.conv(x))))

    torch.manual_seed(0)
    model = PoolNet().eval()
    batches = _batches((2, 3, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = tq.quantize_model(model, PIPELINE, batches, inplace=False)
    assert torch.amax not in _graph_targets(converted)
    with torch.no_grad():
        torch.testing.assert_close(converted(batches[0]), model(batches[0]), atol=0.05, rtol=0)


EXTREMA_KEPT_FLOAT = {"values, indices = y.max(2)": lambda y: (lambda r: torch.cat([r[0], r[1] * r[0]], 1))(y.max(2)),
                      "torch.max(y, y.flip(2))": lambda y: torch.max(y, y.flip(2)).flatten(1),
                      "y.max(dim=y.dim() - 1)[0]": lambda y: y.max(dim=y.dim() - 1)[0]}


@pytest.mark.parametrize("form", list(EXTREMA_KEPT_FLOAT))
def test_max_whose_indices_are_read_stays_float(form):
    # only a max / min whose values alone are read is a passthrough: indices, a max of two tensors (one scale each)
    # and a dim computed at run time keep the float op
    class MaxNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3)
            self.head = nn.LazyLinear(2)

        def forward(self, x):
            return self.head(EXTREMA_KEPT_FLOAT[form](F.relu(self.conv(x))))

    torch.manual_seed(0)
    model = MaxNet().eval()
    batches = _batches((2, 3, 9))
    model(batches[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (what is kept float, where the conv's integers are read)
        converted = tq.quantize_model(model, PIPELINE, batches, inplace=False)
    targets = _graph_targets(converted)
    assert graph.max_values not in targets and torch.amax not in targets
    with torch.no_grad():
        torch.testing.assert_close(converted(batches[0]), model(batches[0]), atol=0.05, rtol=0)


class TupleNet(nn.Module):
    """A conv's output (integers, which another conv reads) in tuples: the values and indices of its max returned
    whole, or a slice of its chunks concatenated."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.kind == "max with indices":
            return self.b(y), y.max(1)
        return self.b(y), torch.cat(y.chunk(4, 1)[:2], 1)


@pytest.mark.parametrize("kind", ["max with indices", "a slice of chunks"])
def test_tuples_of_integer_tensors_stay_float_ops(kind):
    # the output's (values, indices) pair was erased by the max's rewrite; a slice of a split was a tuple taken for
    # an integer tensor and dequantized
    torch.manual_seed(0)
    batches = _batches((2, 3, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.calibrate(tq.prepare(TupleNet(kind).eval(), PIPELINE), batches, progress=False)
    with torch.no_grad():
        fake = prepared(batches[0])
        out = tq.convert(prepared)(batches[0])
    torch.testing.assert_close(out[0], fake[0], atol=1e-5, rtol=0)
    if kind == "max with indices":
        torch.testing.assert_close(out[1].values, fake[1].values, atol=1e-6, rtol=0)
        assert torch.equal(out[1].indices, fake[1].indices)  # (the same values, so the same first maxima)
    else:
        torch.testing.assert_close(out[1], fake[1], atol=1e-6, rtol=0)


def test_in_place_op_through_a_transpose_falls_back_to_the_module_swap():
    class MTNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            y.mT.relu_()
            return self.b(y)

    with pytest.warns(UserWarning, match=r"writes in place into a tensor that shares its memory with another \(relu_"):
        prepared = tq.prepare(MTNet().eval(), PIPELINE)
    assert not graph.is_pipeline(prepared)


class TensorTo(nn.Module):
    """A Tensor.to() call (named `to`, like nn.Module.to) whose output a layer reads."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)).to(torch.float32))


def _names_of_methods(kind: str) -> nn.Module:
    if kind == "Tensor.to":
        return TensorTo()
    # modules named like ModuleDict methods
    return nn.Sequential(collections.OrderedDict(keys=nn.Conv2d(3, 8, 3), relu=nn.ReLU(), values=nn.Conv2d(8, 8, 1),
                                                 items=nn.Sigmoid(), out=nn.Conv2d(8, 4, 1)))


@pytest.mark.parametrize("kind, renamed", [("Tensor.to", {"to_"}), ("method names", {"keys_", "values_", "items_"})])
def test_node_names_of_container_methods_get_their_own_modules(kind, renamed, tmp_path):
    # act_quant[node.name] = ... raised "attribute 'keys' already exists" ('to' for a Tensor.to() call)
    torch.manual_seed(0)
    model, batches = _names_of_methods(kind).eval(), _batches((2, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the .to() is kept float between the layers)
        converted = tq.quantize_model(model, PIPELINE, batches, inplace=False)
        path = tmp_path / "m.safetensors"
        tq.save(converted, path)
        loaded = tq.load(path, _names_of_methods(kind))
    assert renamed <= set(converted.get_submodule(graph.ACT_QUANT)._modules)
    with torch.no_grad():
        out, expected = converted(batches[0]), model(batches[0])
        assert torch.equal(loaded(batches[0]), out)
    torch.testing.assert_close(out, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", [graph.ACT_QUANT, graph.LOOKUP_TABLES])
def test_a_model_attribute_named_like_the_pipelines_modules_falls_back_to_the_module_swap(name):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    setattr(model, name, nn.Identity())  # (a child the forward does not call)
    with pytest.warns(UserWarning, match=f"has an attribute named '{name}', which an integer pipeline needs"):
        prepared = tq.prepare(model, PIPELINE)
    assert not graph.is_pipeline(prepared)


def test_tensor_attributes_of_integer_tensors_are_their_float_tensors():
    # y.dtype and y.mT.sum() of an integer tensor read the integers themselves (uint8, a sum of integers);
    # y.mT and y.T between layers run on the integers
    class AttributeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(8, 8), nn.Linear(8, 5), nn.Linear(6, 3), nn.Linear(6, 2)

        def forward(self, x):
            y = torch.relu(self.a(x))  # [B, 6, 8]
            return self.b(y), self.c(y.mT), self.d(y[0].T), y.mT.sum((1, 2)), torch.full((2,), 1, dtype=y.dtype)

    torch.manual_seed(0)
    model = AttributeNet().eval()
    batches = _batches((4, 6, 8))
    converted = tq.quantize_model(model, PIPELINE, batches, inplace=False)
    with torch.no_grad():
        out, expected = converted(batches[0]), model(batches[0])
    for o, e in zip(out, expected):
        assert o.dtype == e.dtype == torch.float32
        torch.testing.assert_close(o, e, atol=0.05 * e.abs().max().item(), rtol=0)
    layers, _ = graph.pipeline_notes(converted)
    assert layers["c"].startswith("integer input") and layers["d"].startswith("integer input")


@pytest.mark.parametrize("name, lookups", [("hardswish-block", 4), ("smooth-activations", 6)])
def test_activations_between_integer_layers_run_as_lookups(name, lookups):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no activation is kept float between integer layers
        _, prepared, _ = _prepared(name)
        converted = tq.convert(prepared)
    targets = _graph_targets(converted)
    assert targets.count(tq.functional.quantized_lookup) == lookups
    assert targets.count(graph.dequantize_output) == 0 and targets.count(graph.quantize_input) == 1
    assert not any(isinstance(m, (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU)) for m in converted.modules())
    layers, notes = graph.pipeline_notes(converted)
    assert f"{lookups} activation lookup(s)" in notes[0]
    first, activation = {"hardswish-block": ("stem", "hardswish"), "smooth-activations": ("a", "silu")}[name]
    assert layers[first] == f"integer input, uint8 output, then {activation} ({activation}) as a table lookup"
    assert notes[1].startswith("activations run on integers as 256-entry table lookups: ")


def _activation_between_convs(activation):
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), activation, nn.Conv2d(6, 4, 3)).eval()
    batches = _batches((2, 3, 7, 7))
    return model, tq.calibrate(tq.prepare(model, PIPELINE), batches, progress=False), batches


@pytest.mark.parametrize("activation", [nn.Hardswish(), nn.SiLU(inplace=True), nn.GELU(approximate="tanh"),
                                        nn.LeakyReLU(0.2), nn.ELU(0.5), nn.Softplus(2.0), nn.Mish(), nn.Tanh()],
                         ids=lambda m: type(m).__name__)
def test_lookup_table_is_the_activation_between_the_two_quantizers(activation):
    """table[i] = quantize(f(dequantize(i))) with the input's (the conv's output) qparams and the activation's own:
    a table built from another scale fails here."""
    from torchquant import reference
    _, prepared, _ = _activation_between_convs(activation)
    q_in, q_out = prepared.act_quant["_0"], prepared.act_quant["_1"]
    s_in, zp_in = q_in.scale.clone(), int(q_in.zero_point)
    s_out, zp_out = q_out.scale.clone(), int(q_out.zero_point)
    assert s_in != s_out
    converted = tq.convert(prepared)
    (table,) = converted.lookup_tables.buffers()
    codes = torch.arange(256, dtype=torch.uint8)  # the pipeline's activations are uint8
    expected = reference.quantize(activation(reference.dequantize(codes, s_in, zp_in)), s_out, zp_out, bits=8,
                                  signed=False)
    assert torch.equal(table, expected)


def test_clamps_fuse_into_layers_and_are_lookups_after_adds():
    """A ReLU6 / hardtanh after a layer stays its epilogue clamp (no lookup); after an integer add it is a lookup."""
    class AddThenClamp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.b = nn.Conv2d(6, 6, 1)
            self.c = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            y = F.relu6(self.a(x))
            y = F.hardtanh(y + self.b(y), -1.0, 2.0)
            return self.c(y)

    model = AddThenClamp().eval()
    batches = _batches((2, 3, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = tq.quantize_model(model, PIPELINE, calibration=batches)
    assert _graph_targets(converted).count(tq.functional.quantized_lookup) == 1
    layers, notes = graph.pipeline_notes(converted)
    assert layers["a"] == "integer input, clamp [0.0, 6.0] fused, uint8 output"
    assert notes[1].endswith("lookups: hardtanh (hardtanh)")
    with torch.no_grad():
        assert tq.functional.quantization_error(model(batches[0]), converted(batches[0]))["sqnr_db"] > 25


def test_activation_whose_output_stays_float_runs_in_float():
    """A SiLU that only a float op reads (an adaptive average pool to size 2, planned as before the rule that runs
    it on integers) is no lookup: the layer before it writes float."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(32, 2)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(F.silu(self.conv(x)), 2).flatten(1))

    model = Head().eval()
    with (pytest.warns(UserWarning, match=r"kept float between integer layers .*: silu \(silu\)$"),
          graph.pipeline_rules(integer_adaptive_avg_pools=False)):
        converted = tq.quantize_model(model, PIPELINE, calibration=_batches((2, 3, 6, 6)))
    targets = _graph_targets(converted)
    assert tq.functional.quantized_lookup not in targets and F.silu in targets
    layers, _ = graph.pipeline_notes(converted)
    assert layers["conv"] == "integer input, float output"


class InPlaceNet(nn.Module):
    """In-place ops whose results the later readers of their input see: a ReLU and an add, or (lookups) a hardswish
    module, F.silu and Tensor.sigmoid_."""

    def __init__(self, lookups: bool):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)
        self.act = nn.Hardswish(inplace=True)
        self.lookups = lookups

    def forward(self, x):
        y = self.a(x)
        if self.lookups:
            self.act(y)
            z = self.b(y)
            F.silu(z, inplace=True)
            z.sigmoid_()
            return self.c(z) + y
        z = self.b(y)
        F.relu(y, inplace=True)
        y += self.c(y)
        return z + y


def test_in_place_activations_train_and_are_read_as_the_float_model_reads_them():
    model = InPlaceNet(lookups=True).eval()
    batches = _batches((2, 2, 5, 5))
    prepared = tq.prepare(copy.deepcopy(model).train(), PIPELINE)
    prepared(batches[0]).square().mean().backward()  # quantization-aware training through the in-place ops
    assert prepared.a.weight.grad is not None and prepared.a.weight.grad.abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = tq.quantize_model(model, PIPELINE, calibration=batches)
    assert _graph_targets(converted).count(tq.functional.quantized_lookup) == 3
    with torch.no_grad():
        assert tq.functional.quantization_error(model(batches[1]), converted(batches[1]))["sqnr_db"] > 25


class InPlaceMethodNet(nn.Module):
    """In-place tensor methods that are no activations (mul_, clamp_, copy_, __iadd__) on a layer's output,
    unassigned."""

    def __init__(self, method: str):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.method = method

    def forward(self, x):
        y = self.a(x)
        if self.method == "mul_":
            y.mul_(2)
        elif self.method == "clamp_":
            y.clamp_(-0.5, 0.5)
        elif self.method == "__iadd__":
            y.__iadd__(y.mean())
        else:
            y.copy_(torch.flip(y, [3]))
        return self.b(y)


@pytest.mark.parametrize("method", ["mul_", "clamp_", "copy_", "__iadd__"])
def test_in_place_methods_are_read_as_the_float_model_reads_them(method):
    # the converted pipeline ran the method on a dequantized copy and the next layer read the unchanged integers
    torch.manual_seed(0)
    model = InPlaceMethodNet(method).eval()
    batches = _batches((2, 3, 6, 6))
    prepared = tq.calibrate(tq.prepare(model, PIPELINE), batches, progress=False)
    with torch.no_grad():
        want = model(batches[0].clone())
        fake = prepared(batches[0].clone())
        converted = tq.convert(copy.deepcopy(prepared))(batches[0].clone())
    torch.testing.assert_close(converted, fake, atol=1e-5, rtol=0)
    torch.testing.assert_close(converted, want, atol=0.1, rtol=0)


class ViewNet(nn.Module):
    """A conv's output flattened with Tensor.view for a Linear (the conv writes its integers channels-last): of the
    integers, of the conv's float output, or of its integers dequantized for a float op."""

    def __init__(self, kind="integers"):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.kind = kind

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.kind == "in place on a view":
            y[:, :2].sigmoid_()
        if self.kind == "float output":
            y = y * 0.5
        if self.kind == "dequantized":
            return self.fc((y * 0.5).view(y.size(0), -1)) + self.other(y).mean()
        return self.fc(y.view(y.size(0), -1))


@pytest.mark.parametrize("kind", ["integers", "float output", "dequantized"])
def test_view_runs_where_the_pipeline_lays_tensors_out_otherwise(kind):
    # RuntimeError: view size is not compatible with input tensor's size and stride
    torch.manual_seed(0)
    model = ViewNet(kind).eval()
    batches = _batches((2, 3, 6, 6))
    converted = tq.quantize_model(model, PIPELINE, batches)
    with torch.no_grad():
        torch.testing.assert_close(converted(batches[0]), model(batches[0]), atol=0.05, rtol=0)


class SqueezeExciteNet(nn.Module):
    """Float ops between integer layers (a squeeze-excitation product, planned without the rule that runs it on
    integers; max-pool, concatenation, upsampling), and a view of a float tensor made from the last conv's integers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.conv2 = nn.Conv2d(16, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = torch.cat([y, F.interpolate(F.max_pool2d(y, 2), scale_factor=2.0)], dim=1)
        z = self.conv2(y) * 0.5
        return self.head(z.view(z.size(0), -1)), z


def test_float_values_between_integer_layers_keep_the_kernels_layout():
    # a conv writes channels-last: the float ops between integer layers take that layout as it is (no copy to
    # contiguous and back, 2x on a U-Net), while what a view or the caller reads is contiguous as in the float model
    torch.manual_seed(0)
    model = SqueezeExciteNet().eval()
    batches = _batches((2, 3, 8, 8))
    with graph.pipeline_rules(integer_products=False):
        converted = tq.quantize_model(copy.deepcopy(model), PIPELINE, batches)
    kept = {n.name: n.kwargs.get("keep_layout", False) for n in converted.graph.nodes if n.op == "call_function"
            and (n.target is graph.dequantize_output or n.target is graph.integer_layer and n.args[2] is None)}
    # conv's dequantized output and fc2's float output keep the layout; conv2's (z), read by a view and the caller,
    # and the head's (the caller's) are contiguous
    assert kept == {"dequantize_output": True, "integer_layer_2": True, "integer_layer_3": False,
                    "integer_layer_4": False}
    contiguous = copy.deepcopy(converted)
    for node in contiguous.graph.nodes:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "keep_layout"}
    contiguous.recompile()
    x = batches[0]
    with torch.no_grad():
        (y, z), (y_ref, z_ref) = converted(x), contiguous(x)
        assert z.is_contiguous() and torch.equal(z, z_ref) and torch.equal(y, y_ref)
        torch.testing.assert_close(y, model(x)[0], atol=0.1, rtol=0)
    import pickle  # the layouts survive pickling (which rebuilds the graph from its code)
    again = pickle.loads(pickle.dumps(converted))
    assert {n.name: n.kwargs.get("keep_layout", False) for n in again.graph.nodes if n.name in kept} == kept
    # a channels-last input is quantized in memory order: the integers stay channels-last
    quantizer = converted.get_submodule(graph.ACT_QUANT)["x"]
    q = graph.quantize_input(x.to(memory_format=torch.channels_last), quantizer)
    assert q.is_contiguous(memory_format=torch.channels_last) and torch.equal(q, graph.quantize_input(x, quantizer))


@torch.fx.wrap
def _flat_view(t):
    return t.view(t.size(0), -1)


class LayoutReaderNet(nn.Module):
    """A float value made from a conv's integers (w), read by something that depends on its memory layout after
    ops that keep it: a flatten of the spatial dims only, a reshape, a function torch.fx does not see into, an
    as_strided, the caller."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(512, 4)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        w = y * 2
        if self.mode == "flatten(2) to the caller":
            return self.conv2(y), w.flatten(2)
        if self.mode == "flatten(2).view":
            return self.conv2(y), w.flatten(2).view(2, -1)
        if self.mode == "reshape.view":
            return self.conv2(y), w.reshape(2, 8, -1).view(2, -1)
        if self.mode == "wrapped function":
            return self.conv2(y), self.fc(_flat_view(w))
        return self.conv2(y), self.fc(w.as_strided((2, 512), (512, 1)))


@pytest.mark.parametrize("config", ["int8-pipeline", "int8-static"])
@pytest.mark.parametrize("mode", ["flatten(2) to the caller", "flatten(2).view", "reshape.view", "wrapped function",
                                  "as_strided"])
def test_float_values_that_may_be_read_by_layout_stay_contiguous(mode, config):
    # the view failed ("view size is not compatible"), as_strided read other elements, or the caller got
    # channels-last strides, where the pipeline's keep_layout (or, layer by layer, a conv's channels-last output)
    # was set past a flatten / reshape that keeps the layout or into code torch.fx does not see
    torch.manual_seed(0)
    model = LayoutReaderNet(mode).eval()
    batches = _batches((2, 3, 8, 8))
    if config == "int8-static" and mode not in ("wrapped function", "as_strided"):
        config = QuantConfig.preset(config).with_skip(["fc"])  # (not called)
    converted = tq.quantize_model(copy.deepcopy(model), config, batches)
    if config == "int8-pipeline":
        dequantize = next(n for n in converted.graph.nodes if n.target is graph.dequantize_output)
        assert not dequantize.kwargs.get("keep_layout", False)
    else:
        assert converted.conv1.output_memory_format == torch.contiguous_format
    with torch.no_grad():
        got, want = converted(batches[0])[1], model(batches[0])[1]
    assert got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=0.1, rtol=0)


def test_a_float_conv_output_keeps_its_layout_on_every_path():
    # integer_layer(keep_layout=True) returned a contiguous tensor through the C++ entry, channels-last through the
    # Python path (torch.compile's)
    torch.manual_seed(0)
    converted = tq.quantize_model(SqueezeExciteNet().eval(), PIPELINE, _batches((2, 3, 8, 8)))
    layer = converted.fc2
    x_q = torch.randint(0, 256, (2, 4, 5, 5), dtype=torch.uint8)
    eager = graph.integer_layer(layer, x_q, None, torch.float32, keep_layout=True)
    assert eager.is_contiguous(memory_format=torch.channels_last) and not eager.is_contiguous()
    python = layer._int_op(x_q, layer._static_scale, layer.input_zero_point, torch.float32)
    assert python.stride() == eager.stride() and torch.equal(python, eager)
    assert graph.integer_layer(layer, x_q, None, torch.float32).is_contiguous()


def test_in_place_op_on_a_view_falls_back_to_the_module_swap():
    # y[:, :2].sigmoid_() changes y behind the graph: the pipeline quantized y before the change and lost it
    model = ViewNet("in place on a view").eval()
    with pytest.warns(UserWarning, match=r"writes in place into a tensor that shares its memory with another "
                                         r"\(sigmoid_"):
        prepared = tq.prepare(model, PIPELINE)
    assert not graph.is_pipeline(prepared) and isinstance(prepared.conv, QuantConv2d)


class AliasNet(nn.Module):
    """In-place writes the pipeline's new integer tensors would not pass on: `v += 1` into a slice (torch.fx traces
    it as an unused v + 1), an in-place ReLU after a view was taken (the view sees the ReLU)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if self.kind == "augmented slice":
            v = y[:, :, :4]
            v += 1.0
            return self.b(y)
        flat = y.flatten(1)
        y.relu_()
        return self.b(y), flat.min(1).values


@pytest.mark.parametrize("kind, op", [("augmented slice", "add"), ("view before in place", "relu_")])
@pytest.mark.parametrize("preset", ["int8-pipeline", "int8-static"])
def test_writes_through_aliases_reach_their_readers(kind, op, preset):
    # the pipeline (prepared and converted) dropped both writes; the module-swapped conv's channels-last output
    # made flatten(1) a copy that missed the ReLU
    torch.manual_seed(0)
    model, batches = AliasNet(kind).eval(), _batches((2, 3, 6, 6))
    with pytest.warns(UserWarning, match=rf"shares its memory with another \({op}") if preset == "int8-pipeline" \
            else warnings.catch_warnings():
        prepared = tq.calibrate(tq.prepare(model, preset, inplace=False), batches, progress=False)
    assert not graph.is_pipeline(prepared)
    converted = tq.convert(prepared, inplace=False)
    with torch.no_grad():
        expected = model(batches[0].clone())
        for out in (prepared(batches[0].clone()), converted(batches[0].clone())):
            for o, e in zip(out if isinstance(out, tuple) else (out,), expected if kind != "augmented slice"
                            else (expected,)):
                torch.testing.assert_close(o, e, atol=0.05 * e.abs().max().item(), rtol=0)
    if kind == "view before in place":
        assert converted.a.output_memory_format == torch.contiguous_format
        assert (converted(batches[0])[1] >= 0).all()


def test_an_in_place_relu_of_a_conv_output_keeps_its_channels_last_layout():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1), nn.ReLU(inplace=True),
                          nn.Flatten()).eval()
    converted = tq.quantize_model(model, "int8-static", _batches((2, 3, 6, 6)), inplace=False)
    assert converted[0].output_memory_format == torch.channels_last  # (read by the next conv only)
    assert converted[2].output_memory_format == torch.contiguous_format  # (flattened: a view of the output)


def test_a_pipeline_prepared_again_is_kept_as_it_is():
    # tracing a pipeline again failed inside torch.fx (a lint error, KeyError 'input_quantizer')
    torch.manual_seed(0)
    model, batches = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval(), \
        _batches((2, 3, 6, 6))
    prepared = tq.prepare(model, PIPELINE, inplace=False)
    with pytest.warns(UserWarning, match=r"prepare: model is a prepared integer pipeline already and is kept as it "
                                         r"is \(prepare the float model to change it\)") as caught:
        assert tq.prepare(prepared, PIPELINE) is prepared
    assert caught[0].filename == __file__
    converted = tq.quantize_model(model, PIPELINE, batches, inplace=False)
    with torch.no_grad():
        expected = converted(batches[0])
    with pytest.warns(UserWarning, match=r"model is a converted integer pipeline already"):
        again = tq.quantize_model(converted, PIPELINE, batches)
    assert again is converted and graph.is_pipeline(again)
    with torch.no_grad():
        assert torch.equal(again(batches[0]), expected)


def test_dropout_on_integers_is_left_out_of_the_converted_graph():
    """A dropout between integer layers passes their integers on (prepare keeps them integer); the converted model
    runs the identity in train mode too (dropout on integers would be neither dropout nor the identity)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout2d(0.5), nn.Conv2d(8, 4, 3), nn.Flatten(),
                          nn.Dropout(0.5), nn.Linear(4 * 4 * 4, 3)).eval()
    batches = _batches((2, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing kept float
        converted = tq.convert(tq.calibrate(tq.prepare(model, PIPELINE), batches, progress=False))
    assert not any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in converted.modules())
    with torch.no_grad():
        torch.testing.assert_close(converted.train()(batches[0]), converted.eval()(batches[0]), rtol=0, atol=0)


def test_prepared_pipeline_fake_quantizes_where_the_converted_one_quantizes():
    _, prepared, _ = _prepared("basic-blocks")
    # (exact_average: the pool it reads computed as the converted model does)
    quantized = [(n.args[0].args[0] if n.args[0].target is graph.exact_average else n.args[0]).name
                 for n in prepared.graph.nodes if n.op == "call_module" and n.target.startswith(graph.ACT_QUANT + ".")]
    # at the model input, after each layer (its ReLU is its activation clamp now) but those whose residual add
    # alone reads their output (a2, b2: the add is their epilogue), at each add's output (after its ReLU: the global
    # average pool reads the last one's integers) and after the average pool (requantized); not after the head
    assert quantized == ["x", "stem_bn", "a1_bn", "relu_2", "b1", "down", "relu_4", "adaptive_avg_pool2d"]
    assert (prepared.stem.clamp_min, prepared.stem.clamp_max) == (0.0, None)
    assert not any(n.target in ("relu", F.relu) for n in prepared.graph.nodes if n.args and n.args[0].name in (
        "stem_bn", "b1"))


def test_cat_inputs_share_one_quantizer():
    _, prepared, _ = _prepared("cat")
    cat = next(n for n in prepared.graph.nodes if n.target is torch.cat)
    assert len({a.target for a in cat.args[0]}) == 1
    assert prepared.fc1.folded_bn == "fc1_bn"
    targets = _graph_targets(tq.convert(prepared))
    # merge's output the in-place add alone reads: the add is merge's epilogue
    assert targets.count(graph.integer_conv_add) == 1 and targets.count(graph.integer_layer) == 5


def test_layer_input_scale_is_its_producers_output_scale():
    _, prepared, _ = _prepared("conv-bn-module")
    assert prepared.conv2.input_quantizer is prepared.act_quant.bn
    assert prepared.conv2.graph_input
    assert "input_quantizer" not in prepared.conv2._modules  # referenced, owned by the pipeline


def test_float_model_is_left_unchanged_and_parameters_are_shared():
    model = _randomize_bn(BasicBlockNet())
    before = copy.deepcopy(model.state_dict())
    prepared = tq.prepare(model, PIPELINE)
    assert all(type(m) is not QuantConv2d for m in model.modules())
    assert prepared.stem.weight is model.stem.weight
    assert prepared.stem_bn.weight is model.stem_bn.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class EncoderNet(nn.Module):
    """A Linear before an nn.TransformerEncoderLayer, which torch.fx calls as one module (its linears inside)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.encoder(self.embed(x)))


def test_prepared_pipeline_has_its_own_modules():
    # the GraphModule referenced the float model's nn.TransformerEncoderLayer: prepare swapped the float model's
    # own linear1/linear2 for quantized layers and hooked it, train() on the pipeline set its modes, convert left
    # it computing with integer layers
    torch.manual_seed(0)
    model = EncoderNet().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x)
    prepared = tq.prepare(model, PIPELINE)
    assert prepared.encoder is not model.encoder and prepared.norm is not model.norm
    assert type(model.encoder.linear1) is nn.Linear and type(prepared.encoder.linear1) is QuantLinear
    assert not model.encoder._forward_pre_hooks
    assert prepared.encoder.linear1.weight is model.encoder.linear1.weight  # the tensors are shared
    assert prepared.encoder.norm1.weight is model.encoder.norm1.weight and prepared.norm.bias is model.norm.bias
    prepared.train()
    assert not any(m.training for m in model.modules())
    model.encoder.dropout.p = 0.5  # an edit of the float model stays there
    assert prepared.encoder.dropout.p == 0.1
    converted = tq.convert(tq.calibrate(prepared.eval(), [x], progress=False))
    with torch.no_grad():
        assert torch.equal(model(x), want)
        torch.testing.assert_close(converted(x), want, atol=0.1, rtol=0)


def test_quantize_model_and_convert_not_inplace():
    model, prepared, batches = _prepared("cat")
    converted = tq.convert(prepared, inplace=False)
    assert not graph._meta(prepared)["converted"] and graph._meta(converted)["converted"]
    direct = tq.quantize_model(model, "int8-pipeline", calibration=batches)
    with torch.no_grad():
        assert torch.equal(direct(batches[0]), converted(batches[0]))
    assert tq.convert(converted) is converted  # idempotent


def test_untraceable_model_falls_back_to_the_module_swap_with_one_warning():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            y = self.a(x)
            if y.sum() > 0:  # control flow on a value: not traceable
                y = y * 2
            return self.b(y)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tq.quantize_model(Dynamic(), PIPELINE, calibration=[torch.randn(3, 4)])
    assert len(caught) == 1 and "cannot trace Dynamic" in str(caught[0].message)
    assert "module swap" in str(caught[0].message)
    assert isinstance(model.a, QuantLinear) and model.a.converted
    assert model(torch.randn(3, 4)).shape == (3, 2)


class _ReadsTraining(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.form == "F.dropout":
            y = F.dropout(y, 0.5, self.training)
        elif self.training:
            y = y * torch.rand_like(y)
        return self.b(y)


@pytest.mark.parametrize("form", ["F.dropout", "if self.training"])
def test_forward_reading_the_training_flag_falls_back_to_the_module_swap(form):
    """A graph traced with `self.training` read keeps the mode of the trace: prepared for QAT, the converted model
    would run dropout forever. The module swap runs the forward as it is, in the mode it is called in."""
    model = _ReadsTraining(form).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = tq.prepare(model, PIPELINE, inplace=False)
    assert len(caught) == 1 and "reads a module's `training` flag" in str(caught[0].message)
    assert "module swap" in str(caught[0].message)
    assert not graph.is_pipeline(prepared) and prepared.training
    assert all(m.training for m in model.modules())  # (the trace flips the modes and puts them back)
    prepared(torch.randn(8, 16)).square().mean().backward()
    converted = tq.convert(tq.calibrate(prepared.eval(), _batches((8, 16)), progress=False))
    x = torch.randn(8, 16)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), converted(x), rtol=0, atol=0)
        assert tq.functional.quantization_error(model.eval()(x), converted(x))["sqnr_db"] > 25


class _MakesConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) * torch.tensor(0.5) + torch.full((1,), 0.25))


def test_tensors_the_forward_makes_keep_the_pipeline_and_leave_the_model_as_it_was(tmp_path):
    """torch.fx stores a tensor the forward makes as a new attribute of the traced module, named anew by each trace:
    the trace in the other train/eval mode is the same code (no fallback for reading `training`), and the float model
    keeps no such attribute."""
    model = _MakesConstants().eval()
    before = set(vars(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = tq.prepare(model, PIPELINE)
    assert not any("training" in str(w.message) for w in caught)
    assert graph.is_pipeline(prepared) and type(model.a) is nn.Conv2d and set(vars(model)) == before
    converted = tq.convert(tq.calibrate(prepared, _batches((2, 3, 6, 6)), progress=False))
    tq.save(converted, tmp_path / "c.safetensors")
    loaded = tq.load(tmp_path / "c.safetensors", _MakesConstants().eval())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert tq.functional.quantization_error(model(x), converted(x))["sqnr_db"] > 25
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(converted)(x), converted(x), rtol=0, atol=0)


def test_dropout_modules_in_train_mode_keep_the_pipeline():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = tq.prepare(model, PIPELINE, inplace=False)
    assert graph.is_pipeline(prepared) and prepared.training


class _OptionalBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x, bias=None, *, scale=None):
        y = F.relu(self.a(x))
        if bias is not None:
            y = y + bias
        if scale is not None:
            y = y * scale
        return self.b(y)


def test_arguments_defaulting_to_none_are_traced_as_none(tmp_path):
    """`if bias is not None:` is traced with bias left out (the call the model takes without it), not as an input
    whose branch is taken; passing such an argument to the pipeline raises rather than computing another function."""
    torch.manual_seed(0)
    model = _OptionalBias().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = tq.prepare(model, PIPELINE, inplace=False)
    prepared = tq.calibrate(prepared, [torch.randn(5, 6), {"x": torch.randn(5, 6)}], progress=False)
    converted = tq.convert(prepared, inplace=False)
    assert graph.integer_add not in _graph_targets(converted)
    tq.save(converted, tmp_path / "c.safetensors")
    loaded = tq.load(tmp_path / "c.safetensors", _OptionalBias().eval())
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert tq.functional.quantization_error(model(x), converted(x))["sqnr_db"] > 25
        torch.testing.assert_close(converted(x, None, scale=None), converted(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)
        for pipeline in (prepared, converted, loaded):
            for args, kwargs in (((x, torch.ones(5, 8)), {}), ((x,), {"bias": torch.ones(5, 8)}),
                                 ((x,), {"scale": torch.ones(1)})):
                with pytest.raises(ValueError, match=r"traced with `(bias|scale)` left at its default None"):
                    pipeline(*args, **kwargs)


class _TiedAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.enc = nn.Linear(16, 8)

    def forward(self, x):
        z = F.relu(self.enc(F.relu(self.inp(x))))
        return F.linear(z, self.enc.weight.t())  # the decoder is the encoder's weight


def test_layer_whose_weight_the_forward_reads_stays_float():
    """A converted layer keeps no float weight: a layer whose weight the graph reads itself stays float (named in a
    warning), so the pipeline converts, and the others are quantized."""
    model = _TiedAutoencoder().eval()
    with pytest.warns(UserWarning, match=r"enc \(Linear\) stays float: the forward reads its tensor enc.weight"):
        prepared = tq.prepare(model, PIPELINE, inplace=False)
    assert isinstance(prepared.inp, QuantLinear) and type(prepared.enc) is nn.Linear
    converted = tq.convert(tq.calibrate(prepared, _batches((8, 16)), progress=False))
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert tq.functional.quantization_error(model(x), converted(x))["sqnr_db"] > 25


@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic"])
def test_the_module_swap_keeps_a_layer_whose_weight_the_forward_reads_float(preset):
    """The layer-by-layer presets check the traced forward too (a converted layer would have no weight to read);
    the report says why the layer stayed float."""
    model = _TiedAutoencoder().eval()
    with pytest.warns(UserWarning, match=r"enc \(Linear\) stays float: the forward reads its tensor enc.weight"):
        converted = tq.quantize_model(model, preset, calibration=_batches((8, 16)), inplace=False)
    assert type(converted.inp) is QuantLinear and type(converted.enc) is nn.Linear
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert tq.functional.quantization_error(model(x), converted(x))["sqnr_db"] > 25
    report = build_report(model, converted, preset, calibration=_batches((8, 16)), time_layers=False)
    notes = {row.name: row.note for row in report.layers}
    assert notes["enc"] == "kept float: the forward reads its tensor enc.weight itself, which a converted layer " \
                           "does not keep"


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.again = self.first
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(F.relu(self.again(F.relu(self.first(x)))))


@pytest.mark.parametrize("skip", ["first", "again"])
def test_skip_rules_of_a_module_under_two_names(skip, tmp_path):
    """The graph names a module once, by its first name, whose skip rules decide (as in the module swap); a rule for
    the other name says so rather than that it matched no module."""
    model = _Aliased().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = tq.quantize_model(model, PIPELINE.with_skip([skip]), calibration=_batches((4, 16)),
                                      inplace=False)
    messages = [str(w.message) for w in caught]
    said = ("keep float; it is kept float" if skip == "first" else "do not match; it is quantized")
    assert f"prepare: again is the same module as first, which skip rules {said} under both names" in messages
    assert not any("matched no module" in m for m in messages) and all(w.filename == __file__ for w in caught)
    assert isinstance(converted.first, QuantLinear) == (skip == "again")
    tq.save(converted, tmp_path / "c.safetensors")
    loaded = tq.load(tmp_path / "c.safetensors", _Aliased().eval())
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)


class _DefaultWeight(nn.Module):
    """Reads its layer's weight on the path of an argument left at its default, and that layer's bias."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)
        self.g = nn.Linear(8, 8)

    def forward(self, x, w=None):
        if w is None:
            w = self.fc.weight
        y = self.g(self.inp(x) + self.inp.bias)
        return F.linear(self.fc(y), w)


class _Stateful(nn.Module):
    """Keeps its last output, counts its calls, and a hook records what its block computes."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)
        self.prev, self.calls, self.seen = None, 0, []
        self.block.register_forward_hook(lambda module, args, out: self.seen.append(out))

    def forward(self, x):
        self.calls += 1
        y = self.block(x)
        if self.prev is not None:
            y = y + self.prev
        self.prev = y.detach()
        return self.head(y)


def test_the_module_swap_checks_the_default_path_and_reads_of_a_bias():
    # (a converted layer keeps its bias: only reads of the weight keep the layer float)
    model = _DefaultWeight().eval()
    with pytest.warns(UserWarning, match=r"fc \(Linear\) stays float: the forward reads its tensor fc.weight") \
            as caught:
        converted = tq.quantize_model(model, "int8-dynamic", inplace=False)
    assert len(caught) == 1 and type(converted.fc) is nn.Linear and type(converted.inp) is QuantLinear
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert tq.functional.quantization_error(model(x), converted(x))["sqnr_db"] > 25


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "int8-pipeline"])
def test_tracing_leaves_the_model_state_as_it_was(preset):
    """prepare traces the model (to check what the forward reads, to fold BatchNorms, for the pipeline): what the
    traced forward writes into the modules and what their hooks record are not left behind."""
    model = _Stateful().eval()
    prepared = tq.prepare(model, preset)
    assert (model.prev, model.calls, model.seen) == (None, 0, [])
    tq.calibrate(prepared, _batches((4, 8)), progress=False)
    converted = tq.convert(prepared)
    assert isinstance(converted(torch.randn(4, 8)), torch.Tensor)


def test_convert_refusing_a_quantized_layer_whose_weight_the_forward_reads_changes_nothing():
    """A layer quantized before prepare cannot stay float: convert refuses before converting any layer."""
    model = _TiedAutoencoder().eval()
    model.enc = QuantLinear.from_float(model.enc, PIPELINE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.calibrate(tq.prepare(model, PIPELINE, inplace=False), _batches((8, 16)), progress=False)
    x = torch.randn(8, 16)
    with torch.no_grad():
        before = prepared(x)
    with pytest.raises(RuntimeError, match=r"reads enc.weight of the quantized layer 'enc'"):
        tq.convert(prepared)
    assert not any(m.converted for m in prepared.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), before, rtol=0, atol=0)


class _AddsANonFloatTensor(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.form == "mask":
            return self.b(y + (x > 0))
        if self.form == "arange":
            return self.b(y + torch.arange(y.shape[1]))
        if self.form == "long":
            return self.b(torch.add(y, (x < 0).long().flip(0)))
        return self.b(torch.cat([y, (x > 0) & (x < 1)]))


@pytest.mark.parametrize("form", ["mask", "arange", "long", "cat"])
def test_adds_of_bool_or_integer_tensors_stay_float_ops(form):
    """A mask or an index added to an activation is no activation to quantize (the observer takes float only): the
    add runs in float, on the dequantized activation."""
    model = _AddsANonFloatTensor(form).eval()
    prepared = tq.calibrate(tq.prepare(model, PIPELINE, inplace=False), _batches((16, 8)), progress=False)
    x = torch.randn(16, 8)
    with torch.no_grad():
        fake_quant = prepared(x)
        converted = tq.convert(prepared)
        assert graph.integer_add not in _graph_targets(converted)
        assert tq.functional.quantization_error(fake_quant, converted(x))["sqnr_db"] > 60
        assert tq.functional.quantization_error(model(x), converted(x))["sqnr_db"] > 10


def test_unsupported_op_stays_float_and_is_named():
    class Sine(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.b(torch.sin(self.a(x)))

    model = Sine().eval()
    with pytest.warns(UserWarning, match=r"kept float between integer layers .*: sin \(sin\)$"):
        prepared = tq.prepare(model, PIPELINE)
    converted = tq.convert(tq.calibrate(prepared, _batches((2, 1, 7, 7)), progress=False))
    targets = _graph_targets(converted)
    assert targets.count(graph.integer_layer) == 2
    assert targets.count(graph.dequantize_output) == 1 and targets.count(graph.quantize_input) == 2
    x = torch.randn(2, 1, 7, 7)
    with torch.no_grad():
        assert tq.functional.quantization_error(model(x), converted(x))["sqnr_db"] > 25


def test_shape_arithmetic_is_not_named_as_kept_float():
    # `n, c, length = y.shape` and `c * length` read only the integer tensor's shape: prepare's warning named the
    # getitems and the product as float ops kept between integer layers (each "a float round trip")
    class Unpacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 6, 2)

        def forward(self, x):
            y = F.relu(self.conv(x))
            n, c, length = y.shape
            return self.fc(torch.sin(y.reshape(n, c * length)) * y.size(0))

    model = Unpacked().eval()
    with pytest.warns(UserWarning, match=r"kept float between integer layers .*: sin \(sin\), mul_1 \(mul\)$"):
        prepared = tq.prepare(model, PIPELINE)
    converted = tq.convert(tq.calibrate(prepared, _batches((2, 3, 6)), progress=False))
    assert graph._meta(converted)["float_ops"] == ["sin (sin)", "mul_1 (mul)"]
    assert _graph_targets(converted).count(graph.integer_layer) == 2
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        assert tq.functional.quantization_error(model(x), converted(x))["sqnr_db"] > 15


def test_layers_inside_a_module_called_whole_are_named():
    # torch.fx calls torch.nn's containers (nn.TransformerEncoder) whole: their layers were quantized layer by layer
    # without a word, the pipeline covering only the head
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))

    model = Encoder().eval()
    with pytest.warns(UserWarning, match=r"does not reach into enc \(TransformerEncoder: \d+ layer\(s\)\): .* layer by "
                                         r"layer"):
        prepared = tq.prepare(model, PIPELINE)
    converted = tq.convert(tq.calibrate(prepared, _batches((2, 5, 16)), progress=False))
    assert type(converted.enc.layers[0].linear1) is QuantLinear and converted.enc.layers[0].linear1.converted
    notes = graph.pipeline_notes(converted)[1]
    prefix = "layer by layer inside modules the pipeline does not reach into: enc ("
    assert any(note.startswith(prefix) for note in notes)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # (random weights, two calibration batches: int8-static gives the same)
        assert tq.functional.quantization_error(model(x), converted(x))["sqnr_db"] > 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model whose layers the graph calls itself: no such warning
        tq.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval(), PIPELINE)


def test_skipped_layer_stays_float_between_integer_layers():
    model, _, batches = _prepared("cat")
    config = PIPELINE.with_skip(["merge"])
    with pytest.warns(UserWarning, match="merge"):
        converted = tq.quantize_model(model, config, calibration=batches)
    assert type(converted.merge) is nn.Conv2d
    with torch.no_grad():
        assert tq.functional.quantization_error(model(batches[0]), converted(batches[0]))["sqnr_db"] > 25


def test_layer_called_twice_runs_on_its_own_quantizer():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.b(F.relu(self.a(x))))

    model = Twice().eval()
    batches = _batches((3, 4))
    with pytest.warns(UserWarning, match=r"kept float between integer layers .*: b \(b\), b_1 \(b\)$"):
        converted = tq.quantize_model(model, PIPELINE, calibration=batches)
    assert converted.b.converted and not converted.b.graph_input
    with torch.no_grad():
        assert tq.functional.quantization_error(model(batches[0]), converted(batches[0]))["sqnr_db"] > 25


def test_pipeline_whose_every_layer_is_called_twice_converts_and_round_trips(tmp_path):
    # no layer takes integers, so no activation quantizer is used: the converted graph dropped the empty act_quant
    # and convert raised AttributeError (after installing the layers' converted states)
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(F.relu(self.a(x)))

    batches = _batches((3, 4))
    with pytest.warns(UserWarning, match="kept float between integer layers"):
        prepared = tq.calibrate(tq.prepare(Shared().eval(), PIPELINE, inplace=False), batches)
    want = prepared(batches[0])
    converted = tq.convert(prepared)
    assert converted.a.converted and graph._meta(converted)["converted"]
    assert tq.functional.quantization_error(want, converted(batches[0]))["sqnr_db"] > 60
    tq.save(converted, tmp_path / "m.safetensors")
    loaded = tq.load(tmp_path / "m.safetensors", Shared())
    assert torch.equal(loaded(batches[0]), converted(batches[0]))


def test_config_rules():
    needs = "integer_pipeline=True needs static activations of 2 to 8 bits rounded to nearest"
    with pytest.raises(ValueError, match=needs):
        dataclasses.replace(QuantConfig.preset("int8-dynamic"), integer_pipeline=True)
    with pytest.raises(ValueError, match=needs):
        QuantConfig(activation=QuantSpec(bits=1, granularity="per_tensor"), integer_pipeline=True)
    with pytest.raises(ValueError, match=needs):
        QuantConfig(activation=QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor",
                                         rounding="truncate"), integer_pipeline=True)
    four_bits = QuantConfig(activation=QuantSpec(bits=4, signed=False, symmetric=False, granularity="per_tensor"),
                            integer_pipeline=True)
    assert QuantConfig.from_dict(json.loads(json.dumps(four_bits.to_dict()))) == four_bits
    with pytest.raises(ValueError, match="integer_output=True needs integer_pipeline=True"):
        QuantConfig(integer_output=True)
    with pytest.raises(TypeError, match="integer_pipeline must be a bool"):
        QuantConfig(integer_pipeline=1)
    assert QuantConfig.from_dict(json.loads(json.dumps(INTEGER_OUT.to_dict()))) == INTEGER_OUT


def test_output_qparams_needs_a_converted_pipeline():
    _, prepared, _ = _prepared("cat", INTEGER_OUT)
    for model in (prepared, CatNet()):
        with pytest.raises(ValueError, match="output_qparams: model must be a converted integer pipeline"):
            graph.output_qparams(model)


def test_calibration_is_needed_before_convert():
    model = CatNet().eval()
    with pytest.raises(RuntimeError, match="needs calibration"):
        tq.convert(tq.prepare(model, PIPELINE))
    with pytest.raises(ValueError, match="calibration"):
        tq.quantize_model(model, PIPELINE)


# ---- save / load ----

# lookup tables, zero-point pads, convs that pad their input
@pytest.mark.parametrize("name", ["basic-blocks", "hardswish-block", "padded", "padding-modes"])
@pytest.mark.parametrize("converted", [False, True])
def test_save_load_round_trips_the_pipeline_into_the_float_model(tmp_path, converted, name):
    model, prepared, batches = _prepared(name)
    if converted:
        tq.convert(prepared)
    path = tmp_path / "pipeline.safetensors"
    tq.save(prepared, path)
    skeleton = _randomize_bn(MODELS[name][0](), seed=5)
    before = copy.deepcopy(skeleton.state_dict())
    loaded = tq.load(path, skeleton)
    assert graph.is_pipeline(loaded) and graph._meta(loaded)["converted"] == converted
    with torch.no_grad():
        for b in batches:
            assert torch.equal(loaded(b), prepared(b))
    for k, v in skeleton.state_dict().items():  # the float skeleton itself is left as it was
        assert torch.equal(v, before[k])
    again = tq.load(path, loaded)  # into the same pipeline, in place
    assert again is loaded


def _rewrite(path, out, *, metadata=None, tensors=None):
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["torchquant"])
        data = {k: f.get_tensor(k) for k in f.keys()}
    if metadata:
        metadata(meta)
    if tensors:
        tensors(data)
    save_file(data, str(out), metadata={"torchquant": json.dumps(meta)})


def test_load_rejects_bad_pipeline_files_and_changes_nothing(tmp_path):
    model, prepared, _ = _prepared("basic-blocks")
    tq.convert(prepared)
    path = tmp_path / "pipeline.safetensors"
    tq.save(prepared, path)
    bad = tmp_path / "bad.safetensors"

    def check(match, **rewrite):
        _rewrite(path, bad, **rewrite)
        skeleton = BasicBlockNet()
        state = copy.deepcopy(skeleton.state_dict())
        with pytest.raises(ValueError, match=match):
            tq.load(bad, skeleton)
        assert all(torch.equal(v, state[k]) for k, v in skeleton.state_dict().items())

    check(r"act_quant\.x\.scale.*finite and positive",
          tensors=lambda d: d.__setitem__("act_quant.x.scale", torch.tensor([float("nan")])))
    check(r"act_quant\.stem_bn\.zero_point.*must be in \[0, 255\]",
          tensors=lambda d: d.__setitem__("act_quant.stem_bn.zero_point", torch.tensor([300], dtype=torch.int32)))
    check("missing", tensors=lambda d: d.pop("act_quant.relu_2.scale"))
    check("'pipeline' must be an object", metadata=lambda m: m.__setitem__("pipeline", []))
    check("invalid quantization config", metadata=lambda m: m["pipeline"].__setitem__("config", {"weight": 1}))
    check("integer_pipeline true",
          metadata=lambda m: m["pipeline"]["config"].__setitem__("integer_pipeline", False))
    check("other quantizers", metadata=lambda m: m["pipeline"].__setitem__("quantizers", ["x"]))
    with pytest.raises(ValueError, match="not converted"):
        tq.load(path, tq.prepare(BasicBlockNet(), PIPELINE))
    with pytest.raises(ValueError, match="does not fit|other layers"):
        tq.load(path, CatNet())


@pytest.mark.parametrize("key, bad, match", [
    ("act_quant.adaptive_avg_pool2d.scale", 0.0,
     r"'act_quant\.adaptive_avg_pool2d\.scale' \(the input of 'head'\) must be finite and positive"),
    ("act_quant.adaptive_avg_pool2d.scale", -1.0, "finite and positive"),
    ("act_quant.adaptive_avg_pool2d.scale", float("nan"), "finite and positive"),
    ("act_quant.adaptive_avg_pool2d.scale", float("inf"), "finite and positive"),
    ("act_quant.down.scale", 0.0, r"'act_quant\.down\.scale' must be finite and positive"),  # an add's input
    ("act_quant.relu_2.zero_point", 300, r"\(the input of 'b1', 'down'\) must be in \[0, 255\]"),
])
def test_load_state_dict_with_bad_qparams_leaves_the_converted_pipeline_as_it_was(key, bad, match):
    # model.load_state_dict (not torchquant.load): a bad scale of a later layer's input left the layers before it
    # loaded and the forward broken; now everything is checked before anything is copied
    _, prepared, batches = _prepared("basic-blocks")
    converted = tq.convert(prepared)
    other = tq.convert(tq.calibrate(tq.prepare(_randomize_bn(BasicBlockNet(), seed=3), PIPELINE),
                                    [b * 2 for b in batches], progress=False))
    state = other.state_dict()
    state[key] = torch.full_like(state[key], bad)
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    with torch.no_grad():
        want = converted(batches[0])
    with pytest.raises(ValueError, match=match + ".*nothing was loaded"):
        converted.load_state_dict(state)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(converted(batches[0]), want)
    converted.load_state_dict(other.state_dict())  # a good one loads
    with torch.no_grad():
        assert torch.equal(converted(batches[0]), other(batches[0]))


def test_layer_by_layer_file_does_not_load_into_a_pipeline(tmp_path):
    model = CatNet().eval()
    swapped = tq.quantize_model(copy.deepcopy(model), "int8-static", calibration=_batches((3, 2, 6, 6)))
    tq.save(swapped, tmp_path / "swap.safetensors")
    with pytest.raises(ValueError, match="layer-by-layer"):
        tq.load(tmp_path / "swap.safetensors", tq.prepare(model, PIPELINE))


def test_moved_and_copied_pipeline_runs():
    _, prepared, batches = _prepared("basic-blocks")
    converted = tq.convert(prepared)
    with torch.no_grad():
        y = converted(batches[0])
        assert torch.equal(copy.deepcopy(converted)(batches[0]), y)
        assert torch.equal(converted.to("cpu")(batches[0]), y)


class GroupNormNet(nn.Module):
    """A float op with parameters (GroupNorm) between integer layers, then average pooling and a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.mid = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.mid(self.norm(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_converted_pipeline_follows_a_cast_of_the_model(dtype):
    # the converted graph's float outputs kept the dtype of convert time: after model.half() the pipeline returned
    # float32, and the GroupNorm (now half) raised "mixed dtype" on the float32 it was given
    torch.manual_seed(0)
    batches = _batches((2, 3, 6, 6))
    converted = tq.quantize_model(GroupNormNet().eval(), PIPELINE, batches)
    with torch.no_grad():
        want = converted(batches[0])
        cast = copy.deepcopy(converted).to(dtype)
        y = cast(batches[0].to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), want, atol=0.05, rtol=0.05)
        assert cast.to("cpu")(batches[0].to(dtype)).dtype == dtype  # a move keeps the dtype
        assert cast.float()(batches[0]).dtype == torch.float32


class AutocastNet(nn.Module):
    """Float outputs of each kind: a layer's, a layer's integers, an add's, a max-pool's, and the model's input
    (quantized for the first conv) read by a float op."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                          nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.a(x))
        z = self.b(y)
        s = F.relu(z + self.c(y))
        return self.head(self.d(s).amax((2, 3))), z, s, F.max_pool2d(s, 2), x * 2


def test_converted_pipeline_follows_autocast_as_the_float_model_does():
    # the dequantized integers kept the dtype of convert time: under autocast a layer's integers came out float32
    # where the float and fake-quant models give autocast's dtype; what comes from the model's input keeps its dtype
    torch.manual_seed(0)
    batches = _batches((2, 3, 6, 6))
    model = AutocastNet().eval()
    converted = tq.quantize_model(model, PIPELINE, batches, inplace=False)
    with torch.no_grad():
        want = converted(batches[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes = [t.dtype for t in model(batches[0])]
            y = copy.deepcopy(converted)(batches[0])
    assert dtypes == [torch.bfloat16] * 4 + [torch.float32] and [t.dtype for t in y] == dtypes
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(y, want))  # the same values, rounded once


def test_converted_pipeline_to_meta_and_back_by_load_state_dict():
    # the quantizers read their qparams' values after a move: .to("meta") raised midway (Tensor.item() on meta),
    # leaving the model half moved
    _, prepared, batches = _prepared("hardswish-block")
    converted = tq.convert(prepared)
    state = converted.state_dict()
    with torch.no_grad():
        want = converted(batches[0])
    converted.to("meta")
    assert all(t.is_meta for t in converted.state_dict().values())
    converted.to_empty(device="cpu")
    converted.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(converted(batches[0]), want)


# pipeline checkpoints written by earlier revisions of torchquant (scripts/write_old_checkpoints.py) before each
# planning rule came in, and two planned with every rule but recording only some of them: the model of each (of
# MODELS or _FIXTURE_MODELS) and the rule it predates; the outputs they computed on the model's first test batch
CHECKPOINTS = os.path.join(os.path.dirname(__file__), "data", "checkpoints")
OLD_CHECKPOINTS = {"before-integer_dropout": ("dropout", "integer_dropout"),
                   "before-integer_lookups": ("smooth-activations", "integer_lookups"),
                   "before-residual_adds_in_convs": ("basic-blocks", "residual_adds_in_convs"),
                   "before-integer_max_pool1d": ("keyword-spotting", "integer_max_pool1d"),
                   "before-integer_views": ("spectrogram-views", "integer_views"),
                   "before-integer_views-probe": ("views-probe", "integer_views"),
                   "before-integer_extrema": ("text-cnn", "integer_extrema"),
                   "before-integer_extrema-mT": ("transposed-features", "integer_extrema"),
                   "before-integer_extrema-probe": ("extrema-probe", "integer_extrema"),
                   "before-integer_extrema-attribute": ("attribute-probe", "integer_extrema"),
                   "before-integer_indexing": ("shuffle-block", "integer_indexing"),
                   "before-integer_indexing-probe": ("indexing-probe", "integer_indexing"),
                   "before-integer_padding": ("padded", "integer_padding"),
                   "before-integer_means": ("basic-blocks", "integer_means"),
                   "before-integer_avg_pools": ("avg-pools", "integer_avg_pools"),
                   "before-integer_adaptive_avg_pools": ("adaptive-pools", "integer_adaptive_avg_pools"),
                   "before-integer_products": ("squeeze-excitation", "integer_products"),
                   "before-padding_mode_convs": ("padding-modes", "padding_mode_convs"),
                   "integer_padding-unrecorded": ("padded", None),
                   "residual-and-padding-recorded": ("text-cnn", None)}
_FIXTURE_MODELS = {"dropout": (DropoutNet, (2, 3, 8, 8)), "transposed-features": (TransposedFeaturesNet, (2, 4, 6)),
                   "views-probe": (ViewsProbeNet, (2, 3, 6, 6)), "extrema-probe": (ExtremaProbeNet, (2, 3, 6, 6)),
                   "indexing-probe": (IndexingProbeNet, (2, 3, 6, 6)),
                   "attribute-probe": (AttributeProbeNet, (2, 3, 6, 6))}
# (the attribute probe's converted model failed then: its Linear was given the integers)
_PREPARED_ONLY = {"before-integer_extrema-attribute"}


def _expected_output(key):
    with safe_open(os.path.join(CHECKPOINTS, "expected_outputs.safetensors"), "pt") as f:
        return f.get_tensor(key)


def test_old_checkpoints_cover_every_planning_rule():
    assert {rule for _, rule in OLD_CHECKPOINTS.values()} == {*graph.PIPELINE_RULES, None}


@pytest.mark.parametrize("name, kind", [(name, kind) for name in OLD_CHECKPOINTS for kind in ("prepared", "converted")
                                        if kind == "prepared" or name not in _PREPARED_ONLY])
def test_checkpoints_of_earlier_planners_load_as_they_were_saved(name, kind):
    # each loads into a fresh float model (the weights are the file's) and computes what it computed when saved, with
    # the rules it was planned with: those before the one it predates, or all; a converted one's integer ops ran
    # then on the same kernels
    model_name, predates = OLD_CHECKPOINTS[name]
    factory, shape = {**MODELS, **_FIXTURE_MODELS}[model_name]
    loaded = tq.load(os.path.join(CHECKPOINTS, "pipeline", f"{name}.{kind}.safetensors"), factory().eval())
    applied = graph.PIPELINE_RULES[:graph.PIPELINE_RULES.index(predates)] if predates else graph.PIPELINE_RULES
    assert {r for r in graph.PIPELINE_RULES if graph._meta(loaded)[r]} == set(applied)
    with torch.no_grad():
        output, expected = loaded(_batches(shape)[0]), _expected_output(f"pipeline/{name}.{kind}")
    if kind == "converted":
        assert torch.equal(output, expected)
    else:
        # fake quantization runs torch's float convs, whose last bits depend on the CPU's kernels (oneDNN chooses them
        # by instruction set); a value that sits on a rounding boundary may move by one quantization step
        torch.testing.assert_close(output, expected, rtol=0, atol=0.05)
    if kind == "prepared" and name not in _PREPARED_ONLY:
        # converted now, with the rules it was planned with: the converted file's function
        with torch.no_grad():
            assert torch.equal(tq.convert(loaded)(_batches(shape)[0]), _expected_output(f"pipeline/{name}.converted"))
    elif kind == "prepared":
        with torch.no_grad():
            converted = tq.convert(loaded)(_batches(shape)[0])
        assert (converted - _expected_output(f"pipeline/{name}.prepared")).abs().max() < 0.05


class SharedDropoutNet(nn.Module):
    """A conv output read by a conv directly and through dropout and stacked with itself by another."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.d, self.drop = nn.Conv2d(16, 4, 1), nn.Dropout(0.5)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.b(y) + self.c(self.drop(y)) + self.d(torch.stack([y, y], 1).flatten(1, 2))


@pytest.mark.parametrize("rule", ["integer_dropout", "integer_indexing"])
def test_a_pipeline_converts_as_planned_whatever_its_recorded_rules(rule):
    # a prepared pipeline unpickled from an earlier version records none of the later rules; converted, it was lowered
    # with them: a dropout (or stack) planned as a float op, its output quantized, but whose input is an integer
    # tensor (another layer reads it) became a passthrough and the quantizer quantized integers as floats
    torch.manual_seed(0)
    model = SharedDropoutNet().eval()
    batches = _batches((2, 3, 6, 6))
    with graph.pipeline_rules(**{rule: False}), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.calibrate(tq.prepare(copy.deepcopy(model), PIPELINE), batches, progress=False)
    with torch.no_grad():
        expected = tq.convert(copy.deepcopy(prepared))(batches[0])
    del graph._meta(prepared)[rule]
    with torch.no_grad():
        assert torch.equal(tq.convert(prepared)(batches[0]), expected)


def _quantizer_names(model):
    # (not torchquant.io's: scripts/write_old_checkpoints.py imports this module with earlier torchquants)
    return sorted(model.get_submodule(graph.ACT_QUANT)._modules)


def test_pipeline_checkpoints_record_every_planning_rule(tmp_path):
    factory, shape = MODELS["text-cnn"]
    torch.manual_seed(0)
    model = factory().eval()
    batches = _batches(shape)
    prepared = tq.calibrate(tq.prepare(copy.deepcopy(model), PIPELINE), batches, progress=False)
    for pipeline in (prepared, tq.convert(copy.deepcopy(prepared))):
        path = str(tmp_path / "model.safetensors")
        tq.save(pipeline, path)
        with safe_open(path, "pt") as f:
            recorded = json.loads(f.metadata()["torchquant"])["pipeline"]
        assert all(recorded[r] is True for r in graph.PIPELINE_RULES)
        again = tq.load(path, copy.deepcopy(model))
        assert _quantizer_names(again) == _quantizer_names(pipeline)
        with torch.no_grad():
            assert torch.equal(again(batches[0]), pipeline(batches[0]))


def test_rules_a_checkpoint_may_have():
    rules = graph.PIPELINE_RULES
    assert graph.rules_a_checkpoint_may_have(dict.fromkeys(rules, True)) == [dict.fromkeys(rules, True)]
    # files record every rule up to the latest one they record
    assert graph.rules_a_checkpoint_may_have({"residual_adds_in_convs": False, rules[-1]: False}) == [
        {**dict.fromkeys(rules, True), "residual_adds_in_convs": False, rules[-1]: False}]
    # the rules after the latest recorded one applied up to some point in their order, the newest first
    residual = rules.index("residual_adds_in_convs")
    assert graph.rules_a_checkpoint_may_have({"residual_adds_in_convs": True}) == [
        {r: r in rules[:n] for r in rules} for n in range(len(rules), residual, -1)]
    assert graph.rules_a_checkpoint_may_have({}) == [{r: r in rules[:n] for r in rules}
                                                     for n in range(len(rules), -1, -1)]


@pytest.mark.parametrize("name", ["basic-blocks", "hardswish-block", "conv-bn-module", "padded"])
def test_pipeline_pickles(tmp_path, name):
    # unpickling rebuilds a GraphModule by tracing its code: the converted graph's ops (quantize_input,
    # integer_layer, quantized_lookup, ...) were traced into with proxies and raised TypeError
    import pickle
    _, prepared, batches = _prepared(name)
    with torch.no_grad():
        want_prepared = prepared(batches[0])
    again = pickle.loads(pickle.dumps(prepared))
    assert list(again.state_dict()) == list(prepared.state_dict())
    with torch.no_grad():
        assert torch.equal(again(batches[0]), want_prepared)
    converted = tq.convert(prepared)
    tq.convert(again)  # (act_quant is a ModuleDict again)
    with torch.no_grad():
        assert torch.equal(again(batches[0]), converted(batches[0]))
    torch.save(converted, tmp_path / "model.pt")
    for copied in (pickle.loads(pickle.dumps(converted)), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert graph.is_pipeline(copied) and graph._meta(copied)["converted"]
        assert type(copied).__name__ == type(converted).__name__ != "GraphModule"  # the model's class name
        layouts = [{n.name: n.kwargs.get("keep_layout") for n in m.graph.nodes if n.op == "call_function"}
                   for m in (copied, converted)]
        assert layouts[0] == layouts[1]
        calls = [Counter(n.target for n in m.graph.nodes if n.op == "call_function") for m in (copied, converted)]
        assert calls[0] == calls[1]
        assert copied._load_state_dict_pre_hooks and copied._load_state_dict_post_hooks
        with torch.no_grad():
            assert torch.equal(copied(batches[0]), converted(batches[0]))
        state = converted.state_dict()
        copied.load_state_dict(state)
        with pytest.raises(ValueError, match="nothing was loaded"):
            copied.load_state_dict({**state, "act_quant.x.scale": torch.zeros(1)})


# ---- report and command line ----

def test_report_shows_folding_fusion_and_pipeline_counts():
    model, prepared, batches = _prepared("basic-blocks")
    converted = tq.convert(prepared)
    report = build_report(model, converted, PIPELINE, calibration=batches, time_layers=False)
    rows = {row.name: row for row in report.layers}
    assert rows["stem"].note == "bn folded (stem_bn); integer input, ReLU fused, uint8 output"
    assert rows["head"].quantized and rows["head"].output_sqnr_db > 20
    assert any("2 integer add(s) (2 fused into a conv's epilogue)" in note for note in report.notes)
    assert report.output_sqnr_db > 20
    assert not any("each layer alone" in note for note in report.notes)  # (no latencies measured)


def test_cli_convert_and_report_use_the_pipeline(tmp_path, capsys):
    from torchquant.cli import main
    torch.save([torch.randn(4, 1, 8, 8) for _ in range(2)], tmp_path / "calib.pt")
    out = tmp_path / "q.safetensors"
    assert main(["convert", "torchquant.examples:DigitsBNCNN", "--config", "int8-pipeline", "--calib",
                 str(tmp_path / "calib.pt"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bn folded (bn1); integer input, ReLU fused, uint8 output" in text
    assert "integer pipeline:" in text
    # the per-layer latencies time each layer alone, which the table says (the pipeline's calls differ)
    assert "float us / quant us: each layer alone, from a float input to a float output" in text
    from torchquant.examples import DigitsBNCNN
    loaded = tq.load(out, DigitsBNCNN())
    assert graph.is_pipeline(loaded) and graph._meta(loaded)["converted"]


def test_budget_builds_one_pipeline_with_per_layer_weight_bits_that_round_trips(tmp_path):
    from torchquant.budget import quantize_with_budget
    torch.manual_seed(0)  # (which layers the budget keeps at 3 bits depends on the weights)
    model = _randomize_bn(CatNet())
    batches = _batches((3, 2, 6, 6))
    config = dataclasses.replace(PIPELINE, weight=QuantSpec(bits=3))
    quantized, decisions = quantize_with_budget(model, config, batches, min_sqnr=22)
    assert graph.is_pipeline(quantized) and decisions
    bits = {name: quantized.get_submodule(name).config.weight.bits for name in ("left", "right", "fc2")}
    assert bits["right"] == 3 and all(bits[name] == (8 if name in decisions else 3) for name in bits)
    tq.save(quantized, tmp_path / "q.safetensors")
    loaded = tq.load(tmp_path / "q.safetensors", CatNet())
    with torch.no_grad():
        assert torch.equal(loaded(batches[0]), quantized(batches[0]))


@pytest.mark.parametrize("name", ["basic-blocks", "bottleneck", "hardswish-block", "text-cnn", "shuffle-block",
                                  "padded", "padding-modes"])
def test_converted_pipeline_compiles_and_exports(name):
    _, prepared, batches = _prepared(name)
    converted = tq.convert(prepared)
    with torch.no_grad():
        expected = converted(batches[0])
        assert torch.equal(torch.compile(converted, fullgraph=True)(batches[0]), expected)
    program = torch.export.export(converted, (batches[0],))
    with torch.no_grad():
        assert torch.equal(program.module()(batches[0]), expected)


@requires_aoti
def test_converted_pipeline_aoti_package(tmp_path):
    """An integer pipeline (bottleneck blocks: convs with their residual adds in the epilogue, integer outputs
    between layers) compiled by AOTInductor gives the eager integers at every batch size of a dynamic batch dim."""
    _, prepared, batches = _prepared("bottleneck")
    converted = tq.convert(prepared)
    with torch.no_grad():
        program = torch.export.export(converted, (batches[0],),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        package = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "pipeline.pt2")))
        for x in (batches[0], batches[1][:1], torch.cat(batches[:2])):
            assert torch.equal(package(x), converted(x))


@pytest.mark.parametrize("options", [{}, {"cpp_wrapper": True}], ids=["python_wrapper", "cpp_wrapper"])
def test_fused_residual_adds_under_torch_compile(options):
    """The bottleneck blocks' convs with their residual adds in the epilogue (int8_conv2d.residual, an overload
    without defaulted arguments, which inductor's C++ wrapper would leave out) compile to the same integers."""
    _, prepared, batches = _prepared("bottleneck", INTEGER_OUT)
    converted = tq.convert(prepared)
    assert _graph_targets(converted).count(graph.integer_conv_add) == 2
    with torch.no_grad():
        want = converted(batches[0])
        torch._dynamo.reset()
        got = torch.compile(converted, options=options)(batches[0])
    assert torch.equal(got, want)


def test_in_place_ops_are_read_as_the_float_model_reads_them():
    model = InPlaceNet(lookups=False).eval()
    batches = _batches((2, 2, 5, 5))
    converted = tq.quantize_model(model, PIPELINE, calibration=batches)
    with torch.no_grad():
        assert tq.functional.quantization_error(model(batches[0]), converted(batches[0]))["sqnr_db"] > 25


def _activation_quantizer(scale, zero_point, signed=False):
    quantizer = graph.ActivationQuantizer(dataclasses.replace(PIPELINE.activation, signed=signed))
    quantizer.scale.fill_(scale)
    quantizer.zero_point.fill_(zero_point)
    quantizer.refresh()
    return quantizer


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("shape, dims", [((2, 5, 3, 7), (-2, -1)), ((3, 4, 9), (-1,)), ((1, 2, 1, 1), (-2, -1)),
                                         ((2, 300, 17, 13), (-2, -1))])
def test_integer_mean_against_float64(shape, dims, signed):
    # the mean of the dequantized values, requantized: equal to the float64 reference but where that lies within
    # float32 rounding of a tie, and never more than one step off
    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    lo, hi = (-128, 128) if signed else (0, 256)
    q = torch.randint(lo, hi, shape, generator=g, dtype=torch.int32).to(torch.int8 if signed else torch.uint8)
    if len(shape) == 4 and shape[1] > 1:
        q = q.contiguous(memory_format=torch.channels_last)  # as a conv writes it
    for (s_in, z_in), (s_out, z_out) in [((0.05, 3), (0.02, 9)), ((0.013, -128 if signed else 0), (0.1, 0)),
                                         ((0.7, 250 if not signed else 120), (0.004, 17))]:
        inp, out = _activation_quantizer(s_in, z_in, signed), _activation_quantizer(s_out, z_out, signed)
        got = graph.integer_mean(q, dims, True, inp, out)
        assert got.dtype == q.dtype and got.shape == q.sum(dims, keepdim=True).shape
        everything = tuple(range(q.dim()))  # a mean over every dimension is 0-d, as torch's
        assert graph.integer_mean(q, everything, False, inp, out).shape == q.float().mean(everything).shape == ()
        v = (q.double() - inp.qparams[2]).mean(dims, keepdim=True) * inp.qparams[1] / out.qparams[1]
        want = (torch.round(v) + z_out).clamp(lo, hi - 1)
        diff = (got.double() - want).abs()
        assert diff.max() <= 1
        assert (diff[(v - v.floor() - 0.5).abs() > 1e-5] == 0).all()


def test_integer_mean_rounds_ties_to_even():
    # scale 1 in and out: a mean of k + 0.5 is a tie, which quantize rounds to the even integer (exactly: the sum
    # is an integer, the division by 2 exact)
    q = torch.tensor([[[0, 1], [2, 5], [7, 8], [10, 10]]], dtype=torch.uint8)  # means 0.5 3.5 7.5 10
    one = _activation_quantizer(1.0, 0)
    assert graph.integer_mean(q, (-1,), False, one, one).flatten().tolist() == [0, 4, 8, 10]
    # the zero point: means of q - 3 are -2.5, 0.5, 4.5, 7 -> -2, 0, 4, 7 (+ 3 out)
    three = _activation_quantizer(1.0, 3)
    assert graph.integer_mean(q, (-1,), True, three, three).flatten().tolist() == [1, 3, 7, 10]


class GlobalPoolNet(nn.Module):
    """Means on integers: global average pools as a module (2-d, output size (1, 1)) and a function (1-d),
    torch.mean over the last dim, concatenated for the head, and a squeeze (Tensor.mean over the spatial dims, kept)
    read by a 1x1 conv; the first two after a SiLU."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.conv1d = nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d((1, 1)), nn.Conv1d(8, 8, 1)
        self.squeeze, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(32, 3)

    def forward(self, x):
        y = F.silu(self.conv(x))
        z = self.conv1d(y.flatten(2))
        a, b, c = self.pool(y).flatten(1), F.adaptive_avg_pool1d(z, 1).flatten(1), torch.mean(z, -1)
        d = self.squeeze(y.mean((2, 3), keepdim=True)).flatten(1)
        return self.fc(torch.cat([a, b, c, d], 1))


def _integer_out_pipeline_with_no_float_op(model, batches):
    """model prepared as a pipeline with integer output (a warning of an op kept float fails), calibrated on
    batches, and a converted copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = tq.calibrate(tq.prepare(model, INTEGER_OUT), batches, progress=False)
    return prepared, tq.convert(copy.deepcopy(prepared))


def test_global_average_pools_read_integers_and_requantize():
    torch.manual_seed(0)
    batches = _batches((4, 3, 8, 8))
    prepared, converted = _integer_out_pipeline_with_no_float_op(GlobalPoolNet().eval(), batches)
    targets = _graph_targets(converted)
    assert targets.count(graph.integer_mean) == 4 and targets.count(graph.quantize_input) == 1
    assert targets.count(tq.functional.quantized_lookup) == 1 and targets.count(graph.dequantize_output) == 0
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in converted.modules())
    layers, notes = graph.pipeline_notes(converted)
    assert layers["conv1d"] == layers["squeeze"] == "integer input, uint8 output" and "4 integer mean(s)" in notes[0]
    # the concatenated means share its quantizer; the squeeze writes the 1x1 conv's input
    means = [n for n in converted.graph.nodes if n.target is graph.integer_mean]
    assert [m.args[1:3] for m in means] == [((-2, -1), True), ((-1,), True), ((-1,), False), ((2, 3), True)]
    assert len({m.args[4].target for m in means[:3]} | {means[3].args[4].target}) == 2
    # the count follows the input's size under torch.compile with dynamic shapes too
    _assert_fake_quant_integers_and_dynamic_compile(converted, prepared, batches,
                                                    [_batches((2, 3, 11, 9))[0], _batches((1, 3, 6, 7))[0]])


def _assert_fake_quant_integers_and_dynamic_compile(converted, prepared, batches, other_inputs):
    """A converted pipeline with integer output gives the fake-quant integers on batches, and compiled with
    dynamic shapes the converted model's on batches[0] and other_inputs."""
    (qparams,) = graph.output_qparams(converted)
    with torch.no_grad():
        for b in batches:
            _assert_integers_match(converted(b), prepared(b), *qparams)
        torch._dynamo.reset()
        compiled = torch.compile(converted, dynamic=True, fullgraph=True)
        for x in (batches[0], *other_inputs):
            assert torch.equal(compiled(x), converted(x))


def _average_integers(model, x, converted):
    """{(input quantizer, output quantizer): (input integers, output integers)} of every mean and average pool the
    pipeline runs on integers, in the prepared model (its exact_average nodes, the fake-quant values on their
    quantizers' grids) or the converted one."""
    found, pending = {}, {}
    averages = tuple(op for op, _ in graph._AVERAGES.values())

    def on_grid(value, quantizer):
        q = model.get_submodule(quantizer)
        return torch.round(value / q.scale) + q.zero_point

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if converted and node.target in averages:
                found[node.args[-2].target, node.args[-1].target] = (self.env[node.args[0]].float(), result.float())
            if not converted and node.target is graph.exact_average:
                pending[next(iter(node.users))] = (node.args[2].target, on_grid(self.env[node.args[1]],
                                                                                node.args[2].target))
            if node in pending:
                q_in, integers = pending[node]
                found[q_in, node.target] = (integers, on_grid(result, node.target))
            return result
    with torch.no_grad():
        Recorder(model).run(x)
    return found


@pytest.mark.parametrize("name", ["avg-pools", "adaptive-pools", "global-pools"])
def test_fake_quant_averages_are_the_converted_ones(name):
    # the prepared model computes each mean and average pool on integers as the converted one does (a float pool
    # put 1-2 % of the avg-pools model's pool outputs a step apart: calibration makes a pool's output scale a
    # rational multiple of its input's, 102/65 there, so exact ties of the requantization are common)
    factory, shape = MODELS[name] if name in MODELS else (GlobalPoolNet, (4, 3, 8, 8))
    torch.manual_seed(0)
    batches = _batches(shape)
    prepared, converted = _integer_out_pipeline_with_no_float_op(_randomize_bn(factory()), batches)
    compared = 0
    for b in batches:
        fake, exact = _average_integers(prepared, b, False), _average_integers(converted, b, True)
        assert fake.keys() == exact.keys() and len(fake) >= 3
        for key, (fake_in, fake_out) in fake.items():
            if torch.equal(fake_in, exact[key][0]):  # (a layer before may have put an input a step apart)
                assert torch.equal(fake_out, exact[key][1]), key
                compared += 1
    assert compared >= len(batches) * 3
    for mode in (False, True):  # the float pool's gradient, in evaluation and in training (the float pool then)
        prepared.train(mode)
        x = batches[0].clone().requires_grad_()
        prepared(x).sum().backward()
        assert x.grad.abs().sum() > 0


# integer_avg_pool's arguments: (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_POOLS = {
    "densenet-transition": ((2, 2), (2, 2), (0, 0), False, True, None),
    "inception-branch": ((3, 3), (1, 1), (1, 1), False, True, None),
    "padding-not-counted": ((3, 3), (1, 1), (1, 1), False, False, None),
    "resnet-d-shortcut": ((2, 2), (2, 2), (0, 0), True, False, None),
    "ceil-padding-counted": ((3, 3), (2, 2), (1, 1), True, True, None),
    "rectangular-ceil": ((3, 2), (2, 1), (1, 0), True, False, None),
    "divisor-override": ((2, 2), (1, 1), (1, 1), False, True, 3),
    "divisor-override-ceil": ((3, 3), (2, 2), (1, 1), True, False, 5),
    "1d-ceil": ((3,), (2,), (1,), True, True, None),
    "1d-padding-not-counted": ((4,), (3,), (2,), False, False, None),
}


def _avg_pool_float64(q, zero_point, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """torch's average pool of the dequantized values (less the scale), in float64; a 1-d pool as a 2-d one."""
    x = q.double() - zero_point
    if len(kernel_size) == 1:
        return F.avg_pool2d(x.unsqueeze(-2), (1, *kernel_size), (1, *stride), (0, *padding), ceil_mode,
                            count_include_pad, divisor_override).squeeze(-2)
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _assert_requantized_as_float64(got, means, inp, out, dtype):
    """got: the integers of out for the float64 means of integers of inp less their zero point (less the scale).
    Equal to the float64 reference but where that lies within float32 rounding of a tie, and never a step off."""
    v = means * inp.qparams[1] / out.qparams[1]
    assert got.dtype == dtype and got.shape == v.shape
    info = torch.iinfo(dtype)
    want = (torch.round(v) + out.qparams[2]).clamp(info.min, info.max)
    diff = (got.double() - want).abs()
    assert diff.numel() == 0 or diff.max() <= 1
    assert (diff[(v - v.floor() - 0.5).abs() > 1e-5] == 0).all()


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("pool", list(AVG_POOLS))
def test_integer_avg_pool_against_float64(pool, signed):
    # the pool of the dequantized values, requantized: equal to the float64 reference but where that lies within
    # float32 rounding of a tie, and never more than one step off; odd sizes (windows overhanging in ceil mode),
    # channels-last and contiguous, batched and unbatched, an empty batch
    args = AVG_POOLS[pool]
    lo, hi = (-128, 128) if signed else (0, 256)
    shapes = [(2, 5, 6, 7), (1, 3, 4, 4), (3, 1, 9, 5), (5, 6, 7), (0, 2, 5, 5)] if len(args[0]) == 2 \
        else [(2, 3, 10), (4, 9), (1, 2, 4)]
    for i, shape in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        q = torch.randint(lo, hi, shape, generator=g, dtype=torch.int32).to(torch.int8 if signed else torch.uint8)
        if len(shape) == 4 and i == 0:
            q = q.contiguous(memory_format=torch.channels_last)  # as a conv writes it
        for (s_in, z_in), (s_out, z_out) in [((0.05, 3), (0.02, 9)), ((0.013, lo), (0.1, 0)),
                                             ((0.7, hi - 6), (0.004, 17))]:
            inp, out = _activation_quantizer(s_in, z_in, signed), _activation_quantizer(s_out, z_out, signed)
            got = graph.integer_avg_pool(q, *args, inp, out)
            _assert_requantized_as_float64(got, _avg_pool_float64(q, inp.qparams[2], *args), inp, out, q.dtype)


def test_integer_avg_pool_rounds_ties_to_even_and_pads_with_zero():
    # scale 1 in and out: window sums over 2 are ties, which quantize rounds to the even integer (exactly); the
    # padding is the real 0 (the zero point), counted or not
    q = torch.tensor([[[1, 2, 4, 7, 8, 11]]], dtype=torch.uint8)  # 1-d, values less the zero point 3: -2 -1 1 4 5 8
    three = _activation_quantizer(1.0, 3)
    # means -1.5 2.5 6.5 -> -2 2 6, + 3
    assert graph.integer_avg_pool(q, (2,), (2,), (0,), False, True, None, three, three).flatten().tolist() == [1, 5, 9]
    # windows [pad, -2], [-1, 1], [4, 5], [8, pad]: padding counted -1 0 4.5 4 -> -1 0 4 4; not counted -2 0 4 8
    counted = graph.integer_avg_pool(q, (2,), (2,), (1,), False, True, None, three, three)
    assert counted.flatten().tolist() == [2, 3, 7, 7]
    assert graph.integer_avg_pool(q, (2,), (2,), (1,), False, False, None, three, three).flatten().tolist() == \
        [1, 3, 7, 11]


# pipeline models of average pools: their integer op, the pools' arguments, the float module they replace, layers
# reading their integers, and other input sizes (fixed windows follow the size; odd sizes: a ceil-mode pool's last
# window overhangs, an adaptive pool's windows differ in size)
POOL_PIPELINES = {
    "avg-pools": (graph.integer_avg_pool, [((2, 2), (2, 2), (0, 0), False, True, None),
                                           ((3, 3), (1, 1), (1, 1), False, True, None),
                                           ((2, 2), (2, 2), (0, 0), True, False, None),
                                           ((3,), (2,), (1,), False, False, None),
                                           ((2, 2), (2, 2), (1, 1), True, True, 3)],
                  nn.AvgPool2d, ["transition.0", "conv1d"], [(2, 3, 11, 11), (1, 3, 12, 12), (1, 3, 10, 10)]),
    "adaptive-pools": (graph.integer_adaptive_avg_pool, [((6, 6),), ((6, None),), ((4, 4),), ((None, 1),), ((5,),)],
                       nn.AdaptiveAvgPool2d, ["conv1d"], [(2, 3, 12, 12), (1, 3, 18, 18), (1, 3, 10, 14)]),
}


@pytest.mark.parametrize("name", list(POOL_PIPELINES))
def test_average_pools_read_integers_and_requantize(name):
    integer_op, arguments, module_type, readers, other_shapes = POOL_PIPELINES[name]
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    batches = _batches((4, *shape[1:]))
    prepared, converted = _integer_out_pipeline_with_no_float_op(_randomize_bn(factory()), batches)
    targets = _graph_targets(converted)
    assert targets.count(integer_op) == len(arguments) and targets.count(graph.quantize_input) == 1
    assert targets.count(graph.dequantize_output) == 0
    assert not any(isinstance(m, module_type) for m in converted.modules())
    assert [n.args[1:-2] for n in converted.graph.nodes if n.target is integer_op] == arguments
    layers, notes = graph.pipeline_notes(converted)
    assert all(layers[r] == "integer input, uint8 output" for r in readers)
    assert f"{len(arguments)} integer average pool(s)" in notes[0]
    # the windows follow the input's size under torch.compile with dynamic shapes too
    _assert_fake_quant_integers_and_dynamic_compile(converted, prepared, batches,
                                                    [_batches(s)[0] for s in other_shapes])


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("shape, output_size", [((2, 5, 12, 12), (6,) * 2), ((2, 5, 6, 6), (4, 4)),
                                                ((3, 4, 9, 7), (None, 3)), ((5, 6, 7), (3, 2)), ((2, 3, 20), (6,)),
                                                ((0, 2, 5, 5), (2, 2))])
def test_integer_adaptive_avg_pool_against_float64(shape, output_size, signed):
    # the adaptive pool of the dequantized values, requantized: equal to the float64 reference but where that lies
    # within float32 rounding of a tie, never more than one step off; a fixed window (kernel = stride), uneven
    # windows, a kept dim, unbatched, 1-d, an empty batch
    lo, hi = (-128, 128) if signed else (0, 256)
    g = torch.Generator().manual_seed(len(shape))
    q = torch.randint(lo, hi, shape, generator=g, dtype=torch.int32).to(torch.int8 if signed else torch.uint8)
    pool = F.adaptive_avg_pool1d if len(output_size) == 1 else F.adaptive_avg_pool2d
    for (s_in, z_in), (s_out, z_out) in [((0.05, 3), (0.02, 9)), ((0.013, lo), (0.1, 0)), ((0.7, hi - 6), (0.004, 17))]:
        inp, out = _activation_quantizer(s_in, z_in, signed), _activation_quantizer(s_out, z_out, signed)
        got = graph.integer_adaptive_avg_pool(q, output_size, inp, out)
        means = pool(q.double() - inp.qparams[2], output_size[0] if len(output_size) == 1 else output_size)
        _assert_requantized_as_float64(got, means, inp, out, q.dtype)


def test_products_read_integers_and_requantize():
    # a squeeze-excitation gate [B, C, 1, 1] times the block's input, either way round, and a product of one shape:
    # integer products, the gates' activations table lookups, nothing float between the input and the output
    factory, shape = MODELS["squeeze-excitation"]
    torch.manual_seed(0)
    batches = _batches((4, *shape[1:]))
    prepared, converted = _integer_out_pipeline_with_no_float_op(_randomize_bn(factory()), batches)
    targets = _graph_targets(converted)
    assert targets.count(graph.integer_mul) == 3 and targets.count(graph.quantize_input) == 1
    assert targets.count(graph.dequantize_output) == 0
    assert targets.count(tq.functional.quantized_lookup) == 6  # hardswish, hardsigmoid, 2 SiLU, sigmoid, tanh
    products = [n for n in converted.graph.nodes if n.target is graph.integer_mul]
    assert all(n.args[4] is not None for n in products)  # each writes integers at its own scale
    layers, notes = graph.pipeline_notes(converted)
    assert layers["head"] == "integer input, uint8 output" and "3 integer product(s)" in notes[0]
    assert layers["expand1"] == "integer input, uint8 output, then gate (gate) as a table lookup"
    _assert_fake_quant_integers_and_dynamic_compile(converted, prepared, batches,
                                                    [_batches(s)[0] for s in ((1, 3, 8, 8), (3, 3, 10, 6))])


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_integer_mul_against_float64(signed):
    # the product of the dequantized values, requantized: equal to the float64 reference but where that lies within
    # float32 rounding of a tie, never more than one step off; a gate broadcast over a channels-last tensor
    lo, hi = (-128, 128) if signed else (0, 256)
    dtype = torch.int8 if signed else torch.uint8
    g = torch.Generator().manual_seed(3)
    x = torch.randint(lo, hi, (2, 5, 6, 7), generator=g, dtype=torch.int32).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    gate = torch.randint(lo, hi, (2, 5, 1, 1), generator=g, dtype=torch.int32).to(dtype)
    for (s_x, z_x), (s_g, z_g), (s_out, z_out) in [((0.05, 3), (1 / 255, lo), (0.02, 9)),
                                                    ((0.7, hi - 6), (0.013, 0), (0.004, 17))]:
        qx, qg = _activation_quantizer(s_x, z_x, signed), _activation_quantizer(s_g, z_g, signed)
        out = _activation_quantizer(s_out, z_out, signed)
        got = graph.integer_mul(x, gate, qx, qg, out, torch.float32)
        assert got.is_contiguous(memory_format=torch.channels_last)
        v = (x.double() - z_x) * s_x * ((gate.double() - qg.qparams[2]) * qg.qparams[1]) / out.qparams[1]
        want = (torch.round(v) + z_out).clamp(lo, hi - 1)
        diff = (got.double() - want).abs()
        assert diff.max() <= 1  # (float32 products: a tie may round either way)
        assert (diff[(v - v.floor() - 0.5).abs() > 1e-6 * v.abs() + 1e-6] == 0).all()


def test_a_float_product_is_contiguous_where_a_view_or_the_caller_reads_it():
    # a product whose output nothing reads as integers writes float: laid out as the float model's (contiguous) where
    # a view or the caller reads it, as a layer's float output is
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = F.relu(self.conv(x))
            z = y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))
            return z.view(z.size(0), -1), y + y, z

    torch.manual_seed(0)
    model = Net().eval()
    batches = _batches((2, 3, 6, 6))
    converted = tq.quantize_model(copy.deepcopy(model), PIPELINE, batches)
    targets = _graph_targets(converted)
    assert targets.count(graph.integer_mul) == 1 and targets.count(graph.integer_add) == 1
    with torch.no_grad():
        flat, doubled, z = converted(batches[0])
        want = model(batches[0])
    assert flat.shape == (2, 8 * 36) and z.is_contiguous() and doubled.is_contiguous()
    for got, ref in zip((flat, doubled, z), want):
        torch.testing.assert_close(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)


def test_products_with_operands_that_are_not_integer_tensors_stay_float():
    # a number computed from a shape, a float mask given to forward, a parameter (a layer scale): the product stays a
    # float op (no quantizer for such an operand), as it was before products ran on integers
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
            self.gamma = nn.Parameter(torch.tensor([1e-3, 2e-2, 0.5, 3.0]))

        def forward(self, x, mask):
            y = self.conv(x)
            y = y * (y.size(-1) ** -0.5)
            y = y * mask
            y = y.mul(self.gamma.view(1, -1, 1, 1))
            return self.head(y)

    torch.manual_seed(0)
    model = Net().eval()
    batches = [(x, (torch.rand(2, 1, 6, 6) > 0.5).float()) for x in _batches((2, 3, 6, 6))]
    with pytest.warns(UserWarning, match="kept float"):
        prepared = tq.prepare(copy.deepcopy(model), PIPELINE)
    tq.calibrate(prepared, batches, progress=False)
    converted = tq.convert(prepared)
    assert graph.integer_mul not in _graph_targets(converted)
    assert set(converted.get_submodule(graph.ACT_QUANT)) == {"x", "mul_2"}  # the input, the head's input
    with torch.no_grad():
        got, want = converted(*batches[0]), model(*batches[0])
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)


def test_a_product_before_the_rule_stays_float():
    with graph.pipeline_rules(integer_products=False):
        converted = tq.quantize_model(SqueezeExcitationNet().eval(), PIPELINE, calibration=_batches((2, 3, 8, 8)))
    targets = _graph_targets(converted)
    assert graph.integer_mul not in targets and operator.mul in targets and torch.mul in targets
    converted = tq.quantize_model(SqueezeExcitationNet().eval(), PIPELINE, calibration=_batches((2, 3, 8, 8)))
    assert _graph_targets(converted).count(graph.integer_mul) == 3


def test_an_adaptive_average_pool_before_the_rule_stays_float():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.conv(x), 2).flatten(1))

    with graph.pipeline_rules(integer_adaptive_avg_pools=False):
        converted = tq.quantize_model(Net().eval(), PIPELINE, calibration=_batches((2, 3, 6, 6)))
    targets = _graph_targets(converted)
    assert graph.integer_adaptive_avg_pool not in targets and F.adaptive_avg_pool2d in targets
    assert targets.count(graph.quantize_input) == 2  # the input, and the pool's float output for the head
    converted = tq.quantize_model(Net().eval(), PIPELINE, calibration=_batches((2, 3, 6, 6)))
    assert _graph_targets(converted).count(graph.integer_adaptive_avg_pool) == 1


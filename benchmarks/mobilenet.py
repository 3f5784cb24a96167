"""MobileNetV2 (torchvision's architecture, written here as the ResNets are in benchmarks/resnet.py) int8-static on
the CPU: its inverted-residual blocks are 1x1 convs around depthwise 3x3 convs (groups == channels), with ReLU6 and
residual adds without activation. torchquant's integer pipeline and layer-by-layer conversion against torch.ao FX
(x86 engine) and float32, at batch 1 and 8, 224x224; the same tables and options as benchmarks/resnet.py.
mobilenet_v2_hardswish is the same network with hardswish in place of every ReLU6 (MobileNetV3's activation): the
integer pipeline runs each hardswish as a 256-entry table lookup between integer layers. mobilenet_v3_large is
torchvision's MobileNetV3-Large: hardswish and ReLU, 5x5 depthwise convs, squeeze-excitation blocks (average pool,
two 1x1 convs, hardsigmoid, a product with the block's activations: integer means, lookups and products in the
pipeline; `--without-rules integer_products` adds the pipeline with its products in float).

    python -m benchmarks.mobilenet [--models mobilenet_v2 mobilenet_v2_hardswish mobilenet_v3_large] [--batches 1 8]
                                   [--threads 1 2]
                                   [--repeats 5] [--timer wall|thread] [--layers] [--peak-gmacs G]
                                   [--without-rules RULE ...]
                                   [--output benchmarks/results/mobilenet-cpu.md]
"""
import torch
from torch import nn

from benchmarks import resnet


class ConvBNActivation(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation=nn.ReLU6):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), activation(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int, activation=nn.ReLU6):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        layers = [] if expansion == 1 else [ConvBNActivation(in_channels, hidden, 1, activation=activation)]
        layers += [ConvBNActivation(hidden, hidden, 3, stride, groups=hidden, activation=activation),  # depthwise
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, output channels, blocks, first block's stride) of each stage
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, activation=nn.ReLU6):
        super().__init__()
        channels = 32
        features = [ConvBNActivation(3, channels, 3, 2, activation=activation)]
        for expansion, out_channels, blocks, stride in self.STAGES:
            for i in range(blocks):
                features.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expansion,
                                                 activation))
                channels = out_channels
        features.append(ConvBNActivation(channels, 1280, 1, activation=activation))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _divisible_by_8(channels: float) -> int:
    """torchvision's channel rounding: the nearest multiple of 8, at least 8 and at least 90% of channels."""
    rounded = max(8, int(channels + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * channels else rounded


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeezed = _divisible_by_8(channels // 4)
        self.fc1, self.relu = nn.Conv2d(channels, squeezed, 1), nn.ReLU()
        self.fc2, self.gate = nn.Conv2d(squeezed, channels, 1), nn.Hardsigmoid()

    def forward(self, x):
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.relu(self.fc1(scale))))


class InvertedResidualV3(nn.Module):
    def __init__(self, in_channels: int, kernel: int, hidden: int, out_channels: int, se: bool, activation,
                 stride: int):
        super().__init__()
        self.residual = stride == 1 and in_channels == out_channels
        layers = [] if hidden == in_channels else [ConvBNActivation(in_channels, hidden, 1, activation=activation)]
        layers.append(ConvBNActivation(hidden, hidden, kernel, stride, groups=hidden, activation=activation))
        if se:
            layers.append(SqueezeExcitation(hidden))
        layers += [nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV3Large(nn.Module):
    # (input channels, kernel, expanded channels, output channels, squeeze-excitation, hardswish, stride)
    BLOCKS = ((16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2), (24, 3, 72, 24, False, False, 1),
              (24, 5, 72, 40, True, False, 2), (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
              (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
              (80, 3, 184, 80, False, True, 1), (80, 3, 480, 112, True, True, 1),
              (112, 3, 672, 112, True, True, 1), (112, 5, 672, 160, True, True, 2),
              (160, 5, 960, 160, True, True, 1), (160, 5, 960, 160, True, True, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features = [ConvBNActivation(3, 16, 3, 2, activation=nn.Hardswish)]
        for in_channels, kernel, hidden, out_channels, se, hardswish, stride in self.BLOCKS:
            features.append(InvertedResidualV3(in_channels, kernel, hidden, out_channels, se,
                                               nn.Hardswish if hardswish else nn.ReLU, stride))
        features.append(ConvBNActivation(160, 960, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1280, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


ARCHITECTURES = {"mobilenet_v2": lambda: MobileNetV2(activation=nn.ReLU6),
                 "mobilenet_v2_hardswish": lambda: MobileNetV2(activation=nn.Hardswish),
                 "mobilenet_v3_large": MobileNetV3Large}


def mobilenet(name: str = "mobilenet_v2", *, seed: int = 0) -> nn.Module:
    """The MobileNet of that name in eval mode with random weights and BatchNorm statistics measured on random
    images."""
    torch.manual_seed(seed)
    return resnet.with_batchnorm_statistics(ARCHITECTURES[name]())


def main(argv=None) -> None:
    resnet.main(argv, prog="python -m benchmarks.mobilenet", architectures=tuple(ARCHITECTURES), build=mobilenet,
                title="MobileNet int8-static on the CPU", description=__doc__, default_models=tuple(ARCHITECTURES))


if __name__ == "__main__":
    main()

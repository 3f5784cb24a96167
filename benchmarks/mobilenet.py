"""MobileNetV2 (torchvision's architecture, written here as the ResNets are in benchmarks/resnet.py) int8-static on
the CPU: its inverted-residual blocks are 1x1 convs around depthwise 3x3 convs (groups == channels), with ReLU6 and
residual adds without activation. torchquant's integer pipeline and layer-by-layer conversion against torch.ao FX
(x86 engine) and float32, at batch 1 and 8, 224x224; the same tables and options as benchmarks/resnet.py.
mobilenet_v2_hardswish is the same network with hardswish in place of every ReLU6 (MobileNetV3's activation): the
integer pipeline runs each hardswish as a 256-entry table lookup between integer layers.

    python -m benchmarks.mobilenet [--models mobilenet_v2 mobilenet_v2_hardswish] [--batches 1 8] [--threads 1 2]
                                   [--repeats 5] [--timer wall|thread] [--layers] [--peak-gmacs G]
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


ACTIVATIONS = {"mobilenet_v2": nn.ReLU6, "mobilenet_v2_hardswish": nn.Hardswish}


def mobilenet_v2(name: str = "mobilenet_v2", *, seed: int = 0) -> MobileNetV2:
    """MobileNetV2 (with the activation its name says) in eval mode with random weights and BatchNorm statistics
    measured on random images."""
    torch.manual_seed(seed)
    return resnet.with_batchnorm_statistics(MobileNetV2(activation=ACTIVATIONS[name]))


def main(argv=None) -> None:
    resnet.main(argv, prog="python -m benchmarks.mobilenet", architectures=tuple(ACTIVATIONS), build=mobilenet_v2,
                title="MobileNetV2 int8-static on the CPU", description=__doc__)


if __name__ == "__main__":
    main()

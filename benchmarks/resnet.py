"""ResNet-18 and ResNet-50 (torchvision's architecture, written here: torchvision's PyPI wheels are CUDA builds that
do not import against the CPU torch) int8-static on the CPU: torchquant's integer pipeline (preset int8-pipeline)
and its layer-by-layer conversion (int8-static) against torch.ao FX graph mode (x86 engine) and the float32 model,
at batch 1 and 8, 224x224, 1 and 2 threads; and the output SQNR of each against float.

Weights are random (torchvision's initialisation) with BatchNorm statistics taken from a few batches of random
images, so activations have the ranges of a trained network's; calibration uses other random images.

    python -m benchmarks.resnet [--models resnet18 resnet50] [--batches 1 8] [--threads 1 2] [--repeats 5]
                                [--output benchmarks/results/resnet-cpu.md]
"""
import argparse
import copy
from typing import Dict, List, Sequence

import torch
from torch import nn

import torchquant
from benchmarks.models import (TORCH_AO, _engine_for, _quantized_engine, _quiet_torch_ao, latency_rows,
                               torch_ao_static, write_tables)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision.models.ResNet's layout and initialisation (without its options)."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000):
        super().__init__()
        self.in_channels = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block, channels: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_channels != channels * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.in_channels, channels * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(channels * block.expansion))
        layers = [block(self.in_channels, channels, stride, downsample)]
        self.in_channels = channels * block.expansion
        layers += [block(self.in_channels, channels) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


ARCHITECTURES = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


def resnet(name: str, *, seed: int = 0) -> ResNet:
    """A ResNet in eval mode with random weights and BatchNorm statistics measured on random images."""
    torch.manual_seed(seed)
    model = ResNet(*ARCHITECTURES[name])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 224, 224))
    return model.eval()


def sqnr_rows(model_name: str, variants: Dict[str, nn.Module], x: torch.Tensor) -> List[dict]:
    with torch.inference_mode(), _quiet_torch_ao():
        outputs = {}
        for name, model in variants.items():
            with _quantized_engine(_engine_for(name)):
                outputs[name] = model(x).float()
    reference = outputs["float"]
    return [{"model": model_name, "variant": name,
             "output SQNR dB": torchquant.functional.quantization_error(reference, y)["sqnr_db"]}
            for name, y in outputs.items() if name != "float"]


def run(models=("resnet18", "resnet50"), batches=(1, 8), threads=(1, 2), repeats: int = 5) -> List[dict]:
    rows = []
    generator = torch.Generator().manual_seed(1)
    for name in models:
        model = resnet(name)
        calibration = [torch.randn(8, 3, 224, 224, generator=generator) for _ in range(2)]
        variants = {"float": model,
                    "torchquant int8-pipeline": torchquant.quantize_model(copy.deepcopy(model), "int8-pipeline",
                                                                          calibration=calibration),
                    "torchquant int8-static (layer by layer)": torchquant.quantize_model(
                        copy.deepcopy(model), "int8-static", calibration=calibration),
                    f"{TORCH_AO} static (FX, x86)": torch_ao_static(model, calibration)}
        rows += [{"table": "sqnr", **row}
                 for row in sqnr_rows(name, variants, torch.randn(8, 3, 224, 224, generator=generator))]
        inputs = {f"batch {b} x 3x224x224": (torch.randn(b, 3, 224, 224, generator=generator),) for b in batches}
        rows += [{"table": "latency", **row} for row in latency_rows(name, variants, inputs, threads, repeats)]
    return rows


TITLES = {"latency": "Latency (CPU, 224x224, random weights)", "sqnr": "Output SQNR against float32 (batch 8)"}
COLUMNS = {"latency": ["model", "input", "threads", "variant", "ms", "vs float", "vs torch.ao"],
           "sqnr": ["model", "variant", "output SQNR dB"]}
LEGEND = "ms: median of interleaved samples; vs float / vs torch.ao: speed-up over that baseline (> 1 is faster)."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resnet", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved samples per timing (median)")
    parser.add_argument("--output", help="also write the tables, with the machine and date, to this Markdown file")
    args = parser.parse_args(argv)
    rows = run(args.models, args.batches, args.threads, args.repeats)
    write_tables(rows, "ResNet-18 / ResNet-50 int8-static on the CPU", args.output, TITLES, COLUMNS, LEGEND)


if __name__ == "__main__":
    main()

"""A small real task that ships offline: scikit-learn's 8x8 handwritten digits and a CNN that learns them in seconds.

Used by `torchquant demo`, the quality tests and the documentation. The split, the initialisation (given a seed)
and the training order are deterministic, so accuracies are reproducible on one machine.
"""
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["DigitsData", "load_digits_data", "DigitsCNN", "DigitsBNCNN", "train", "evaluate", "calibration_batches",
           "model_device"]


@dataclass
class DigitsData:
    """Tensors of the digits set: images float32 [N, 1, 8, 8] scaled to [0, 1], labels int64 [N]."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_data(*, test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """The 1797 digits of sklearn.datasets.load_digits, split by a permutation drawn from `seed`."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is a test/demo extra, not a dependency of the library
        raise ImportError("the digits example needs scikit-learn (pip install 'torchquant[demo]' or scikit-learn)") \
            from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train_ = order[:n_test], order[n_test:]
    return DigitsData(images[train_], labels[train_], images[test], labels[test])


def _check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers: ~36k parameters, ~98% test accuracy on the digits."""

    def __init__(self, channels: int = 16, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        _check_sizes(channels=channels, hidden=hidden, num_classes=num_classes)
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * channels * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.pool(self.act(self.conv2(x)))
        x = self.act(self.fc1(x.flatten(1)))
        return self.fc2(x)


class DigitsBNCNN(nn.Module):
    """DigitsCNN with a BatchNorm2d after each convolution (the convolutions without bias): the model on which
    BatchNorm folding is measured."""

    def __init__(self, channels: int = 16, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        _check_sizes(channels=channels, hidden=hidden, num_classes=num_classes)
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * channels * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.pool(self.act(self.bn2(self.conv2(x))))
        x = self.act(self.fc1(x.flatten(1)))
        return self.fc2(x)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (a converted layer keeps its weights in buffers)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_data(data) -> None:
    if not isinstance(data, DigitsData):
        raise TypeError(f"data: expected a DigitsData (from load_digits_data()), got {type(data).__name__}")


def train(model: nn.Module, data: DigitsData, *, epochs: int = 10, lr: float = 3e-3, batch_size: int = 32,
          seed: int = 0) -> nn.Module:
    """Adam on the training split, shuffled by `seed`. Works unchanged on a prepared (fake-quant) model: that is
    quantization-aware training. Returns the model, left in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _check_data(data)
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs: expected a non-negative int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    device = model_device(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # Cosine decay to zero: the last epochs settle the weights, which makes the result steady from seed to seed.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.train_x[index].to(device)), data.train_y[index].to(device))
            loss.backward()
            optimizer.step()
        schedule.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: DigitsData, *, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent on the test split (model put in eval mode)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _check_data(data)
    model.eval()
    device = model_device(model)
    correct = 0
    for start in range(0, len(data.test_y), batch_size):
        logits = model(data.test_x[start:start + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == data.test_y[start:start + batch_size]).sum().item()
    return 100.0 * correct / len(data.test_y)


def calibration_batches(data: DigitsData, *, batch_size: int = 64, num_batches: Optional[int] = 8
                        ) -> Iterator[torch.Tensor]:
    """Batches of training images for calibrate(): the first num_batches (all when None)."""
    _check_data(data)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    stop = len(data.train_x) if num_batches is None else min(len(data.train_x), num_batches * batch_size)
    for start in range(0, stop, batch_size):
        yield data.train_x[start:start + batch_size]

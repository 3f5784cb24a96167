"""torch.compile(converted_model, fullgraph=True) runs and matches eager (one small model: compiling is slow)."""
import torch
import torch.nn as nn

import torchquant as tq
from torchquant.nn import QuantConv2d, QuantLinear

from test_nn import exact_float_reference  # noqa: F401  (autouse fixture)


def test_compiled_converted_model_matches_eager(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantConv2d(3, 4, 3, padding=1, config="int8-static"), nn.ReLU(),
        QuantConv2d(4, 4, (1, 3), groups=2, config="int8-dynamic"), nn.Flatten(),
        QuantLinear(4 * 5 * 3, 8, config="int8-dynamic"), nn.ReLU(),
        QuantLinear(8, 3, config="w4a8-dynamic"),
    ).to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    tq.calibrate(model, [x], progress=False)
    tq.convert(model.eval())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)

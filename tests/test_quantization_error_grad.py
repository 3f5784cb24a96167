"""quantization_error on outputs that carry autograd history, as `model(x)` returns them."""
import warnings

import torch

import torchquant as tq
import torchquant.functional as F


def test_quantization_error_of_model_outputs_is_silent():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    qmodel = tq.quantize_model(model, inplace=False)
    x = torch.randn(5, 8)
    y, y_q = model(x), qmodel(x)
    assert y.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        error = F.quantization_error(y, y_q)
    with torch.no_grad():
        assert error == F.quantization_error(model(x), qmodel(x))
    assert 0 < error["mse"] and error["sqnr_db"] > 20

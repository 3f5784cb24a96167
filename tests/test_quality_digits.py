"""Quantization quality on real data: the digits CNN of torchquant.examples (scikit-learn's 8x8 digits), float
versus post-training quantization and quantization-aware training. Fixed seeds; seconds each."""
import copy
import dataclasses

import pytest
import torch

import torchquant
from torchquant.examples import DigitsBNCNN, DigitsCNN, calibration_batches, evaluate, load_digits_data, train
from torchquant.nn import QuantConv2d, QuantLinear

pytest.importorskip("sklearn")


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


def _trained(model_type, digits):
    torch.manual_seed(0)
    return train(model_type(), digits, epochs=10, seed=0)


def _learned_accuracy(model, digits):
    accuracy = evaluate(model, digits)
    assert accuracy >= 96.0, f"the float {type(model).__name__} should learn the task, got {accuracy:.2f}%"
    return accuracy


@pytest.fixture(scope="module")
def float_model(digits):
    return _trained(DigitsCNN, digits)


@pytest.fixture(scope="module")
def float_accuracy(float_model, digits):
    return _learned_accuracy(float_model, digits)


def _converted_layers(model):
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d)) and m.converted]


def _ptq(model, digits, config):
    quantized = torchquant.quantize_model(model, config, calibration=list(calibration_batches(digits)),
                                          inplace=False)
    assert len(_converted_layers(quantized)) == 4, "every conv and linear layer should be converted"
    return quantized


@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic"])
def test_int8_ptq_within_half_a_point_of_float(float_model, float_accuracy, digits, preset, record_property):
    before = copy.deepcopy(float_model.state_dict())
    accuracy = evaluate(_ptq(float_model, digits, preset), digits)
    record_property(f"{preset} accuracy", accuracy)
    print(f"{preset}: {accuracy:.2f}% (float {float_accuracy:.2f}%)")
    assert accuracy >= float_accuracy - 0.5
    for key, value in float_model.state_dict().items():  # inplace=False leaves the float model alone
        assert torch.equal(value, before[key])


def test_w4a8_ptq_reported(float_model, float_accuracy, digits, record_property):
    accuracy = evaluate(_ptq(float_model, digits, "w4a8-dynamic"), digits)
    record_property("w4a8-dynamic PTQ accuracy", accuracy)
    print(f"w4a8-dynamic PTQ: {accuracy:.2f}% (float {float_accuracy:.2f}%)")
    # 4-bit weights without retraining: a sanity bound, not a target (QAT below has the target)
    assert accuracy >= float_accuracy - 5.0


def test_truncate_rounding_reported(float_model, float_accuracy, digits, record_property):
    from torchquant.demo import demo_variants
    config = dict(demo_variants())["int8-static, truncate rounding"]
    assert config.weight.rounding == config.activation.rounding == "truncate"
    accuracy = evaluate(_ptq(float_model, digits, config), digits)
    record_property("int8-static truncate accuracy", accuracy)
    print(f"int8-static with truncation: {accuracy:.2f}% (float {float_accuracy:.2f}%)")
    # truncation biases every value toward zero, yet 8 bits leave enough resolution for the task
    assert accuracy >= float_accuracy - 3.0


def test_qat_4bit_weights_within_one_point_of_float(float_model, float_accuracy, digits, record_property):
    from torchquant.demo import qat_config
    config = qat_config()
    assert config.weight.bits == 4
    qat = torchquant.prepare(copy.deepcopy(float_model), config)
    assert all(isinstance(m, (QuantLinear, QuantConv2d)) for m in (qat.conv1, qat.conv2, qat.fc1, qat.fc2))
    _qat_within_one_point(qat, float_accuracy, digits, record_property, "w4a8 QAT")


def _qat_within_one_point(qat, float_accuracy, digits, record_property, label):
    """Trains the prepared model 3 epochs, converts it and checks its accuracy against float's and the
    fake-quant model's."""
    train(qat, digits, epochs=3, lr=1e-3, seed=1)
    fake_quant_accuracy = evaluate(qat, digits)
    converted = torchquant.convert(qat)
    assert len(_converted_layers(converted)) == 4
    accuracy = evaluate(converted, digits)
    record_property(f"{label} accuracy", accuracy)
    print(f"{label}: {accuracy:.2f}% (fake-quant {fake_quant_accuracy:.2f}%, float {float_accuracy:.2f}%)")
    assert accuracy >= float_accuracy - 1.0
    # the converted model computes the function it was trained as (up to float summation order)
    assert abs(accuracy - fake_quant_accuracy) <= 0.6


# ---- the digits CNN with BatchNorm after each conv: folded into the convs ----

@pytest.fixture(scope="module")
def bn_float(digits):
    """(the trained float DigitsBNCNN, its accuracy)"""
    model = _trained(DigitsBNCNN, digits)
    return model, _learned_accuracy(model, digits)


def _folded(model):
    return {m.folded_bn for m in model.modules() if isinstance(m, QuantConv2d)}


@pytest.mark.parametrize("preset", ["int8-static", "int8-pipeline"])  # layer by layer; uint8 between the layers
def test_bn_int8_ptq_within_0_3_points_of_float(bn_float, digits, record_property, preset):
    from torchquant.graph import is_pipeline
    bn_float_model, bn_float_accuracy = bn_float
    quantized = _ptq(bn_float_model, digits, preset)
    assert _folded(quantized) == {"bn1", "bn2"} and is_pipeline(quantized) == (preset == "int8-pipeline")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in quantized.modules())
    accuracy = evaluate(quantized, digits)
    record_property(f"BN {preset} accuracy", accuracy)
    print(f"BN {preset}: {accuracy:.2f}% (float {bn_float_accuracy:.2f}%)")
    assert accuracy >= bn_float_accuracy - 0.3


def test_bn_qat_4bit_with_folding_within_one_point_of_float(bn_float, digits, record_property):
    bn_float_model, bn_float_accuracy = bn_float
    from torchquant.demo import qat_config
    qat = torchquant.prepare(copy.deepcopy(bn_float_model), dataclasses.replace(qat_config(), freeze_bn_after=60))
    assert _folded(qat) == {"bn1", "bn2"}
    bn = qat.conv1.bn
    steps_before = int(bn.num_batches_tracked)
    _qat_within_one_point(qat, bn_float_accuracy, digits, record_property, "BN w4a8 QAT")
    assert int(bn.num_batches_tracked) == steps_before + 60  # then frozen


# ---- 4-bit QAT of the same model as an integer pipeline (torchquant.graph): uint8 tensors between the layers ----

def test_bn_qat_4bit_pipeline_with_folding_within_one_point_of_float(bn_float, digits, record_property):
    from torchquant.config import QuantConfig, QuantSpec
    from torchquant.graph import is_pipeline
    bn_float_model, bn_float_accuracy = bn_float
    config = QuantConfig(weight=QuantSpec(bits=4), integer_pipeline=True, freeze_bn_after=60,
                         activation=QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor",
                                              observer="moving_average"))
    qat = torchquant.prepare(copy.deepcopy(bn_float_model), config)
    assert is_pipeline(qat) and _folded(qat) == {"bn1", "bn2"}
    _qat_within_one_point(qat, bn_float_accuracy, digits, record_property, "BN w4a8 pipeline QAT")

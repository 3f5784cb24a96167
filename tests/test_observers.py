import pytest
import torch

from torchquant import QuantSpec
from torchquant import functional as F_q
from torchquant.observers import Observer


def _batches(device, channels=None, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (5, 7) if channels is None else (channels, 11)
    return [(torch.randn(shape, generator=g) * (i + 1)).to(device) for i in range(n)]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
def test_minmax_matches_choose_qparams_of_all_data(device, symmetric, axis):
    spec = QuantSpec(symmetric=symmetric, signed=symmetric, granularity="per_tensor")
    batches = _batches(device, channels=None if axis is None else 4)
    obs = Observer(spec, axis=axis, num_channels=1 if axis is None else 4).to(device)
    for b in batches:
        obs(b)
    everything = torch.cat(batches, dim=1)
    want = F_q.choose_qparams(everything, bits=8, signed=symmetric, symmetric=symmetric, axis=axis)
    got = obs.qparams()
    torch.testing.assert_close(got[0], want[0].reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1].reshape(-1), rtol=0, atol=0)
    assert obs.lo.device.type == device and int(obs.batches) == 3


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_are_ignored(device, observer, bad):
    # as choose_qparams ignores them: one inf in a calibration batch made the range [min, 0] (every positive value
    # clipped to 0), one NaN made it NaN (scale 1.0)
    spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", observer=observer)
    batches = _batches(device)
    damaged, zeroed = [b.clone() for b in batches], [b.clone() for b in batches]
    damaged[1][2, 3], zeroed[1][2, 3] = bad, 0.0
    got, want = Observer(spec).to(device), Observer(spec).to(device)
    for b, z in zip(damaged, zeroed):
        got(b)
        want(z)
    for g, w in zip(got.qparams(), want.qparams()):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if observer == "minmax":
        everything = torch.cat(damaged, dim=1)
        for g, w in zip(got.qparams(), F_q.choose_qparams(everything, bits=8, signed=False, symmetric=False)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_range_takes_non_finite_values_as_zero(symmetric):
    """NaN and inf sort to the top of a percentile's order statistics, where they shift it without making it
    non-finite: they are replaced by 0 first, on every path."""
    torch.manual_seed(0)
    x = torch.randn(2, 1000)
    x.view(-1)[torch.randperm(2000)[:16]] = torch.tensor([float("nan")] * 10 + [float("inf")] * 6)
    spec = QuantSpec(bits=8, signed=symmetric, symmetric=symmetric, granularity="per_tensor", observer="percentile",
                     percentile=99.0)
    observer = Observer(spec)
    observer(x)
    replaced = Observer(spec)
    replaced(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
    assert torch.equal(observer.lo, replaced.lo) and torch.equal(observer.hi, replaced.hi)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
def test_observer_replaces_non_finite_values_only_when_there_are_some(device, observer, monkeypatch):
    # on the CPU, eagerly, finite data is reduced once, with no element-wise pass to replace NaN/inf first (a
    # percentile is not where they would show); the path that always replaces them (traced graphs, a GPU, which a
    # check would make wait) gives the same ranges
    spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", observer=observer)
    batches = _batches(device)
    batches[1][2, 3], batches[2][0, 0] = float("nan"), float("-inf")
    replaced = []  # (the passes over a batch: choose_qparams replaces them in the few values of a range too)
    real = torch.nan_to_num
    monkeypatch.setattr(torch, "nan_to_num", lambda x, **k: replaced.append(x.numel() == batches[0].numel())
                        or real(x, **k))
    eager = Observer(spec).to(device)
    eager(batches[0])
    assert any(replaced) == (observer == "percentile" or device != "cpu")
    for b in batches[1:]:
        eager(b)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    always = Observer(spec).to(device)
    for b in batches:
        always(b)
    assert torch.equal(eager.lo, always.lo) and torch.equal(eager.hi, always.hi)
    assert torch.isfinite(eager.lo).all() and torch.isfinite(eager.hi).all()


def test_moving_average():
    spec = QuantSpec(observer="moving_average", averaging_constant=0.25, granularity="per_tensor")
    obs = Observer(spec)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-5.0, 9.0]))
    assert obs.lo.item() == pytest.approx(-1.0 + 0.25 * (-5.0 + 1.0))
    assert obs.hi.item() == pytest.approx(1.0 + 0.25 * (9.0 - 1.0))


@pytest.mark.parametrize("observer, expected", [("moving_average", 3.0e38 - 0.01 * 6.0e38), ("mse", 0.0),
                                                 ("percentile", 0.0)])
def test_averaged_ranges_near_the_float32_limit_stay_finite(observer, expected):
    # running += c * (new - running) overflowed to -inf for batches at +-3e38 (scale 1.0 came out of it)
    spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", observer=observer,
                     percentile=100.0)
    obs = Observer(spec)
    for b in (torch.full((4, 8), 3.0e38), torch.full((4, 8), -3.0e38)):
        obs(b)
    assert obs.lo.item() == pytest.approx(expected, rel=1e-6, abs=1e30)
    assert obs.hi.item() == pytest.approx(expected, rel=1e-6, abs=1e30)
    if observer == "moving_average":
        assert obs.qparams()[0].item() == pytest.approx(expected / 255, rel=1e-6)


def test_percentile_ignores_outliers(device):
    x = torch.linspace(-1, 1, 10001, device=device)
    x[0], x[-1] = -100.0, 100.0
    sym = Observer(QuantSpec(observer="percentile", percentile=99.9, granularity="per_tensor")).to(device)
    sym(x)
    assert 0.9 < sym.hi.item() <= 1.0 and sym.lo.item() == -sym.hi.item()
    asym = Observer(QuantSpec(observer="percentile", percentile=99.9, signed=False, symmetric=False,
                              granularity="per_tensor")).to(device)
    asym(x + 1)
    assert 0.0 <= asym.lo.item() < 0.1 and 1.9 < asym.hi.item() <= 2.0


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_clips_no_worse_than_minmax(device, bits):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(6, 200, generator=g) ** 3).to(device)  # heavy tails: clipping pays off
    errors = {}
    for observer in ("minmax", "mse"):
        spec = QuantSpec(bits=bits, observer=observer)
        obs = Observer(spec, axis=0, num_channels=6).to(device)
        obs(w)
        scale, zp = obs.qparams()
        approx = F_q.fake_quantize(w, scale, zp, bits=bits, axis=0)
        errors[observer] = (approx - w).square().sum(dim=1)
    assert torch.all(errors["mse"] <= errors["minmax"])
    if bits <= 4:
        assert errors["mse"].sum() < 0.8 * errors["minmax"].sum()


@pytest.mark.parametrize("shape", [(6, 200), (3, 50), (40, 300), (5, 64), (2, 9001), (1, 5)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_range_is_the_least_error_factor(device, shape, symmetric):
    """Each channel's range is the factor of MSE_SHRINK_FACTORS whose fake-quantization error (plain PyTorch,
    float64 sums) is least, up to the kernel's float32 terms and lane sums (64 terms a lane per 4096-element chunk);
    the weight is left as it was."""
    import torchquant.observers as observers
    from torchquant import reference
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(shape, generator=g) ** 3).to(device)
    before = w.clone()
    spec = QuantSpec(bits=4, observer="mse", symmetric=symmetric, signed=symmetric)
    lo, hi = observers._mse_range(w, spec)
    assert torch.equal(w, before)
    factors = torch.tensor(observers.MSE_SHRINK_FACTORS, device=device)
    w_lo, w_hi = torch.aminmax(w, dim=1)
    errors = []
    for f in factors:
        scale, zp = observers.qparams_from_range(f * w_lo, f * w_hi, spec)
        approx = reference.fake_quantize(w, scale, zp, bits=4, signed=symmetric, axis=0)
        errors.append((approx.double() - w.double()).square().sum(dim=1))
    errors = torch.stack(errors)  # [factors, channels]
    chosen = torch.stack([torch.nonzero(factors * w_hi[c] == hi[c])[0, 0] for c in range(shape[0])])
    assert torch.equal(factors[chosen] * w_lo, lo)
    least = errors.min(dim=0).values
    assert torch.all(errors[chosen, torch.arange(shape[0], device=device)] <= least * (1 + 1e-5))


def _error_case(channels, length, candidates, bits, signed, seed=0, specials=False):
    """fake_quantize_error's arguments: rows with values around their candidates' ranges (some clipped), NaN and
    +-inf in some rows when specials."""
    from torchquant.observers import qparams_from_range
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(channels, length, generator=g) * torch.rand(channels, 1, generator=g) * 4
    if specials and length > 3:
        rows[0, 1], rows[-1, -2], rows[-1, 0] = float("nan"), float("inf"), -float("inf")
    factors = torch.linspace(1.0, 0.3, candidates)
    lo = rows.nan_to_num(0, 0, 0).amin(1) if length else torch.full((channels,), -1.0)
    hi = rows.nan_to_num(0, 0, 0).amax(1) if length else torch.full((channels,), 1.0)
    spec = QuantSpec(bits=bits, signed=signed, symmetric=signed)
    scale, zero_point = qparams_from_range((factors[:, None] * lo).reshape(-1), (factors[:, None] * hi).reshape(-1),
                                           spec)
    return rows, scale.view(candidates, channels), zero_point.view(candidates, channels)


ERROR_CASES = [(3, 200, 4, 4, True), (2, 4097, 3, 8, False), (5, 63, 2, 1, True), (1, 9000, 5, 3, False),
               (4, 1, 3, 2, True), (2, 0, 2, 8, True), (7, 65, 41, 5, True)]


@pytest.mark.parametrize("channels, length, candidates, bits, signed", ERROR_CASES)
@pytest.mark.parametrize("rounding", ["nearest", "truncate"])
def test_fake_quantize_error_is_the_sum_of_squared_errors(device, channels, length, candidates, bits, signed,
                                                          rounding):
    """Against plain PyTorch (torchquant.reference's fake quantization, float64 sums); NaN and inf in a row make its
    error NaN or inf, as the sum of the fake-quantized row's squared differences is."""
    from torchquant import reference
    from torchquant._ops import ops
    for specials in (False, True):
        rows, scale, zero_point = _error_case(channels, length, candidates, bits, signed, specials=specials)
        got = ops.fake_quantize_error(rows.to(device), scale.to(device), zero_point.to(device), bits, signed,
                                      rounding)
        assert got.dtype == torch.float64 and got.shape == (candidates, channels) and got.device.type == device
        want = torch.stack([
            (reference.fake_quantize(rows, scale[f], zero_point[f], bits=bits, signed=signed, rounding=rounding,
                                     axis=0).double() - rows.double()).square().sum(1)
            for f in range(candidates)])
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("channels, length, candidates, bits, signed", ERROR_CASES)
def test_fake_quantize_error_is_the_same_on_every_path_thread_count_and_cuda(device, isa, channels, length,
                                                                             candidates, bits, signed):
    """The same float64 sums, bit for bit, on every CPU path (the scalar path's order), 1 or 2 threads, and CUDA:
    the mse observer picks the same range everywhere."""
    from torchquant._ops import ops
    from conftest import forced_isa
    rows, scale, zero_point = _error_case(channels, length, candidates, bits, signed, specials=True)
    with forced_isa("scalar"):
        want = ops.fake_quantize_error(rows, scale, zero_point, bits, signed, "nearest")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = ops.fake_quantize_error(rows.to(device), scale.to(device), zero_point.to(device), bits, signed,
                                          "nearest")
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
    finally:
        torch.set_num_threads(threads)


def test_fake_quantize_error_bad_inputs():
    from torchquant._ops import ops
    rows, scale, zero_point = _error_case(3, 10, 2, 8, True)
    cases = [
        ((rows.double(), scale, zero_point), r"rows must be a 2-D float32 tensor \[channels, length\], got Double"),
        ((rows[0], scale, zero_point), r"rows must be a 2-D float32 tensor .* of shape \[10\]"),
        ((rows, scale[:, :2], zero_point[:, :2]),
         r"scale must be float32 \[candidates, 3\], got Float of shape \[2, 2\]"),
        ((rows, scale, zero_point.long()), r"zero_point must be int32 of scale's shape \[2, 3\], got Long"),
        ((rows, scale, zero_point[:1]),
         r"zero_point must be int32 of scale's shape \[2, 3\], got Int of shape \[1, 3\]"),
        ((rows, -scale, zero_point), r"scale must be positive and finite"),
        ((rows, scale, zero_point + 300), r"zero_point must be in \[-128, 127\], got 30"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.fake_quantize_error(*args, 8, True, "nearest")
    with pytest.raises(RuntimeError, match="rounding must be 'nearest' or 'truncate', got 'up'"):
        ops.fake_quantize_error(rows, scale, zero_point, 8, True, "up")
    with pytest.raises(RuntimeError, match=r"bits must be in \[1, 8\], got 9"):
        ops.fake_quantize_error(rows, scale, zero_point, 9, True, "nearest")


def test_state_dict_dtype_and_device(device):
    obs = Observer(QuantSpec(granularity="per_tensor"))
    obs(torch.tensor([-2.0, 3.0]))
    obs.half()
    assert obs.lo.dtype == torch.float32
    obs.to(device)
    assert obs.hi.device.type == device
    fresh = Observer(QuantSpec(granularity="per_tensor"))
    fresh.load_state_dict(obs.state_dict())
    assert fresh.lo.item() == -2.0 and fresh.hi.item() == 3.0 and fresh.has_data


def test_half_input_and_empty_input():
    obs = Observer(QuantSpec(granularity="per_tensor"))
    obs(torch.empty(0, 3))
    assert not obs.has_data
    obs(torch.tensor([-1.5, 0.5], dtype=torch.bfloat16))
    assert obs.lo.item() == -1.5 and obs.lo.dtype == torch.float32
    obs.reset()
    assert not obs.has_data


def test_bad_input():
    with pytest.raises(RuntimeError, match="seen no data"):
        Observer(QuantSpec()).qparams()
    with pytest.raises(TypeError, match="floating-point"):
        Observer(QuantSpec())(torch.arange(4))
    with pytest.raises(ValueError, match="expected 4 channels along axis 0, got 3"):
        Observer(QuantSpec(), axis=0, num_channels=4)(torch.randn(3, 2))
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        Observer("minmax")
    with pytest.raises(ValueError, match="per-tensor observer has num_channels 1"):
        Observer(QuantSpec(), axis=None, num_channels=3)

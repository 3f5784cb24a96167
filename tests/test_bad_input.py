"""Bad input to the kernels: sizes that overflow, failed allocations, inconsistent arguments, extreme ranges and
the CPU instruction-set paths' float contract. Calls that crashed the process once run in a child process."""
import os
import textwrap

import pytest
import torch

import torchquant.functional as F
from torchquant import reference
from torchquant._ops import ops

from conftest import SUPPORTED_ISAS, bit_patterns

# AddressSanitizer (make sanitize-test) reserves terabytes of address space and keeps freed memory in quarantine:
# address-space limits and resident-memory measurements mean nothing under it
not_under_asan = pytest.mark.skipif(os.environ.get("TORCHQUANT_SANITIZED") == "1",
                                    reason="memory limits and measurements do not apply under AddressSanitizer")

# ---------------------------------------------------------------------------------------------------------------
# Sizes computed from user integers are overflow-checked
# ---------------------------------------------------------------------------------------------------------------

CONV_OVERFLOW_CHILD = textwrap.dedent("""
    import torch, torchquant.functional as F
    w = torch.ones(1, 4, 1, 1, dtype=torch.int8)
    x = torch.zeros(1, 4, 1, 1, dtype=torch.int8)
    cases = [
        dict(kernel_size=(1, 2**62 + 1), padding=(0, 2**61)),      # kh * kw * C wraps to 4
        dict(kernel_size=(1, 5), dilation=(1, 2**62)),               # dilated kernel of 2^64 + 1 taps
        dict(kernel_size=(1, 5), dilation=(1, 2**62), padding=(0, 2**62)),
        dict(kernel_size=(1, 1), padding=(2**62, 0)),                # padded height 2^63 + 1
        dict(kernel_size=(1, 1), padding=(2**61, 2**61)),            # output rows 2^124
        dict(kernel_size=(2**31, 2**31), padding=(2**31, 2**31)),
    ]
    for kwargs in cases:
        try:
            F.int8_conv2d(x, 1.0, 0, F.pack_conv_weight(w), w.sum((1, 2, 3), dtype=torch.int32), torch.ones(1),
                          out_channels=1, **kwargs)
        except (RuntimeError, ValueError) as e:
            print("raised:", e)
        else:
            raise SystemExit(f"accepted {kwargs}")
""")


def test_conv_geometry_overflow_is_rejected(run_in_child):
    out = run_in_child(CONV_OVERFLOW_CHILD)
    assert out.count("raised:") == 6, out
    assert "overflows int64" in out


def test_conv_sizes_near_the_limit_still_work():
    # a large but representable padding that the output still fits: a valid call, answered exactly
    w_q = torch.randint(-5, 5, (3, 2, 1, 2), dtype=torch.int8)
    x_q = torch.randint(-5, 5, (1, 2, 1, 3), dtype=torch.int8)
    w_scale = torch.rand(3) + 0.1
    got = F.int8_conv2d(x_q, 0.5, 1, F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32), w_scale,
                        out_channels=3, kernel_size=(1, 2), stride=(1, 2**40), dilation=(1, 2))
    want = reference.int8_conv2d(x_q, 0.5, 1, w_q, w_scale, stride=(1, 2**40), dilation=(1, 2))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# A failed scratch allocation leaves every op usable; the memory each thread keeps is bounded
# ---------------------------------------------------------------------------------------------------------------

SCRATCH_CHILD = textwrap.dedent("""
    import torch, torchquant.functional as F
    a = torch.randint(-5, 5, (8, 100), dtype=torch.int8); b = torch.randint(-5, 5, (100, 8), dtype=torch.int8)
    want = a.int() @ b.int()
    assert torch.equal(F.int8_mm(a, b), want)
    for _ in range(2):
        try:
            F.int8_mm(torch.ones(1, 1, dtype=torch.int8).expand(2, 2**31),
                      torch.ones(1, 1, dtype=torch.int8).expand(2**31, 2))
        except MemoryError:
            print("MemoryError")
        assert torch.equal(F.int8_mm(a, b), want)
    print("ok")
""")


def test_failed_scratch_allocation_leaves_ops_usable(run_in_child):
    out = run_in_child(SCRATCH_CHILD)
    assert out.split() == ["MemoryError", "MemoryError", "ok"], out


ADDRESS_SPACE_CHILD = textwrap.dedent("""
    import resource, torch, torch.nn as nn
    import torchquant as tq, torchquant.functional as F
    from torchquant import reference
    from torchquant.nn import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear(96, 24, config="int8-dynamic")
    tq.calibrate(layer, [torch.randn(4, 96)], progress=False)
    layer.eval().convert()
    x = torch.randn(5, 96)
    with torch.no_grad():
        want_layer = layer(x)
    w_q = torch.randint(-127, 128, (24, 96), dtype=torch.int8)
    packed, w_sum, w_scale = F.pack_int8_weight(w_q), w_q.sum(1, dtype=torch.int32), torch.rand(24) + 0.01
    x_q = torch.randint(-128, 128, (5, 96), dtype=torch.int8)
    want_linear = reference.int8_linear(x_q, 0.1, 3, w_q, w_scale)

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    limit = vm_bytes() + (768 << 20)  # room for ordinary calls, not for a 4 GiB scratch buffer
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    huge_q = torch.ones(1, 1, dtype=torch.int8).expand(2**20, 4096)  # int8 rows are re-laid: 4 GiB of scratch
    for attempt in range(2):
        try:
            F.int8_linear(huge_q, 0.1, 3, F.pack_int8_weight(torch.ones(1, 4096, dtype=torch.int8)),
                          torch.full((1,), 4096, dtype=torch.int32), torch.ones(1), out_features=1)
        except MemoryError:
            print("MemoryError")
        try:
            with torch.no_grad():
                layer(torch.ones(1, 1).expand(2**20, 96))  # per-token activations of 2**20 * 96 floats
        except (MemoryError, RuntimeError):
            pass
        with torch.no_grad():
            assert torch.equal(layer(x), want_layer)
        assert torch.equal(F.int8_linear(x_q, 0.1, 3, packed, w_sum, w_scale, out_features=24), want_linear)
    print("ok")
""")


@not_under_asan
def test_failed_allocation_under_address_space_limit(run_in_child):
    out = run_in_child(ADDRESS_SPACE_CHILD)
    assert out.split() == ["MemoryError", "MemoryError", "ok"], out


SCRATCH_BOUND_CHILD = textwrap.dedent("""
    import torch, torchquant.functional as F
    from torchquant._ops import ops

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10

    small = torch.ones(4, 64, dtype=torch.int8)
    ops.int8_mm(small, small.t())
    before = rss()
    # 48 MiB of activations and 64 MiB of packed weights as scratch; a and b themselves take no memory
    a = torch.ones(1, 1, dtype=torch.int8).expand(48, 2**20)
    b = torch.ones(1, 1, dtype=torch.int8).expand(2**20, 1)
    assert int(ops.int8_mm(a, b)[0, 0]) == 2**20
    kept = rss() - before
    print(kept >> 20)
    assert kept < (32 << 20), f"the thread kept {kept >> 20} MiB"
""")


@not_under_asan
def test_scratch_memory_is_bounded(run_in_child):
    run_in_child(SCRATCH_BOUND_CHILD)


# ---------------------------------------------------------------------------------------------------------------
# Inconsistent arguments
# ---------------------------------------------------------------------------------------------------------------

def test_int64_zero_point_is_not_wrapped():
    x = torch.randn(10)
    q = torch.zeros(10, dtype=torch.int8)
    for zp in (torch.tensor([2**32]), torch.tensor([2**32 + 3]), torch.tensor([-2**32])):
        with pytest.raises((ValueError, RuntimeError), match="zero_point"):
            F.quantize(x, 0.1, zp)
        with pytest.raises((ValueError, RuntimeError), match="zero_point"):
            F.dequantize(q, 0.1, zp)
        with pytest.raises((ValueError, RuntimeError), match="zero_point"):
            F.fake_quantize(x, 0.1, zp)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf"), -float("inf")])
def test_int8_linear_rejects_bad_scales(bad):
    w_q = torch.randint(-5, 5, (8, 16), dtype=torch.int8)
    packed, w_sum = F.pack_int8_weight(w_q), w_q.sum(1, dtype=torch.int32)
    x_q = torch.randint(-5, 5, (3, 16), dtype=torch.int8)
    w_scale = torch.ones(8)
    bad_w_scale = w_scale.clone()
    bad_w_scale[5] = bad
    for call in (lambda: F.int8_linear(x_q, bad, 0, packed, w_sum, w_scale, out_features=8),
                 lambda: F.int8_linear(x_q, torch.tensor([1.0, bad, 1.0]), 0, packed, w_sum, w_scale, out_features=8),
                 lambda: F.int8_linear(x_q, 1.0, 0, packed, w_sum, bad_w_scale, out_features=8),
                 lambda: F.int8_linear(x_q, 1.0, 0, packed, w_sum, w_scale, out_features=8, out_dtype=torch.int8,
                                       out_scale=bad),
                 lambda: ops.int8_linear(x_q, torch.tensor([bad]), 0, packed, w_sum, w_scale, None, 8, torch.float32,
                                         None, 0),
                 lambda: ops.int8_linear(x_q, torch.ones(1), 0, packed, w_sum, bad_w_scale, None, 8, torch.float32,
                                         None, 0),
                 lambda: F.dynamic_int8_linear(x_q.float(), packed, w_sum, bad_w_scale, out_features=8)):
        with pytest.raises((ValueError, RuntimeError), match="scale must be positive"):
            call()
    w4 = torch.randint(-5, 5, (8, 4, 1, 1), dtype=torch.int8)
    with pytest.raises((ValueError, RuntimeError), match="w_scale must be positive"):
        ops.int8_conv2d(torch.zeros(1, 4, 2, 2, dtype=torch.int8), torch.ones(1), 0, F.pack_conv_weight(w4),
                        w4.sum((1, 2, 3), dtype=torch.int32), bad_w_scale, None, 8, [1, 1], [1, 1], [0, 0], [1, 1], 1,
                        torch.float32)


def _linear_args(device_of):
    w_q = torch.randint(-5, 5, (8, 16), dtype=torch.int8)
    args = dict(x_q=torch.randint(-5, 5, (3, 16), dtype=torch.int8), x_scale=torch.ones(1),
                w_packed=F.pack_int8_weight(w_q), w_sum=w_q.sum(1, dtype=torch.int32), w_scale=torch.ones(8))
    return {name: t.to(device_of.get(name, "cpu")) for name, t in args.items()}


@pytest.mark.parametrize("meta_arg", ["x_q", "x_scale", "w_packed", "w_sum", "w_scale"])
def test_raw_ops_reject_meta_and_cpu_mixes(meta_arg):
    a = _linear_args({meta_arg: "meta"})
    with pytest.raises(RuntimeError, match="device"):
        ops.int8_linear(a["x_q"], a["x_scale"], 0, a["w_packed"], a["w_sum"], a["w_scale"], None, 8, torch.float32,
                        None, 0)
    with pytest.raises(RuntimeError, match="device"):
        ops.int8_mm(torch.ones(2, 3, dtype=torch.int8), torch.ones(3, 2, dtype=torch.int8, device="meta"))
    with pytest.raises(RuntimeError, match="device"):
        ops.int8_mm(torch.ones(2, 3, dtype=torch.int8, device="meta"), torch.ones(3, 2, dtype=torch.int8))
    x = torch.randn(4)
    for scale, zp in ((torch.ones(1, device="meta"), torch.zeros(1, dtype=torch.int32)),
                      (torch.ones(1), torch.zeros(1, dtype=torch.int32, device="meta"))):
        with pytest.raises(RuntimeError, match="device"):
            ops.quantize(x, scale, zp, None, 8, True, "nearest")
        with pytest.raises(RuntimeError, match="device"):
            ops.fake_quantize(x, scale, zp, None, 8, True, "nearest")
        with pytest.raises(RuntimeError, match="device"):
            ops.dequantize(torch.zeros(4, dtype=torch.int8), scale, zp, None, torch.float32)
    # all-meta calls still give shapes (torch.compile's fake kernels)
    m = _linear_args({k: "meta" for k in ("x_q", "x_scale", "w_packed", "w_sum", "w_scale")})
    out = ops.int8_linear(m["x_q"], m["x_scale"], 0, m["w_packed"], m["w_sum"], m["w_scale"], None, 8,
                          torch.float32, None, 0)
    assert out.device.type == "meta" and out.shape == (3, 8)


def test_packed_weight_records_its_logical_shape():
    # K = 100 against a weight packed for K = 65: both pad to 128
    w_q = torch.randint(-5, 5, (8, 65), dtype=torch.int8)
    packed = F.pack_int8_weight(w_q)
    with pytest.raises(RuntimeError, match=r"packed weight of shape \[8, 65\] but this call needs \[8, 100\]"):
        F.int8_linear(torch.zeros(2, 100, dtype=torch.int8), 1.0, 0, packed, w_q.sum(1, dtype=torch.int32),
                      torch.ones(8), out_features=8)
    with pytest.raises(RuntimeError, match="needs"):
        F.dynamic_int8_linear(torch.zeros(2, 100), packed, w_q.sum(1, dtype=torch.int32), torch.ones(8),
                              out_features=8)
    # N = 5 against a weight packed for N = 8: both pad to 64
    with pytest.raises(RuntimeError, match=r"needs \[5, 65\]"):
        F.int8_linear(torch.zeros(2, 65, dtype=torch.int8), 1.0, 0, packed, w_q.sum(1, dtype=torch.int32)[:5],
                      torch.ones(5), out_features=5)
    # 5 input channels against a conv weight packed for 4; and a 2x1 kernel against a 1x2 one (same K)
    w4 = torch.ones(1, 4, 1, 1, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"\[1, 1, 1, 1, 4\] but this call needs \[1, 1, 1, 1, 5\]"):
        F.int8_conv2d(torch.zeros(1, 5, 3, 3, dtype=torch.int8), 1.0, 0, F.pack_conv_weight(w4),
                      w4.sum((1, 2, 3), dtype=torch.int32), torch.ones(1), out_channels=1, kernel_size=1)
    w12 = torch.ones(1, 2, 1, 2, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"\[1, 1, 1, 2, 2\] but this call needs \[1, 1, 2, 1, 2\]"):
        F.int8_conv2d(torch.zeros(1, 2, 3, 3, dtype=torch.int8), 1.0, 0, F.pack_conv_weight(w12),
                      w12.sum((1, 2, 3), dtype=torch.int32), torch.ones(1), out_channels=1, kernel_size=(2, 1))


# ---------------------------------------------------------------------------------------------------------------
# choose_qparams over extreme ranges
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (1, False), (2, False)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_choose_qparams_finite_for_extreme_ranges(bits, signed, symmetric):
    f32 = torch.finfo(torch.float32)
    for x in (torch.tensor([-3e38, 3e38]), torch.tensor([f32.min, f32.max]), torch.tensor([0.0, f32.max]),
              torch.tensor([f32.min, 0.0])):
        scale, zero_point = F.choose_qparams(x, bits=bits, signed=signed, symmetric=symmetric)
        assert torch.isfinite(scale).all() and (scale > 0).all(), (x, scale)
        q = F.quantize(x, scale, zero_point, bits=bits, signed=signed)  # usable as they are
        assert q.shape == x.shape


# ---------------------------------------------------------------------------------------------------------------
# Every CPU instruction-set path gives bit-identical outputs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_isa_paths_bit_identical(monkeypatch, out_dtype, with_bias):
    paths = SUPPORTED_ISAS
    if len(paths) < 2:
        pytest.skip("this CPU has a single instruction-set path")
    g = torch.Generator().manual_seed(1)
    m, k, n = 37, 203, 150
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, generator=g) * 1e-3 + 1e-5
    x_scale = torch.rand(m, generator=g) * 0.05 + 1e-3
    bias = torch.randn(n, generator=g) * 3 if with_bias else None
    out_scale = 0.37 if out_dtype in (torch.int8, torch.uint8) else None
    packed, w_sum = F.pack_int8_weight(w_q), w_q.sum(1, dtype=torch.int32)
    w_c = torch.randint(-128, 128, (24, 3, 3, 3), dtype=torch.int8, generator=g)
    x_c = torch.randint(0, 256, (2, 6, 9, 9), dtype=torch.uint8, generator=g)
    conv_bias = bias[:24] if with_bias else None
    results = {}
    for isa in paths:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
        results[isa] = (
            F.int8_linear(x_q, x_scale, 5, packed, w_sum, w_scale, bias, out_features=n, out_dtype=out_dtype,
                          out_scale=out_scale, out_zero_point=3 if out_scale else 0),
            F.int8_conv2d(x_c, 0.02, 120, F.pack_conv_weight(w_c, 2), w_c.sum((1, 2, 3), dtype=torch.int32),
                          w_scale[:24], conv_bias, out_channels=24, kernel_size=3, padding=1, groups=2,
                          out_dtype=out_dtype, out_scale=out_scale),
            ops.int8_mm(x_q, w_q.t()),
        )
    for isa in paths[1:]:
        for got, want in zip(results[isa], results[paths[0]]):
            assert torch.equal(bit_patterns(got), bit_patterns(want)), f"{isa} differs from {paths[0]}"


"""Integer matrix family: int8_mm, pack_int8_weight, int8_linear, dynamic_int8_linear, int8_conv2d.

Integers are compared exactly against int64 products (torchquant.reference) and torch._int_mm; float outputs of
the fused epilogue against the reference within float rounding. On the CPU every instruction-set path runs
(TORCHQUANT_CPU_ISA), each on the same packed layouts.
"""
import itertools

import pytest
import torch

import torchquant.functional as F
from torchquant import reference
from torchquant._ops import FLOAT_DTYPES, ops
from torchquant.timing import num_threads

from conftest import SUPPORTED_ISAS, forced_isa, randint8


def quantized_weight(n, k, device, seed=0):
    """A random int8 weight with its packed form, row sums and per-channel scales."""
    g = torch.Generator().manual_seed(seed)
    w = randint8((n, k), generator=g)
    w_scale = torch.rand(n, generator=g) * 0.02 + 0.001
    return w.to(device), F.pack_int8_weight(w.to(device)), w.sum(1, dtype=torch.int32).to(device), w_scale.to(device)


# ---------------------------------------------------------------------------------------------------------------
# int8_mm
# ---------------------------------------------------------------------------------------------------------------

ODD = (1, 3, 17, 33)


# beyond the odd sizes: several row chunks (<= 96 rows), k blocks (1024 bytes) and weight panels (64 columns), in
# both work orders (activations under 512 KB: panel-major; above: chunk-major)
LARGER = [(100, 300, 70), (130, 520, 129), (101, 260, 257), (200, 2700, 300)]
# on AMX tiles (avx512_amx): blocks of at most 16 rows (work items of 8-16 rows, the last rows of larger ones) sum a
# whole 64-column panel at once, larger ones pairs of 16-row tiles; from 16 k-chunks (K >= 1024) each pair's
# epilogue runs while the next pair is summed; 193 rows make chunks of 96, 96 and 1 (the last on the VNNI kernel,
# after the AMX blocks on the same thread); K past the last 64-byte chunk (int8_mm zero fills both operands to a
# whole chunk; int8_linear's rows, packed to round_up(K, 4) or uint8 read in place, leave those k-steps to the VNNI
# kernel); a weight over 1 MB (4100 x 300), whose chunks take up to 1 MB of rows where the work items outnumber the
# threads: 160 and 140
AMX_ROWS = [(12, 384, 1536), (8, 130, 64), (16, 64, 100), (9, 1536, 129), (193, 256, 130), (40, 200, 70),
            (70, 64, 64), (193, 2100, 130), (40, 2048, 64), (70, 1536, 130), (300, 4100, 300)]


@pytest.mark.parametrize("m,k,n", list(itertools.product(ODD, ODD, ODD)) + LARGER + AMX_ROWS)
def test_int8_mm_exact(device, isa, m, k, n):
    g = torch.Generator().manual_seed(m * 10007 + k * 101 + n)
    a, b = randint8((m, k), device=device, generator=g), randint8((k, n), device=device, generator=g)
    out = F.int8_mm(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n) and out.device.type == device
    torch.testing.assert_close(out, reference.int8_mm(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1024, 4096])
@pytest.mark.parametrize("va,vb", [(-128, -128), (127, 127), (-128, 127), (127, -128)])
def test_int8_mm_extremes(device, isa, k, va, vb):
    # all -128 x -128 at K = 4096 is 2^26: vpmaddubsw-style int16 pair sums would saturate here
    a = torch.full((7, k), va, dtype=torch.int8, device=device)
    b = torch.full((k, 65), vb, dtype=torch.int8, device=device)
    torch.testing.assert_close(F.int8_mm(a, b), torch.full((7, 65), va * vb * k, dtype=torch.int32, device=device),
                               rtol=0, atol=0)


# Weights in [-64, 64] (7-bit and narrower ones) take the AVX2 path's byte kernel (vpmaddubsw, exact for them) in
# the k blocks where they all lie there; one weight outside ([65, 127], -128) sends its block to the widened kernel.
# Shapes with work items of many rows and k blocks of 128 bytes or more, 16-column and partial panels.
SMALL_WEIGHT_SHAPES = [(100, 300, 70), (130, 1200, 129), (7, 520, 16), (200, 2700, 300), (9, 600, 33)]


@pytest.mark.parametrize("m,k,n", SMALL_WEIGHT_SHAPES)
@pytest.mark.parametrize("outlier", [None, 65, -65, -128, 127])
def test_int8_mm_small_weights_exact(device, isa, m, k, n, outlier):
    g = torch.Generator().manual_seed(m * 7 + k + n)
    a = randint8((m, k), generator=g)
    b = torch.randint(-64, 65, (k, n), dtype=torch.int8, generator=g)
    # the largest pair sums vpmaddubsw forms: 2 * 255 * 64 (activations 127, shifted to 255) and 2 * 255 * -64
    a[:, :4] = 127
    b[:2], b[2:4] = 64, -64
    b[-4:-2], a[-1, -4:] = -64, -128
    if outlier is not None:
        b[k - 5, n // 2] = outlier  # in the last k block
    a, b = a.to(device), b.to(device)
    torch.testing.assert_close(F.int8_mm(a, b), reference.int8_mm(a, b), rtol=0, atol=0)


def test_int8_mm_matches_torch_int_mm(device, isa):
    a, b = randint8((64, 256), device=device), randint8((256, 96), device=device)
    torch.testing.assert_close(F.int8_mm(a, b), torch._int_mm(a, b), rtol=0, atol=0)


# b in the nn.Linear layout (k contiguous per column), packed for 9 rows of a or more (fewer read it in place on
# AVX-512 and AVX2, see test_int8_mm_few_rows_linear_layout): on AVX-512 whole panels go 16 k-steps (64 bytes of k) at a
# time through a 16 x 16 transpose that also sums each column; the rest (steps past the last whole block, k past the
# last step, partial panels) 4 columns at a time and single columns. Exactly one block, blocks with tail steps and a
# k tail, full panels shallower than a block, partial panels of 1-45 columns.
@pytest.mark.parametrize("m,k,n", [(9, 64, 64), (33, 4100, 130), (17, 2702, 300), (11, 67, 65), (9, 128, 192),
                                   (10, 63, 71), (9, 100, 109), (5, 100, 109)])
def test_int8_mm_linear_layout(device, isa, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    a, w = randint8((m, k), generator=g), randint8((n, k), generator=g)
    w[0], w[1], w[-1] = -128, 127, -128  # column sums at their extremes
    a, w = a.to(device), w.to(device)
    torch.testing.assert_close(F.int8_mm(a, w.t()), reference.int8_mm(a, w.t()), rtol=0, atol=0)


# Up to 8 rows of a against b in the nn.Linear layout: on the AVX-512 and AVX2 paths the columns are read in place (64
# or 32 bytes of k at a time, the last chunk masked or copied), 4 columns at a time for up to 4 (AVX2: 2) rows, 2 for
# more, then single columns (on avx512_amx, from 4 rows against a small b, on tiles: test_int8_mm_rows_in_place).
# Every row count, k with and without a tail and below one chunk, columns left over by each grouping; columns further
# apart than k, a's rows strided, one column read for every output column (stride 0), and 1 and 2 threads.
@pytest.mark.parametrize("m", range(1, 10))
@pytest.mark.parametrize("k,n", [(1, 5), (63, 70), (64, 4), (65, 3), (130, 9), (4100, 13)])
def test_int8_mm_few_rows_linear_layout(isa, m, k, n):
    assert_linear_layout_forms(m, k, n)


def assert_linear_layout_forms(m, k, n):
    """int8_mm of m rows against b in the nn.Linear layout in every form: contiguous, columns further apart than k,
    a's rows strided, one column read for every output column (stride 0); extremes in a and b; 1 and 2 threads."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    a, w = randint8((m, k), generator=g), randint8((n, k + 9), generator=g)
    w[0], w[-1] = -128, 127
    a[-1], a[0] = 127, -128  # (one row: -128)
    forms = [(a, w[:, :k].contiguous().t()), (a, w[:, :k].t()), (randint8((k, m), generator=g).t(), w[:, :k].t()),
             (a, w[:1, :k].t().expand(k, n))]
    for x, y in forms:
        for threads in (1, 2):
            with num_threads(threads):
                got = F.int8_mm(x, y)
            torch.testing.assert_close(got, reference.int8_mm(x, y), rtol=0, atol=0)


# 8 to 384 rows of a against b in the nn.Linear layout (4 to 7 against a b of at most 4 MB), on AMX tiles
# (avx512_amx): 16 columns of b read in place as tdpbssd's first operand, 64 or 32 columns a block (up to 16 rows of
# a, or more, 32 at a time), k's last partial chunk copied, the last partial block of columns copied whole. Both ends
# of the row range and of each grouping, k with and without a tail and below one chunk, blocks left partial, and the
# forms of the test above (a thread's share of columns ends in a partial block only at n). The other paths take the
# same calls.
@pytest.mark.parametrize("m", [4, 7, 8, 16, 17, 32, 33, 64, 100, 384, 385])
@pytest.mark.parametrize("k,n", [(1, 17), (63, 64), (64, 130), (65, 31), (4100, 70)])
def test_int8_mm_rows_in_place(isa, m, k, n):
    assert_linear_layout_forms(m, k, n)


@pytest.mark.parametrize("va,vw", [(-128, -128), (127, 127), (127, -128)])
def test_int8_mm_few_rows_wrap_as_int32(isa, va, vw):
    """Sums past the int32 range wrap as torch's int32 product does (-128 * -128 * (2^17 + 64) = 2^31 + 2^20; 127 x
    127, shifted to 255 x 127 on AVX-512, passes int32 in the lanes' sums too)."""
    k = (1 << 17) + 64
    for m in (2, 16):  # a few rows, and rows on AMX tiles (test_int8_mm_rows_in_place)
        a = torch.full((m, k), va, dtype=torch.int8)
        w = torch.full((3, k), vw, dtype=torch.int8)
        torch.testing.assert_close(F.int8_mm(a, w.t()), reference.int8_mm(a, w.t()), rtol=0, atol=0)
        torch.testing.assert_close(F.int8_mm(a, w.t()), torch._int_mm(torch.cat([a] * 9), w.t())[:m], rtol=0,
                                   atol=0)


# Few rows of a (packed, at most 1 MB) and a packed b over 1 MB: each thread packs and multiplies blocks of b's columns
# (at most 1 MB packed, whole panels; as many blocks as that needs, rounded up to a multiple of the threads). With 1
# thread: blocks of 192 + 108 columns (a partial panel in the last; rows of 4160 bytes, K zero filled to whole AMX tile
# depths), of 384, 384 and 332 (one row, on the VNNI kernel on AVX-512; in the nn.Linear layout one row is read in place
# instead, on AVX-512 and AVX2), of 576 + 524 (two chunks of rows), of one panel (k over 16K: 64, 64, 2), of 192 + 128,
# and six of 192 (the last 140). With 2 threads: 320 x 3 + 140 (two blocks a thread), 64, 64 and 2 (two blocks and one),
# 192 x 5 + 140 (three a thread), and the others in one block, their panels split over both threads. b row-major, in the
# nn.Linear layout, with every other column (the strided packing) and with rows longer than n; outputs written with
# streaming stores where n allows.
@pytest.mark.parametrize("m,k,n", [(9, 4100, 300), (1, 2048, 1100), (130, 1024, 1100), (1, 16400, 130),
                                   (9, 4100, 320), (9, 4100, 1100)])
@pytest.mark.parametrize("layout", ["k_n", "linear", "every_other_column", "long_rows"])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_mm_blocks_of_b(device, isa, monkeypatch, m, k, n, layout, threads):
    monkeypatch.setenv("TORCHQUANT_STREAMING_BYTES", "0")
    g = torch.Generator().manual_seed(m + k + n)
    a = randint8((m, k), generator=g)
    b = {"k_n": lambda: randint8((k, n), generator=g),
         "linear": lambda: randint8((n, k), generator=g).t(),
         "every_other_column": lambda: randint8((k, 2 * n), generator=g)[:, ::2],
         "long_rows": lambda: randint8((k, n + 7), generator=g)[:, :n]}[layout]()
    a, b = a.to(device), b.to(device)
    with num_threads(threads):
        got = F.int8_mm(a, b)
    torch.testing.assert_close(got, reference.int8_mm(a, b), rtol=0, atol=0)


# More rows of a (packed over 1 MB, up to 8 MB) against a b at least twice their size take the same blocks of b, each
# going over all of a's rows (here 4 blocks of 4, 4, 4 and 1 panels); b row-major and in the nn.Linear layout (over
# 384 rows: packed, not read in place), 1 and 2 threads, against torch's exact int32 product
@pytest.mark.parametrize("layout", ["k_n", "linear"])
def test_int8_mm_blocks_of_b_many_rows(isa, layout):
    m, k, n = 400, 4096, 832
    g = torch.Generator().manual_seed(7)
    a = randint8((m, k), generator=g)
    b = randint8((k, n), generator=g) if layout == "k_n" else randint8((n, k), generator=g).t()
    a[0], b[:, -1] = -128, -128
    want = torch._int_mm(a, b)
    for threads in (1, 2):
        with num_threads(threads):
            torch.testing.assert_close(F.int8_mm(a, b), want, rtol=0, atol=0)


def test_int8_mm_strides(device, isa):
    a, w = randint8((37, 90), device=device), randint8((45, 90), device=device)
    want = reference.int8_mm(a, w.t())
    torch.testing.assert_close(F.int8_mm(a, w.t()), want, rtol=0, atol=0)  # the nn.Linear weight layout
    torch.testing.assert_close(F.int8_mm(a.t().contiguous().t(), w.t().contiguous()), want, rtol=0, atol=0)
    big_a, big_b = randint8((37, 180), device=device), randint8((3, 180, 45), device=device)
    sliced_a, sliced_b = big_a[:, ::2], big_b[1, ::2]  # non-contiguous both ways
    torch.testing.assert_close(F.int8_mm(sliced_a, sliced_b), reference.int8_mm(sliced_a, sliced_b), rtol=0, atol=0)


def test_int8_mm_empty(device):
    a, b = randint8((0, 5), device=device), randint8((5, 3), device=device)
    assert F.int8_mm(a, b).shape == (0, 3)
    zeros = F.int8_mm(randint8((4, 0), device=device), randint8((0, 3), device=device))
    torch.testing.assert_close(zeros, torch.zeros(4, 3, dtype=torch.int32, device=device))


def test_int8_mm_bad_inputs(device):
    a, b = randint8((4, 5), device=device), randint8((5, 3), device=device)
    with pytest.raises(TypeError, match="a must be int8"):
        F.int8_mm(a.float(), b)
    with pytest.raises(TypeError, match="b must be int8"):
        F.int8_mm(a, b.to(torch.uint8))
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        F.int8_mm([[1]], b)
    with pytest.raises(ValueError, match="must be 2-d"):
        F.int8_mm(a[None], b)
    with pytest.raises(ValueError, match="inner sizes differ"):
        F.int8_mm(a, b[:4])
    with pytest.raises(RuntimeError, match="inner sizes differ"):
        ops.int8_mm(a, b[:4])  # the kernel checks too, for direct op calls


def test_int8_mm_different_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.raises(ValueError, match="move all tensors to one device"):
        F.int8_mm(randint8((4, 5)), randint8((5, 3), device="cuda"))


# ---------------------------------------------------------------------------------------------------------------
# pack_int8_weight / int8_linear / dynamic_int8_linear
# ---------------------------------------------------------------------------------------------------------------

def test_pack_int8_weight_shape(device):
    """The packed weight has the logical shape and the strides of the zero-padded buffer."""
    packed = F.pack_int8_weight(randint8((5, 70), device=device))
    assert packed.shape == (5, 70) and packed.stride() == (128, 1) and packed.untyped_storage().nbytes() == 64 * 128
    packed = F.pack_int8_weight(randint8((3, 65, 64), device=device))
    assert packed.shape == (3, 65, 64) and packed.stride() == (128 * 64, 64, 1)
    assert packed.untyped_storage().nbytes() == 3 * 128 * 64
    conv = F.pack_conv_weight(randint8((6, 2, 3, 5), device=device), groups=2)
    assert conv.shape == (2, 3, 3, 5, 2) and conv.stride() == (64 * 64, 64, 10, 2, 1)
    with pytest.raises(TypeError, match="w must be int8"):
        F.pack_int8_weight(torch.zeros(4, 4, device=device))
    with pytest.raises(ValueError, match=r"\[N, K\] or \[G, N, K\]"):
        F.pack_int8_weight(randint8((4,), device=device))


@pytest.mark.parametrize("x_dtype,x_zp", [(torch.int8, 0), (torch.int8, -7), (torch.uint8, 128), (torch.uint8, 3)])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("k,n", [(1, 1), (17, 33), (64, 70), (300, 129), (96, 260)])
def test_int8_linear_float_out(device, isa, x_dtype, x_zp, per_token, k, n):
    g = torch.Generator().manual_seed(k * 1000 + n)
    x_q = torch.randint(0 if x_dtype == torch.uint8 else -128, 256 if x_dtype == torch.uint8 else 128, (2, 5, k),
                        dtype=x_dtype, generator=g).to(device)
    x_scale = (torch.rand(2, 5, generator=g) + 0.01).to(device) if per_token else torch.tensor([0.05], device=device)
    w, w_packed, w_sum, w_scale = quantized_weight(n, k, device)
    bias = torch.randn(n, generator=g).to(device)
    for out_dtype in FLOAT_DTYPES:
        got = F.int8_linear(x_q, x_scale, x_zp, w_packed, w_sum, w_scale, bias, out_features=n, out_dtype=out_dtype)
        want = reference.int8_linear(x_q, x_scale, x_zp, w, w_scale, bias, out_dtype=out_dtype)
        assert got.shape == (2, 5, n) and got.dtype == out_dtype
        torch.testing.assert_close(got, want)
    no_bias = F.int8_linear(x_q, x_scale, x_zp, w_packed, w_sum, w_scale, out_features=n)
    torch.testing.assert_close(no_bias, reference.int8_linear(x_q, x_scale, x_zp, w, w_scale))


@pytest.mark.parametrize("out_dtype,out_zp", [(torch.int8, 0), (torch.int8, 5), (torch.uint8, 128)])
def test_int8_linear_requantized(device, isa, out_dtype, out_zp):
    g = torch.Generator().manual_seed(3)
    k, n = 200, 90
    x_q = randint8((33, k), device=device, generator=g)
    w, w_packed, w_sum, w_scale = quantized_weight(n, k, device)
    bias = torch.randn(n, generator=g).to(device)
    x_scale = torch.tensor([0.02], device=device)
    y = reference.int8_linear(x_q, x_scale, 0, w, w_scale, bias)
    out_scale = float(y.abs().max()) / 200  # the largest outputs clamp, most do not
    got = F.int8_linear(x_q, x_scale, 0, w_packed, w_sum, w_scale, bias, out_features=n, out_dtype=out_dtype,
                        out_scale=out_scale, out_zero_point=out_zp)
    want = reference.int8_linear(x_q, x_scale, 0, w, w_scale, bias, out_dtype=out_dtype, out_scale=out_scale,
                                 out_zero_point=out_zp)
    assert got.dtype == out_dtype
    # the float y may differ in its last bit (summation and fused multiply-add order), moving a rounding tie by one
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    info = torch.iinfo(out_dtype)
    assert got.min() == info.min or got.max() == info.max  # the clamp was exercised


# With one thread every block of a thread's work but its first waits for the next one's products (PendingEpilogue),
# the last rows of a 193-row GEMM run on the VNNI kernel after AMX blocks, and conv slices start in junk columns
@pytest.mark.parametrize("case", ["gemm", "conv"])
def test_amx_overlapped_epilogue_one_thread(monkeypatch, case):
    if "avx512_amx" not in SUPPORTED_ISAS:
        pytest.skip("this CPU has no AMX tiles")
    monkeypatch.setenv("TORCHQUANT_CPU_ISA", "avx512_amx")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if case == "gemm":
            for m, k, n in [(193, 2100, 130), (70, 1536, 130), (9, 1536, 129)]:
                g = torch.Generator().manual_seed(m + k)
                a, b = randint8((m, k), generator=g), randint8((k, n), generator=g)
                torch.testing.assert_close(F.int8_mm(a, b), reference.int8_mm(a, b), rtol=0, atol=0)
            return
        for b, c, h, w_, oc, kernel, stride, padding, dilation in AMX_WINDOW_CONVS:
            if c < 256:  # (fewer than 32 k-chunks a block: no overlap)
                continue
            g = torch.Generator().manual_seed(oc + h)
            x_q = torch.randint(0, 256, (b, c, h, w_), dtype=torch.uint8, generator=g)
            w_q = randint8((oc, c, *kernel), generator=g)
            kwargs = dict(stride=stride, padding=padding, dilation=dilation)
            got = F.int8_conv2d(x_q, 1.0, 3, F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32),
                                torch.ones(oc), out_channels=oc, kernel_size=kernel, **kwargs)
            torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, 3, w_q, torch.ones(oc), **kwargs),
                                       rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


# Each thread copies the padded rows of the images its work items reach into a buffer of its own: with 1-4 threads
# the items of a thread start and end anywhere in an image (several pieces an image, tiles across output rows or
# within them), and a thread goes on to its next image
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_amx_padded_rows_any_thread_split(monkeypatch, threads):
    if "avx512_amx" not in SUPPORTED_ISAS:
        pytest.skip("this CPU has no AMX tiles")
    monkeypatch.setenv("TORCHQUANT_CPU_ISA", "avx512_amx")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b, c, h, w_, oc, stride, padding in [(3, 64, 11, 30, 64, 1, 1), (3, 64, 9, 63, 64, 2, 1),
                                                  (2, 128, 6, 40, 70, 1, (2, 1))]:
            g = torch.Generator().manual_seed(b * h + threads)
            x_q = torch.randint(0, 256, (b, c, h, w_), dtype=torch.uint8, generator=g)
            w_q = randint8((oc, c, 3, 3), generator=g)
            kwargs = dict(stride=stride, padding=padding)
            got = F.int8_conv2d(x_q, 1.0, 5, F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32),
                                torch.ones(oc), out_channels=oc, kernel_size=3, **kwargs)
            torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, 5, w_q, torch.ones(oc), **kwargs),
                                       rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)


# The epilogue is one code on every AVX-512 path: the float and requantized outputs of the AMX tiles are those of
# the VNNI kernel bit for bit, whatever order the blocks go through it in
@pytest.mark.parametrize("m,k,n", AMX_ROWS)
def test_int8_linear_amx_matches_vnni(m, k, n):
    if "avx512_amx" not in SUPPORTED_ISAS:
        pytest.skip("this CPU has no AMX tiles")
    g = torch.Generator().manual_seed(m + k + n)
    x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    w, w_packed, w_sum, w_scale = quantized_weight(n, k, "cpu")
    bias = torch.randn(n, generator=g)
    x_scale = torch.rand(m, generator=g) + 0.01
    for out in [dict(out_dtype=torch.float32), dict(out_dtype=torch.bfloat16),
                dict(out_dtype=torch.uint8, out_scale=0.05, out_zero_point=3, clamp_min=0.0)]:
        got = {}
        for isa in ("avx512_amx", "avx512_vnni"):
            with forced_isa(isa):
                got[isa] = F.int8_linear(x_q, x_scale, 128, w_packed, w_sum, w_scale, bias, out_features=n, **out)
        torch.testing.assert_close(got["avx512_amx"], got["avx512_vnni"], rtol=0, atol=0)
    torch.testing.assert_close(got["avx512_amx"], reference.int8_linear(x_q, x_scale, 128, w, w_scale, bias, **out),
                               rtol=0, atol=1)


# Outputs of >= 16 MB (TORCHQUANT_STREAMING_BYTES: here 0, every output) are written with streaming stores where
# every store fills whole 64-byte lines: N = 512 float32, 1024 bfloat16 and 2048 uint8 rows; N = 520 float32 rows
# are 2080 bytes apart (every other row 64-byte aligned), 1040 bfloat16 and 2100 uint8 ones too: stored normally.
@pytest.mark.parametrize("streamed", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("out_dtype,n", [(torch.float32, 520), (torch.bfloat16, 1040), (torch.uint8, 2100),
                                         (torch.int32, 520), (torch.float32, 512), (torch.bfloat16, 1024),
                                         (torch.uint8, 2048), (torch.int32, 512)])
def test_int8_linear_large_outputs(device, isa, monkeypatch, streamed, out_dtype, n):
    if streamed:
        monkeypatch.setenv("TORCHQUANT_STREAMING_BYTES", "0")
    g = torch.Generator().manual_seed(n)
    m, k = 1010, 20
    x_q = randint8((m, k), device=device, generator=g)
    w, w_packed, w_sum, w_scale = quantized_weight(n, k, device)
    bias = torch.randn(n, generator=g).to(device)
    x_scale = (torch.rand(m, generator=g) + 0.01).to(device)
    if out_dtype == torch.int32:  # int8_mm's epilogue
        torch.testing.assert_close(F.int8_mm(x_q, w.t()), reference.int8_mm(x_q, w.t()), rtol=0, atol=0)
        return
    out_scale = None
    if out_dtype == torch.uint8:
        out_scale = float(reference.int8_linear(x_q, x_scale, 0, w, w_scale, bias).abs().max()) / 100
    got = F.int8_linear(x_q, x_scale, 0, w_packed, w_sum, w_scale, bias, out_features=n, out_dtype=out_dtype,
                        out_scale=out_scale, out_zero_point=128 if out_scale else 0)
    want = reference.int8_linear(x_q, x_scale, 0, w, w_scale, bias, out_dtype=out_dtype, out_scale=out_scale,
                                 out_zero_point=128 if out_scale else 0)
    if out_scale is None:
        torch.testing.assert_close(got, want)
    else:  # a rounding tie may move by one (see test_int8_linear_requantized)
        diff = (got.int() - want.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("value", ["-1", "2MB", "1e6"])
def test_streaming_bytes_bad_value(monkeypatch, value):
    monkeypatch.setenv("TORCHQUANT_STREAMING_BYTES", value)
    x_q, w, w_packed, w_sum, w_scale = randint8((3, 8)), *quantized_weight(4, 8, "cpu")
    with pytest.raises(RuntimeError, match="TORCHQUANT_STREAMING_BYTES must be a non-negative integer, got '"):
        F.int8_linear(x_q, 0.1, 0, w_packed, w_sum, w_scale, out_features=4)


def test_int8_linear_non_contiguous(device, isa):
    k, n = 96, 40
    w, w_packed, w_sum, w_scale = quantized_weight(n, k, device)
    x_q = randint8((2 * k, 12), device=device).t()[:, ::2]  # [12, k] with strides (1, 2 * 12)
    for x in (x_q, x_q.to(torch.uint8)):
        got = F.int8_linear(x, 0.1, 3, w_packed, w_sum, w_scale, out_features=n)
        torch.testing.assert_close(got, reference.int8_linear(x, 0.1, 3, w, w_scale))


def test_int8_linear_empty(device):
    w, w_packed, w_sum, w_scale = quantized_weight(8, 16, device)
    out = F.int8_linear(randint8((0, 16), device=device), 1.0, 0, w_packed, w_sum, w_scale, out_features=8)
    assert out.shape == (0, 8)


def test_int8_linear_bad_inputs(device):
    w, w_packed, w_sum, w_scale = quantized_weight(8, 16, device)
    x_q = randint8((4, 16), device=device)

    def call(x=x_q, x_scale=1.0, zp=0, packed=w_packed, sums=w_sum, scale=w_scale, n=8, **kw):
        return F.int8_linear(x, x_scale, zp, packed, sums, scale, out_features=n, **kw)

    with pytest.raises(TypeError, match="x_q must be int8 or uint8"):
        call(x=x_q.float())
    with pytest.raises(TypeError, match="x_scale must be float32"):
        call(x_scale=torch.ones(1, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="x_zero_point must lie in"):
        call(zp=200)
    with pytest.raises(RuntimeError, match="x_scale must have 1 element or one per row"):
        call(x_scale=torch.ones(3, device=device))
    with pytest.raises(RuntimeError, match=r"w_packed holds a packed weight of shape \[8, 16\] but this call needs "
                                            r"\[8, 30\] \[out_features, x_q.size\(-1\)\]"):
        call(x=randint8((4, 30), device=device))
    with pytest.raises(RuntimeError, match="w_sum must have shape"):
        call(sums=w_sum[:4])
    with pytest.raises(RuntimeError, match="w_scale must be Float"):
        call(scale=w_scale.double())
    with pytest.raises(RuntimeError, match="needs out_scale"):
        call(out_dtype=torch.int8)
    with pytest.raises(RuntimeError, match="out_scale must be positive"):
        call(out_dtype=torch.int8, out_scale=0.0)
    with pytest.raises(RuntimeError, match="out_zero_point must lie in"):
        call(out_dtype=torch.uint8, out_scale=1.0, out_zero_point=-1)
    with pytest.raises(TypeError, match="out_dtype must be"):
        call(out_dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dynamic_int8_linear(device, isa, dtype):
    g = torch.Generator().manual_seed(11)
    k, n = 160, 72
    x = torch.randn(3, 7, k, generator=g).to(device, dtype)
    w_float = torch.randn(n, k, generator=g) * 0.1
    w_scale = w_float.abs().amax(1) / 127
    w = torch.round(w_float / w_scale[:, None]).to(torch.int8)
    bias = torch.randn(n, generator=g)
    w, w_scale, bias = w.to(device), w_scale.to(device), bias.to(device)
    got = F.dynamic_int8_linear(x, F.pack_int8_weight(w), w.sum(1, dtype=torch.int32), w_scale, bias, out_features=n)
    assert got.dtype == dtype and got.shape == (3, 7, n)
    x_q, x_scale = ops.quantize_per_token(x, 8)
    want = reference.int8_linear(x_q, x_scale, 0, w, w_scale, bias, out_dtype=dtype)
    torch.testing.assert_close(got, want)
    # and it is a close approximation of the float layer
    float_out = torch.nn.functional.linear(x.float(), w.float() * w_scale[:, None], bias)
    assert (got.float() - float_out).abs().max() < 0.05 * float_out.abs().max()


# the CPU kernel quantizes straight into the GEMM's activation rows: odd K (padding), several row chunks and
# threads, leading dims, rows of zeros, NaN, +-inf, ties and tiny values
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 7, 67), (130, 384), (97, 1030), (0, 9), (4, 0, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_linear_dynamic_equals_two_ops(device, isa, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape) + 7)
    k, n = shape[-1], 70
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    flat = x.view(-1, k)
    if flat.shape[0] >= 4:
        flat[0] = 0.0
        flat[1, 0], flat[2, -1] = float("nan"), float("inf")
        flat[3] = torch.arange(k, dtype=torch.float32).remainder(5).sub(2).mul(0.5).to(dtype)  # ties at .5 steps
        if k > 1:
            flat[1, 1], flat[2, 0] = float("-inf"), 1e-30
    x = x.to(device)
    w, w_packed, w_sum, w_scale = quantized_weight(n, k, device)
    bias = torch.randn(n, generator=g).to(device)
    got = ops.int8_linear_dynamic(x, w_packed, w_sum, w_scale, bias, n)
    x_q, x_scale = ops.quantize_per_token(x, 8)
    want = ops.int8_linear(x_q, x_scale, 0, w_packed, w_sum, w_scale, bias, n, dtype)
    assert got.dtype == dtype and got.shape == (*shape[:-1], n)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_int8_linear_dynamic_op_checks(device):
    # the one-call op behind dynamic_int8_linear and the converted QuantLinear checks its own input in C++
    w, w_packed, w_sum, w_scale = quantized_weight(7, 9, device)
    with pytest.raises(RuntimeError, match="int8_linear_dynamic: x must be float32, float16 or bfloat16, got Double"):
        ops.int8_linear_dynamic(torch.randn(2, 9, device=device, dtype=torch.float64), w_packed, w_sum, w_scale,
                                None, 7)
    with pytest.raises(RuntimeError, match="w_packed holds a packed weight of shape"):
        ops.int8_linear_dynamic(torch.randn(2, 70, device=device), w_packed, w_sum, w_scale, None, 7)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.int8_linear_dynamic(torch.randn(2, 9, device=device), w_packed, w_sum, w_scale, torch.zeros(3,
                                device=device), 7)
    empty = ops.int8_linear_dynamic(torch.randn(0, 9, device=device), w_packed, w_sum, w_scale, None, 7)
    assert empty.shape == (0, 7)
    # not differentiable (it runs below autograd): no gradient reaches x, as through quantize_per_token
    x = torch.randn(2, 9, device=device, requires_grad=True)
    assert not ops.int8_linear_dynamic(x, w_packed, w_sum, w_scale, None, 7).requires_grad


# ---------------------------------------------------------------------------------------------------------------
# int8_conv2d
# ---------------------------------------------------------------------------------------------------------------

CONVS = [  # batch, in_ch, h, w, out_ch, kernel, stride, padding, dilation, groups
    (2, 8, 9, 9, 16, (3, 3), 1, 1, 1, 1),
    (1, 16, 8, 8, 24, (1, 1), 1, 0, 1, 1),      # pointwise: uint8 reads the input in place
    (1, 6, 7, 7, 10, (1, 1), 1, 0, 1, 2),       # pointwise, groups, channels per group not a multiple of 4
    (2, 5, 11, 10, 7, (3, 3), 2, 1, 1, 1),      # stride, odd channels
    (1, 8, 12, 12, 8, (3, 3), 1, 2, 2, 1),      # dilation
    (1, 8, 10, 9, 12, (3, 1), (2, 1), (1, 0), 1, 4),  # non-square kernel, groups
    (1, 3, 9, 13, 4, (1, 5), 1, (0, 2), (1, 2), 1),
    (1, 12, 6, 6, 12, (3, 3), 1, 1, 1, 12),     # depthwise
    (1, 4, 3, 3, 70, (3, 3), 1, 0, 1, 1),       # one output pixel, output channels past one panel
    (2, 3, 15, 14, 16, (7, 7), 2, 3, 1, 1),     # a ResNet stem: im2col runs of 21 bytes, padded borders
    (1, 6, 7, 8, 8, (3, 3), 1, 2, 2, 1),        # dilation: im2col runs of one pixel's 6 bytes
    (1, 40, 6, 6, 8, (2, 2), 1, 1, 1, 1),       # runs of 80 bytes (whole vectors and an overlapping tail)
    (2, 8, 11, 9, 8, (3, 3), 1, (2, 1), (2, 1), 1),  # dilated rows only: whole-pixel runs 2 input rows apart
    # depthwise (groups == channels == out_channels): channels are the vector lanes, 64 per tile row
    (2, 70, 9, 75, 70, (3, 3), 1, 1, 1, 70),    # a full and a 6-channel block; rows of 75 in two segments
    (2, 128, 7, 7, 128, (3, 3), 1, 1, 1, 128),  # two full blocks; 7-pixel rows: one 4-pixel block and edges
    (1, 48, 9, 10, 48, (3, 3), 2, 1, 1, 48),    # stride 2, three vectors
    (1, 32, 12, 13, 32, (5, 5), 1, 2, 1, 32),   # 5x5, two pixels of padding
    (1, 16, 10, 11, 16, (3, 3), 1, 2, 2, 16),   # dilation
    (1, 8, 6, 30, 8, (1, 7), (1, 2), (0, 3), 1, 8),  # 1x7 along the row, a partial vector
    (1, 64, 3, 3, 64, (3, 3), 1, 0, 1, 64),     # one output pixel
    (1, 24, 5, 9, 24, (3, 3), 1, 4, 1, 24),     # padding wider than the kernel: output pixels reading no input
    (1, 16, 12, 20, 16, (9, 3), 1, 4, 1, 16),   # 9 kernel rows: past the AVX-512 column quads (up to 8 rows)
    (1, 16, 3, 300, 16, (1, 3), (1, 6), (0, 1), 1, 16),  # stride 6: 2 segments of <= 256 input columns, not 1
    (1, 8, 3, 300, 8, (1, 3), 1, (0, 130), (1, 130), 8),  # windows 261 columns wide: one pixel per segment
    (1, 20, 5, 5, 40, (3, 3), 1, 1, 1, 20),     # channel multiplier 2: the GEMM
    # grouped, 2 / 4 / 8 channels in and out per group: passes of the depthwise kernel (int8 inputs; uint8 on AVX-512
    # with 4 or 8 a group, in multiples of 4 groups for 4: the dword kernel)
    (2, 128, 7, 9, 128, (3, 3), 1, 1, 1, 32),   # ResNeXt-style: 4 channels a group, two 64-channel blocks
    (1, 24, 9, 10, 24, (3, 3), 2, 1, 1, 3),     # 8 a group (uint8 on AVX-512: the dword kernel), stride 2
    (2, 10, 6, 11, 10, (1, 1), 1, 0, 1, 5),     # 2 a group, 1x1
    (1, 16, 12, 8, 16, (3, 3), 1, 2, 2, 4),     # dilation
    (1, 32, 7, 7, 32, (3, 3), 1, 1, 1, 2),      # 16 a group: uint8 on AVX-512 the dword kernel, else the GEMM
    (2, 96, 5, 9, 96, (3, 3), 2, 1, 1, 3),      # 32 a group: a 64-channel block and one of two vectors
    (1, 16, 12, 20, 16, (9, 3), 1, 4, 1, 4),    # 9 kernel rows: past the AVX-512 column quads
    (2, 1, 9, 10, 16, (3, 3), 1, 1, 1, 1),      # one channel: kernel rows of 3 bytes read in place as 4
    (1, 3, 5, 6, 8, (3, 3), 2, 4, 1, 1),        # padding wider than the kernel: windows partly or wholly outside
]


# streamed: every output whose stores fill whole cache lines is written with streaming stores (64 or 128 channels)
@pytest.mark.parametrize("streamed", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("conv", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
@pytest.mark.parametrize("x_dtype,x_zp", [(torch.int8, 3), (torch.uint8, 120)])
def test_int8_conv2d(device, isa, monkeypatch, streamed, conv, x_dtype, x_zp):
    if streamed:
        monkeypatch.setenv("TORCHQUANT_STREAMING_BYTES", "0")
    b, c, h, w_, oc, kernel, stride, padding, dilation, groups = conv
    g = torch.Generator().manual_seed(sum(map(hash, (b, c, h, oc))) % 1000)
    lo, hi = (0, 256) if x_dtype == torch.uint8 else (-128, 128)
    x_q = torch.randint(lo, hi, (b, c, h, w_), dtype=x_dtype, generator=g).to(device)
    w_q = randint8((oc, c // groups, *kernel), generator=g).to(device)
    w_scale = (torch.rand(oc, generator=g) * 0.01 + 0.001).to(device)
    bias = torch.randn(oc, generator=g).to(device)
    w_packed = F.pack_conv_weight(w_q, groups)
    w_sum = w_q.sum((1, 2, 3), dtype=torch.int32)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    got = F.int8_conv2d(x_q, 0.03, x_zp, w_packed, w_sum, w_scale, bias, out_channels=oc, kernel_size=kernel, **kwargs)
    want = reference.int8_conv2d(x_q, 0.03, x_zp, w_q, w_scale, bias, **kwargs)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)
    # integers exact: with unit scales and no bias the float output is the int32 sum itself
    ones = torch.ones(oc, device=device)
    got_int = F.int8_conv2d(x_q, 1.0, x_zp, w_packed, w_sum, ones, out_channels=oc, kernel_size=kernel, **kwargs)
    want_int = reference.int8_conv2d(x_q, 1.0, x_zp, w_q, ones, **kwargs)
    torch.testing.assert_close(got_int, want_int, rtol=0, atol=0)


# A contiguous (NCHW) input is transposed to channels-last by the kernel itself: 16 x 16 byte blocks, single bytes
# for the channels and pixels past them, 256-pixel tasks. Its output equals that of the same values handed over in
# channels-last, and the reference.
@pytest.mark.parametrize("channels", [1, 2, 4, 15, 16, 17, 33, 48, 100])
@pytest.mark.parametrize("batch,h,w", [(1, 1, 7), (2, 5, 3), (1, 16, 16), (3, 15, 17), (1, 19, 27)])
def test_int8_conv2d_contiguous_input_transposed(isa, channels, batch, h, w):
    g = torch.Generator().manual_seed(channels * 100 + h * w)
    x_q = torch.randint(0, 256, (batch, channels, h, w), dtype=torch.uint8, generator=g)
    w_q = randint8((8, channels, 1, 1), generator=g)
    w_scale = torch.ones(8)
    packed, w_sum = F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32)
    got = F.int8_conv2d(x_q, 1.0, 5, packed, w_sum, w_scale, out_channels=8, kernel_size=1)
    from_channels_last = F.int8_conv2d(x_q.contiguous(memory_format=torch.channels_last), 1.0, 5, packed, w_sum,
                                       w_scale, out_channels=8, kernel_size=1)
    torch.testing.assert_close(got, from_channels_last, rtol=0, atol=0)
    torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, 5, w_q, w_scale), rtol=0, atol=0)


# Depthwise weights packed by pack_conv_weight ([G, 1, KH, KW, 1]) carry the kernel's own layouts after the panels;
# one packed as a [G, 1, KH*KW] matrix and viewed as the conv weight has none, and the kernel derives them per call.
# Channel counts around the 32- and 64-channel blocks, strides, padding, 1 to 3 images.
@pytest.mark.parametrize("packing", ["conv", "matrix"])
@pytest.mark.parametrize("channels", [1, 2, 31, 32, 33, 63, 64, 65, 96, 129, 200])
@pytest.mark.parametrize("batch,size,stride,padding", [(1, 5, 1, 1), (3, 9, 2, 1), (2, 7, 2, 0), (1, 6, 1, 2)])
def test_int8_conv2d_depthwise_channels(isa, packing, channels, batch, size, stride, padding):
    g = torch.Generator().manual_seed(channels * 7 + stride)
    x_q = torch.randint(0, 256, (batch, channels, size, size + 1), dtype=torch.uint8, generator=g)
    w_q = randint8((channels, 1, 3, 3), generator=g)
    if packing == "conv":
        w_packed = F.pack_conv_weight(w_q, channels)
    else:
        w_packed = ops.pack_int8_weight(w_q.reshape(channels, 1, 9)).unflatten(-1, (3, 3, 1))
    ones = torch.ones(channels)
    kwargs = dict(stride=stride, padding=padding, groups=channels)
    got = F.int8_conv2d(x_q, 1.0, 77, w_packed, w_q.sum((1, 2, 3), dtype=torch.int32), ones, out_channels=channels,
                        kernel_size=3, **kwargs)
    torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, 77, w_q, ones, **kwargs), rtol=0, atol=0)


# Grouped convs of 2, 4 or 8 channels in and out per group run as that many passes of the depthwise kernel, each
# picking one input channel of every lane's group; of 8, 16 or 32, and 4 in groups a multiple of 4 (uint8 input,
# AVX-512) on the dword kernel, each lane's products in its channel's group; of 4 to 16 on AVX2 on the pair kernel
# (widened input columns); packed by pack_conv_weight with those kernels' layouts, or as a matrix (the kernels derive
# them). Channel counts around the 16-byte lanes and the 32- and 64-channel blocks (a last block of 1 to 7 vectors).
@pytest.mark.parametrize("packing", ["conv", "matrix"])
@pytest.mark.parametrize("per_group,groups", [(2, 9), (4, 4), (4, 8), (4, 17), (4, 28), (4, 48), (8, 2), (8, 3), (8, 4),
                                              (8, 5), (8, 6), (8, 7), (8, 9), (16, 2), (16, 5), (16, 7), (32, 2),
                                              (32, 3)])
@pytest.mark.parametrize("batch,size,stride,padding", [(1, 5, 1, 1), (3, 9, 2, 1), (2, 7, 2, 0)])
@pytest.mark.parametrize("x_dtype,x_zp", [(torch.uint8, 77), (torch.int8, -5)])
def test_int8_conv2d_grouped_passes(isa, packing, per_group, groups, batch, size, stride, padding, x_dtype, x_zp):
    g = torch.Generator().manual_seed(per_group * 100 + groups * 7 + stride)
    channels = per_group * groups
    x_q = randint8((batch, channels, size, size + 1), generator=g, dtype=x_dtype)
    w_q = randint8((channels, per_group, 3, 3), generator=g)
    if packing == "conv":
        w_packed = F.pack_conv_weight(w_q, groups)
    else:  # k in (kh, kw, c) order
        matrix = w_q.permute(0, 2, 3, 1).reshape(groups, per_group, 9 * per_group)
        w_packed = ops.pack_int8_weight(matrix).unflatten(-1, (3, 3, per_group))
    ones = torch.ones(channels)
    kwargs = dict(stride=stride, padding=padding, groups=groups)
    got = F.int8_conv2d(x_q, 1.0, x_zp, w_packed, w_q.sum((1, 2, 3), dtype=torch.int32), ones, out_channels=channels,
                        kernel_size=3, **kwargs)
    torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, x_zp, w_q, ones, **kwargs), rtol=0, atol=0)


# The AVX2 grouped kernel (groups of 4 to 16; 32 on the GEMM) widens each work item's input columns once: rows wider
# than the columns it widens (several segments a row), dilations that spread one window past them (one pixel a
# segment), one-row and one-column kernels, strides, padding on every side, channel counts not a multiple of 8 (a
# last block of 12 and of 52 channels: the 16-channel loop, then 8 or 4). The AVX-512 dword kernel (uint8) reads a
# pixel's bytes at each tap in place, a zero-point vector for taps outside: the same geometries, groups of 4 in
# multiples of 4 (a last block of 16 channels) on its transposed lanes, of 8 on its pairs of lanes.
@pytest.mark.parametrize("per_group,groups", [(4, 3), (4, 13), (4, 20), (4, 24), (8, 2), (8, 11), (8, 14), (16, 5),
                                              (32, 2)])
@pytest.mark.parametrize("kernel,stride,padding,dilation,width", [((3, 5), 1, (1, 2), 1, 150), ((3, 3), 2, 1, 1, 141),
                                                                  ((5, 1), 1, (2, 0), 2, 11), ((1, 3), 1, 0, 40, 90),
                                                                  ((2, 2), 3, 1, 2, 9)])
@pytest.mark.parametrize("x_dtype,x_zp", [(torch.uint8, 200), (torch.int8, 100)])
def test_int8_conv2d_grouped_geometry(isa, per_group, groups, kernel, stride, padding, dilation, width, x_dtype, x_zp):
    g = torch.Generator().manual_seed(per_group + groups + width)
    channels = per_group * groups
    x_q = randint8((2, channels, 7, width), generator=g, dtype=x_dtype)
    w_q = randint8((channels, per_group, *kernel), generator=g)
    ones = torch.ones(channels)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    got = F.int8_conv2d(x_q, 1.0, x_zp, F.pack_conv_weight(w_q, groups), w_q.sum((1, 2, 3), dtype=torch.int32), ones,
                        out_channels=channels, kernel_size=kernel, **kwargs)
    torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, x_zp, w_q, ones, **kwargs), rtol=0, atol=0)


# The epilogue bounds the sums by the products in each (kh * kw * channels a group) and skips the clamp to the
# output's range where the bound allows: sums of 255 * 127 products at an output scale where they pass 2^31 before
# the clamp must still clamp (the depthwise kernel's passes and the dword kernel sum a group's channels too).
@pytest.mark.parametrize("per_group", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("kernel", [1, 3])
def test_int8_conv2d_grouped_sums_clamped_at_the_bound(isa, per_group, kernel):
    channels = 64
    x_q = torch.full((1, channels, 3, 3), 255, dtype=torch.uint8)
    w_q = torch.full((channels, per_group, kernel, kernel), 127, dtype=torch.int8)
    ones, groups = torch.ones(channels), channels // per_group
    out = dict(out_dtype=torch.uint8, out_scale=255 * 128 / (0.99 * 2**30))  # 1 product's bound just below 2^30
    got = F.int8_conv2d(x_q, 1.0, 0, F.pack_conv_weight(w_q, groups), w_q.sum((1, 2, 3), dtype=torch.int32), ones,
                        out_channels=channels, kernel_size=kernel, groups=groups, **out)
    want = reference.int8_conv2d(x_q, 1.0, 0, w_q, ones, groups=groups, **out)
    assert (want == 255).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# Ungrouped uint8 convs of up to 128 outputs read windows in place, kernel rows of kw * channels bytes padded to a
# multiple of 4 (a 7x7 stem of 3 channels: 21 -> 24; one channel, 3 -> 4) when that adds at most a quarter to the
# multiplies of an im2col row (kh * kw * channels bytes padded once; 3x3 of 3 channels: 36 against 28, im2col):
# pack_conv_weight stores the padded rows with the weight; a weight packed as a matrix and viewed as the conv weight
# is padded per call. 129 outputs: im2col rows.
@pytest.mark.parametrize("packing", ["conv", "matrix"])
@pytest.mark.parametrize("c,kernel,oc", [(3, (7, 7), 64), (3, (7, 7), 1), (5, (3, 3), 70), (3, (3, 5), 128),
                                         (3, (7, 7), 129), (6, (1, 3), 16), (1, (3, 3), 16), (2, (3, 3), 64),
                                         (1, (7, 7), 32), (1, (5, 5), 8), (3, (3, 3), 16)])
@pytest.mark.parametrize("batch,stride,padding", [(1, 2, 3), (2, 1, 0)])
def test_int8_conv2d_padded_kernel_rows(isa, packing, c, kernel, oc, batch, stride, padding):
    g = torch.Generator().manual_seed(oc * 3 + c)
    x_q = torch.randint(0, 256, (batch, c, 13, 12), dtype=torch.uint8, generator=g)
    w_q = randint8((oc, c, *kernel), generator=g)
    if packing == "conv":
        w_packed = F.pack_conv_weight(w_q)
    else:
        w_packed = ops.pack_int8_weight(w_q.permute(0, 2, 3, 1).reshape(1, oc, -1)).unflatten(-1, (*kernel, c))
    ones = torch.ones(oc)
    kwargs = dict(stride=stride, padding=padding)
    got = F.int8_conv2d(x_q, 1.0, 99, w_packed, w_q.sum((1, 2, 3), dtype=torch.int32), ones, out_channels=oc,
                        kernel_size=kernel, **kwargs)
    torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, 99, w_q, ones, **kwargs), rtol=0, atol=0)


# Weight panels with fewer than 64 columns: the microkernels multiply only the 16-column vectors that hold output
# columns (1 to 4) into the tile, in groups of rows, and the epilogue stores the panel's columns. Every row count
# behind such groups, every output kind, the GEMM (int8_mm, int8_linear, 1x1 convs) and the windows read in place
# (3x3): identical on every instruction-set path, and as the reference.
PARTIAL_COLUMNS = [1, 16, 17, 24, 33, 48, 56, 70, 100]


def on_every_isa(fn):
    """fn() on each supported instruction-set path, all results identical; the first one."""
    results = []
    for isa in SUPPORTED_ISAS:
        with forced_isa(isa):
            results.append(fn())
    for isa, got in zip(SUPPORTED_ISAS[1:], results[1:]):
        assert torch.equal(got, results[0]), f"{isa} differs from {SUPPORTED_ISAS[0]}"
    return results[0]


@pytest.mark.parametrize("n", PARTIAL_COLUMNS)
def test_partial_panels_gemm(n):
    g = torch.Generator().manual_seed(n)
    for m in (1, 5, 11, 12, 13, 23, 25, 37, 100):
        a, b = randint8((m, 40), generator=g), randint8((40, n), generator=g)
        assert torch.equal(on_every_isa(lambda: F.int8_mm(a, b)), a.int() @ b.int())
        w, w_packed, w_sum, w_scale = quantized_weight(n, 40, "cpu", seed=m)
        x_q = torch.randint(0, 256, (m, 40), dtype=torch.uint8, generator=g)
        x_scale = torch.rand(m, generator=g) + 0.01  # per-row scales
        bias = torch.randn(n, generator=g)
        for out_dtype in FLOAT_DTYPES:
            got = on_every_isa(lambda: F.int8_linear(x_q, x_scale, 9, w_packed, w_sum, w_scale, bias,
                                                     out_features=n, out_dtype=out_dtype))
            want = reference.int8_linear(x_q, x_scale, 9, w, w_scale, bias, out_dtype=out_dtype)
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bits", [7, 4])
@pytest.mark.parametrize("m,n", [(100, 130), (37, 16)])
def test_int8_linear_narrow_weights_on_every_isa(bits, m, n):
    # 7- and 4-bit weights (the byte kernel on AVX2) with uint8 activations over their whole range
    g = torch.Generator().manual_seed(bits * m)
    k = 600
    w = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, generator=g) * 0.02 + 0.001
    x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    x_q[:, :8] = 255
    x_scale = torch.rand(m, generator=g) + 0.01
    bias = torch.randn(n, generator=g)
    w_packed, w_sum = F.pack_int8_weight(w), w.sum(1, dtype=torch.int32)
    for out_dtype in FLOAT_DTYPES:
        got = on_every_isa(lambda: F.int8_linear(x_q, x_scale, 9, w_packed, w_sum, w_scale, bias, out_features=n,
                                                 out_dtype=out_dtype))
        torch.testing.assert_close(got, reference.int8_linear(x_q, x_scale, 9, w, w_scale, bias, out_dtype=out_dtype))


# 1 to 4 rows against a weight of over 8 MB (n x k bytes): the AVX2 path's int8 kernel streams it (sub-blocks of 32
# k-steps, each pass prefetching its lines of the next one), 7-bit weights too (not the byte kernel there). 1025
# k-steps (4 k blocks and one step: a last sub-block of 1) with a last panel of 8 columns (one 16-column vector: 2
# slices, each its own pass), and 1034 k-steps (a last sub-block of 10) with one of 40 (3 vectors: one row's 4-slice
# pass, then 2 of one slice); extremes in both operands; 1 and 2 threads.
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("k,n", [(4100, 2056), (4136, 2088)])
def test_int8_linear_few_rows_streamed_weight(m, bits, k, n):
    g = torch.Generator().manual_seed(m)
    w = _extreme_weights(randint8((n, k), generator=g)) if bits == 8 else \
        torch.randint(-64, 65, (n, k), dtype=torch.int8, generator=g)
    x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    x_q[:, :8], x_q[0, -8:] = 255, 0
    w_packed, w_sum, ones = F.pack_int8_weight(w), w.sum(1, dtype=torch.int32), torch.ones(n)
    want = reference.int8_linear(x_q, 1.0, 5, w, ones)
    for threads in (1, 2):
        with num_threads(threads):
            got = on_every_isa(lambda: F.int8_linear(x_q, 1.0, 5, w_packed, w_sum, ones, out_features=n))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("n", PARTIAL_COLUMNS)
@pytest.mark.parametrize("kernel,padding", [((1, 1), 0), ((3, 3), 1)], ids=["1x1", "3x3"])
@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.int8, torch.float32, torch.float16])
def test_partial_panels_conv(n, kernel, padding, out_dtype):
    g = torch.Generator().manual_seed(n * 10 + kernel[0])
    w_q = randint8((n, 8, *kernel), generator=g)
    w_packed, w_sum = F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32)
    w_scale = torch.rand(n, generator=g) * 0.01 + 0.001
    bias = torch.randn(n, generator=g)
    for width in (1, 6, 11, 12, 13, 20, 25, 30):  # output rows of one image row: tails of 0-11 behind the groups
        x_q = torch.randint(0, 256, (2, 8, 3, width), dtype=torch.uint8, generator=g)
        x_q = x_q.contiguous(memory_format=torch.channels_last)
        y = reference.int8_conv2d(x_q, 0.03, 100, w_q, w_scale, bias, padding=padding)
        q = {} if out_dtype.is_floating_point else dict(out_scale=float(y.abs().max()) / 100, out_zero_point=3)
        residual = torch.randint(0, 256, y.shape, dtype=torch.uint8, generator=g)
        for r in (None, residual):
            extra = {} if r is None else dict(residual=r, residual_scale=0.02, residual_zero_point=128, relu=True)
            got = on_every_isa(lambda: F.int8_conv2d(x_q, 0.03, 100, w_packed, w_sum, w_scale, bias, out_channels=n,
                                                     kernel_size=kernel, padding=padding, out_dtype=out_dtype,
                                                     clamp_min=0.0, **q, **extra))
            want = (reference.int8_conv2d if r is None else reference.int8_conv2d_residual)(
                x_q, 0.03, 100, w_q, w_scale, bias, padding=padding, out_dtype=out_dtype, clamp_min=0.0, **q, **extra)
            if out_dtype.is_floating_point:
                torch.testing.assert_close(got, want)
            else:  # the float y may differ in its last bit from the reference's, moving a rounding tie by one
                assert (got.int() - want.int()).abs().max() <= 1


# im2col matrices over 512 KB are produced chunk by chunk inside the GEMM (the small ones above are made whole
# first).
BIG_CONVS = [(2, 32, 40, 40, 200, (3, 3), 1, 1, 1, 1), (2, 32, 41, 40, 80, (3, 3), 1, 1, 1, 2),
             (1, 16, 81, 80, 70, (3, 3), 1, 1, 1, 1),
             # up to 64 output channels: uint8 window rows read in place, output rows split in segments of <= 96
             (1, 12, 9, 203, 64, (3, 3), 1, 1, 1, 1), (2, 4, 12, 211, 40, (5, 3), 2, (2, 1), (2, 1), 1),
             # a contiguous 3-channel input is interleaved channels-last 4096 pixels per task: two per image
             (2, 3, 70, 61, 16, (7, 7), 2, 3, 1, 1),
             # windows read in place, 720 and 576 bytes deep (beyond the AVX2 kernel's 512-byte blocks of widened
             # operands in the GEMM); dilated rows, a stride along them, two panels
             (1, 80, 9, 30, 64, (3, 3), 1, 1, 1, 1), (2, 64, 9, 23, 128, (3, 3), (1, 2), 1, (2, 1), 1),
             # kernel rows of 600 and 652 (650 padded) bytes read in place: the AVX2 wide kernel takes each in two
             # parts; a full and a partial panel, a Conv1d-like row of 5 taps
             (2, 200, 6, 14, 96, (3, 3), 1, 1, 1, 1), (3, 130, 1, 40, 100, (1, 5), 1, (0, 2), 1, 1),
             # a weight over 1 MB (256 x 4608): on AMX im2col chunks of up to 1 MB of rows (128 and 117 rows)
             (5, 512, 7, 7, 256, (3, 3), 1, 1, 1, 1)]


@pytest.mark.parametrize("conv", BIG_CONVS, ids=[f"big{i}" for i in range(len(BIG_CONVS))])
@pytest.mark.parametrize("x_dtype,x_zp", [(torch.int8, -2), (torch.uint8, 7)])
def test_int8_conv2d_large(device, isa, conv, x_dtype, x_zp):
    b, c, h, w_, oc, kernel, stride, padding, dilation, groups = conv
    g = torch.Generator().manual_seed(oc)
    lo, hi = (0, 256) if x_dtype == torch.uint8 else (-128, 128)
    x_q = torch.randint(lo, hi, (b, c, h, w_), dtype=x_dtype, generator=g).to(device)
    w_q = randint8((oc, c // groups, *kernel), generator=g).to(device)
    w_packed, w_sum = F.pack_conv_weight(w_q, groups), w_q.sum((1, 2, 3), dtype=torch.int32)
    ones = torch.ones(oc, device=device)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    got = F.int8_conv2d(x_q, 1.0, x_zp, w_packed, w_sum, ones, out_channels=oc, kernel_size=kernel, **kwargs)
    torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, x_zp, w_q, ones, **kwargs), rtol=0, atol=0)


# batch, in_ch, h, w, out_ch, kernel, stride, padding, groups: windows read in place (with and without padding),
# through the GEMM's im2col rows (more than 128 output channels, groups), 1x1, a deep 3x3
NARROW_WEIGHT_CONVS = [(2, 16, 12, 11, 100, (3, 3), 1, 1, 1), (1, 3, 20, 19, 64, (7, 7), 2, 3, 1),
                       (2, 32, 9, 9, 200, (3, 3), 2, 1, 1), (1, 64, 8, 8, 40, (1, 1), 1, 0, 1),
                       (1, 24, 9, 10, 48, (3, 3), 1, 0, 2), (1, 160, 7, 7, 70, (3, 3), 1, 1, 1)]


@pytest.mark.parametrize("conv", NARROW_WEIGHT_CONVS, ids=[f"conv{i}" for i in range(len(NARROW_WEIGHT_CONVS))])
@pytest.mark.parametrize("outlier", [None, 65, -128])
def test_int8_conv2d_narrow_weights(isa, conv, outlier):
    # weights in [-64, 64] take the AVX2 byte kernel panel by panel; an outlier in the last panel sends it back
    b, c, h, w_, oc, kernel, stride, padding, groups = conv
    g = torch.Generator().manual_seed(oc * 7 + c)
    x_q = torch.randint(0, 256, (b, c, h, w_), dtype=torch.uint8, generator=g).to(memory_format=torch.channels_last)
    x_q[:, :, :2] = 255
    w_q = torch.randint(-64, 65, (oc, c // groups, *kernel), dtype=torch.int8, generator=g)
    w_q[: oc // 2, :, 0] = 64
    w_q[oc // 2:, :, -1] = -64
    if outlier is not None:
        w_q[-1, 0, 0, 0] = outlier
    ones = torch.ones(oc)
    kwargs = dict(stride=stride, padding=padding, groups=groups)
    got = F.int8_conv2d(x_q, 1.0, 99, F.pack_conv_weight(w_q, groups), w_q.sum((1, 2, 3), dtype=torch.int32), ones,
                        out_channels=oc, kernel_size=kernel, **kwargs)
    torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, 99, w_q, ones, **kwargs), rtol=0, atol=0)


# Unsigned activations below 128 (7 bits: what torch.ao's x86 engine quantizes to, reduce_range) take the AVX2 byte
# kernel with any int8 weight (pair sums of at most 2 * 127 * 128 in magnitude); a byte of 128 or more anywhere in
# the input (or a padding byte, the zero point, of 128 or more) sends the call back to the kernels of widened
# operands. Weights at -128 and 127 against activations at 127 make the largest pair sums.
def _seven_bit_x(shape, generator, outlier):
    x_q = torch.randint(0, 128, shape, dtype=torch.uint8, generator=generator)
    x_q.view(-1)[:32] = 127
    if outlier is not None:  # (beside a 127: with a weight of -128 for both, the pair sum saturates)
        x_q.view(-1)[1] = outlier
    return x_q


def _extreme_weights(w_q):
    rows = w_q.view(w_q.shape[0], -1)
    rows[0] = -128
    rows[:, :8] = -128
    rows[1: w_q.shape[0] // 2, 8:16] = 127
    return w_q


@pytest.mark.parametrize("outlier", [None, 128, 255])
@pytest.mark.parametrize("m,n,k,transposed", [(100, 130, 600, False), (37, 16, 61, False), (3, 70, 1030, False),
                                              (50, 64, 200, True)])
def test_int8_linear_7bit_activations_with_8bit_weights(outlier, m, n, k, transposed):
    g = torch.Generator().manual_seed(m * n + k)
    w = _extreme_weights(randint8((n, k), generator=g))
    x_q = _seven_bit_x((k, m) if transposed else (m, k), g, outlier)
    if transposed:  # rows k-strided: packed by the op, its bytes tested where they lie
        x_q = x_q.t()
    ones = torch.ones(n)
    got = on_every_isa(lambda: F.int8_linear(x_q, 1.0, 5, F.pack_int8_weight(w), w.sum(1, dtype=torch.int32), ones,
                                             out_features=n))
    torch.testing.assert_close(got, reference.int8_linear(x_q, 1.0, 5, w, ones), rtol=0, atol=0)


@pytest.mark.parametrize("conv", NARROW_WEIGHT_CONVS, ids=[f"conv{i}" for i in range(len(NARROW_WEIGHT_CONVS))])
@pytest.mark.parametrize("outlier,x_zp", [(None, 99), (None, 200), (130, 99)], ids=["7-bit", "zp200", "outlier"])
def test_int8_conv2d_7bit_activations_with_8bit_weights(conv, outlier, x_zp):
    b, c, h, w_, oc, kernel, stride, padding, groups = conv
    g = torch.Generator().manual_seed(oc * 5 + c)
    x_q = _seven_bit_x((b, h, w_, c), g, outlier).permute(0, 3, 1, 2)  # (channels-last)
    w_q = _extreme_weights(randint8((oc, c // groups, *kernel), generator=g))
    ones = torch.ones(oc)
    kwargs = dict(stride=stride, padding=padding, groups=groups)
    got = on_every_isa(lambda: F.int8_conv2d(x_q, 1.0, x_zp, F.pack_conv_weight(w_q, groups),
                                             w_q.sum((1, 2, 3), dtype=torch.int32), ones, out_channels=oc,
                                             kernel_size=kernel, **kwargs))
    torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, x_zp, w_q, ones, **kwargs), rtol=0, atol=0)


# Ungrouped uint8 convs with a multiple of 4 input channels and of 64 output channels run as a direct conv on the
# AVX-512 path: groups of output pixels across output rows and images, each tap read in place, taps in the padding
# read as the zero point or, with a zero point of 0, skipped where they are outside for the whole group.
DIRECT_CONVS = [  # batch, in_ch, h, w, out_ch, kernel, stride, padding, dilation
    (2, 8, 7, 7, 64, (3, 3), 1, 1, 1),             # edges, corners and interior across 2 images
    (3, 4, 9, 11, 128, (3, 3), 2, 1, 1),           # stride, two panels, non-square input
    (1, 16, 12, 10, 64, (5, 3), 1, (2, 1), (2, 1)),  # non-square dilated kernel
    (2, 12, 6, 5, 64, (1, 1), 2, 0, 1),            # 1x1 with stride 2 (not the in-place pointwise GEMM)
    (1, 64, 9, 9, 64, (1, 1), 2, 0, 1),            # the same over whole 64-byte rows (AMX: im2col rows, no padded copy)
    (1, 4, 5, 6, 64, (8, 8), 1, 4, 1),             # 64 taps, the most a direct conv takes
    (1, 8, 4, 4, 64, (3, 3), 1, 4, 1),             # padding wider than the kernel: pixels with no tap inside
    (1, 4, 3, 3, 64, (9, 9), 1, 3, 1),             # 81 taps: the GEMM path
    (2, 64, 20, 20, 192, (3, 3), 1, 1, 1),         # row chunks, panel-major (input under 512 KB)
    (1, 8, 200, 340, 64, (3, 3), 1, 1, 1),         # row chunks, chunk-major (input over 512 KB)
]
# Ungrouped uint8 convs whose kernel rows are whole 64-byte k-chunks read their windows on AMX tiles (avx512_amx)
# from a copy of the input with its padding; with stride 1 a tile's rows run on across output rows (the straddling
# windows multiplied, not stored), else they stay in one output row. The path takes a conv when at least 7 of 8
# multiplied pixels are stored (these are; the last two are not, and take im2col rows).
AMX_WINDOW_CONVS = [  # batch, in_ch, h, w, out_ch, kernel, stride, padding, dilation
    (2, 64, 6, 40, 64, (3, 3), 1, 1, 1),           # tiles across output rows (42-pixel padded rows), 2 images
    (1, 64, 5, 64, 96, (3, 3), 2, 1, 1),           # stride 2: tiles within a row, a half-full second panel
    (1, 128, 4, 64, 130, (3, 3), 1, 0, 1),         # no padding, 3 panels, 2 columns in the last
    (1, 32, 7, 64, 64, (3, 2), 1, 1, (2, 1)),      # 2 x 32 channels a kernel row, dilated rows
    (2, 64, 3, 120, 32, (3, 3), 1, 1, 1),          # several pieces an image, one half-panel
    (1, 64, 3, 64, 64, (3, 3), 1, (2, 1), 1),      # padding taller than wide: whole padded rows in the windows
    (2, 64, 5, 17, 64, (1, 3), 1, (0, 1), 1),      # one kernel row, padded across only
    (1, 64, 9, 64, 64, (3, 3), (2, 1), 1, 1),      # stride 2 down, 1 across: tiles within a row
    (1, 256, 4, 30, 64, (3, 3), 1, 1, 1),          # 36 k-chunks a tile: each block's epilogue during the next
    (1, 256, 9, 64, 70, (3, 3), 2, 1, 1),          # the same within output rows, 2 panels
    (1, 256, 5, 29, 64, (3, 3), 1, 1, 1),          # the same, slices starting in the junk columns (31-pixel rows)
    (3, 64, 7, 7, 64, (3, 3), 1, 1, 1),            # 7x7 images (49 of 64 stored): im2col rows
    (1, 64, 2, 2, 64, (3, 3), 1, 1, 1),            # a 2x2 image: im2col rows
]
# Stride-2 convs over at most 4 channels (a stem) run on AMX tiles as a stride-1 conv over 2x2 blocks of 16
# channels, where that conv is one the padded-window path takes (these are; the last is not: im2col rows)
AMX_BLOCK_CONVS = [  # batch, in_ch, h, w, out_ch, kernel, stride, padding, dilation
    (2, 3, 64, 64, 64, (7, 7), 2, 3, 1),           # ResNet's stem, smaller
    (1, 4, 40, 120, 70, (8, 8), 2, (3, 2), 1),     # the largest kernel and channels, a second panel
    (1, 1, 20, 130, 10, (3, 3), 2, 1, 1),          # one channel, a part panel
    (1, 2, 16, 130, 32, (5, 4), 2, 0, 1),          # no padding, a half-panel
    (1, 3, 41, 97, 64, (7, 7), 2, 3, 1),           # odd image sizes: edge blocks half outside on both sides
    (1, 2, 16, 131, 32, (5, 4), 2, 0, 1),          # no padding, an odd width: the last block half outside
    (2, 3, 32, 30, 64, (7, 7), 2, 3, 1),           # small images: im2col rows
]


@pytest.mark.parametrize("streamed", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("conv", DIRECT_CONVS + AMX_WINDOW_CONVS + AMX_BLOCK_CONVS,
                         ids=[f"direct{i}" for i in range(len(DIRECT_CONVS))]
                         + [f"amx{i}" for i in range(len(AMX_WINDOW_CONVS))]
                         + [f"blocks{i}" for i in range(len(AMX_BLOCK_CONVS))])
@pytest.mark.parametrize("x_zp", [0, 9])
def test_int8_conv2d_direct(isa, monkeypatch, streamed, conv, x_zp):
    if streamed:
        monkeypatch.setenv("TORCHQUANT_STREAMING_BYTES", "0")
    b, c, h, w_, oc, kernel, stride, padding, dilation = conv
    g = torch.Generator().manual_seed(oc + c + h)
    x_q = torch.randint(0, 256, (b, c, h, w_), dtype=torch.uint8, generator=g)
    w_q = randint8((oc, c, *kernel), generator=g)
    w_packed, w_sum = F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32)
    ones = torch.ones(oc)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation)
    got = F.int8_conv2d(x_q, 1.0, x_zp, w_packed, w_sum, ones, out_channels=oc, kernel_size=kernel, **kwargs)
    torch.testing.assert_close(got, reference.int8_conv2d(x_q, 1.0, x_zp, w_q, ones, **kwargs), rtol=0, atol=0)
    # requantized uint8 with a fused ReLU, as the integer pipeline calls it
    w_scale = torch.rand(oc, generator=g) * 0.01 + 0.001
    bias = torch.randn(oc, generator=g)
    y = reference.int8_conv2d(x_q, 0.03, x_zp, w_q, w_scale, bias, **kwargs)
    out_scale = float(y.abs().max()) / 200
    q = dict(out_dtype=torch.uint8, out_scale=out_scale, out_zero_point=0, clamp_min=0.0)
    got = F.int8_conv2d(x_q, 0.03, x_zp, w_packed, w_sum, w_scale, bias, out_channels=oc, kernel_size=kernel,
                        **q, **kwargs)
    want = reference.int8_conv2d(x_q, 0.03, x_zp, w_q, w_scale, bias, **q, **kwargs)
    diff = (got.int() - want.int()).abs()  # the float y may move a rounding tie by one
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("out_dtype,out_zp", [(torch.int8, 0), (torch.int8, -5), (torch.uint8, 128)])
@pytest.mark.parametrize("conv", [CONVS[0], CONVS[1], CONVS[5], CONVS[13], CONVS[16], BIG_CONVS[0]],
                         ids=["3x3", "1x1", "groups", "depthwise", "depthwise-5x5", "big"])
def test_int8_conv2d_requantized(device, isa, conv, out_dtype, out_zp):
    b, c, h, w_, oc, kernel, stride, padding, dilation, groups = conv
    g = torch.Generator().manual_seed(oc + out_zp)
    x_q = torch.randint(0, 256, (b, c, h, w_), dtype=torch.uint8, generator=g).to(device)
    w_q = randint8((oc, c // groups, *kernel), generator=g).to(device)
    w_scale = (torch.rand(oc, generator=g) * 0.01 + 0.001).to(device)
    bias = torch.randn(oc, generator=g).to(device)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = reference.int8_conv2d(x_q, 0.03, 100, w_q, w_scale, bias, **kwargs)
    out_scale = float(y.abs().max()) / 200  # the largest outputs clamp, most do not
    got = F.int8_conv2d(x_q, 0.03, 100, F.pack_conv_weight(w_q, groups), w_q.sum((1, 2, 3), dtype=torch.int32),
                        w_scale, bias, out_channels=oc, kernel_size=kernel, out_dtype=out_dtype, out_scale=out_scale,
                        out_zero_point=out_zp, **kwargs)
    want = reference.int8_conv2d(x_q, 0.03, 100, w_q, w_scale, bias, out_dtype=out_dtype, out_scale=out_scale,
                                 out_zero_point=out_zp, **kwargs)
    assert got.dtype == out_dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    # the float y may differ in its last bit from the reference's, moving a rounding tie by one
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    info = torch.iinfo(out_dtype)
    assert got.min() == info.min or got.max() == info.max  # the clamp was exercised


def test_int8_conv2d_half_outputs_and_strided_input(device):
    x_q = randint8((2, 8, 10, 12), device=device)[:, :, ::2]  # non-contiguous, neither NCHW nor NHWC dense
    w_q = randint8((8, 8, 3, 3), device=device)
    w_scale = torch.full((8,), 0.01, device=device)
    packed, w_sum = F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32)
    for dtype in (torch.float16, torch.bfloat16):
        got = F.int8_conv2d(x_q, 0.05, 0, packed, w_sum, w_scale, out_channels=8, kernel_size=3, padding=1,
                            out_dtype=dtype)
        torch.testing.assert_close(got, reference.int8_conv2d(x_q, 0.05, 0, w_q, w_scale, padding=1, out_dtype=dtype))


def test_int8_conv2d_bad_inputs(device):
    w_q = randint8((8, 4, 3, 3), device=device)
    packed, w_sum = F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32)
    w_scale = torch.ones(8, device=device)
    x_q = randint8((1, 4, 6, 6), device=device)

    def call(x=x_q, packed=packed, oc=8, kernel=3, **kw):
        return F.int8_conv2d(x, 1.0, 0, packed, w_sum, w_scale, out_channels=oc, kernel_size=kernel, **kw)

    with pytest.raises(ValueError, match="x_q must be 4-d"):
        call(x=x_q[0])
    with pytest.raises(TypeError, match="x_q must be int8 or uint8"):
        call(x=x_q.float())
    with pytest.raises(ValueError, match="groups must be a positive int dividing"):
        call(groups=3)
    with pytest.raises(ValueError, match="groups must be a positive int dividing out_channels"):
        F.pack_conv_weight(w_q, 3)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        call(x=x_q[:, :, :2, :2])
    with pytest.raises(RuntimeError, match=r"w_packed holds a packed weight of shape \[1, 8, 3, 3, 4\] but this call "
                                            r"needs \[1, 8, 5, 5, 4\]"):
        call(kernel=5, padding=2)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        call(stride=0)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        call(kernel=(3, 3, 3))
    with pytest.raises(TypeError, match="out_dtype must be float32, float16, bfloat16, int8 or uint8"):
        call(out_dtype=torch.int32)
    with pytest.raises(RuntimeError, match="needs out_scale"):
        call(out_dtype=torch.int8)
    with pytest.raises(RuntimeError, match="out_scale is only for int8/uint8 out_dtype"):
        call(out_scale=0.5)
    with pytest.raises(RuntimeError, match="out_scale must be positive and finite"):
        call(out_dtype=torch.uint8, out_scale=0.0)
    with pytest.raises(RuntimeError, match=r"out_zero_point must lie in \[-128, 127\]"):
        call(out_dtype=torch.int8, out_scale=0.5, out_zero_point=128)


# ---------------------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, dispatch
# ---------------------------------------------------------------------------------------------------------------

def test_opcheck(device):
    """opcheck runs each op on clones of its arguments. A clone of a packed weight keeps its shape and strides but
    not the padding of its buffer, which the kernels reject (see test_copied_packed_weight_rejected), so the ops
    that read a packed weight are checked with one that has no padding (N and K multiples of 64)."""
    a, b = randint8((5, 9), device=device), randint8((9, 7), device=device)
    torch.library.opcheck(ops.int8_mm, (a, b))
    torch.library.opcheck(ops.pack_int8_weight, (randint8((7, 9), device=device),))
    torch.library.opcheck(ops.pack_int8_weight, (randint8((2, 7, 9), device=device),))
    torch.library.opcheck(ops.pack_int8_weight, (randint8((2, 7, 3, 2, 5), device=device),))  # a conv weight
    torch.library.opcheck(ops.pack_int8_weight, (randint8((6, 1, 3, 3, 1), device=device),))  # a depthwise one
    w, w_packed, w_sum, w_scale = quantized_weight(64, 64, device)
    x_scale = torch.rand(3, 5, device=device).reshape(-1)
    bias = torch.randn(64, device=device)
    torch.library.opcheck(ops.int8_linear, (randint8((3, 5, 64), device=device), x_scale, 2, w_packed, w_sum, w_scale,
                                            bias, 64, torch.bfloat16, None, 0))
    torch.library.opcheck(ops.int8_linear, (randint8((4, 64), device=device), x_scale[:1], 0, w_packed, w_sum, w_scale,
                                            None, 64, torch.uint8, 0.5, 10))
    # (the overload int8_linear_dynamic.activation: test_fused_gelu)
    torch.library.opcheck(ops.int8_linear_dynamic.default, (torch.randn(3, 5, 64, device=device), w_packed, w_sum,
                                                            w_scale, bias, 64))
    torch.library.opcheck(ops.int8_linear_dynamic.default, (torch.randn(4, 64, device=device, dtype=torch.bfloat16),
                                                            w_packed, w_sum, w_scale, None, 64))
    w_q = randint8((128, 16, 2, 2), device=device)  # 2 groups of 64 outputs, window 2 * 2 * 16 = 64
    w_sum, w_scale = w_q.sum((1, 2, 3), dtype=torch.int32), torch.rand(128, device=device)
    # (the overload int8_conv2d.residual: test_conv_residual)
    torch.library.opcheck(ops.int8_conv2d.default,
                          (randint8((2, 32, 7, 6), device=device), x_scale[:1], 1, F.pack_conv_weight(w_q, 2), w_sum,
                           w_scale, torch.randn(128, device=device), 128, [2, 2], [2, 1], [1, 0], [1, 2], 2,
                           torch.float32))
    torch.library.opcheck(ops.int8_conv2d.default,
                          (randint8((1, 32, 5, 5), device=device), x_scale[:1], 0, F.pack_conv_weight(w_q, 2), w_sum,
                           w_scale, None, 128, [2, 2], [1, 1], [0, 0], [1, 1], 2, torch.int8, 0.25, -3))


def test_copied_packed_weight_rejected(device):
    """A copy of a padded packed weight (.clone(), .contiguous()) has its shape but not its padded buffer: the
    kernels reject it instead of reading past its storage."""
    w, w_packed, w_sum, w_scale = quantized_weight(7, 9, device)
    x_q = randint8((3, 9), device=device)
    for copy in (w_packed.clone(), w_packed.contiguous()):
        with pytest.raises(RuntimeError, match="w_packed must be laid out as pack_int8_weight returns it"):
            F.int8_linear(x_q, 0.5, 0, copy, w_sum, w_scale, out_features=7)
    # a copy of the bytes the view spans, with its strides (how AOTInductor copies a buffer): the message says why
    spanned = sum((size - 1) * stride for size, stride in zip(w_packed.shape, w_packed.stride())) + 1
    copy = torch.as_strided(w_packed, (spanned,), (1,)).clone().as_strided(w_packed.shape, w_packed.stride())
    with pytest.raises(RuntimeError, match=r"over 4096 bytes of its storage from its offset; its storage holds "
                                           rf"{spanned}\. A copy of the packed tensor's view alone"):
        F.int8_linear(x_q, 0.5, 0, copy, w_sum, w_scale, out_features=7)
    # a group of a grouped packed weight is a packed weight itself
    w3 = randint8((3, 7, 9), device=device)
    packed3 = F.pack_int8_weight(w3)
    got = F.int8_linear(x_q, 0.5, 0, packed3[2], w3[2].sum(1, dtype=torch.int32), w_scale, out_features=7)
    torch.testing.assert_close(got, reference.int8_linear(x_q, 0.5, 0, w3[2], w_scale), rtol=0, atol=0)


@pytest.mark.parametrize("m", [7, 8, 12, 15, 16, 17, 31, 32, 33, 47, 96, 97, 200])
def test_int8_mm_tile_edges_on_every_path(m, isa):
    """Rows, depth and columns around the AMX kernel's tiles (8 rows the fewest it takes, 16 rows a tile, 64 bytes
    of k, 16 and 32 columns) and the driver's 96-row chunks: exact on every path (the k past the last whole 64 goes
    to the vector kernel)."""
    generator = torch.Generator().manual_seed(m)
    for k in (64, 65, 68, 127, 128, 200, 1030):
        for n in (1, 16, 32, 33, 64, 65, 130):
            a = randint8((m, k), generator=generator)
            b = randint8((k, n), generator=generator)
            assert torch.equal(torch.ops.torchquant.int8_mm(a, b), a.int() @ b.int()), (m, k, n)

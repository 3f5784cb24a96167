"""The cache of freed CPU outputs (torchquant.set_cpu_output_cache / cpu_output_cache_info): a freed output of 64 KiB
or more comes back as the next output of its size class; every op writes all of a reused block (poisoned with 0xff
and 0x5a bytes, it gives the op's output on fresh memory); the limit holds, the oldest blocks going first; outputs
resized, lazily cloned, shared, saved, made on one thread and freed on another, or made in children forked while
another thread makes outputs behave as torch's own."""
import io
import os
import queue
import signal
import threading
import time

import pytest
import torch

import torchquant as tq
import torchquant.functional as F
from torchquant import reference as ref

from conftest import assert_same, randint8
from test_gemm import quantized_weight

MIB = 1 << 20


@pytest.fixture(autouse=True)
def default_limit():
    tq.set_cpu_output_cache(64 * MIB)
    yield
    tq.set_cpu_output_cache(64 * MIB)


def reuse_count() -> int:
    return tq.cpu_output_cache_info()["reused"]


def test_freed_output_is_reused():
    x = torch.randn(512, 257)
    first = F.quantize(x, 0.02, 3)
    address = first.data_ptr()
    del first
    before = reuse_count()
    second = F.quantize(x * 2, 0.02, 3)
    assert second.data_ptr() == address
    assert reuse_count() == before + 1
    assert_same(second, ref.quantize(x * 2, torch.tensor(0.02), torch.tensor(3)))


def test_nearby_sizes_share_a_size_class():
    # 100,000 and 106,000 bytes both round up to 106,496 (13 steps of 8 KiB); 107,000 is the next class
    first = F.quantize(torch.randn(100_000), 0.1, 0)
    address = first.data_ptr()
    del first
    second = F.quantize(torch.randn(106_000), 0.1, 0)
    assert second.data_ptr() == address
    del second
    third = F.quantize(torch.randn(107_000), 0.1, 0)
    assert third.data_ptr() != address


def test_small_outputs_bypass_the_cache():
    info = tq.cpu_output_cache_info()
    for _ in range(3):
        F.quantize(torch.randn(1000), 0.1, 0)  # 1000 bytes
    assert tq.cpu_output_cache_info() == info


def fill_bytes(t: torch.Tensor, byte: int) -> None:
    """Every byte of t's storage set to byte (0xff: NaN in floats, -1 in integers)."""
    torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).fill_(byte)


def assert_writes_reused_blocks(make) -> None:
    """make()'s output, computed on an output block poisoned with 0xff and with 0x5a, equals its output with nothing
    kept (fresh memory), each time on the poisoned block itself."""
    tq.set_cpu_output_cache(0)
    expected = make()
    tq.set_cpu_output_cache(64 * MIB)
    for byte in (0xFF, 0x5A):
        out = make()
        outputs = out if isinstance(out, tuple) else (out,)
        addresses = []
        for o in outputs:
            fill_bytes(o, byte)
            if o.untyped_storage().nbytes() >= 64 * 1024:  # (smaller ones are not kept)
                addresses.append(o.data_ptr())
        assert addresses, "no output is large enough to be kept"
        del out, outputs, o
        result = make()
        results = result if isinstance(result, tuple) else (result,)
        # (several outputs come back in the reverse order of their freeing)
        assert sorted(r.data_ptr() for r in results if r.untyped_storage().nbytes() >= 64 * 1024) == \
            sorted(addresses), "an output did not reuse its block"
        for r, e in zip(results, expected if isinstance(expected, tuple) else (expected,)):
            assert_same(r, e)


def test_every_op_writes_its_whole_reused_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 301, generator=g)
    channel_scale = torch.rand(301, generator=g) + 0.01
    channel_zp = torch.randint(-3, 4, (301,), generator=g, dtype=torch.int32)
    q = F.quantize(x, 0.03, -5)
    a = randint8((301, 67), generator=g)
    w, w_packed, w_sum, w_scale = quantized_weight(259, 67, "cpu")
    x_q = (a.to(torch.int16) + 128).to(torch.uint8)
    image = torch.randint(0, 256, (2, 67, 33, 35), generator=g, dtype=torch.uint8)
    image = image.contiguous(memory_format=torch.channels_last)
    other = torch.randint(0, 256, image.shape, generator=g, dtype=torch.uint8)
    row = torch.randint(0, 256, (1, 67, 1, 35), generator=g, dtype=torch.uint8)
    conv_w = randint8((70, 67, 3, 3), generator=g)
    conv_scale = torch.rand(70, generator=g) * 0.01 + 0.001
    packed, conv_sum = F.pack_conv_weight(conv_w), conv_w.sum((1, 2, 3), dtype=torch.int32)
    residual = torch.randint(0, 256, (2, 70, 33, 35), generator=g, dtype=torch.uint8)
    residual = residual.contiguous(memory_format=torch.channels_last)
    large = torch.randint(0, 255, (2, 64, 70, 66), generator=g, dtype=torch.uint8)
    large = large.contiguous(memory_format=torch.channels_last)
    table = randint8((256,), generator=g)
    ops = {
        "quantize": lambda: F.quantize(x, 0.03, -5),
        "quantize per channel": lambda: F.quantize(x, channel_scale, channel_zp, axis=1),
        "quantize bfloat16": lambda: F.quantize(x.bfloat16(), 0.03, -5),
        "dequantize": lambda: F.dequantize(q, 0.03, -5),
        "dequantize to bfloat16": lambda: F.dequantize(q, 0.03, -5, dtype=torch.bfloat16),
        "fake_quantize": lambda: F.fake_quantize(x, 0.03, -5),
        "fake_quantize per channel": lambda: F.fake_quantize(x, channel_scale, channel_zp, axis=1),
        "quantize_per_token": lambda: F.quantize_per_token(x[:, :256].repeat(1, 2)),
        "int8_mm": lambda: F.int8_mm(a, w.t()),
        "int8_mm over k = 0": lambda: F.int8_mm(a[:, :0], w.t()[:0]),
        "int8_linear": lambda: F.int8_linear(x_q, 0.02, 128, w_packed, w_sum, w_scale, out_features=259),
        "int8_linear to uint8": lambda: F.int8_linear(x_q, 0.02, 128, w_packed, w_sum, w_scale, out_features=259,
                                                      out_dtype=torch.uint8, out_scale=0.5),
        "int8_linear to bfloat16": lambda: F.int8_linear(x_q, 0.02, 128, w_packed, w_sum, w_scale, out_features=259,
                                                         out_dtype=torch.bfloat16),
        "dynamic_int8_linear": lambda: F.dynamic_int8_linear(x[:, :67], w_packed, w_sum, w_scale, out_features=259),
        "dynamic_int8_linear with GELU": lambda: F.dynamic_int8_linear(x[:, :67], w_packed, w_sum, w_scale,
                                                                       out_features=259, activation="gelu"),
        "int8_conv2d": lambda: F.int8_conv2d(image, 0.02, 9, packed, conv_sum, conv_scale, out_channels=70,
                                             kernel_size=(3, 3), padding=(1, 1)),
        "int8_conv2d + residual + ReLU to uint8": lambda: F.int8_conv2d(
            image, 0.02, 9, packed, conv_sum, conv_scale, out_channels=70, kernel_size=(3, 3), padding=(1, 1),
            out_dtype=torch.uint8, out_scale=0.3, residual=residual, residual_scale=0.1, residual_zero_point=4,
            relu=True),
        "quantized_add": lambda: F.quantized_add(image, 0.1, 3, other, 0.2, 5),
        "quantized_mul broadcast": lambda: F.quantized_mul(image, 0.1, 3, row, 0.2, 5, out_dtype=torch.uint8,
                                                           out_scale=0.25),
        "quantized_mul": lambda: F.quantized_mul(image, 0.1, 3, other, 0.2, 5),
        "quantized_lookup": lambda: F.quantized_lookup(image, table),
        "quantized_max_pool2d": lambda: F.quantized_max_pool2d(large, 3, 2, 1),
        "quantized_avg_pool2d": lambda: F.quantized_avg_pool2d(large, 0.1, 3, 3, 1, 1),
        "quantized_adaptive_avg_pool2d": lambda: F.quantized_adaptive_avg_pool2d(large, 0.1, 3, (20, 30)),
    }
    for name, make in ops.items():
        try:
            assert_writes_reused_blocks(make)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


def test_the_limit_keeps_the_most_recently_freed_blocks():
    tq.set_cpu_output_cache(1 * MIB)
    outputs = [F.quantize(torch.randn(512 * 1024), 0.1, 0) for _ in range(4)]  # 512 KiB each
    addresses = [o.data_ptr() for o in outputs]
    while outputs:  # freed in the order made
        outputs.pop(0)
    info = tq.cpu_output_cache_info()
    assert info["limit"] == MIB and info["cached_bytes"] == MIB and info["cached_blocks"] == 2
    # the two freed last are kept; the next outputs take the most recently freed first
    again = [F.quantize(torch.randn(512 * 1024), 0.1, 0) for _ in range(2)]
    assert [o.data_ptr() for o in again] == addresses[:1:-1]
    del again
    tq.set_cpu_output_cache(0)
    assert tq.cpu_output_cache_info()["cached_bytes"] == 0
    kept_none = F.quantize(torch.randn(512 * 1024), 0.1, 0)
    del kept_none
    assert tq.cpu_output_cache_info()["cached_blocks"] == 0


def test_a_block_over_the_limit_is_not_kept():
    tq.set_cpu_output_cache(0)
    tq.set_cpu_output_cache(256 * 1024)
    out = F.dequantize(torch.zeros(128 * 1024, dtype=torch.int8), 0.5)  # 512 KiB
    del out
    assert tq.cpu_output_cache_info()["cached_bytes"] == 0


@pytest.mark.parametrize("limit, error, message", [(-1, ValueError, "max_bytes must be >= 0, got -1"),
                                                    (1.5, TypeError, "max_bytes must be an int, got float"),
                                                    (True, TypeError, "max_bytes must be an int, got bool")])
def test_bad_limit(limit, error, message):
    with pytest.raises(error, match=message):
        tq.set_cpu_output_cache(limit)


def test_failed_output_allocation_is_a_memory_error():
    # [2^22, 1] @ [1, 2^23 + 8]: small operands, an int32 output of 2^47 + 2^27 bytes, past any address space (and
    # inside a size class of 2^47 + 2^44); with blocks kept, they are let go before the second try (which fails
    # too); every op works afterwards
    a, b = torch.ones(2**22, 1, dtype=torch.int8), torch.ones(1, 2**23 + 8, dtype=torch.int8)
    for limit in (64 * MIB, 0):
        tq.set_cpu_output_cache(limit)
        kept = F.quantize(torch.randn(512, 257), 0.02, 3)
        del kept
        assert (tq.cpu_output_cache_info()["cached_bytes"] > 0) == (limit > 0)
        with pytest.raises(MemoryError, match=f"torchquant: out of memory for an output of {2**47 + 2**27} bytes"):
            F.int8_mm(a, b)
        assert tq.cpu_output_cache_info()["cached_bytes"] == 0
        small_a, small_b = randint8((70, 33), 1), randint8((33, 90), 2)
        assert_same(F.int8_mm(small_a, small_b), small_a.int() @ small_b.int())


def test_cached_output_with_torch_storage_operations():
    x = torch.randn(100_000)
    out = F.quantize(x, 0.05, 0)
    expected = out.clone()
    address = out.data_ptr()
    out.resize_(300_000)  # a new storage from the same allocator, the values copied over
    assert out.data_ptr() != address
    assert_same(out[:100_000], expected)

    out = F.quantize(x, 0.05, 0)
    lazy = out._lazy_clone()  # copy-on-write: the DataPtr's context must be its data pointer
    assert_same(lazy, expected)
    out.add_(1)  # the write materializes a copy
    assert_same(lazy, expected)

    out = F.quantize(x, 0.05, 0)
    out.share_memory_()
    assert out.is_shared()
    assert_same(out, expected)

    out = F.quantize(x, 0.05, 0)
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    assert_same(torch.load(buffer), expected)
    assert (out.numpy() == expected.numpy()).all()


def test_outputs_made_on_some_threads_and_freed_on_others():
    x = torch.randn(64, 4096)
    expected = ref.quantize(x, torch.tensor(0.01), torch.tensor(0))
    made = queue.Queue(maxsize=8)
    makers = 2
    wrong = []

    def make():
        for _ in range(200):
            made.put(F.quantize(x, 0.01, 0))
        made.put(None)

    def check_and_free():
        ended = 0
        while ended < makers:
            out = made.get()
            if out is None:
                ended += 1
            elif not torch.equal(out, expected):
                wrong.append(out)
            del out  # freed on this thread

    threads = [threading.Thread(target=make) for _ in range(makers)] + [threading.Thread(target=check_and_free)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    info = tq.cpu_output_cache_info()
    assert 0 < info["cached_bytes"] <= info["limit"]


def wait_for_child(pid: int, seconds: float = 60) -> int:
    """The forked child's exit status (-1 killed by a signal), killing it first if it runs past seconds."""
    deadline = time.monotonic() + seconds
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if waited[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"a forked child did not finish in {seconds} s")
    return os.WEXITSTATUS(waited[1]) if os.WIFEXITED(waited[1]) else -1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_children_forked_while_another_thread_makes_outputs():
    x = torch.randn(256, 1024)
    expected = ref.quantize(x, torch.tensor(0.02), torch.tensor(0))
    stop = threading.Event()

    def churn():  # outputs made and freed without the GIL while the main thread forks
        while not stop.is_set():
            F.quantize(x, 0.02, 0)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        statuses = []
        for _ in range(10):
            pid = os.fork()
            if pid == 0:  # the child: exit status 0 only if its outputs are right
                torch.set_num_threads(1)  # (OpenMP's threads do not survive a fork: a DataLoader worker does the same)
                ok = all(torch.equal(F.quantize(x, 0.02, 0), expected) for _ in range(3))
                os._exit(0 if ok else 1)
            statuses.append(wait_for_child(pid))
    finally:
        stop.set()
        thread.join()
    assert statuses == [0] * 10

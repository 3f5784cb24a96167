"""Quantization-aware training under DistributedDataParallel (gloo, 2 CPU processes)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import load_file, save_file

import torchquant as tq
from torchquant import QuantConfig, QuantSpec
from torchquant.nn import QuantLinear

WORLD = 2
CONFIG = QuantConfig(QuantSpec(bits=4, learn_scale=True),
                     QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", learn_scale=True))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(folded=False):
    torch.manual_seed(0)
    if folded:  # the BatchNorm folds into the first layer (batch statistics in training)
        float_model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 1))
        return tq.prepare(float_model, "int8-static")
    return nn.Sequential(QuantLinear(6, 12, config=CONFIG), nn.ReLU(), QuantLinear(12, 1, config=CONFIG))


def _rank_data(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(16, 6, generator=g) * (1 + rank)  # ranks see different ranges
    return x, x[:, :1] - x[:, 1:2]


def _train(rank, port, out_dir, folded=False):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(_model(folded))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(4):
            x, y = _rank_data(rank, step)
            loss = (model(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v.detach().contiguous() for k, v in model.module.state_dict().items()}
        save_file(state, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def _rank_main(rank, port, out_dir, folded=False):
    _train(rank, port, out_dir, folded)
    # A rank that trained ends without interpreter shutdown: a gloo worker thread may still be freeing its last
    # work item, whose captured thread-local state holds a Python object (torch.autograd.backward stashes one in
    # the thread's state), and its decref during finalization aborts the process ("terminate called without an
    # active exception"): a PyTorch teardown race, whatever the model. A failing rank raises and exits as usual.
    os._exit(0)


def test_qat_under_ddp_agrees_across_ranks(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, msg=key)
    # the first layer's observer saw the global range of both ranks' inputs
    inputs = torch.cat([_rank_data(r, s)[0] for r in range(WORLD) for s in range(4)])
    assert states[0]["0.input_quantizer.observer.lo"].item() == inputs.min().item()
    assert states[0]["0.input_quantizer.observer.hi"].item() == inputs.max().item()
    initial = _model()[0].weight_quantizer
    assert not torch.equal(states[0]["0.weight_quantizer.scale"], initial.scale.detach())  # learned, and moved


def test_qat_with_a_folded_batchnorm_under_ddp_agrees_across_ranks(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path), True), nprocs=WORLD, join=True)
    states = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    initial = _model(folded=True)
    assert states[0].keys() == states[1].keys() == initial.state_dict().keys()
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var"} <= states[0].keys()  # the BatchNorm's names
    for key, param in initial.named_parameters():  # gradients (the BatchNorm's too) are averaged across ranks
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, msg=key)
        # the bias before the BatchNorm cancels in the normalization: its gradient is zero
        assert torch.equal(states[0][key], param.detach()) == (key == "0.bias"), key
    # running statistics: each rank's own last batch, as for a BatchNorm under DDP
    assert not torch.equal(states[0]["1.running_mean"], initial[1].running_mean)

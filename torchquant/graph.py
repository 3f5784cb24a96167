"""The integer pipeline: a static-activation model traced with torch.fx and run on integers between its layers.

prepare_pipeline traces the float model (torch.fx symbolic tracing), swaps its Conv2d/Conv1d/Linear layers for
quantized ones and folds their BatchNorms (as the module swap does), and finds these patterns on the graph:

- layer [+ folded BatchNorm] [+ ReLU / ReLU6 / hardtanh, as a module, F.relu, torch.relu or Tensor.relu]: one
  integer kernel whose epilogue applies the BatchNorm (folded into weight and bias) and the activation (the
  layer's activation clamp, which its fake-quant forward applies too), then writes the output requantized to
  uint8/int8;
- a + b / torch.add(a, b) of two tensors [+ ReLU]: one integer add (torchquant.functional.quantized_add) that
  reads both quantized inputs and writes its requantized output; where one input is a conv layer's output that
  the add alone reads and the other an integer tensor (a residual block), the add [+ ReLU] becomes that conv's
  epilogue instead (int8_conv2d's residual form: the conv's float32 output plus the dequantized other input,
  requantized once), and the conv's output gets no quantizer of its own;
- max-pool (a global one, adaptive to size 1 or of the input's size read from its shape, as torch.amax), maxima and
  minima (amax / amin, x.max(), x.max(dim)[0] whose indices nothing reads, as torch.amax), flatten, reshape/view,
  squeeze/unsqueeze, transpose/permute/movedim/.T/.mT, indexing and slicing, flip/roll/narrow/select/repeat/tile/
  expand, chunk/split/tensor_split/unbind read by indexing, nearest-neighbour upsampling (int8 ones through
  float32, exact: torch has no int8 kernel for it), padding (F.pad, nn.ZeroPad2d and the other padding modules:
  reflect / replicate / circular copy values, zeros are the zero point; a nonzero constant, which may lie off the
  integers' grid, stays float), a ReLU after an integer tensor, nn.Identity, dropout
  modules (the identity in evaluation, which is what a converted model runs): run on the integers (they keep the
  scale); torch.cat / torch.stack of integer tensors: its inputs share one scale (one quantizer observes them all),
  so the concatenation runs on the integers too;
- a * b / torch.mul(a, b) / a.mul(b) of two integer tensors (a squeeze-excitation block's x * gate, broadcast):
  one integer product (torchquant.functional.quantized_mul) that reads both quantized inputs and writes its
  requantized output;
- an element-wise activation (hardswish, hardsigmoid, SiLU, sigmoid, tanh, GELU, ELU, leaky ReLU, Mish, softplus and
  the others of _LOOKUP_MODULES / _LOOKUP_FUNCTIONS / _LOOKUP_METHODS, as modules, functions or tensor methods, in
  place or not) of an integer tensor whose output an integer op reads: a 256-entry table lookup
  (torchquant.functional.quantized_lookup) from its input's integers to its output's, which get a quantizer of their
  own; the table is the activation itself run on the 256 dequantized input values, then quantized;
- a global average pool (adaptive to size 1), a mean over given dims, an average pool of a fixed window
  (nn.AvgPool1d / 2d, F.avg_pool1d / 2d: any padding, ceil_mode, count_include_pad or divisor_override) and an
  adaptive average pool to other sizes (nn.AdaptiveAvgPool1d / 2d, F.adaptive_avg_pool1d / 2d) of an integer tensor
  whose output an integer op reads: exact sums of the integers, then scaled, divided and requantized to an output
  quantizer of its own (integer_mean, integer_avg_pool, integer_adaptive_avg_pool);
- everything else runs in float: its integer inputs are dequantized and its output, where an integer op reads it,
  quantized again.

Every integer tensor of the pipeline has one activation quantizer (an ActivationQuantizer under `act_quant`): the
prepared model fake-quantizes each tensor with it exactly where the converted model quantizes (after a fused
activation, at an add's output, at the model's input), so calibration and quantization-aware training see the
function that runs; in evaluation its means and average pools of integer tensors sum the integers as the converted
ones do (exact_average). convert_pipeline then rewrites the graph: producers write integers at their consumers' scale,
the input is quantized once and the outputs are dequantized once (or returned as integers with
QuantConfig.integer_output).

A model that torch.fx cannot trace falls back to the module swap, with one warning that says why; so does one whose
forward reads a module's `training` flag (the graph would keep the mode it was traced in). Arguments of the forward
that default to None are traced as None (the pipeline refuses a call that passes one); a layer whose tensors the
forward reads itself (tied weights) stays float; adds and concatenations of bool or integer tensors (masks, indices)
stay float ops.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import inspect
import math
import operator
import warnings
from collections import Counter
from typing import Dict, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from torchquant import functional as F_q
from torchquant._ops import FLOAT_DTYPES
from torchquant._ops.elementwise import _MAX_EXACT_WINDOW  # the largest window quantized_avg_pool2d sums exactly
from torchquant.config import QuantConfig
from torchquant.fold import SEQUENTIAL_FOLDING, _Tracer, has_foldable_bn, has_forward_hooks
from torchquant.nn import quant_type
from torchquant.nn.base import QuantLayerBase, quant_layers, warn_if_gradient_cut
from torchquant.nn.conv import QuantConv2d, contiguous_output
from torchquant.nn.quantizers import InputQuantizer

ACT_QUANT = "act_quant"  # the ModuleDict of a pipeline's activation quantizers
META_KEY = "torchquant"  # GraphModule.meta entry of a pipeline: its options

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
# max-pool modules and functions, with the integer op that runs each
_MAX_POOLS = {nn.MaxPool1d: F_q.quantized_max_pool1d, nn.MaxPool2d: F_q.quantized_max_pool2d}
_MAX_POOL_FUNCTIONS = {F.max_pool1d: F_q.quantized_max_pool1d, torch.max_pool1d: F_q.quantized_max_pool1d,
                       F.max_pool2d: F_q.quantized_max_pool2d, torch.max_pool2d: F_q.quantized_max_pool2d}
# max-pools that can be global (adaptive ones to size 1), with the number of dims they pool
_ADAPTIVE_MAX_POOLS = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2}
_ADAPTIVE_MAX_POOL_FUNCTIONS = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2}
_ADAPTIVE_AVG_POOLS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2}
_ADAPTIVE_AVG_POOL_FUNCTIONS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2}
_POOLED_DIMS = {F_q.quantized_max_pool1d: 1, F_q.quantized_max_pool2d: 2}
# nearest-neighbour upsampling copies values: it runs on uint8 integers as it is (torch has no int8 kernel)
_UPSAMPLE_FUNCTIONS = (F.interpolate, F.upsample, F.upsample_nearest)
_NEAREST_MODES = ("nearest", "nearest-exact")
# ops that move or regroup a tensor's values without changing them: they run on the integers as they are (and
# indexing or slicing: operator.getitem of a tensor); functions and tensor methods, by the planning rule that brought
# them in (None: from the start)
_PASSTHROUGHS = {
    None: (torch.flatten, torch.reshape, "flatten", "reshape", "view", "contiguous"),
    "integer_views": (torch.unflatten, torch.squeeze, torch.unsqueeze, torch.transpose, torch.swapaxes, torch.swapdims,
                      torch.t, torch.permute, torch.movedim, torch.moveaxis, "unflatten", "squeeze", "unsqueeze",
                      "transpose", "swapaxes", "swapdims", "t", "permute", "movedim", "moveaxis"),
    "integer_indexing": (torch.flip, torch.roll, torch.narrow, torch.select, torch.tile, operator.getitem, "flip",
                         "roll", "narrow", "select", "tile", "repeat", "expand")}
_PASSTHROUGH_RULE = {op: rule for rule, ops in _PASSTHROUGHS.items() for op in ops}
# ops that split a tensor into a tuple of tensors: passthroughs where only indexing reads the tuple (x.chunk(2, 1))
_SPLIT_FUNCTIONS = (torch.chunk, torch.split, torch.tensor_split, torch.unbind)
_SPLIT_METHODS = ("chunk", "split", "tensor_split", "unbind")
_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate, torch.stack)
_PASSTHROUGH_ATTRIBUTES = ("T", "mT")
# padding modules by the F.pad mode they run (the constant ones pad with their `value`)
_PAD_MODULES = {**{m: "constant" for m in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
                                           nn.ConstantPad2d, nn.ConstantPad3d)},
                **{m: "reflect" for m in (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)},
                **{m: "replicate" for m in (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)},
                **{m: "circular" for m in (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)}}
# shape queries: attributes an integer tensor shares with its float tensor (not dtype, nor any tensor-valued one)
_SHAPE_ATTRIBUTES = ("shape", "ndim", "device", "is_cuda", "is_cpu")
_SHAPE_METHODS = ("size", "dim")
_AVG_POOLS = (nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.adaptive_avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool2d)
# average pools of a fixed window (the number of dims they pool), which run on integers (integer_avg_pool)
_WINDOW_AVG_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2}
_WINDOW_AVG_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2}
_AVG_POOL_ARGUMENTS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_PASSTHROUGH_MODULES = (nn.Flatten, nn.Identity)
_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                       operator.irshift)
_IN_PLACE_DUNDERS = {f"__{op.__name__}__" for op in _IN_PLACE_OPERATORS}  # y.__iadd__(t), ...
# ops whose result may share its input's memory
_VIEW_METHODS = ("view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "narrow", "select", "transpose",
                 "swapaxes", "t", "permute", "movedim", "expand", "expand_as", "squeeze", "unsqueeze", "diagonal",
                 "unfold", "as_strided", "detach", "split", "chunk", "unbind", "contiguous", "swapdims", "moveaxis")
_VIEW_FUNCTIONS = (operator.getitem, torch.flatten, torch.reshape, torch.narrow, torch.select, torch.transpose,
                   torch.swapaxes, torch.t, torch.permute, torch.movedim, torch.squeeze, torch.unsqueeze,
                   torch.diagonal, torch.as_strided, torch.detach, torch.split, torch.chunk, torch.unbind,
                   torch.swapdims, torch.moveaxis, torch.unflatten)
# element-wise activations that run as table lookups on integers (a ReLU6 / hardtanh that no layer's epilogue fuses
# among them; a plain ReLU keeps its integer clamp)
_LOOKUP_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.CELU, nn.SELU,
                   nn.LeakyReLU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink,
                   nn.Softshrink, nn.ReLU6, nn.Hardtanh)
_LOOKUP_FUNCTIONS = (F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.elu, F.elu_, F.celu, F.selu, F.leaky_relu,
                     F.leaky_relu_, F.mish, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.hardshrink,
                     F.softshrink, F.relu6, F.hardtanh, F.hardtanh_, torch.sigmoid, torch.sigmoid_, torch.tanh,
                     torch.tanh_)
_LOOKUP_METHODS = {"sigmoid": torch.sigmoid, "sigmoid_": torch.sigmoid, "tanh": torch.tanh, "tanh_": torch.tanh}
LOOKUP_TABLES = "lookup_tables"  # the module holding a converted pipeline's lookup tables (buffers)


class ActivationQuantizer(InputQuantizer):
    """The static quantizer of one integer tensor of a pipeline: fake-quantizes it in the prepared model, holds
    its scale and zero point in the converted one. `qparams` caches them as the kernels take them (float32 scale
    tensor [1], scale as a Python float, zero point as a Python int, storage dtype), refreshed whenever they change
    (convert, load, move), so the converted forward never reads a tensor value."""

    def __init__(self, spec):
        super().__init__(spec, per_token_ok=False)
        self.qparams = None

    def current_qparams(self) -> tuple:
        """The qparams of the scale and zero point as they are now (qparams caches them)."""
        scale = self.scale.detach().reshape(1).float()
        return (scale, float(scale.item()), int(self.zero_point.item()),
                torch.int8 if self.spec.signed else torch.uint8)

    def refresh(self) -> None:
        self.qparams = self.current_qparams()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.qparams is not None and not self.scale.is_meta:  # (meta: no values; a load refreshes them)
            self.refresh()
        return self


class _Pipeline(fx.GraphModule):
    """A pipeline's GraphModule. Unpickling (pickle, torch.save) rebuilds a GraphModule from its code: a plain one,
    without the meta and load_state_dict hooks that make it a pipeline, which _unpickled_pipeline puts back."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # a cast of the model (half(), to(torch.bfloat16)) maps float32 and float16 alike: the converted graph's
        # float outputs take that dtype too, as the float ops reading them (and the caller) expect
        dtype = fn(torch.empty(0)).dtype
        if (self.meta.get(META_KEY, {}).get("converted") and dtype in FLOAT_DTYPES
                and fn(torch.empty(0, dtype=torch.float16)).dtype == dtype):
            for node in self.graph.nodes:
                if node.target in _FLOAT_DTYPE_ARG:
                    node.update_arg(_FLOAT_DTYPE_ARG[node.target], dtype)
            self.recompile()
        return self

    def __reduce__(self):
        rebuild, (body, import_block) = super().__reduce__()
        body["_graphmodule_cls_name"] = type(self).__name__  # the model's class name (fx's pickling drops it)
        # the pre-hooks without their reference to this module (pickled, it would be another module)
        pre_hooks = [(h.hook, h.with_module) for h in body.pop("_load_state_dict_pre_hooks").values()]
        return (_unpickled_pipeline, (rebuild, body, import_block, pre_hooks))


def _unpickled_pipeline(rebuild, body: dict, import_block: str, pre_hooks: list) -> _Pipeline:
    plain = rebuild(body, import_block)
    gm = _Pipeline(plain, plain.graph, class_name=type(plain).__name__)
    # the modules as pickled: a GraphModule keeps only those its code reads (not the quantizers of lookup outputs,
    # which their tables hold), in new plain containers (act_quant is a ModuleDict)
    gm._modules.clear()
    gm._modules.update(body["_modules"])
    gm.meta = body["meta"]
    gm.training = body["training"]
    for hook, with_module in pre_hooks:
        gm._register_load_state_dict_pre_hook(hook, with_module=with_module)
    for hook in body["_load_state_dict_post_hooks"].values():
        gm.register_load_state_dict_post_hook(hook)
    return gm


def is_pipeline(model: nn.Module) -> bool:
    """Whether model was made by prepare_pipeline (prepared or converted)."""
    return isinstance(model, fx.GraphModule) and META_KEY in getattr(model, "meta", {})


def _meta(model: fx.GraphModule) -> dict:
    return model.meta[META_KEY]


# ---------------------------------------------------------------------------------------------------------------
# pattern matching

def _constant_args(node: fx.Node, skip: int = 1) -> bool:
    return not any(isinstance(a, fx.Node) for a in (*node.args[skip:], *node.kwargs.values()))


def activation_clamp(node: fx.Node, modules: dict) -> Optional[tuple]:
    """(clamp_min, clamp_max) (each a float or None) of a ReLU / ReLU6 / hardtanh node applied to its first
    argument, None for anything else."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) is nn.ReLU:
            return (0.0, None)
        if type(m) in (nn.ReLU6, nn.Hardtanh):
            return (float(m.min_val), float(m.max_val))
        return None
    if not node.args or not _constant_args(node):
        return None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return (0.0, None)
        if node.target is F.relu6:
            return (0.0, 6.0)
        if node.target is F.hardtanh:
            bounds = dict(zip(("min_val", "max_val"), node.args[1:3]), **node.kwargs)
            low, high = bounds.get("min_val", -1.0), bounds.get("max_val", 1.0)
            return (float(low), float(high))
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return (0.0, None)
    return None


def lookup_function(node: fx.Node, modules: dict):
    """The float function (tensor -> tensor) of an element-wise activation node that an integer pipeline runs as a
    table lookup (of its first argument, the other arguments constant), None for anything else."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return m if type(m) in _LOOKUP_MODULES and len(node.args) == 1 and not node.kwargs else None
    if not node.args or not isinstance(node.args[0], fx.Node) or not _constant_args(node):
        return None
    if node.op == "call_function" and node.target in _LOOKUP_FUNCTIONS:
        return lambda x: node.target(x, *node.args[1:], **node.kwargs)
    if node.op == "call_method" and node.target in _LOOKUP_METHODS and len(node.args) == 1 and not node.kwargs:
        return _LOOKUP_METHODS[node.target]
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fake_quant_after(node: fx.Node) -> Optional[fx.Node]:
    """The activation quantizer's call that alone reads node (a prepared pipeline's fake-quant), or None."""
    user = _only_user(node)
    if user is not None and user.op == "call_module" and user.target.startswith(ACT_QUANT + "."):
        return user
    return None


def layer_chain(node: fx.Node, modules: dict, calls: Counter) -> Optional[list]:
    """[layer node, folded BatchNorm node?] for a pipeline layer's call (a quantized layer called once in the
    graph), else None."""
    if node.op != "call_module" or calls[node.target] != 1:
        return None
    layer = modules.get(node.target)
    if not isinstance(layer, QuantLayerBase) or len(node.args) != 1 or node.kwargs:
        return None
    user = _only_user(node)
    if user is not None and layer.folded_bn is not None and user.op == "call_module" and user.target == layer.folded_bn:
        return [node, user]
    return [node]


def _fuse_activations(graph: fx.Graph, modules: dict) -> None:
    """A ReLU / ReLU6 / hardtanh that alone reads a pipeline layer's output (after its folded BatchNorm) becomes the
    layer's activation clamp (QuantLayerBase.set_activation_clamp: in the fake-quant forward and the integer
    kernels' epilogue) and leaves the graph."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        chain = layer_chain(node, modules, calls)
        if chain is None:
            continue
        layer, user = modules[node.target], _only_user(chain[-1])
        if user is None or not user.args or user.args[0] is not chain[-1] or (layer.clamp_min, layer.clamp_max) != (
                None, None):
            continue
        clamp = activation_clamp(user, modules)
        if clamp is not None:
            layer.set_activation_clamp(*clamp)
            user.replace_all_uses_with(chain[-1])
            graph.erase_node(user)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in ("add", "add_"):
        pass
    else:
        return False
    return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def _is_mul(node: fx.Node) -> bool:
    """A product of two tensors or values (which of them are tensors, the planning asks): a * b, torch.mul(a, b),
    a.mul(b), in place or not."""
    if not (node.op == "call_function" and node.target in _MUL_FUNCTIONS
            or node.op == "call_method" and node.target in ("mul", "mul_")):
        return False
    return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def _chain_ending_at(node: fx.Node, modules: dict, calls: Counter) -> Optional[list]:
    """The layer chain (layer_chain) whose last node is node, if any."""
    if node.op != "call_module":
        return None
    chain = layer_chain(node, modules, calls)
    if chain is None and node.args and isinstance(node.args[0], fx.Node):
        chain = layer_chain(node.args[0], modules, calls)  # node: a folded BatchNorm
    return chain if chain is not None and chain[-1] is node else None


def residual_conv(add: fx.Node, modules: dict, calls: Counter, is_integer) -> Optional[tuple[list, fx.Node]]:
    """(conv chain, the other input) when the add's epilogue form applies: an input of the add (the first that
    qualifies) is the output of a pipeline conv (QuantConv2d / QuantConv1d) chain that the add alone reads, and the
    other input is a different node for which is_integer holds."""
    for i, value in enumerate(add.args):
        other = add.args[1 - i]
        chain = _chain_ending_at(value, modules, calls)
        if (chain is not None and isinstance(modules[chain[0].target], QuantConv2d) and _only_user(value) is add
                and other is not value and is_integer(other)):
            return chain, other
    return None


def _fused_relu(node: fx.Node, modules: dict) -> Optional[fx.Node]:
    """The ReLU that is the only user of node, if any (an add fuses a plain ReLU only)."""
    user = _only_user(node)
    if user is not None and user.args and user.args[0] is node and activation_clamp(user, modules) == (0.0, None):
        return user
    return None


def _is_max_pool(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        m = modules.get(node.target)
        found = type(m) in _MAX_POOLS and not m.return_indices
    else:
        found = (node.op == "call_function" and node.target in _MAX_POOL_FUNCTIONS and _constant_args(node)
                 and not _given_arguments(node, _MAX_POOL_ARGUMENTS).get("return_indices", False))
    return found and (_POOLED_DIMS[_integer_max_pool(node, modules)] == 2 or _RULES.get()["integer_max_pool1d"])


def _spatial_dims(arg, x: fx.Node, n: int) -> Optional[tuple]:
    """The dims of x whose sizes arg is, read from x's shape, when they are the pooled dims of an n-d pool: x.size(2)
    / x.shape[2] / x.size()[-1] ... for n = 1, x.shape[2:] / x.size()[-2:] / (x.size(2), x.size(3)) for n = 2; None
    otherwise. Positive dims stay positive: on an unbatched input x.shape[2:] is (W,), which a 2-d pool takes as a W x W
    window, and amax over dims (2, 3) then fails as the pool's float model does not, rather than pooling otherwise."""
    def dim_of(v):  # the dim (or slice of dims) of x whose size v is, or None
        if isinstance(v, fx.Node) and v.op == "call_method" and v.target == "size" and len(v.args) == 2:
            return v.args[1] if v.args[0] is x else None
        if isinstance(v, fx.Node) and v.op == "call_function" and v.target is operator.getitem:
            shape, index = v.args
            return index if _is_shape_of(shape, x) else None
        return None

    positive, negative = tuple(range(2, 2 + n)), tuple(range(-n, 0))
    if isinstance(arg, (tuple, list)):
        dims = tuple(dim_of(v) for v in arg)
    else:
        dim = dim_of(arg)  # (slices are not hashable before Python 3.12)
        dims = (dim,) if n == 1 else positive if dim == slice(2, None) else negative if dim == slice(-2, None) else None
    return dims if dims in (positive, negative) else None


def _is_shape_of(node, x: fx.Node) -> bool:
    """x.shape or x.size()."""
    return isinstance(node, fx.Node) and node.args[:1] == (x,) and (
        _is_attribute(node, ("shape",))
        or node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs)


def _all_ones(size, n: int) -> bool:
    """Whether an adaptive pool's output_size is 1 in each of its n dims."""
    return size == 1 or isinstance(size, (tuple, list)) and tuple(size) == (1,) * n


def _global_max_pool_dims(node: fx.Node, modules: dict) -> Optional[tuple]:
    """The dims of a max-pool whose window is its whole input (adaptive to size 1, or of the input's own spatial
    size: the text CNN's F.max_pool1d(x, x.size(2))), which runs on integers as torch.amax over them (an integer
    max-pool of that size would take it as a constant); None for anything else."""
    if not _RULES.get()["integer_views"]:
        return None
    if node.op == "call_module":
        m = modules.get(node.target)
        n = _ADAPTIVE_MAX_POOLS.get(type(m))
        global_pool = n is not None and not m.return_indices and _all_ones(m.output_size, n)
        return tuple(range(-n, 0)) if global_pool else None
    if node.op != "call_function" or not node.args:
        return None
    if node.target in _ADAPTIVE_MAX_POOL_FUNCTIONS and _constant_args(node):
        n = _ADAPTIVE_MAX_POOL_FUNCTIONS[node.target]
        given = _given_arguments(node, ("output_size", "return_indices"))
        global_pool = not given.get("return_indices", False) and _all_ones(given.get("output_size"), n)
        return tuple(range(-n, 0)) if global_pool else None
    if node.target not in _MAX_POOL_FUNCTIONS:
        return None
    n = _POOLED_DIMS[_MAX_POOL_FUNCTIONS[node.target]]
    given = _given_arguments(node, _MAX_POOL_ARGUMENTS)
    dims = _spatial_dims(given.get("kernel_size"), node.args[0], n)
    stride = given.get("stride")
    global_pool = (dims is not None and (stride is None or _spatial_dims(stride, node.args[0], n) == dims)
                   and given.get("padding", 0) in (0, (0,) * n, [0] * n)
                   and given.get("dilation", 1) in (1, (1,) * n, [1] * n)
                   and not given.get("return_indices", False))
    return dims if global_pool else None


def _adaptive_avg_pool(node: fx.Node, modules: dict) -> Optional[tuple[int, object]]:
    """(pooled dims, output_size as given) of an adaptive average pool: nn.AdaptiveAvgPool1d / 2d, or
    F.adaptive_avg_pool1d / 2d with constant arguments; None for any other node."""
    if node.op == "call_module":
        m = modules.get(node.target)
        n = _ADAPTIVE_AVG_POOLS.get(type(m))
        return None if n is None else (n, m.output_size)
    if node.op == "call_function" and node.target in _ADAPTIVE_AVG_POOL_FUNCTIONS and _constant_args(node):
        return _ADAPTIVE_AVG_POOL_FUNCTIONS[node.target], _given_arguments(node, ("output_size",)).get("output_size")
    return None


def _integer_mean_args(node: fx.Node, modules: dict) -> Optional[tuple[tuple, bool]]:
    """(dims, keepdim) of a mean that reads integers and requantizes (integer_mean): an adaptive average pool to
    size 1 (a classifier's global average pool) or x.mean(dims[, keepdim]) / torch.mean over given dims (a
    squeeze-excitation block's); None for any other node."""
    if not _RULES.get()["integer_means"]:
        return None
    pool = _adaptive_avg_pool(node, modules)
    if pool is not None:
        n, size = pool
        return (tuple(range(-n, 0)), True) if _all_ones(size, n) else None
    is_mean = (node.op == "call_method" and node.target == "mean"
               or node.op == "call_function" and node.target is torch.mean)
    if is_mean and _constant_args(node):
        given = _given_arguments(node, ("dim", "keepdim"))
        dim, keepdim = given.pop("dim", None), given.pop("keepdim", False)
        dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (tuple, list)) else None
        if dims and all(isinstance(d, int) for d in dims) and isinstance(keepdim, bool) and not given:
            return dims, keepdim
    return None


def _integer_avg_pool_args(node: fx.Node, modules: dict) -> Optional[tuple]:
    """(kernel_size, stride, padding (each a tuple of one int per pooled dim), ceil_mode, count_include_pad,
    divisor_override) of an average pool that reads integers and requantizes (integer_avg_pool): nn.AvgPool1d / 2d,
    F.avg_pool1d / 2d with constant arguments; None for any other node (and a window too large for exact sums)."""
    if not _RULES.get()["integer_avg_pools"]:
        return None
    if node.op == "call_module":
        m = modules.get(node.target)
        n = _WINDOW_AVG_POOLS.get(type(m))
        given = {} if n is None else {name: getattr(m, name, None) for name in _AVG_POOL_ARGUMENTS}
    elif node.op == "call_function" and node.target in _WINDOW_AVG_POOL_FUNCTIONS and _constant_args(node):
        n = _WINDOW_AVG_POOL_FUNCTIONS[node.target]
        given = _given_arguments(node, _AVG_POOL_ARGUMENTS)
    else:
        return None
    if n is None:
        return None
    kernel = _n_ints(given.get("kernel_size"), n)
    stride = kernel if given.get("stride") in (None, (), []) else _n_ints(given["stride"], n)
    padding = _n_ints(given.get("padding", 0), n)
    divisor = given.get("divisor_override")
    if kernel is None or stride is None or padding is None or math.prod(kernel) > _MAX_EXACT_WINDOW:
        return None
    return (kernel, stride, padding, bool(given.get("ceil_mode", False)),
            bool(given.get("count_include_pad", True)), None if divisor is None else int(divisor))


def _integer_adaptive_avg_pool_args(node: fx.Node, modules: dict) -> Optional[tuple]:
    """(output_size,) of an adaptive average pool to a size other than 1 that reads integers and requantizes
    (integer_adaptive_avg_pool): nn.AdaptiveAvgPool1d / 2d, F.adaptive_avg_pool1d / 2d with a constant output size,
    as a tuple of one int or None (the input's size) per pooled dim; None for any other node."""
    if not _RULES.get()["integer_adaptive_avg_pools"]:
        return None
    pool = _adaptive_avg_pool(node, modules)
    if pool is None:
        return None
    n, size = pool
    values = tuple(size) if isinstance(size, (tuple, list)) else (size,) * n
    if len(values) != n or not all(v is None or isinstance(v, int) and v >= 0 for v in values):
        return None
    return None if _all_ones(values, n) else (values,)  # (a global pool is integer_mean's)


def _integer_average(node: fx.Node, modules: dict) -> Optional[tuple[str, tuple]]:
    """(kind, arguments) of a mean or an average pool that runs on integers where it reads an integer tensor and its
    output is quantized: kind "mean" (integer_mean), "avg_pool" (integer_avg_pool) or "adaptive_avg_pool"
    (integer_adaptive_avg_pool), the arguments theirs after the input; None for any other node."""
    for kind, arguments in (("mean", _integer_mean_args(node, modules)),
                            ("avg_pool", _integer_avg_pool_args(node, modules)),
                            ("adaptive_avg_pool", _integer_adaptive_avg_pool_args(node, modules))):
        if arguments is not None:
            return kind, arguments
    return None


def _n_ints(value, n: int) -> Optional[tuple]:
    """A pooling argument as a tuple of n ints (an int, or a sequence of one, stands for all n); None if it is not."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(values) == 1:
        values *= n
    return values if len(values) == n and all(isinstance(v, int) for v in values) else None


def _is_nearest_upsample(node: fx.Node, modules: dict) -> bool:
    """nn.Upsample / nn.UpsamplingNearest2d, F.interpolate / F.upsample in a nearest mode, F.upsample_nearest."""
    if not _RULES.get()["integer_views"]:
        return False
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, nn.Upsample) and m.mode in _NEAREST_MODES
    if node.op != "call_function" or node.target not in _UPSAMPLE_FUNCTIONS:
        return False
    mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
    return node.target is F.upsample_nearest or mode in _NEAREST_MODES


def _integer_max_pool(node: fx.Node, modules: dict):
    """The functional.quantized_max_pool1d / 2d that runs a max-pool node on integers."""
    return _MAX_POOLS[type(modules[node.target])] if node.op == "call_module" else _MAX_POOL_FUNCTIONS[node.target]


_MAX_POOL_ARGUMENTS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _given_arguments(node: fx.Node, names: tuple) -> dict:
    """The arguments a function node was called with after its tensor, by name (names: its parameters in order)."""
    return dict(zip(names, node.args[1:]), **node.kwargs)


def _max_pool_arguments(node: fx.Node, modules: dict) -> dict:
    """The pooling arguments of a max-pool node (module or function) as keyword arguments of
    functional.quantized_max_pool1d / 2d."""
    if node.op == "call_module":
        m = modules[node.target]
        return {name: getattr(m, name) for name in _MAX_POOL_ARGUMENTS[:-1]}
    given = _given_arguments(node, _MAX_POOL_ARGUMENTS)
    given.pop("return_indices", None)
    return given


def _in_place(node: fx.Node, modules: dict) -> bool:
    """Whether node writes into its first argument: a tensor method or torch function whose name ends in "_"
    (relu_, mul_, clamp_, copy_, F.elu_, ...), an augmented assignment (+=, *=, ..., or its method called by name:
    y.__iadd__(t)), or an activation module or
    function with inplace=True (by keyword or position)."""
    if node.op == "call_method":
        return (node.target.endswith("_") and not node.target.startswith("_")) or node.target in _IN_PLACE_DUNDERS
    if node.op == "call_function" and (node.target in _IN_PLACE_OPERATORS
                                       or getattr(node.target, "__name__", "").endswith("_")):
        return True
    if activation_clamp(node, modules) is None and lookup_function(node, modules) is None:
        return False
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a Python signature: inplace only by keyword
        return bool(node.kwargs.get("inplace", False))
    return bool(bound.arguments.get("inplace", False))


def _is_attribute(node: fx.Node, names: tuple) -> bool:
    """getattr(x, name) of one of names (x.shape, x.mT, ...)."""
    return (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] in names)


def _is_view(node: fx.Node) -> bool:
    """Whether node's result may share its first argument's memory (y[:, :2], y.flatten(1), y.mT, ...)."""
    return (node.op == "call_method" and node.target in _VIEW_METHODS
            or node.op == "call_function" and node.target in _VIEW_FUNCTIONS
            or _is_attribute(node, _PASSTHROUGH_ATTRIBUTES))


def _aliases(node: fx.Node, modules: dict) -> list:
    """node and the nodes whose results may share its memory: its views, the in-place ops writing into it (which
    return it), and theirs in turn."""
    found, todo = {node: None}, [node]  # (a dict: insertion-ordered, node first)
    while todo:
        for user in todo.pop().users:
            if (user not in found and user.args and isinstance(user.args[0], fx.Node) and user.args[0] in found
                    and (_is_view(user) or _in_place(user, modules))):
                found[user] = None
                todo.append(user)
    return list(found)


# operators that torch.fx records in place of an augmented assignment (fx's proxies have no __iadd__: `v += t`
# becomes `v = v + t`)
_AUGMENTABLE_OPERATORS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
                          operator.pow, operator.and_, operator.or_, operator.xor, operator.lshift, operator.rshift)


def _in_place_through_an_alias(graph: fx.Graph, modules: dict) -> Optional[fx.Node]:
    """An in-place op whose write the pipeline, which quantizes tensors where they are made and writes new ones,
    would miss: one into a view of another tensor (y[:, :2].sigmoid_(), y.view(-1).relu_()), one into a tensor of
    which a view taken before it is read after it (f = y.flatten(1); y.relu_(); f.sum()), or an augmented assignment
    to a view (v = y[:, :2]; v += 1), which torch.fx traces as an out-of-place op whose result nothing reads."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        base = node.args[0] if node.args else None
        if not isinstance(base, fx.Node) or not _is_view(base) and not _in_place(node, modules):
            continue
        if _is_view(base) and (_in_place(node, modules) or node.op == "call_function" and not node.users
                               and node.target in _AUGMENTABLE_OPERATORS):
            return node
        if _in_place(node, modules) and any(order[alias] < order[node] and any(order[u] > order[node] for u in
                                                                             alias.users)
                                            for alias in _aliases(base, modules)[1:]):
            return node
    return None


def aliases_copied_by_a_layout(node: fx.Node, modules: dict) -> bool:
    """Whether node's tensor has an alias (_aliases) that is a view of a contiguous tensor but a copy of a
    channels-last one (y.flatten(1), y.reshape(n, -1)) where an in-place op writes into one of those aliases: the
    write reaches the other side only in the contiguous layout."""
    aliases = _aliases(node, modules)
    return (any(_in_place(a, modules) for a in aliases)
            and any(a.op in ("call_method", "call_function") and getattr(a.target, "__name__", a.target)
                    in ("flatten", "reshape", "reshape_as", "contiguous") for a in aliases))


def _functionalize_in_place(graph: fx.Graph, modules: dict) -> None:
    """After an in-place activation or add, its input tensor holds the result: the graph's later readers of the
    input read the op's output instead, so that the pipeline, whose integer ops write new tensors, computes what
    the float model does."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.args and isinstance(node.args[0], fx.Node) and _in_place(node, modules):
            for user in list(node.args[0].users):
                if order[user] > order[node]:
                    user.replace_input_with(node.args[0], node)


def max_values(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """torch.max(x, dim, keepdim).values: a prepared pipeline's x.max(dim)[0] whose indices nothing reads (the
    converted pipeline runs torch.amax on the integers instead, the same values)."""
    return torch.max(x, dim, keepdim).values


def min_values(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """torch.min(x, dim, keepdim).values, as max_values."""
    return torch.min(x, dim, keepdim).values


# torch.max / torch.min and their methods over one dim -> their values alone
_VALUES_OF = {torch.max: max_values, "max": max_values, torch.min: min_values, "min": min_values}
_REDUCTION_OF_VALUES = {max_values: torch.amax, min_values: torch.amin}
# largest / smallest values: dequantization is increasing, so they commute with it (an integer tensor's maxima are
# its float tensor's, quantized): amax / amin as functions or methods, max_values / min_values (and the max / min of
# a whole tensor: _VALUES_OF's ops with no other argument)
_EXTREMA = (torch.amax, torch.amin, "amax", "amin", *_REDUCTION_OF_VALUES)


def _merge_extremum_values(graph: fx.Graph) -> None:
    """torch.max / torch.min over one dim (or their methods) whose indices nothing reads (x.max(2)[0],
    torch.min(x, dim=1).values, `values, _ = x.max(-1)`) become one max_values / min_values node of the tensor, which
    the pipeline runs on integers as it does amax."""
    if not _RULES.get()["integer_extrema"]:
        return
    for node in list(graph.nodes):
        values_of = _VALUES_OF.get(node.target) if node.op in ("call_function", "call_method") else None
        given = _given_arguments(node, ("dim", "keepdim")) if values_of is not None else {}
        if (not isinstance(given.get("dim"), int) or not set(given) <= {"dim", "keepdim"}
                or not isinstance(node.args[0], fx.Node) or not _constant_args(node)):
            continue
        values = [u for u in node.users if u.op == "call_function" and (
            u.target is operator.getitem and u.args[1:] == (0,) or u.target is getattr and u.args[1:] == ("values",))]
        # (an unused item, as `_` of `values, _ = x.max(1)`, may go; anything else reads the pair or its indices)
        if not values or any(u not in values and (u.users or u.target is not operator.getitem) for u in node.users):
            continue
        with graph.inserting_after(node):
            merged = graph.call_function(values_of, (node.args[0], given["dim"], given.get("keepdim", False)))
        for user in list(node.users):
            user.replace_all_uses_with(merged)
            graph.erase_node(user)
        graph.erase_node(node)


def _is_extremum(node: fx.Node) -> bool:
    """amax / amin, the max / min of a whole tensor, max_values / min_values: the largest or smallest values."""
    if (node.op not in ("call_function", "call_method") or not _constant_args(node)
            or not _RULES.get()["integer_extrema"]):
        return False
    return node.target in _EXTREMA or node.target in _VALUES_OF and len(node.args) == 1 and not node.kwargs


def _integer_padding(node: fx.Node, modules: dict) -> Optional[tuple]:
    """(pad, mode) of F.pad or a padding module that runs on integers: one that copies values (reflect, replicate,
    circular) or pads with zeros (the zero point); None for anything else (a nonzero constant may lie off the
    integers' grid)."""
    if not _RULES.get()["integer_padding"]:
        return None
    if node.op == "call_module" and type(modules.get(node.target)) in _PAD_MODULES:
        m = modules[node.target]
        pad, mode, value = m.padding, _PAD_MODULES[type(m)], getattr(m, "value", None)
    elif node.op == "call_function" and node.target is F.pad:
        arguments = dict(zip(("input", "pad", "mode", "value"), node.args), **node.kwargs)
        pad, mode, value = arguments.get("pad"), arguments.get("mode", "constant"), arguments.get("value")
        if pad is None or isinstance(mode, fx.Node) or isinstance(value, fx.Node):
            return None
    else:
        return None
    return (pad, mode) if mode != "constant" or value is None or value == 0 else None


def _is_passthrough(node: fx.Node, modules: dict) -> bool:
    """Ops that map integer tensors to integer tensors at the same scale (the first argument is the tensor)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        m = modules.get(node.target)
        return type(m) in _PASSTHROUGH_MODULES or type(m) in _DROPOUT_MODULES and _RULES.get()["integer_dropout"] \
            or _is_max_pool(node, modules) or _is_nearest_upsample(node, modules) \
            or _global_max_pool_dims(node, modules) is not None or activation_clamp(node, modules) == (0.0, None) \
            or _integer_padding(node, modules) is not None
    if node.op == "call_function":
        if (_is_listed_passthrough(node) or _is_max_pool(node, modules) or _is_nearest_upsample(node, modules)
                or _global_max_pool_dims(node, modules) is not None or _is_extremum(node)
                or _is_attribute(node, _PASSTHROUGH_ATTRIBUTES) or _integer_padding(node, modules) is not None):
            return True
    if node.op == "call_method" and (_is_listed_passthrough(node) or _is_extremum(node)):
        return not any(isinstance(a, torch.dtype) for a in node.args)  # (view(dtype) reinterprets the bytes)
    return _is_split(node) or activation_clamp(node, modules) == (0.0, None)


def _is_listed_passthrough(node: fx.Node) -> bool:
    """A function or method of _PASSTHROUGHS whose rule applies."""
    if node.target not in _PASSTHROUGH_RULE:
        return False
    rule = _PASSTHROUGH_RULE[node.target]
    return rule is None or _RULES.get()[rule]


def _splits(node: fx.Node) -> bool:
    """chunk / split / tensor_split / unbind: a tuple of tensors."""
    return (node.op == "call_function" and node.target in _SPLIT_FUNCTIONS
            or node.op == "call_method" and node.target in _SPLIT_METHODS)


def _is_split(node: fx.Node) -> bool:
    """A split whose tensors are only read one by one (t[i]; a slice of the tuple is a tuple)."""
    return _splits(node) and _RULES.get()["integer_indexing"] and bool(node.users) and all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users)


def _is_shape_query(node: fx.Node) -> bool:
    """Ops that read a tensor's shape only (integer tensors have their float tensor's shape)."""
    return ((node.op == "call_function" and node.target is len) or _is_attribute(node, _SHAPE_ATTRIBUTES)
            or (node.op == "call_method" and node.target in _SHAPE_METHODS))


def _is_cat(node: fx.Node) -> bool:
    """torch.cat / stack of tensors."""
    return (node.op == "call_function" and node.target in _CAT_FUNCTIONS and node.args
            and (node.target is torch.cat or _RULES.get()["integer_indexing"])
            and isinstance(node.args[0], (list, tuple)) and all(isinstance(a, fx.Node) for a in node.args[0])
            and _constant_args(node))


def _tensor_like(node: fx.Node) -> bool:
    """Whether node may be a tensor: not a shape query, nor an item of one (x.shape[2]) or of an input (a list);
    an item of another op is a tensor where it slices (y[:, :4]) or picks from a split (x.chunk(2)[0]), not where an
    int picks from what may be a tuple of ints (x.stride()[1])."""
    if _is_shape_query(node) or node.target is getattr and not _RULES.get()["integer_extrema"]:
        return False  # (without the integer_extrema rule every attribute is read as a shape query)
    if node.op == "call_function" and node.target is operator.getitem:
        if not _RULES.get()["integer_indexing"]:
            return False  # (without the integer_indexing rule no item is a tensor to integer ops)
        base, index = node.args
        return (isinstance(base, fx.Node) and base.op.startswith("call_") and _tensor_like(base)
                and (not isinstance(index, int) or _splits(base)))
    return node.op != "get_attr"


# ops whose tensor is bool or integer, whatever their inputs' dtypes (comparisons, logical ops, indices)
_NOT_FLOAT_FUNCTIONS = (operator.lt, operator.le, operator.eq, operator.ne, operator.ge, operator.gt, operator.not_,
                        torch.lt, torch.le, torch.eq, torch.ne, torch.ge, torch.gt, torch.less, torch.less_equal,
                        torch.greater, torch.greater_equal, torch.not_equal, torch.logical_and, torch.logical_or,
                        torch.logical_xor, torch.logical_not, torch.isnan, torch.isinf, torch.isfinite, torch.signbit,
                        torch.argmax, torch.argmin, torch.argsort, torch.nonzero, torch.bucketize, torch.searchsorted,
                        torch.randint, torch.randint_like, torch.randperm)
_NOT_FLOAT_METHODS = ("lt", "le", "eq", "ne", "ge", "gt", "less", "less_equal", "greater", "greater_equal",
                      "not_equal", "logical_and", "logical_or", "logical_xor", "logical_not", "isnan", "isinf",
                      "isfinite", "signbit", "argmax", "argmin", "argsort", "nonzero", "bool", "byte", "char", "short",
                      "int", "long")
# factories whose tensor is int64 unless a float number or dtype is given (torch.arange(n), torch.full(size, 2))
_INTEGER_FACTORIES = (torch.arange, torch.full, torch.full_like)
# ops that keep an integer tensor integer where their other arguments are not floats
_INTEGER_PRESERVING = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
                       operator.and_, operator.or_, operator.xor, operator.invert, torch.cat, torch.stack, torch.where)


def _not_float(node) -> bool:
    """Whether node's tensor is known to be bool or integer from the op that makes it (a mask, an index): the pipeline
    quantizes float tensors only (an add of such a tensor and an activation stays a float op)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    dtypes = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.dtype)]
    if dtypes:  # x.to(torch.long), torch.arange(n, dtype=torch.int32), x.view(torch.uint8)
        return not dtypes[-1].is_floating_point and not dtypes[-1].is_complex
    if node.target in _NOT_FLOAT_FUNCTIONS or node.op == "call_method" and node.target in _NOT_FLOAT_METHODS:
        return True
    arguments = []
    fx.node.map_aggregate((node.args, node.kwargs), arguments.append)
    if any(isinstance(a, float) for a in arguments):
        return False
    if node.target in _INTEGER_FACTORIES:  # (its Node arguments are sizes, read from shapes)
        return True
    tensors = [a for a in node.all_input_nodes if not _is_shape_query(a)]
    return bool(tensors) and (node.target in _INTEGER_PRESERVING or _is_view(node)
                              or node.target in _PASSTHROUGH_RULE) and all(_not_float(a) for a in tensors)


def _is_avg_pool(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) in _AVG_POOLS
    return node.op == "call_function" and node.target in _AVG_POOL_FUNCTIONS


# ---------------------------------------------------------------------------------------------------------------
# prepare

class _Groups:
    """Union-find over the integer tensors' scale groups."""

    def __init__(self):
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        self.parent[max(a, b)] = min(a, b)
        return min(a, b)


def _plan(graph: fx.Graph, modules: dict, integer_output: bool) -> tuple[dict, dict, list, list]:
    """The integer tensors of graph: (group of each integer value node, root nodes -> group (the values the
    pipeline quantizes: producer outputs and float values an integer op reads), [(layer node, input node)], float
    ops that read integer tensors)."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    groups = _Groups()
    group: dict[fx.Node, int] = {}
    roots: dict[fx.Node, str] = {}  # root -> "producer" | "quantize"
    layers: list[tuple[fx.Node, fx.Node]] = []
    int_consumers: set[fx.Node] = set()  # layer heads, adds, cats, lookups, means and average pools: read integers
    # lookups, means and average pools: they read integers only where their output is read as integers
    if_integer_out: set[fx.Node] = set()
    fused: set[fx.Node] = set()

    def ensure_int(value: fx.Node) -> int:
        if value not in group:
            group[value] = groups.new()
            roots[value] = "quantize"
        return group[value]

    producers: set[fx.Node] = set()

    def produce(node: fx.Node) -> None:
        group[node] = groups.new()
        roots[node] = "producer"
        producers.add(node)

    for node in list(graph.nodes):
        if node in fused:
            continue
        chain = layer_chain(node, modules, calls)
        if chain is not None:
            if not _tensor_like(node.args[0]):
                continue
            ensure_int(node.args[0])
            layers.append((node, node.args[0]))
            int_consumers.add(node)
            fused.update(chain[1:])
            produce(chain[-1])
            continue
        if (_is_add(node) and all(_tensor_like(a) and not _not_float(a) for a in node.args)
                and any(a in group for a in node.args)):
            conv = residual_conv(node, modules, calls, lambda value: value in group) \
                if _RULES.get()["residual_adds_in_convs"] else None
            if conv is not None and conv[0][-1] not in producers:  # (a layer whose input is not a tensor)
                conv = None
            if conv is not None:  # the add is the conv's epilogue: the conv's output is not quantized
                end = conv[0][-1]
                del group[end], roots[end]
                producers.discard(end)
            for a in node.args:
                if conv is None or a is not conv[0][-1]:
                    ensure_int(a)
            int_consumers.add(node)
            relu = _fused_relu(node, modules)
            if relu is not None:
                fused.add(relu)
            produce(relu or node)
            continue
        # (both operands integer already: a product with anything else, a number computed from a shape, a mask, a
        # parameter such as a layer scale, stays a float op rather than quantizing that operand)
        if _RULES.get()["integer_products"] and _is_mul(node) and all(a in group for a in node.args):
            int_consumers.add(node)
            produce(node)
            continue
        if (_is_cat(node) and any(a in group for a in node.args[0])
                and all(_tensor_like(a) and not _not_float(a) for a in node.args[0])):
            g = ensure_int(node.args[0][0])
            for a in node.args[0][1:]:
                g = groups.union(g, ensure_int(a))
            group[node] = g
            int_consumers.add(node)
            continue
        if _is_passthrough(node, modules) and node.args[0] in group:
            group[node] = group[node.args[0]]
        elif (_RULES.get()["integer_lookups"] and lookup_function(node, modules) is not None
              or _integer_mean_args(node, modules) is not None
              or _integer_avg_pool_args(node, modules) is not None
              or _integer_adaptive_avg_pool_args(node, modules) is not None) and node.args[0] in group:
            int_consumers.add(node)
            if_integer_out.add(node)
            produce(node)

    # producers whose integers nothing reads as integers write float instead (the last layer, usually); a lookup or
    # a mean reads its input as integers only where its own output is read so (else it runs in float)
    needed: dict[fx.Node, bool] = {}
    for node in reversed(list(graph.nodes)):
        if node not in group:
            continue
        need = False
        for user in node.users:
            if user in if_integer_out:
                need = need or needed[user]
            elif user in int_consumers:  # reads node as integers
                need = True
            elif user in group and user not in int_consumers:  # a passthrough of node
                need = need or needed.get(user, False)
            elif user.op == "output":
                need = need or integer_output
        needed[node] = need or node in roots and roots[node] == "quantize"
    for node in graph.nodes:
        if node in group and roots.get(node) == "producer" and not needed[node]:
            del group[node], roots[node]
        elif node in group and node not in roots and node not in int_consumers and node.args[0] not in group:
            del group[node]  # a passthrough of a producer that now writes float
    int_consumers -= if_integer_out - group.keys()  # those whose output is float run in float
    return ({node: groups.find(g) for node, g in group.items()}, roots, layers,
            _kept_float(graph, modules, calls, producers, roots,
                        int_consumers | fused | {n for n in group if roots.get(n) != "quantize"}))


def _kept_float(graph: fx.Graph, modules: dict, calls: Counter, producers: set, roots: dict, pipeline: set) -> list:
    """The ops on a path from a pipeline producer to a quantized input that the pipeline does not run on integers
    (except average pooling, passthroughs, which run float where their input is float, and shape queries), and the
    quantized layers called more than once (each quantizes its own input)."""
    after_producer: set[fx.Node] = set()
    for node in graph.nodes:
        # (a shape query's value, and arithmetic on it such as `n, c, length = y.shape; c * length`, is no tensor)
        if node in producers or (any(a in after_producer for a in node.all_input_nodes)
                                 and not _is_shape_query(node)):
            after_producer.add(node)
    before_quantize: set[fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if roots.get(node) == "quantize" or any(u in before_quantize for u in node.users):
            before_quantize.add(node)
    kept = []
    for node in graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node in pipeline:
            continue
        layer = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(layer, QuantLayerBase) and calls[node.target] > 1:
            kept.append(node)
        elif (node in after_producer and node in before_quantize and not _is_shape_query(node)
              and not _is_avg_pool(node, modules) and not _is_passthrough(node, modules)):
            kept.append(node)
    return kept


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


# Rules of the pipeline's planning that came in after pipelines were first saved, in the order they came; each applies
# unless load() rebuilds a pipeline saved before it did, whose quantizers and function are those of the pipeline
# without it. Before each, the ops it names were float ops (their outputs quantized where integer ops read them):
# - integer_dropout: dropout modules pass integers through;
# - integer_lookups: element-wise activations run as table lookups;
# - residual_adds_in_convs: a conv's residual add becomes its epilogue (before: the conv's output was quantized);
# - integer_max_pool1d: 1-d max-pools run on integers;
# - integer_views: squeeze / unsqueeze / transpose / permute / movedim / unflatten, nearest upsampling and global
#   max-pools run on integers;
# - integer_extrema: amax / amin and the values of max / min run on integers; .T / .mT pass integers through (before:
#   every attribute was read as a shape query, which an integer op does not take);
# - integer_indexing: indexing and slicing, flip / roll / narrow / select / tile / repeat / expand, splits read by
#   indexing, torch.stack and the torch.cat aliases concat / concatenate run on integers (before: an item or slice
#   was no tensor to integer ops);
# - integer_padding: padding runs on integers;
# - integer_means: global average pools and means over given dims read integers and requantize (before: they ran in
#   float);
# - integer_avg_pools: average pools of a fixed window read integers and requantize (before: they ran in float);
# - integer_adaptive_avg_pools: adaptive average pools to sizes other than 1 read integers and requantize (before:
#   they ran in float);
# - integer_products: products of two integer tensors (squeeze-excitation gates) read integers and requantize
#   (before: they ran in float, and a gate's activation with them);
# - padding_mode_convs: convs whose padding_mode is 'reflect', 'replicate' or 'circular' are quantized (before: they
#   stayed float).
# Checkpoints record the rules their pipeline was planned with; a file older than a rule does not (load() then
# rebuilds the pipeline whose quantizers and tensors it holds: rules_a_checkpoint_may_have).
PIPELINE_RULES = ("integer_dropout", "integer_lookups", "residual_adds_in_convs", "integer_max_pool1d", "integer_views",
                  "integer_extrema", "integer_indexing", "integer_padding", "integer_means",
                  "integer_avg_pools", "integer_adaptive_avg_pools", "integer_products", "padding_mode_convs")
_RULES = contextvars.ContextVar("torchquant_pipeline_rules", default=dict.fromkeys(PIPELINE_RULES, True))


def planning_rule(rule: str) -> bool:
    """Whether the rule of PIPELINE_RULES applies to the model being prepared (all do, but while load() rebuilds a
    pipeline planned before some: pipeline_rules)."""
    return _RULES.get()[rule]


def rules_a_checkpoint_may_have(recorded: dict) -> list[dict]:
    """The rule sets a pipeline checkpoint recording the given rules (a dict of some of PIPELINE_RULES) may have been
    planned with, the newest first. Every rule before the latest one it records applied; a rule after it came in
    after the file was saved, or was not recorded yet then: those applied up to some point in their order."""
    latest = max((i for i, rule in enumerate(PIPELINE_RULES) if rule in recorded), default=-1)
    candidates = []
    for applied in range(len(PIPELINE_RULES), latest, -1):  # the rules before `applied` applied
        rules = {rule: recorded.get(rule, i < applied) for i, rule in enumerate(PIPELINE_RULES)}
        if rules not in candidates:
            candidates.append(rules)
    return candidates


@contextlib.contextmanager
def pipeline_rules(**rules: bool) -> Iterator[None]:
    """Inside, prepare_pipeline applies the named rules of PIPELINE_RULES as given (the others as they are)."""
    token = _RULES.set({**_RULES.get(), **rules})
    try:
        yield
    finally:
        _RULES.reset(token)


def argument_left_out(value, name: str, model_name: str) -> None:
    """The converted graph's check that an argument the pipeline was traced without (its default None) is not
    passed: the branches of the forward that read it are not in the graph."""
    if value is not None:
        raise ValueError(f"{model_name}: this integer pipeline was traced with `{name}` left at its default None (the "
                         f"graph has only the forward's branches for None); call it without `{name}`, or prepare "
                         f"the model without the integer pipeline (e.g. preset 'int8-static') to pass it")


def _none_defaults(model: nn.Module) -> dict:
    """The forward's arguments that default to None, as concrete_args that trace them as None."""
    return {name: None for name, p in inspect.signature(model.forward).parameters.items()
            if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _trace(model: nn.Module) -> tuple[fx.Graph, dict, bool]:
    """The graph of model's forward, with the arguments that default to None left at None (an `if mask is not None:`
    branch would otherwise be traced as taken, for a mask the call without it does not give), the tensor constants
    it reads (_Tracer.constants), and whether the graph depends on the modules' train/eval mode (it is traced again
    with every module's mode flipped)."""
    pinned = _none_defaults(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        tracer = _PipelineTracer()
        graph = tracer.trace(model, concrete_args=pinned or None)
        modes = [(m, m.training) for m in model.modules()]
        try:
            for m, training in modes:
                m.training = not training
            flipped = _PipelineTracer().trace(model, concrete_args=pinned or None).python_code("self").src
        except Exception:  # noqa: BLE001 -- a forward that fails in the other mode depends on it
            flipped = None
        finally:
            for m, training in modes:
                m.training = training
    reads_mode = flipped != graph.python_code("self").src
    # fx names a pinned argument's placeholder `mask_1` (the forward then takes no `mask=` keyword) and checks it
    # with a bare AssertionError
    renamed = {f"{name}_1": name for name in pinned}
    for node in graph.nodes:
        if node.op == "placeholder" and node.target in renamed:
            node.target = renamed[node.target]
        elif node.op == "call_function" and node.target is fx._symbolic_trace._assert_is_none:
            node.target, node.args = argument_left_out, (node.args[0], node.args[0].target, type(model).__name__)
    return graph, tracer.constants, reads_mode


def prepare_pipeline(model: nn.Module, config: QuantConfig, swap) -> Optional[fx.GraphModule]:
    """The prepared pipeline of model (left unchanged: the pipeline has its own modules, sharing the model's
    parameters and buffers), or None with a warning when torch.fx cannot trace it. swap(gm, config) swaps the layers
    of the traced module (the module swap's planner, with BatchNorm folding)."""
    try:
        graph, constants, reads_mode = _trace(model)
    except Exception as exc:  # noqa: BLE001 -- any tracing failure means: the module swap instead
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        folding = f" ({SEQUENTIAL_FOLDING})" if config.fold_bn and has_foldable_bn(model) else ""
        warnings.warn(f"prepare: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {reason}); "
                      f"the model is quantized layer by layer (module swap) instead of as an integer pipeline"
                      f"{folding}", UserWarning, stacklevel=4)
        return None
    if reads_mode:  # the graph would keep the mode it was traced in (dropout on after eval(), in the converted model)
        warnings.warn(f"prepare: {type(model).__name__}'s forward reads a module's `training` flag (train/eval mode, "
                      f"e.g. F.dropout(x, p, self.training)), which a traced graph fixes at its value now; the model "
                      f"is quantized layer by layer (module swap) instead of as an integer pipeline (nn.Dropout "
                      f"modules keep it)", UserWarning,
                      stacklevel=4)
        return None
    hooked = next((name for name, m in model.named_modules() if has_forward_hooks(m)), None)
    if hooked is not None:  # the converted graph calls no module's hooks (a traced-through one's, none at all)
        warnings.warn(f"prepare: {type(model).__name__} has forward hooks (on {hooked or 'the model'}); the model is "
                      f"quantized layer by layer (module swap) instead of as an integer pipeline", UserWarning,
                      stacklevel=4)
        return None
    in_place = _in_place_through_an_alias(graph, dict(model.named_modules()))
    if in_place is not None:
        warnings.warn(f"prepare: {type(model).__name__} writes in place into a tensor that shares its memory with "
                      f"another ({_describe(in_place)}); the model is quantized layer by layer (module swap) "
                      f"instead of as an integer pipeline", UserWarning, stacklevel=4)
        return None
    taken = next((name for name in (ACT_QUANT, LOOKUP_TABLES) if hasattr(model, name)), None)
    if taken is not None:  # the pipeline's own modules have these names
        warnings.warn(f"prepare: {type(model).__name__} has an attribute named {taken!r}, which an integer pipeline "
                      f"needs for itself; the model is quantized layer by layer (module swap) instead", UserWarning,
                      stacklevel=4)
        return None
    model.__dict__.update(constants)  # (for the GraphModule to copy, then off the user's model again)
    try:
        gm = _Pipeline(model, graph, class_name=type(model).__name__)
    finally:
        for name in constants:
            del model.__dict__[name]
    _own_modules(gm, graph)
    gm.meta[META_KEY] = {"integer_output": config.integer_output, "converted": False, **_RULES.get()}
    swap(gm, keeping_read_layers_float(gm, gm.graph, config, stacklevel=4))
    modules = dict(gm.named_modules())
    _functionalize_in_place(gm.graph, modules)
    _merge_extremum_values(gm.graph)
    _fuse_activations(gm.graph, modules)
    group, roots, layers, float_readers = _plan(gm.graph, modules, config.integer_output)
    # one quantizer per scale group, named after the group's first root
    # the new modules take the float model's mode (train() would also set the float model's own modules' modes)
    gm.training = model.training
    gm.add_module(ACT_QUANT, nn.ModuleDict().train(model.training))
    quantizers: dict[int, str] = {}
    for node in gm.graph.nodes:
        if node in roots and group[node] not in quantizers:
            name = quantizers[group[node]] = _free_attribute(gm.get_submodule(ACT_QUANT), node.name)
            quantizer = ActivationQuantizer(config.activation).to(_device_of(gm)).train(model.training)
            gm.get_submodule(ACT_QUANT)[name] = quantizer
    averages = [(n, n.args[0], average) for n in gm.graph.nodes
                if n.args and n.args[0] in group and (average := _integer_average(n, modules)) is not None]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in [n for n in gm.graph.nodes if n in roots]:
        after = placeholders[-1] if node.op == "placeholder" else node
        with gm.graph.inserting_after(after):
            fq = gm.graph.call_module(f"{ACT_QUANT}.{quantizers[group[node]]}", (node,))
        node.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)
    # means and average pools that the converted pipeline runs on integers compute as it does (exact_average)
    for node, value, (kind, arguments) in averages:
        if _fake_quant_after(node) is None:
            continue
        with gm.graph.inserting_after(node):
            quantizer = gm.graph.get_attr(f"{ACT_QUANT}.{quantizers[group[value]]}")
        with gm.graph.inserting_after(quantizer):
            exact = gm.graph.call_function(exact_average, (node, node.args[0], quantizer, kind, *arguments))
        node.replace_all_uses_with(exact, delete_user_cb=lambda user, exact=exact: user is not exact)
    act_quant = gm.get_submodule(ACT_QUANT)
    for head, value in layers:
        layer = modules[head.target]
        del layer._modules["input_quantizer"]
        layer.__dict__["input_quantizer"] = act_quant[quantizers[group[value]]]
        layer.graph_input = True
    gm.graph.lint()
    gm.recompile()
    gm.register_load_state_dict_post_hook(_after_load)
    if float_readers:
        warnings.warn(f"prepare: kept float between integer layers (each costs a float round trip): "
                      f"{', '.join(_describe(n) for n in float_readers)}", UserWarning, stacklevel=4)
    _meta(gm)["float_ops"] = [_describe(n) for n in float_readers]
    _meta(gm)["layer_by_layer"] = within = _layers_within_leaves(gm)
    if within:
        warnings.warn(f"prepare: the integer pipeline does not reach into {', '.join(within)}: torch.fx calls these "
                      f"modules whole, so the quantized layers inside them run layer by layer (each quantizes its "
                      f"float input and writes float)", UserWarning, stacklevel=4)
    return gm


def _layers_within_leaves(gm: fx.GraphModule) -> list[str]:
    """The modules the graph calls whole (torch.fx leaves: torch.nn's containers such as nn.TransformerEncoder)
    that hold quantized layers, each as 'name (class: n layer(s))'."""
    found = []
    for target in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"):
        module = gm.get_submodule(target)
        if isinstance(module, QuantLayerBase):
            continue
        if inner := len(quant_layers(module)):
            found.append(f"{target} ({type(module).__name__}: {inner} layer(s))")
    return found


# the tensors of a layer whose reads by the forward keep it float: an integer pipeline's layers keep no float
# weight, nor their float bias where a BatchNorm folded into them; the module swap's converted layers keep the bias
PIPELINE_READ_TENSORS = ("weight", "bias")
SWAP_READ_TENSORS = ("weight",)


def layer_tensors_read(root: nn.Module, graph: Optional[fx.Graph] = None,
                       tensors: tuple = PIPELINE_READ_TENSORS) -> dict[int, str]:
    """id of each layer of root the swap would quantize whose tensors (of those named) the forward reads itself (a
    decoder tied to an encoder's weight: F.linear(z, self.enc.weight.t())) -> the first such tensor's name, from
    graph (root's torch.fx graph; traced here when None, with the arguments that default to None left at None, and
    {} where torch.fx cannot trace root)."""
    if graph is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's own warnings
                graph = _Tracer().trace(root, concrete_args=_none_defaults(root) or None)
        except Exception:  # noqa: BLE001 -- an untraceable model: nothing found
            return {}
    read = {}
    for node in graph.nodes:
        owner_name, _, tensor = node.target.rpartition(".") if node.op == "get_attr" else ("", "", "")
        owner = root.get_submodule(owner_name) if owner_name else None  # (root's own tensors: root is no layer)
        if quant_type(owner) is not None and tensor in tensors:
            read.setdefault(id(owner), node.target)
    return read


def keeping_read_layers_float(root: nn.Module, graph: Optional[fx.Graph], config: QuantConfig,
                              stacklevel: int = 2, tensors: tuple = PIPELINE_READ_TENSORS) -> QuantConfig:
    """config, also skipping (with a warning) the layers of root whose tensors (of those named) the forward reads
    itself (layer_tensors_read): a converted layer keeps no float weight for it to read."""
    read = layer_tensors_read(root, graph, tensors)
    for name, module in root.named_modules():
        if id(module) in read:
            warnings.warn(f"prepare: {name} ({type(module).__name__}) stays float: {read_reason(read[id(module)])}",
                          UserWarning, stacklevel=stacklevel + 1)
    if not read:
        return config
    return dataclasses.replace(config, skip=(*config.skip, lambda name, module: id(module) in read))


def read_reason(tensor: str) -> str:
    return f"the forward reads its tensor {tensor} itself, which a converted layer does not keep"


def _free_attribute(container: nn.Module, name: str) -> str:
    """name, or name with underscores appended where container already has that attribute: a graph node's name
    may be a method of the container (a submodule called `keys` or `values` beside a ModuleDict's methods, a
    Tensor.to() call beside nn.Module.to; a model's own modules cannot be named like nn.Module's). A pure function
    of the names before it, so that a checkpoint's names are found again when the same model is prepared again."""
    while hasattr(container, name):
        name += "_"
    return name


def _own_modules(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """fx.GraphModule references the modules the graph calls (its new parents aside): each becomes a copy sharing
    their parameters and buffers, so that what prepare and convert do to them (swapping the layers inside an
    nn.TransformerEncoderLayer, turning off its fast path), what train()/eval() sets and what is changed on either
    model later stays in that model."""
    called = {node.target: gm.get_submodule(node.target) for node in graph.nodes if node.op == "call_module"}
    memo = {id(t): t for m in called.values() for t in (*m.parameters(), *m.buffers())}
    for target in sorted(called, key=lambda t: t.count(".")):  # a called module before those called inside it
        parent, _, key = target.rpartition(".")
        # (through memo, a module reached by several names stays one module)
        setattr(gm.get_submodule(parent), key, copy.deepcopy(called[target], memo))


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _after_load(module, incompatible_keys) -> None:
    """After a state dict loads into a converted pipeline: the layers read their input qparams again (their
    quantizers may have loaded after them) and the quantizers cache theirs."""
    if not _meta(module)["converted"]:
        return
    for m in module.modules():
        if isinstance(m, ActivationQuantizer):
            m.refresh()
    for m in module.modules():
        if isinstance(m, QuantLayerBase) and m.converted:
            m._set_input_zero_point()
            m._prepare_forward()


# ---------------------------------------------------------------------------------------------------------------
# the converted pipeline's ops (called from the rewritten graph)

def quantize_input(x: torch.Tensor, quantizer: ActivationQuantizer) -> torch.Tensor:
    """x quantized with quantizer's (per-tensor) qparams, in x's layout (quantize keeps it): the integers of a
    channels-last x stay channels-last (the layout the convs read) without a copy. Each conv reading a contiguous
    one lays it out channels-last itself."""
    if x.requires_grad:
        warn_if_gradient_cut("integer pipeline", x)
    scale, _, zero_point, _ = quantizer.qparams
    spec = quantizer.spec
    return F_q.quantize(x, scale, zero_point, bits=spec.bits, signed=spec.signed, rounding=spec.rounding)


def dequantize_output(q: torch.Tensor, quantizer: ActivationQuantizer, dtype: torch.dtype, *,
                      keep_layout: bool = False, autocast: bool = False) -> torch.Tensor:
    """q's float values, contiguous (a view may read them); with keep_layout, in q's layout (dequantize keeps it:
    a conv's channels-last integers give channels-last values without a copy), for float ops that take any layout.
    With autocast (q computed from layers' outputs, which take autocast's dtype), the values are of autocast's dtype
    where it is on for q's device, as the float model's are."""
    if autocast and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    scale, _, zero_point, _ = quantizer.qparams
    return F_q.dequantize(q if keep_layout else q.contiguous(), scale, zero_point, dtype=dtype)


def integer_layer(layer: QuantLayerBase, x_q: torch.Tensor, out: Optional[ActivationQuantizer],
                  dtype: torch.dtype, *, keep_layout: bool = False) -> torch.Tensor:
    """The layer's integer op on x_q (at the layer's input scale, with its activation clamp), writing `out`'s
    integers (of its bits: the range its fake-quant clamps to) or float of dtype when out is None. A conv writes
    channels-last; its float output is made contiguous, the layout the float model's conv gives the float ops after
    it (x.view(n, -1) fails on the other), unless keep_layout."""
    if out is None:
        y = layer.pipeline_op(x_q, dtype)
        return y if keep_layout else contiguous_output(y)
    _, scale, zero_point, out_dtype = out.qparams
    return layer.pipeline_op(x_q, out_dtype, scale, zero_point, out.spec.bits)


# methods that read a tensor's strides or memory as they are (a view of a tensor laid out otherwise fails)
_STRIDE_METHODS = {"view", "view_as", "as_strided", "numpy", "data_ptr", "untyped_storage", "storage", "stride"}


def _makes_contiguous(node: fx.Node) -> bool:
    """x.contiguous(), and a flatten from dim 0 or 1 to the last (of a channels-last x: a copy, contiguous)."""
    if node.op == "call_method" and node.target == "contiguous":
        return True
    if not ((node.op == "call_method" and node.target == "flatten") or
            (node.op == "call_function" and node.target is torch.flatten)):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start in (0, 1) and end == -1


def _reads_metadata(node: fx.Node) -> bool:
    """x.size(), x.dim(), len(x), x.shape and the like: no tensor comes out."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device", "is_cuda")
    return _is_shape_query(node)


def _may_read_layout(node: fx.Node, gm: nn.Module) -> bool:
    """Whether node may depend on its tensor inputs' memory layout: the graph's output (the caller), a stride-reading
    method, or code other than PyTorch's own ops and modules (a function wrapped for torch.fx, a custom leaf
    module), which may view its input."""
    if node.op == "output":
        return True
    if node.op == "call_method":
        return node.target in _STRIDE_METHODS
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        return node.target is torch.as_strided or not (module.split(".")[0] in ("torch", "_operator", "operator")
                                                        or node.target in (getattr, len))
    if node.op == "call_module":
        return not type(gm.get_submodule(node.target)).__module__.startswith("torch.nn.")
    return False


def reaches_a_layout_reader(node: fx.Node, gm: nn.Module, stops) -> bool:
    """Whether node's tensor, or one computed from it, can reach something that may read its memory layout
    (_may_read_layout: a Tensor.view, the caller, code outside PyTorch) without passing through a node for which
    stops(node) is true (where the caller's check ends), a copy to the contiguous layout, or a shape query."""
    seen, todo = set(), list(node.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if stops(user) or _makes_contiguous(user) or _reads_metadata(user):
            continue
        if _may_read_layout(user, gm):
            return True
        todo.extend(user.users)
    return False


def _integer_binary(op, a: torch.Tensor, b: torch.Tensor, qa: ActivationQuantizer, qb: ActivationQuantizer,
                    out: Optional[ActivationQuantizer], dtype: torch.dtype, keep_layout: bool, **kwargs):
    """op (quantized_add or quantized_mul) of a and b read with their quantizers' parameters, requantized to out's
    (or float of dtype when out is None: contiguous, as the float model's result, unless keep_layout)."""
    sa, _, za, _ = qa.qparams
    sb, _, zb, _ = qb.qparams
    if out is None:
        y = op(a, sa, za, b, sb, zb, out_dtype=dtype, **kwargs)
        return y if keep_layout else y.contiguous()
    _, scale, zero_point, out_dtype = out.qparams
    return op(a, sa, za, b, sb, zb, out_dtype=out_dtype, out_scale=scale, out_zero_point=zero_point,
              out_bits=out.spec.bits, **kwargs)


def integer_add(a: torch.Tensor, b: torch.Tensor, qa: ActivationQuantizer, qb: ActivationQuantizer,
                out: Optional[ActivationQuantizer], relu: bool, dtype: torch.dtype, *,
                keep_layout: bool = False) -> torch.Tensor:
    """a + b [+ ReLU] on integers: the sum of the dequantized values in float32, as out's integers (or float of dtype
    when out is None: contiguous, as the float model's sum, unless keep_layout)."""
    if a.shape != b.shape:  # an add that broadcasts (y + y.mean()): quantized_add takes one shape
        a, b = torch.broadcast_tensors(a, b)
    return _integer_binary(F_q.quantized_add, a, b, qa, qb, out, dtype, keep_layout, relu=relu)


def integer_mul(a: torch.Tensor, b: torch.Tensor, qa: ActivationQuantizer, qb: ActivationQuantizer,
                out: Optional[ActivationQuantizer], dtype: torch.dtype, *, keep_layout: bool = False) -> torch.Tensor:
    """a * b on integers (broadcast): the product of the dequantized values in float32, as out's integers (or float of
    dtype when out is None: contiguous, as the float model's product of contiguous values, unless keep_layout)."""
    return _integer_binary(F_q.quantized_mul, a, b, qa, qb, out, dtype, keep_layout)


def _conv_output_shape(layer: QuantConv2d, x: torch.Tensor) -> tuple:
    """The conv's output shape for x, batched or not (as nn.Conv2d / nn.Conv1d take it)."""
    spatial = x.shape[-len(layer.kernel_size):]
    return (*x.shape[:-len(layer.kernel_size) - 1], layer.out_channels,
            *((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in zip(
                spatial, layer.kernel_size, layer.stride, layer.padding, layer.dilation)))


def integer_conv_add(layer: QuantConv2d, x_q: torch.Tensor, residual: torch.Tensor, residual_quantizer:
                     ActivationQuantizer, out: Optional[ActivationQuantizer], relu: bool,
                     dtype: torch.dtype, *, keep_layout: bool = False) -> torch.Tensor:
    """A conv layer's integer op on x_q with the residual add [+ ReLU] that alone reads its output as its epilogue:
    y = the conv's float32 output (with its activation clamp) + the dequantized residual, max(y, 0) when relu,
    written as `out`'s integers (or float of dtype when out is None: contiguous unless keep_layout, as
    integer_layer's). An add that broadcasts runs those steps in float32."""
    scale, _, zero_point, _ = residual_quantizer.qparams
    if residual.shape != _conv_output_shape(layer, x_q):
        y = layer.pipeline_op(x_q, torch.float32) + F_q.dequantize(residual, scale, zero_point)
        y = torch.clamp_min(y, 0.0) if relu else y
        return y.to(dtype) if out is None else quantize_input(y, out)
    if out is None:
        y = layer.pipeline_residual_op(x_q, residual, scale, zero_point, relu, dtype)
        return y if keep_layout else contiguous_output(y)
    _, out_scale, out_zero_point, out_dtype = out.qparams
    return layer.pipeline_residual_op(x_q, residual, scale, zero_point, relu, out_dtype, out_scale, out_zero_point,
                                      out.spec.bits)


def lookup_table(fn, input_quantizer: ActivationQuantizer, output_quantizer: ActivationQuantizer,
                 dtype: torch.dtype) -> torch.Tensor:
    """The 256-entry table of quantized_lookup for the activation fn between two integer tensors:
    table[byte i] = quantize_out(fn(dequantize_in(i))), i the input's integer with those bits. fn runs on the 256
    dequantized values in the model's float dtype and device, as the fake-quant model runs it on its (fake-quantized)
    input, so the converted integers are the fake-quant model's (up to how fn's kernel rounds other shapes)."""
    input_quantizer.refresh()
    output_quantizer.refresh()
    codes = torch.arange(256, dtype=torch.uint8, device=input_quantizer.scale.device).view(input_quantizer.qparams[3])
    with torch.no_grad():
        return quantize_input(fn(dequantize_output(codes, input_quantizer, dtype)), output_quantizer)


def _mean_of_integers(q: torch.Tensor, dims: tuple, keepdim: bool, qparams: tuple) -> torch.Tensor:
    """The float32 mean of the values q stands for (qparams: ActivationQuantizer.qparams) over dims, as integer_mean
    computes it."""
    scale, _, zero_point, _ = qparams
    count = 1
    for d in dims:
        count *= q.shape[d]
    total = F_q.quantized_sum(q, dims, keepdim) - count * zero_point
    # (scale is a 1-element tensor: reshaped to 0-d, it keeps a mean over every dimension 0-d)
    return total.float() * scale.reshape(()) / total.new_full((), count, dtype=torch.float32)


def integer_mean(q: torch.Tensor, dims: tuple, keepdim: bool, quantizer: ActivationQuantizer,
                 out: ActivationQuantizer) -> torch.Tensor:
    """A mean (a global average pool) on integers: the mean of q's values over dims, as out's integers. The int32
    sum of q - zero point (quantized_sum) is exact; it is scaled and divided by the count in float32 (a count on q's
    device, where the division rounds as on the CPU: CUDA multiplies by the reciprocal of a Python number), then
    quantized: the same integers on every device."""
    return quantize_input(_mean_of_integers(q, dims, keepdim, quantizer.qparams), out)


def _avg_pool_of_integers(q: torch.Tensor, kernel_size: tuple, stride: tuple, padding: tuple, ceil_mode: bool,
                          count_include_pad: bool, divisor_override: Optional[int], qparams: tuple) -> torch.Tensor:
    """The float32 average pool of the values q stands for, as integer_avg_pool computes it."""
    _, scale, zero_point, _ = qparams
    if len(kernel_size) == 1:
        return F_q.quantized_avg_pool1d(q, scale, zero_point, kernel_size, stride, padding, ceil_mode,
                                        count_include_pad)
    return F_q.quantized_avg_pool2d(q, scale, zero_point, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                    divisor_override)


def integer_avg_pool(q: torch.Tensor, kernel_size: tuple, stride: tuple, padding: tuple, ceil_mode: bool,
                     count_include_pad: bool, divisor_override: Optional[int], quantizer: ActivationQuantizer,
                     out: ActivationQuantizer) -> torch.Tensor:
    """An average pool (1-d or 2-d, as kernel_size has 1 or 2 entries) on integers: the mean of each window of q's
    values, as out's integers. functional.quantized_avg_pool1d / 2d sum each window's q - zero point exactly, scale
    and divide in float32 (the same values on every device); the quantization follows."""
    return quantize_input(_avg_pool_of_integers(q, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                                divisor_override, quantizer.qparams), out)


def _adaptive_avg_pool_of_integers(q: torch.Tensor, output_size: tuple, qparams: tuple) -> torch.Tensor:
    """The float32 adaptive average pool of the values q stands for, as integer_adaptive_avg_pool computes it."""
    _, scale, zero_point, _ = qparams
    if len(output_size) == 1:
        return F_q.quantized_adaptive_avg_pool1d(q, scale, zero_point, output_size[0])
    return F_q.quantized_adaptive_avg_pool2d(q, scale, zero_point, output_size)


def integer_adaptive_avg_pool(q: torch.Tensor, output_size: tuple, quantizer: ActivationQuantizer,
                              out: ActivationQuantizer) -> torch.Tensor:
    """An adaptive average pool (1-d or 2-d, as output_size has 1 or 2 entries) on integers: the mean of each of
    its windows of q's values, as out's integers. functional.quantized_adaptive_avg_pool1d / 2d sum each window's
    q - zero point exactly, then scale and divide in float32 as integer_avg_pool does; the quantization follows."""
    return quantize_input(_adaptive_avg_pool_of_integers(q, output_size, quantizer.qparams), out)


# by the kind _integer_average names: the converted graph's op, and the float values it quantizes
_AVERAGES = {"mean": (integer_mean, _mean_of_integers), "avg_pool": (integer_avg_pool, _avg_pool_of_integers),
             "adaptive_avg_pool": (integer_adaptive_avg_pool, _adaptive_avg_pool_of_integers)}


def exact_average(y: torch.Tensor, x: torch.Tensor, quantizer: ActivationQuantizer, kind: str, *args) -> torch.Tensor:
    """A prepared pipeline's mean or average pool y of x, whose values quantizer fake-quantized, as the converted
    pipeline computes it (integer_mean, integer_avg_pool, integer_adaptive_avg_pool: the exact sum of the integers,
    scaled and divided in float32), with y's gradient. The float pool sums rounded float32 values, and calibration
    makes the output's scale a rational multiple of the input's (the output's range is a mean of input integers),
    so its requantization meets exact ties, which a float sum lands on either side of (1-2 % of an average pool's
    outputs a step apart). While the quantizer observes (training, calibration), or before it has, y as it is."""
    if quantizer.training or quantizer.calibrating or not quantizer.ready:
        return y
    spec, qparams = quantizer.spec, quantizer.current_qparams()
    q = F_q.quantize(x.detach(), qparams[0], qparams[2], bits=spec.bits, signed=spec.signed, rounding=spec.rounding)
    exact = _AVERAGES[kind][1](q, *args, qparams).to(y.dtype)
    return exact + (y - y.detach())  # (also without a gradient: a trace records the same ops either way)


def integer_relu(q: torch.Tensor, quantizer: ActivationQuantizer) -> torch.Tensor:
    """ReLU on integers: the zero point is the quantized 0."""
    return torch.clamp_min(q, quantizer.qparams[2])


def integer_pad(q: torch.Tensor, pad: Sequence[int], mode: str, quantizer: ActivationQuantizer) -> torch.Tensor:
    """F.pad on integers: constant padding (with zeros) writes the zero point, the other modes copy values."""
    if mode == "constant":
        return F.pad(q, pad, value=quantizer.qparams[2])
    return F.pad(q, pad, mode=mode)


# ---------------------------------------------------------------------------------------------------------------
# convert

def _float_dtype(layers) -> torch.dtype:
    for layer in layers:
        return layer.weight.dtype if not layer.converted else layer.bias.dtype if layer.bias is not None \
            else torch.float32
    return torch.float32


def convert_pipeline(gm: fx.GraphModule) -> fx.GraphModule:
    """Converts a prepared pipeline in place: every layer's integer state is computed first (a failure leaves gm
    as it was), then installed, and the graph rewritten to pass integers."""
    if _meta(gm)["converted"]:
        return gm
    modules = dict(gm.named_modules())
    quantizers = [m for m in gm.get_submodule(ACT_QUANT).values()]
    for q in quantizers:
        if not q.ready:
            raise RuntimeError("convert: the integer pipeline needs calibration before convert (an activation "
                               "quantizer observed no data)")
    for node in gm.graph.nodes:  # (a layer quantized before prepare, which the pipeline could not keep float)
        owner = node.target.rpartition(".")[0] if node.op == "get_attr" else ""
        if isinstance(modules.get(owner), QuantLayerBase) and not modules[owner].converted:
            raise RuntimeError(f"convert: the forward reads {node.target} of the quantized layer {owner!r} itself, "
                               f"which a converted layer does not keep; prepare the float model with the layer "
                               f"left float (QuantConfig.skip) to convert it")
    layers = [m for m in modules.values() if isinstance(m, QuantLayerBase)]
    pending = [(layer, layer.converted_state()) for layer in layers if not layer.converted]
    dtype = _float_dtype(layers)
    for layer, state in pending:
        layer._install_converted(state)
    _lower(gm, dtype, build_tables=True)
    return gm


def converted_skeleton(gm: fx.GraphModule) -> None:
    """A prepared pipeline turned into the converted layout with placeholder states, for loading a converted
    pipeline's state dict (whose post hook then refreshes what the forward reads)."""
    layers = [m for m in gm.modules() if isinstance(m, QuantLayerBase)]
    dtype = _float_dtype(layers)
    for layer in layers:
        layer._converted_skeleton()
    _lower(gm, dtype, build_tables=False)


def _lower(gm: fx.GraphModule, dtype: torch.dtype, build_tables: bool) -> None:
    """Rewrites the prepared graph: fake-quant nodes after producers go (the producer writes those integers), the
    others become quantize nodes, fused chains, adds and lookups become integer calls, integer tensors read by float
    ops are dequantized. Lookup tables are built from the calibrated quantizers when build_tables, else left zero
    (for a state dict to fill). The rules are those gm was planned with."""
    with pipeline_rules(**{rule: _meta(gm).get(rule, True) for rule in PIPELINE_RULES}):
        _lower_planned(gm, dtype, build_tables)


def _lower_planned(gm: fx.GraphModule, dtype: torch.dtype, build_tables: bool) -> None:
    graph = gm.graph
    modules = dict(gm.named_modules())
    integer_output = _meta(gm)["integer_output"]
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    act_prefix = ACT_QUANT + "."
    int_of: dict[fx.Node, fx.Node] = {}  # integer value -> get_attr node of its quantizer
    attrs: dict[str, fx.Node] = {}
    dequantized: dict[fx.Node, fx.Node] = {}
    erased: set[fx.Node] = set()
    tables = nn.Module()  # (left out below by delete_all_unused_submodules when nothing reads it)
    gm.add_module(LOOKUP_TABLES, tables)
    lookups = {}  # lookup node name -> the activation it runs, as reports name it
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    def attr(target: str) -> fx.Node:
        if target not in attrs:
            with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(None):
                attrs[target] = graph.get_attr(target)
        return attrs[target]

    def replace(old_nodes: list, new: fx.Node, quantizer: Optional[fx.Node]) -> None:
        old_nodes[-1].replace_all_uses_with(new)
        for n in reversed(old_nodes):
            graph.erase_node(n)
            erased.add(n)
        if quantizer is not None:
            int_of[new] = quantizer

    for node in [n for n in graph.nodes if n.target is exact_average]:  # (the pools below compute it exactly)
        quantizer = node.args[2]  # a get_attr
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        if not quantizer.users:
            graph.erase_node(quantizer)
    layer_made: Dict[fx.Node, bool] = {}  # from_layers' answers (branches that meet again ask twice)

    def from_layers(value: fx.Node) -> bool:
        """Whether integer value's float counterpart is computed from layers' outputs only (of autocast's dtype under
        autocast), not from a float value the graph quantizes (which keeps its dtype: the model's input)."""
        if value not in layer_made:
            if value.target is integer_layer:
                layer_made[value] = True
            elif value.target is integer_conv_add:  # the conv's output plus the residual
                layer_made[value] = from_layers(value.args[2])
            else:
                inputs = [a for a in value.all_input_nodes if a in int_of]  # (quantize_input reads a float value)
                layer_made[value] = bool(inputs) and all(from_layers(a) for a in inputs)
        return layer_made[value]

    def dequantize(value: fx.Node) -> fx.Node:
        if value not in dequantized:
            with graph.inserting_after(value):
                dequantized[value] = graph.call_function(dequantize_output, (value, int_of[value], dtype),
                                                         {"autocast": True} if from_layers(value) else {})
        return dequantized[value]

    def lower_layer(chain: list) -> None:
        fq = _fake_quant_after(chain[-1])
        out = None if fq is None else attr(fq.target)
        with graph.inserting_after(fq or chain[-1]):
            new = graph.call_function(integer_layer, (attr(chain[0].target), chain[0].args[0], out, dtype))
        replace(chain + ([fq] if fq else []), new, out)

    # conv chains whose output an add alone reads, without a quantizer: the add's epilogue form (lowered with it)
    residual_chains: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node in erased or node.op in ("placeholder", "get_attr"):
            continue
        chain = layer_chain(node, modules, calls)
        if chain is not None and modules[node.target].graph_input:
            user = _only_user(chain[-1])
            if (_fake_quant_after(chain[-1]) is None and user is not None and _is_add(user)
                    and isinstance(modules[node.target], QuantConv2d)):
                residual_chains.add(chain[-1])
                continue
            lower_layer(chain)
            continue
        if _is_add(node) and any(a in residual_chains for a in node.args):
            conv = residual_conv(node, modules, calls, lambda value: value in int_of)
            for a in node.args:  # (a prepared model whose add is float: the conv writes float)
                if a in residual_chains and (conv is None or a is not conv[0][-1]):
                    lower_layer(_chain_ending_at(a, modules, calls))
            if conv is not None:
                chain, other = conv
                relu = _fused_relu(node, modules)
                end = relu or node
                fq = _fake_quant_after(end)
                out = None if fq is None else attr(fq.target)
                with graph.inserting_after(fq or end):
                    new = graph.call_function(integer_conv_add, (attr(chain[0].target), chain[0].args[0], other,
                                                                 int_of[other], out, relu is not None, dtype))
                replace(chain + [node] + ([relu] if relu else []) + ([fq] if fq else []), new, out)
                continue
        if _is_add(node) and all(a in int_of for a in node.args):
            relu = _fused_relu(node, modules)
            end = relu or node
            fq = _fake_quant_after(end)
            out = None if fq is None else attr(fq.target)
            with graph.inserting_after(fq or end):
                new = graph.call_function(integer_add, (*node.args, *(int_of[a] for a in node.args), out,
                                                        relu is not None, dtype))
            replace([node] + ([relu] if relu else []) + ([fq] if fq else []), new, out)
            continue
        if _is_mul(node) and all(a in int_of for a in node.args) and _RULES.get()["integer_products"]:
            fq = _fake_quant_after(node)
            out = None if fq is None else attr(fq.target)
            with graph.inserting_after(fq or node):
                new = graph.call_function(integer_mul, (*node.args, *(int_of[a] for a in node.args), out, dtype))
            replace([node] + ([fq] if fq else []), new, out)
            continue
        if node.op == "call_module" and node.target.startswith(act_prefix):  # quantizes a float value
            with graph.inserting_after(node):
                new = graph.call_function(quantize_input, (node.args[0], attr(node.target)))
            replace([node], new, attrs[node.target])
            continue
        activation = lookup_function(node, modules)
        fq = _fake_quant_after(node)
        average = _integer_average(node, modules)
        if average is not None and node.args[0] in int_of and fq is not None:
            out = attr(fq.target)
            kind, arguments = average
            with graph.inserting_after(fq):
                new = graph.call_function(_AVERAGES[kind][0], (node.args[0], *arguments, int_of[node.args[0]], out))
            replace([node, fq], new, out)
            continue
        if activation is not None and node.args[0] in int_of and fq is not None and _RULES.get()["integer_lookups"]:
            out = attr(fq.target)
            out_quantizer = gm.get_submodule(fq.target)
            table = lookup_table(activation, gm.get_submodule(int_of[node.args[0]].target), out_quantizer, dtype) \
                if build_tables else torch.zeros(256, dtype=torch.int8 if out_quantizer.spec.signed else torch.uint8,
                                                 device=out_quantizer.scale.device)
            tables.register_buffer(node.name, table)
            with graph.inserting_after(fq):
                new = graph.call_function(F_q.quantized_lookup, (node.args[0], attr(f"{LOOKUP_TABLES}.{node.name}")))
            replace([node, fq], new, out)
            lookups[new.name] = _describe(node)
            continue
        # (a cat or passthrough whose output is quantized was planned as a float op: by rules a pipeline unpickled
        # from an earlier version does not record)
        if _is_cat(node) and all(a in int_of for a in node.args[0]) and fq is None:
            int_of[node] = int_of[node.args[0][0]]
            continue
        if node.args and isinstance(node.args[0], fx.Node) and node.args[0] in int_of \
                and _is_passthrough(node, modules) and fq is None:
            quantizer = int_of[node.args[0]]
            if _is_max_pool(node, modules):
                with graph.inserting_after(node):
                    new = graph.call_function(_integer_max_pool(node, modules), (node.args[0],),
                                              _max_pool_arguments(node, modules))
                replace([node], new, quantizer)
            elif (pooled := _global_max_pool_dims(node, modules)) is not None:
                with graph.inserting_after(node):
                    new = graph.call_function(torch.amax, (node.args[0], pooled), {"keepdim": True})
                replace([node], new, quantizer)
            elif _is_nearest_upsample(node, modules) and gm.get_submodule(quantizer.target).spec.signed:
                # int8 through float32 (exact): torch's nearest upsampling has no int8 kernel
                with graph.inserting_before(node):
                    as_float = graph.call_method("float", (node.args[0],))
                upsampled = graph.node_copy(node, lambda a: as_float if a is node.args[0] else a)
                node.prepend(upsampled)
                with graph.inserting_after(upsampled):
                    new = graph.call_method("to", (upsampled, torch.int8))
                replace([node], new, quantizer)
            elif activation_clamp(node, modules) == (0.0, None):
                with graph.inserting_after(node):
                    new = graph.call_function(integer_relu, (node.args[0], quantizer))
                replace([node], new, quantizer)
            elif (padding := _integer_padding(node, modules)) is not None:
                with graph.inserting_after(node):
                    new = graph.call_function(integer_pad, (node.args[0], *padding, quantizer))
                replace([node], new, quantizer)
            elif node.op == "call_module" and type(modules.get(node.target)) in _DROPOUT_MODULES:
                # the identity at inference, which is all a converted model runs (in train mode too: dropout on
                # the integers would be neither dropout nor the identity)
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                erased.add(node)
            else:
                if node.target in _REDUCTION_OF_VALUES:  # the same values, without the indices
                    node.target = _REDUCTION_OF_VALUES[node.target]
                if node.op == "call_method" and node.target == "view":
                    # the integers may be laid out otherwise than the float tensor (a conv writes channels-last),
                    # where a view of the same shape fails; reshape copies only then
                    node.target = "reshape"
                int_of[node] = quantizer
            continue
        if node.op == "output" and integer_output or _is_shape_query(node):
            continue
        node.args = fx.node.map_arg(node.args, lambda a: dequantize(a) if a in int_of else a)
        node.kwargs = fx.node.map_arg(node.kwargs, lambda a: dequantize(a) if a in int_of else a)
    # float values made from integers keep the kernels' channels-last layout where no view can read them (the float
    # ops between integer layers, SE blocks' products, concatenations, upsampling, run on it as they are)
    for node in graph.nodes:
        float_from_integers = (node.target is dequantize_output
                               or (node.target is integer_layer and node.args[2] is None)
                               or (node.target in (integer_conv_add, integer_add, integer_mul)
                                   and node.args[4] is None))
        if (node.op == "call_function" and float_from_integers
                and not reaches_a_layout_reader(node, gm, lambda user: user.target is quantize_input)):
            node.kwargs = {**node.kwargs, "keep_layout": True}
    _meta(gm).update(converted=True, lookups=lookups, output_quantizers=[int_of[n].target if n in int_of else None
                                                          for n in _output_nodes(graph)])
    graph.lint()
    gm.delete_all_unused_submodules()
    if not hasattr(gm, ACT_QUANT):  # an empty one (no layer takes integers: each is called more than once) goes
        gm.add_module(ACT_QUANT, nn.ModuleDict())
    gm.recompile()
    for q in gm.get_submodule(ACT_QUANT).values():
        q.refresh()


class _PipelineTracer(_Tracer):
    """The tracer of a pipeline, which torch.fx also uses to rebuild it from its code when it is unpickled
    (pickle, torch.save, copy.copy): the converted graph's ops are recorded as calls, not traced into."""

    def __init__(self):
        super().__init__(autowrap_functions=(quantize_input, dequantize_output, integer_layer, integer_add,
                                             integer_mul, integer_conv_add, integer_relu, integer_pad, integer_mean,
                                             integer_avg_pool, integer_adaptive_avg_pool, exact_average,
                                             F_q.quantized_lookup,
                                             F_q.quantized_max_pool1d, F_q.quantized_max_pool2d, argument_left_out))


# where the converted graph's calls take the pipeline's float dtype
_FLOAT_DTYPE_ARG = {dequantize_output: 2, integer_layer: 3, integer_add: 6, integer_mul: 5, integer_conv_add: 6}


def _output_nodes(graph: fx.Graph) -> list:
    nodes = []
    fx.node.map_arg(next(n for n in graph.nodes if n.op == "output").args, nodes.append)
    return nodes


def output_qparams(model: fx.GraphModule) -> list:
    """(scale, zero_point) of each integer output of a converted pipeline built with integer_output=True (in the
    order of the output's tensors; None for an output that is float)."""
    if not is_pipeline(model) or not _meta(model)["converted"]:
        raise ValueError("output_qparams: model must be a converted integer pipeline")
    result = []
    for target in _meta(model)["output_quantizers"]:
        if target is None:
            result.append(None)
        else:
            _, scale, zero_point, _ = model.get_submodule(target).qparams
            result.append((scale, zero_point))
    return result


def pipeline_notes(model: fx.GraphModule) -> tuple[dict, list]:
    """For reports on a converted pipeline: ({layer name: what its integer call fuses and writes}, notes on the
    whole graph: how many integer adds, quantizes and dequantizes it runs, and the ops kept float)."""
    if not is_pipeline(model) or not _meta(model)["converted"]:
        return {}, []
    layers, counts = {}, Counter()
    for node in model.graph.nodes:
        counts[node.target] += 1
        if node.target in (integer_layer, integer_conv_add):
            layer, out = node.args[0], node.args[2 if node.target is integer_layer else 4]
            clamp_min, clamp_max = (model.get_submodule(layer.target).clamp_min,
                                    model.get_submodule(layer.target).clamp_max)
            parts = ["integer input"]
            if (clamp_min, clamp_max) == (0.0, None):
                parts.append("ReLU fused")
            elif clamp_min is not None or clamp_max is not None:
                parts.append(f"clamp [{clamp_min}, {clamp_max}] fused")
            if node.target is integer_conv_add:
                parts.append("residual add + ReLU fused" if node.args[5] else "residual add fused")
            spec = None if out is None else model.get_submodule(out.target).spec
            parts.append("float output" if spec is None else f"{'int' if spec.signed else 'uint'}{spec.bits} output")
            parts += [f"then {_meta(model)['lookups'][user.name]} as a table lookup" for user in node.users
                      if user.target is F_q.quantized_lookup]
            layers[node.args[0].target] = ", ".join(parts)
    notes = [f"integer pipeline: {counts[integer_layer] + counts[integer_conv_add]} integer layer call(s), "
             f"{counts[integer_add] + counts[integer_conv_add]} integer add(s) ({counts[integer_conv_add]} fused into "
             f"a conv's epilogue), {counts[integer_mul]} integer product(s), {counts[F_q.quantized_lookup]} activation "
             f"lookup(s), {counts[integer_mean]} integer mean(s) (global average pools), "
             f"{counts[integer_avg_pool] + counts[integer_adaptive_avg_pool]} integer average pool(s), "
             f"{counts[quantize_input]} quantize(s), {counts[dequantize_output]} dequantize(s)"]
    if _meta(model)["lookups"]:
        notes.append("activations run on integers as 256-entry table lookups: "
                     + ", ".join(_meta(model)["lookups"].values()))
    if _meta(model)["float_ops"]:
        notes.append("kept float between integer layers: " + ", ".join(_meta(model)["float_ops"]))
    if _meta(model)["layer_by_layer"]:
        notes.append("layer by layer inside modules the pipeline does not reach into: "
                     + ", ".join(_meta(model)["layer_by_layer"]))
    return layers, notes

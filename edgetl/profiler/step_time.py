"""The native runner's training step time, predicted from shapes: a roofline with a per-layer cost.

A step of ``edgetl-device`` (MobileTL's trained top, batch N) is its GEMMs (every 1x1
convolution and linear layer: forward, input gradient, weight gradient; edgetl's blocked GEMM),
the streaming of activation maps through memory by everything else (depthwise convolutions,
norms, activations, squeeze-excitation, residuals), and a fixed cost per layer (a dozen operator
calls, forward and backward, each dispatched and spread over the threads). So

    seconds = (gemm_flops + LAYER_COST x layers) / gemm rate + MAP_PASSES x map_bytes / memory bandwidth

with the device's two rates from its profile (``gemm_gflops``, ``memory_gbps``: what
``edgetl-gemm-bench`` measures there). :data:`MAP_PASSES` (traffic in units of the top's
activation maps) and :data:`LAYER_COST` (in GEMM FLOPs, so it scales with the CPU) are fitted
side by side on x86-64 (``benchmarks/device_step.py``, both settings, 2 threads). Pure functions
of shapes and policy; nothing is run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from edgetl.models.blocks import feature_units, first_trained_unit
from edgetl.profiler.shapes import Shape, float_bytes, walk
from edgetl.profiler.units import head_layers, unit_layers
from edgetl.train.policy import TrainPolicy

#: full passes over the top's activation maps (forward outputs, fp32) that one step's non-GEMM
#: work makes, forward and backward; and the fixed cost of one layer's operators, in GEMM FLOPs:
#: fitted with benchmarks/device_step.py (demo and MobileNetV3-Large settings, 2 threads, x86-64)
MAP_PASSES = 5.6
LAYER_COST = 22e6


#: one matrix product c[m x n] = a[m x k] b[k x n], with a (b) read transposed when flagged
GemmShape = tuple[int, int, int, bool, bool]


@dataclass(frozen=True)
class StepWork:
    """What one training step computes, from the trained top's shapes."""

    #: the 1x1 convolutions' and linear layers' products: forward, input and weight gradients
    gemms: tuple[GemmShape, ...]
    depthwise_flops: float  # forward and both gradients
    map_bytes: int  # every layer output of the trained top, fp32
    forward_flops: float  # the convolutions and linear layers of the forward alone
    layers: int  # layers of the trained top (convolutions, norms, activations, ...)

    @property
    def gemm_flops(self) -> float:
        return sum(2.0 * m * n * k for m, n, k, _, _ in self.gemms)

    def to_dict(self) -> dict:
        return {**asdict(self), "gemm_flops": self.gemm_flops}


@dataclass(frozen=True)
class StepTimeEstimate:
    """Predicted seconds of one native training step, by term. An estimate."""

    gemm: float
    streaming: float
    layers: float

    @property
    def total(self) -> float:
        return self.gemm + self.streaming + self.layers

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _gemm(m: int, k: int, n: int, input_grad: bool) -> list[GemmShape]:
    """y[m x n] = x[m x k] w^T (w: n x k) and its gradients: dx = dy w only when the input is trained,
    dw = dy^T x; as the device's kernels run them (``deploy/native/kernels/pointwise.cpp``)."""
    return [(m, n, k, False, True)] + ([(m, k, n, False, False)] if input_grad else []) + [(n, k, m, True, False)]


def step_work(model: nn.Module, policy: TrainPolicy, *, batch_size: int, image_size: int) -> StepWork:
    """The GEMM and depthwise FLOPs and activation-map bytes of one step training ``model``'s top K."""
    units = feature_units(model)
    trained_from = first_trained_unit(units, policy.blocks)
    shape: Shape = (batch_size, 3, image_size, image_size)
    gemms: list[GemmShape] = []
    depthwise = forward = 0.0
    maps = count = 0
    first = True  # the top's first layer reads the frozen bottom's features: no input gradient
    layer_lists = [(i >= trained_from, unit_layers(name, unit)) for i, (name, unit) in enumerate(units)] + [(True, head_layers(model))]
    for trained, layers in layer_lists:
        for _, layer, _, y in walk(layers, shape):
            if trained:
                pixels = math.prod(y[:1] + y[2:])
                products = []  # (m, k, n) of each y = x w^T
                if layer.op == "conv" and layer.groups > 1 and layer.groups == layer.in_channels:
                    forward += 2.0 * math.prod(y) * layer.kernel**2
                    depthwise += 3 * 2.0 * math.prod(y) * layer.kernel**2
                elif layer.op == "conv":
                    products = [(pixels, layer.in_channels // layer.groups * layer.kernel**2, layer.out_channels)]
                elif layer.op == "linear":
                    products = [(y[0], layer.in_channels, layer.out_channels)]
                elif layer.op == "se":  # its two 1x1 convolutions on the pooled map
                    products = [(y[0], layer.in_channels, layer.se_squeeze), (y[0], layer.se_squeeze, layer.in_channels)]
                for m, k, n in products:
                    forward += 2.0 * m * k * n
                    gemms += _gemm(m, k, n, input_grad=layer.op == "se" or not first)
                maps += float_bytes(y)
                count += 1
                first = first and layer.op not in ("conv", "linear")
            shape = y
    return StepWork(tuple(gemms), depthwise, maps, forward, count)


def predict_native_step_time(work: StepWork, *, gemm_gflops: float, memory_gbps: float) -> StepTimeEstimate:
    """Seconds of one ``edgetl-device`` training step on a device with these two rates."""
    if not (gemm_gflops > 0 and memory_gbps > 0):
        raise ValueError("gemm_gflops and memory_gbps must be positive")
    return StepTimeEstimate(
        gemm=work.gemm_flops / (gemm_gflops * 1e9),
        streaming=MAP_PASSES * work.map_bytes / (memory_gbps * 1e9),
        layers=LAYER_COST * work.layers / (gemm_gflops * 1e9),
    )

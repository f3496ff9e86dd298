"""The names MobileTL's operators take, stated once (torch-free: ``TrainPolicy`` checks a policy read
from a file with them, and a torch-free device client reads policies)."""

#: the activation backward: ``"sign"`` (gradient where the input is > 0) or ``"exact"`` (the true
#: derivative where it is binary: ReLU6)
ACTIVATION_GRADS: tuple[str, ...] = ("sign", "exact")
#: where the 1-bit mask lives: read off the output (``"reuse"``) or stored bit-packed (``"packed"``)
ACTIVATION_MASKS: tuple[str, ...] = ("reuse", "packed")
#: how a conv's input is kept for backward: as computed, or compressed (the rest)
SAVED_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
COMPRESSED_PRECISIONS: tuple[str, ...] = SAVED_PRECISIONS[1:]

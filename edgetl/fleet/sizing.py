"""A client's K from its device profile: the memory planner's choice, capped at the fleet's K.

A device with less memory trains fewer blocks (a Pi Zero fewer than a Pi 5); the server's
per-key averaging (:mod:`~edgetl.fleet.aggregate`) lets them train one model together. The plan
is for PyTorch eager (what a Python client runs), the recipe's batch size and optimizer, and no
memory options beyond MobileTL, so the client trains exactly the policy the plan chose.
"""

from __future__ import annotations

import os

from edgetl.fleet.config import FleetConfig
from edgetl.profiler.device import DeviceProfile
from edgetl.profiler.planner import plan


def blocks_for_device(device: DeviceProfile | str | os.PathLike, config: FleetConfig, *, num_classes: int) -> int:
    """The largest K (at most ``config.blocks``) whose predicted training peak fits ``device``.

    Raises:
        EdgetlError: nothing fits (not even the classifier alone); the message says what it needs.
    """
    chosen = plan(
        device,
        config.model,
        image_size=config.image_size,
        method=config.method,
        batch_sizes=(config.batch_size,),
        num_classes=num_classes,
        optimizer=config.optimizer,
        min_blocks=0,
        memory_options=False,
    ).chosen
    return min(chosen.blocks, config.blocks)

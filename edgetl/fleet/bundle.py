"""The bundle a device client trains with: the fleet's global model exported for the device runner.

A device without PyTorch trains through ``edgetl-device`` (:mod:`edgetl.fleet.device`), whose
training program is fixed at export: K, batch and resolution. So the server's operator exports one
bundle per kind of device from the fleet's current global model (its initial one before round 1)
with :func:`device_bundle` (``edgetl fleet bundle``), choosing K and batch for the device with
``edgetl plan --runtime native``. The frozen bottom in the bundle is the fleet's (every client
loads the same pretrained weights); the trained tensors are replaced by the server's each round,
so a bundle stays usable for the whole run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from edgetl.errors import ConfigError
from edgetl.exporter import ExportBundle, ExportConfig, export
from edgetl.fleet.checkpoint import load_round
from edgetl.fleet.config import FleetConfig
from edgetl.fleet.local import build_network, classes_for
from edgetl.fleet.payload import load_arrays
from edgetl.train.policy import TrainPolicy


def device_bundle(
    config: FleetConfig,
    out: str | os.PathLike,
    *,
    blocks: int,
    batch_size: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ExportBundle:
    """Export the fleet's global model (``config.out``'s last round, else the initial model) as a
    training bundle for a device client that trains the top ``blocks`` blocks at ``batch_size``.

    ``lr``/``momentum``: the device's SGD (a fleet whose recipe says ``sgd`` overrides ``lr``).
    ``blocks`` may not exceed ``config.blocks``: the server sends only what a K = ``config.blocks``
    client trains.
    """
    if not 0 <= blocks <= config.blocks:
        raise ConfigError(f"a device bundle trains at most the fleet's blocks ({config.blocks}), got {blocks}")
    classes = classes_for(config)
    net = build_network(config, num_classes=len(classes), blocks=blocks)
    state = load_round(config.out)
    if state is not None:
        log(f"exporting the global model after round {state.round} of {config.out}")
        load_arrays(net, state.arrays)
    export_config = ExportConfig(
        image_size=config.image_size, batch_size=batch_size, training=True, lr=lr, momentum=momentum, overwrite=overwrite, seed=config.seed
    )
    policy = TrainPolicy(blocks=blocks, method=config.method)
    return export(net, policy, Path(out), export_config, model_name=config.model, classes=classes, log=log)

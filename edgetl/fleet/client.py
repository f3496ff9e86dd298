"""Flower's ClientApp for the fleet (Message API): train and evaluate handlers.

A client reads its recipe from the server's message (``config``: :meth:`FleetConfig.to_record`)
and only its own things from Flower's node config: ``data`` (its ``ImageFolder``; without it,
``partition-id`` / ``num-partitions`` pick its share of the recipe's data, as the simulation
engine sets them) and ``device`` (a device-profile TOML: its K comes from the planner). It loads
the global tensors it receives, fine-tunes, and replies with only what it trained
(:func:`~edgetl.fleet.payload.shared_keys`) and its figures. Under FedBN its norms' statistics
stay in its context state between rounds and never leave it.

A node config with ``bundle`` makes it a device client: it trains through the native runner
(:mod:`edgetl.fleet.device`) and never imports torch, which is why this module's imports are
torch-free and the eager path imports its machinery inside the handlers.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgetl.fleet.config import FleetConfig
from edgetl.fleet.payload import RoundResult, is_stat_key, nbytes

LOCAL_STATS = "edgetl-local-stats"


def _node(context: Context) -> dict[str, Any]:
    node = dict(context.node_config)
    return {
        "partition": int(node["partition-id"]) if "partition-id" in node else None,
        "partitions": int(node["num-partitions"]) if "num-partitions" in node else None,
        **{key: str(node[key]) if node.get(key) else None for key in ("data", "device", "bundle", "val")},
    }


def _prepare(msg: Message, context: Context, *, train: bool):
    """The recipe, this client's data, K and network with the global tensors loaded."""
    from edgetl.errors import DataError
    from edgetl.fleet.local import build_network, client_data
    from edgetl.fleet.payload import load_arrays
    from edgetl.fleet.sizing import blocks_for_device

    config = FleetConfig.from_record(dict(msg.content["config"]))
    rnd = int(msg.content["round"]["round"])
    node = _node(context)
    train_set, val_set, classes = client_data(config, partition=node["partition"], partitions=node["partitions"], data=node["data"])
    expected = list(msg.content["round"]["classes"])
    if classes != expected:
        raise DataError(f"this client's classes {classes} differ from the fleet's {expected}")
    device = node["device"]
    if device is None and config.devices and node["partition"] is not None:  # a simulated client's profile
        device = config.devices[node["partition"] % len(config.devices)]
    blocks = blocks_for_device(device, config, num_classes=len(classes)) if device and train else config.blocks
    net = build_network(config, num_classes=len(classes), blocks=blocks)
    load_arrays(net, {k: a.numpy() for k, a in msg.content["arrays"].items()})
    if config.fedbn and LOCAL_STATS in context.state:  # this client's own statistics, kept from its last round
        own = {k: a.numpy() for k, a in context.state[LOCAL_STATS].items()}
        load_arrays(net, {k: v for k, v in own.items() if k in net.state_dict()})
    return config, rnd, node, net, train_set, val_set, blocks


def _seed(config: FleetConfig, rnd: int, node: dict[str, Any], node_id: int) -> int:
    return (config.seed * 1_000_003 + rnd * 7919 + (node["partition"] if node["partition"] is not None else node_id)) % (2**31 - 1)


def array_record(arrays: dict) -> ArrayRecord:
    """numpy arrays by name as a Flower ``ArrayRecord`` (``.npy`` bytes, no pickles)."""
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune from the global tensors; reply with the trained ones (and statistics unless FedBN)."""
    if _node(context)["bundle"]:
        return _device_train(msg, context)
    from edgetl.fleet.local import local_finetune
    from edgetl.fleet.payload import shared_keys, to_arrays

    config, rnd, node, net, train_set, _, blocks = _prepare(msg, context, train=True)
    keys = shared_keys(net, stats=not config.fedbn)
    result = local_finetune(net, train_set, config=config, keys=keys, seed=_seed(config, rnd, node, context.node_id))
    if config.fedbn:
        stats = [k for k in shared_keys(net, stats=True) if is_stat_key(k)]
        context.state[LOCAL_STATS] = array_record(to_arrays(net.state_dict(), stats))
    return _train_reply(msg, result, result.arrays, blocks)


def _train_reply(msg: Message, result: RoundResult, arrays: dict, blocks: int) -> Message:
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.train_loss,
            "train-acc": result.train_acc,
            "blocks": blocks,
            "upload-bytes": nbytes(arrays),
            "peak-rss-bytes": result.peak_rss_bytes,
            "seconds": result.seconds,
        }
    )
    return Message(RecordDict({"arrays": array_record(arrays), "metrics": metrics}), reply_to=msg)


def _device_start(msg: Message, context: Context):
    """A device client's recipe, runner and starting tensors (the global ones, its own statistics under FedBN)."""
    from edgetl.fleet.device import DeviceClient

    config = FleetConfig.from_record(dict(msg.content["config"]))
    client = DeviceClient.from_node(dict(context.node_config))
    offered = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    classes = list(msg.content["round"]["classes"])
    client.check_fits(
        model=config.model, method=config.method, image_size=config.image_size, classes=classes, offered=offered, fedbn=config.fedbn
    )
    start = dict(offered)
    if config.fedbn and LOCAL_STATS in context.state:
        start.update({k: a.numpy() for k, a in context.state[LOCAL_STATS].items()})
    return config, client, offered, start


def _device_train(msg: Message, context: Context) -> Message:
    """Train through the native runner (no torch): reply with the tensors the server sent that the bundle trains."""
    from edgetl.fleet.device import DeviceClientError

    node = _node(context)
    if node["data"] is None:
        raise DeviceClientError("a device client needs its images: node config data=DIR (one subfolder per class)")
    config, client, offered, start = _device_start(msg, context)
    rnd = int(msg.content["round"]["round"])
    lr = config.lr if config.optimizer == "sgd" else None  # otherwise the bundle's optimizer's learning rate
    seed = _seed(config, rnd, node, context.node_id)
    result = client.train(start, node["data"], epochs=config.epochs, seed=seed, lr=lr, timeout=config.round_timeout)
    if config.fedbn:
        context.state[LOCAL_STATS] = array_record({k: v for k, v in result.arrays.items() if is_stat_key(k)})
    arrays = {k: v for k, v in result.arrays.items() if k in offered}
    return _train_reply(msg, result, arrays, int(client.manifest["model"]["policy"]["blocks"]))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global model on this client's held-out images (its own statistics under FedBN)."""
    node = _node(context)
    if node["bundle"]:
        from edgetl.fleet.device import DeviceClientError

        if node["val"] is None:
            raise DeviceClientError("federated evaluation on a device client needs node config val=DIR (one subfolder per class)")
        _, client, _, start = _device_start(msg, context)
        loss, acc, count = client.evaluate(start, node["val"])
    else:
        from edgetl.fleet.local import accuracy

        _, _, _, net, _, val_set, _ = _prepare(msg, context, train=False)
        (loss, acc), count = accuracy(net, val_set), len(val_set)
    metrics = MetricRecord({"num-examples": count, "eval-loss": loss, "eval-acc": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def train_message_content(arrays: dict, config: FleetConfig, rnd: int, classes: list[str]) -> RecordDict:
    """What the server sends a client: the global tensors, the recipe, the round and the classes."""
    return RecordDict(
        {
            "arrays": array_record(arrays),
            "config": ConfigRecord(config.to_record()),
            "round": ConfigRecord({"round": rnd, "classes": list(classes)}),
        }
    )

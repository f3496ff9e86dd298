"""Flower's ServerApp for the fleet (Message API): the round loop, owned here end to end.

Flower's stock ``FedAvg`` insists that every reply carries the same keys and averages them
globally; a MobileTL fleet's clients send different keys (different K). So the ServerApp's
``main`` runs its own loop over the Grid: per round it waits for ``min_clients`` connected
clients, samples ``fraction`` of them (seeded), sends each the global tensors a K = ``blocks``
client trains plus the recipe, collects replies until ``round_timeout``, rejects bad ones with a
logged reason (:mod:`~edgetl.fleet.validate`), averages the rest per key
(:mod:`~edgetl.fleet.aggregate`), evaluates, and writes the global model atomically
(:mod:`~edgetl.fleet.checkpoint`). A restarted server resumes after the last saved round.

A client that dies mid-round, errs or is too slow is simply missing from the round's replies;
with fewer than ``min_replies`` valid replies the round changes nothing (logged) and the next starts.
A run in which no round used any reply is an error (:func:`no_reply_problem`). A ``stop`` event
(the simulation engine's Ctrl-C) ends the loop at once; the round in progress is not saved.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from edgetl.errors import RunError
from edgetl.fleet.aggregate import Reply, fedavg_per_key
from edgetl.fleet.checkpoint import RoundState, load_round, save_round
from edgetl.fleet.client import train_message_content
from edgetl.fleet.config import FleetConfig
from edgetl.fleet.payload import load_arrays, nbytes, shared_keys, to_arrays
from edgetl.fleet.validate import reply_problem

log = logging.getLogger("edgetl.fleet")

#: settings a resumed run must share with the checkpoint (others, e.g. rounds, may change)
_IDENTITY = ("model", "weights", "blocks", "method", "fedbn", "image_size", "data", "seed")
_NODE_POLL_SECONDS = 0.5
_PULL_SECONDS = 0.1


@dataclass(frozen=True)
class Parsed:
    """A reply read off the wire: its tensors and claimed count, or why it could not be read."""

    node: int
    arrays: dict[str, np.ndarray]
    num_examples: Any
    metrics: dict[str, Any]
    problem: str | None = None


def parse_reply(msg: Message) -> Parsed:
    """Decode a train reply (``.npy`` arrays, never pickles); a malformed one carries its problem."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return Parsed(node, {}, None, {}, f"client error: {_error_line(msg.error.reason)}")
    try:
        metrics = dict(msg.content["metrics"])
        arrays = {key: array.numpy() for key, array in msg.content["arrays"].items()}
    except Exception as exc:  # anything off the wire: a reason, never a crash of the server
        return Parsed(node, {}, None, {}, f"unreadable reply ({type(exc).__name__}: {str(exc)[:100]})")
    return Parsed(node, arrays, metrics.get("num-examples"), metrics)


def _error_line(reason: str) -> str:
    """A client's error reason as one line. Flower's simulation engine wraps the ClientApp's
    exception in Ray's multi-line report, whose last ``Message: ...`` carries the exception's own text."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Message: " in line:
            return line.split("Message: ", 1)[1].rstrip("'>")
    return lines[-1] if lines else str(reason)


def run_fleet(grid: Grid, config: FleetConfig, stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Run ``config.rounds`` rounds over ``grid`` (resuming after the last saved one); the history.
    When ``stop`` is set the loop ends without saving the round in progress."""
    from edgetl.fleet.local import accuracy, build_network, classes_for, test_set

    classes = classes_for(config)
    net = build_network(config, num_classes=len(classes), blocks=config.blocks)
    state = load_round(config.out)
    if state is None:
        state = RoundState(0, to_arrays(net.state_dict(), net.state_dict().keys()), [], config.to_record())
    else:
        changed = [k for k in _IDENTITY if state.config.get(k) != config.to_record().get(k)]
        if changed:
            raise RunError(f"{config.out} holds a fleet run with other settings ({', '.join(changed)}): use another --out")
        log.info("resuming %s after round %d", config.out, state.round)
    broadcast = shared_keys(net, stats=not config.fedbn)
    allowed = {key: tuple(state.arrays[key].shape) for key in broadcast}
    evaluation = test_set(config) if not config.fedbn else None

    for rnd in range(state.round + 1, config.rounds + 1):
        t0 = time.perf_counter()
        nodes = _wait_for_nodes(grid, config, stop)
        rng = np.random.default_rng([config.seed, rnd])
        count = min(len(nodes), max(config.min_clients, math.ceil(config.fraction * len(nodes))))
        # node ids are uint64: sample positions, never the ids themselves (numpy would turn them into floats)
        sampled = sorted(nodes[int(i)] for i in rng.choice(len(nodes), size=count, replace=False)) if nodes else []
        content = train_message_content({k: state.arrays[k] for k in broadcast}, config, rnd, classes)
        messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in sampled]
        replies = _send_and_receive(grid, messages, config.round_timeout, stop) if sampled else []
        if stop is not None and stop.is_set():
            log.warning("round %d interrupted: not saved (%d saved rounds kept)", rnd, state.round)
            break

        accepted: list[Reply] = []
        metrics: list[dict[str, Any]] = []
        rejected: list[str] = []
        for parsed in map(parse_reply, replies):
            problem = parsed.problem or reply_problem(parsed.arrays, parsed.num_examples, allowed=allowed, max_examples=config.max_examples)
            if problem is not None:
                log.warning("round %d: rejected reply from node %d: %s", rnd, parsed.node, problem)
                rejected.append(f"node {parsed.node}: {problem}")
                continue
            accepted.append(Reply(parsed.node, int(parsed.num_examples), parsed.arrays))
            metrics.append(parsed.metrics)
        missing = len(sampled) - len(replies)
        if missing:
            log.warning("round %d: %d of %d sampled clients did not reply within %gs", rnd, missing, len(sampled), config.round_timeout)
        applied = len(accepted) >= config.min_replies
        if applied:
            state.arrays, _ = fedavg_per_key(state.arrays, accepted)
        else:
            log.warning(
                "round %d: %d valid replies < min_replies=%d: the global model is unchanged", rnd, len(accepted), config.min_replies
            )

        row: dict[str, Any] = {
            "round": rnd,
            "sampled": len(sampled),
            "replies": len(replies),
            "accepted": len(accepted),
            "rejected": rejected,
            "applied": applied,
            "blocks": [int(m.get("blocks", -1)) for m in metrics],
            "upload_bytes": [nbytes(r.arrays) for r in accepted],  # counted here, not as the client claims
            "client_peak_rss_bytes": [int(m.get("peak-rss-bytes", 0)) for m in metrics],
            "examples": [r.num_examples for r in accepted],
            "train_loss": _weighted([(m.get("train-loss", 0.0), r.num_examples) for m, r in zip(metrics, accepted, strict=True)]),
        }
        if evaluation is not None:
            load_arrays(net, state.arrays)
            row["test_loss"], row["test_acc"] = accuracy(net, evaluation[0])
        if (config.fedbn or config.federated_eval) and sampled:
            row["federated_acc"] = _federated_accuracy(grid, config, state, broadcast, rnd, classes, sampled, stop)
            if stop is not None and stop.is_set():
                log.warning("round %d interrupted: not saved (%d saved rounds kept)", rnd, state.round)
                break
        row["seconds"] = time.perf_counter() - t0
        state.history.append(row)
        state.round = rnd
        save_round(config.out, state)
        log.info("round %d: %s", rnd, _round_line(row))
    return state.history


def no_reply_problem(history: list[dict[str, Any]]) -> str | None:
    """Why a run whose rounds all went without a usable reply trained nothing (None when one was used)."""
    if not history or any(row["accepted"] for row in history):
        return None
    last = history[-1]
    if last["rejected"]:
        why = last["rejected"][0]
    elif not last["sampled"]:
        why = "no client connected"
    else:
        why = f"{last['sampled'] - last['replies']} of {last['sampled']} sampled clients did not reply within the round timeout"
    return f"no round used any client reply (last round: {why}); the global model is untrained"


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float, stop: threading.Event | None) -> list[Message]:
    """The replies to ``messages`` within ``timeout``; with ``stop``, those received until it is set."""
    if stop is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline and not stop.is_set():
        for reply in grid.pull_messages(list(pending)):
            replies.append(reply)
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            stop.wait(_PULL_SECONDS)
    return replies


def _wait_for_nodes(grid: Grid, config: FleetConfig, stop: threading.Event | None = None) -> list[int]:
    """Connected clients, waiting up to ``round_timeout`` for ``min_clients`` of them."""
    deadline = time.monotonic() + config.round_timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= config.min_clients or time.monotonic() > deadline or (stop is not None and stop.is_set()):
            if len(nodes) < config.min_clients:
                log.warning("only %d clients connected (min_clients=%d) after %gs", len(nodes), config.min_clients, config.round_timeout)
            return nodes
        time.sleep(_NODE_POLL_SECONDS)


def _federated_accuracy(grid, config, state, broadcast, rnd, classes, nodes, stop=None) -> float | None:
    """Example-weighted accuracy the clients measure on their own held-out images (FedBN: with their own statistics)."""
    content = train_message_content({k: state.arrays[k] for k in broadcast}, config, rnd, classes)
    messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node) for node in nodes]
    pairs = []
    for reply in _send_and_receive(grid, messages, config.round_timeout, stop):
        if reply.has_error():
            log.warning("round %d: evaluation failed on node %d: %s", rnd, reply.metadata.src_node_id, reply.error.reason)
            continue
        m = dict(reply.content["metrics"])
        count = m.get("num-examples")
        if isinstance(count, int) and 1 <= count <= config.max_examples:
            pairs.append((float(m.get("eval-acc", 0.0)), count))
    return _weighted(pairs) if pairs else None


def _weighted(pairs: list[tuple[float, int]]) -> float | None:
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def _round_line(row: dict[str, Any]) -> str:
    parts = [f"{row['accepted']}/{row['sampled']} replies used", f"K {row['blocks']}"]
    if row["upload_bytes"]:
        parts.append(f"upload {np.mean(row['upload_bytes']) / 2**20:.2f}MiB/client")
    for key in ("test_acc", "federated_acc"):
        if row.get(key) is not None:
            parts.append(f"{key} {100 * row[key]:.2f}%")
    return ", ".join(parts) + f", {row['seconds']:.1f}s"


def server_app(config: FleetConfig | None = None, stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp running :func:`run_fleet` with ``config`` (None: from the run config, as
    ``flwr run`` passes it: :meth:`FleetConfig.from_record` of ``context.run_config``) and ``stop``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if not log.handlers:  # in a ServerApp process of its own (deployment): its lines reach `flwr run --stream`
            log.addHandler(logging.StreamHandler())
            log.setLevel(logging.INFO)
        run_fleet(grid, config if config is not None else FleetConfig.from_record(dict(context.run_config)), stop)

    return app


app = server_app()

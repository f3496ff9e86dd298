"""Shared fixtures: a small learnable image dataset and stand-in 'pretrained' weights.

No weights can be downloaded here. The stand-in for a pretrained network is a torchvision
architecture whose batch-norm statistics were calibrated on a source dataset and which was then
trained in full on it for a few steps; tests then transfer it to a target dataset of the same
family. The architecture and the weight-loading path are the real ones.
"""

from __future__ import annotations

import os

# One math thread: OpenMP's spinning threads slow small CPU workloads by 100x whenever another
# process holds a core (a child process in a test, a parallel job). Inherited by child processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetl.models.zoo import load_model, transforms_for

torch.set_num_threads(1)

#: sorted, as an ImageFolder lists them: a fleet's server reads its classes from a folder, and a
#: device bundle exported from the shared run must list them in that order to join it
CLASSES = ("blue", "green", "red")
_TINT = {"red": 0, "green": 1, "blue": 2}  # the channel each class is tinted towards


def make_image_folder(root: Path, per_class: int = 24, size: int = 24, seed: int = 0) -> Path:
    """Class k: noisy images tinted towards channel k, with a bright blob of it at a random place."""
    rng = np.random.default_rng(seed)
    for name in ("red", "green", "blue"):  # the order the random stream was first drawn in
        k = _TINT[name]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, size=(size, size, 3)).astype(np.uint8)
            img[..., k] += 60
            y, x = rng.integers(0, size // 2, size=2)
            img[y : y + size // 2, x : x + size // 2, k] = rng.integers(170, 255)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def write_truncated_jpeg(path: Path, size: int = 48, seed: int = 0) -> Path:
    """The first half of a quality-95 JPEG of noise: PIL's ``verify()`` accepts it, decoding fails."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(size, size, 3)).astype(np.uint8)).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "train")


@pytest.fixture(scope="session")
def source_folder(tmp_path_factory) -> Path:
    """The 'pretraining' data: same task family, other images."""
    return make_image_folder(tmp_path_factory.mktemp("source") / "train", per_class=40, seed=1)


def small_fleet_config(tmp_path: Path, data: Path, **overrides):
    """A fleet of two MobileNetV3-Small clients on ``data``, 32 px, one round (the engine tests)."""
    from edgetl.fleet.config import FleetConfig

    values = dict(
        model="mobilenet_v3_small", data=str(data), test_data=str(data), clients=2, alpha=None, rounds=1, blocks=2,
        image_size=32, batch_size=8, min_clients=2, out=str(tmp_path / "server"), round_timeout=120.0, lr=1e-2,
    )  # fmt: skip
    return FleetConfig(**(values | overrides))


def set_task_identity(monkeypatch) -> None:
    """What Flower's runtime sets in a ServerApp process before any Message is built."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class LoopbackGrid:
    """Flower's Grid in one process: node i is the ClientApp ``apps[i]`` with its own Context
    (partition i of n, or ``node_configs[i]``). ``drop`` nodes never answer (killed); an exception
    becomes an error reply, as a SuperNode returns it."""

    def __init__(self, apps, *, drop=(), fail_at_round=None, first_id=100, node_configs=None):
        from flwr.app import Context, RecordDict

        self.apps, self.first_id = apps, first_id
        nodes = node_configs or [{"partition-id": i, "num-partitions": len(apps)} for i in range(len(apps))]
        self.contexts = [Context(1, first_id + i, node, RecordDict(), {}) for i, node in enumerate(nodes)]
        self.drop, self.fail_at_round, self.sent = set(drop), fail_at_round, []

    def get_node_ids(self):
        return [self.first_id + i for i in range(len(self.apps))]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            rnd = int(msg.content["round"]["round"])
            if rnd == self.fail_at_round:
                raise KeyboardInterrupt  # the server process dies mid-round
            i = msg.metadata.dst_node_id - self.first_id
            if not 0 <= i < len(self.apps):
                raise ValueError(f"Invalid destination node ID for Message: {msg.metadata.dst_node_id}")  # as the SuperLink says
            self.sent.append((rnd, i, sorted(msg.content["arrays"].keys())))
            if i in self.drop:
                continue
            try:
                replies.append(self.apps[i](msg, self.contexts[i]))
            except Exception as exc:
                from flwr.app import Error, Message

                replies.append(Message(Error(code=0, reason=str(exc)), reply_to=msg))
        return replies


def calibrate(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Set every batch norm's statistics to those of ``model``'s activations on ``x``."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(x)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def pretrained_model(name: str, folder: Path, image_size: int = 32, steps: int = 60) -> torch.nn.Module:
    """A stand-in for a pretrained ``name``: calibrated, then briefly trained in full on ``folder``.

    Its classifier has 5 outputs, so loading it for the 3-class target gives a fresh head, as with
    real ImageNet weights.
    """
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    model = load_model(name, num_classes=5)
    data = ImageFolder(str(folder), transform=transforms_for(name, image_size=image_size, train=False))
    x, y = torch.stack([data[i][0] for i in range(len(data))]), torch.tensor(data.targets)
    calibrate(model, x).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (16,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def pretrained_file(tmp_path_factory, source_folder):
    """``pretrained_file(name)`` -> path of a stand-in pretrained state dict for ``name``."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            path = tmp_path_factory.mktemp("weights") / f"{name}.pt"
            torch.save(pretrained_model(name, source_folder).state_dict(), path)
            cache[name] = path
        return cache[name]

    return get


# =================================================================================================
# Shared export bundle (owned by the exporter's tests; used by tests/test_export.py and
# tests/test_native.py). One finished run and its 'edgetl export --training' bundle per session:
# lowering is the slow part.
# =================================================================================================

EXPORT_IMAGE_SIZE, EXPORT_BATCH = 64, 4
EXPORT_LR, EXPORT_MOMENTUM = 0.005, 0.9


def export_policy():
    """The shared run's policy: MobileTL, K=2."""
    from edgetl.train.policy import TrainPolicy

    return TrainPolicy(blocks=2)


@pytest.fixture(scope="session")
def export_run(tmp_path_factory) -> Path:
    """A finished 'edgetl finetune' run: config.json + model.pt (stand-in pretrained MobileNetV2, 3-class head)."""
    import json

    work = tmp_path_factory.mktemp("export-run")
    source = make_image_folder(work / "source", per_class=20, seed=1)
    pretrained = pretrained_model("mobilenet_v2", source, image_size=32, steps=30)
    torch.manual_seed(0)
    model = load_model("mobilenet_v2", num_classes=len(CLASSES))
    model.load_state_dict({k: v for k, v in pretrained.state_dict().items() if not k.startswith("classifier")}, strict=False)
    policy = export_policy().to_dict()
    run = work / "run"
    run.mkdir()
    torch.save(
        {"model": model.state_dict(), "model_name": "mobilenet_v2", "classes": list(CLASSES), "policy": json.dumps(policy)},
        run / "model.pt",
    )
    config = {
        "model": "mobilenet_v2",
        "blocks": 2,
        "method": "mobiletl",
        "image_size": EXPORT_IMAGE_SIZE,
        "batch_size": EXPORT_BATCH,
        "classes": list(CLASSES),
        "policy": policy,
    }
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="session")
def training_bundle(export_run, tmp_path_factory) -> Path:
    """``edgetl export --training`` of :func:`export_run` (batch 4, SGD lr 0.005 momentum 0.9)."""
    from edgetl.cli import main

    out = tmp_path_factory.mktemp("export-bundle") / "dist"
    argv = ["--debug", "export", "--checkpoint", str(export_run), "--out", str(out), "--training"]
    argv += ["--batch-size", str(EXPORT_BATCH), "--lr", str(EXPORT_LR), "--momentum", str(EXPORT_MOMENTUM)]
    assert main(argv) == 0
    return out


def fisher_yates(n: int, state: int) -> list[int]:
    """The runner's documented shuffle (``random.h``): Fisher-Yates over splitmix64 from ``state``
    (finetune.cpp's epoch order, replay.cpp's replay order)."""
    mask = (1 << 64) - 1
    order = list(range(n))
    for i in range(n, 1, -1):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        j = (z ^ (z >> 31)) % i
        order[i - 1], order[j] = order[j], order[i - 1]
    return order


#: spare outputs of :func:`spare_bundle`
SPARE = 2


@pytest.fixture(scope="session")
def spare_bundle(export_run, tmp_path_factory) -> Path:
    """``edgetl export --training --spare-classes 2`` of :func:`export_run` (batch 4)."""
    from edgetl.cli import main

    out = tmp_path_factory.mktemp("spare-bundle") / "dist"
    argv = ["--debug", "export", "--checkpoint", str(export_run), "--out", str(out), "--training"]
    assert main([*argv, "--batch-size", str(EXPORT_BATCH), "--spare-classes", str(SPARE)]) == 0
    return out


def make_new_classes(root: Path, per_class: int, *, seed: int = 0, size: int = 24) -> Path:
    """Two classes the export run never saw: ``purple`` (red + blue raised) and ``yellow`` (red + green)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, channels in (("purple", (0, 2)), ("yellow", (0, 1))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (size, size, 3))
            img[..., list(channels)] += 150
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def export_eager_net(run: Path):
    """The run's model, prepared as the bundle's training program trains it (dropout off)."""
    from edgetl.exporter.training import without_dropout
    from edgetl.train.prepare import prepare

    model = load_model("mobilenet_v2", num_classes=len(CLASSES))
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True)["model"])
    return without_dropout(prepare(model, export_policy()))


# --- the native device runner ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def runner() -> Path:
    """deploy/native/build.sh, as a user runs it (incremental after the test command's own build)."""
    import fcntl
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    build = root / "deploy" / "native" / "build"
    build.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(build.parent / ".build.lock", "w") as lock:  # pytest-xdist workers build one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = subprocess.run(
            ["bash", str(root / "deploy/native/build.sh"), str(build)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHON": sys.executable},
            timeout=600,
        )
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"native runner built in {time.perf_counter() - t0:.1f}s")
    return build / "edgetl-device"

"""Flower's deployment engine: a SuperLink, SuperNodes, and the fleet's Flower App.

A real fleet runs ``flower-superlink`` on the server, ``flower-supernode`` on each device (a
Raspberry Pi: its own ``data`` and ``device`` profile in ``--node-config``) and submits the app
written by :func:`write_app` with ``flwr run`` (docs/fleet.md). :class:`LocalFleet`
does the same with every process on this machine on loopback ports: the tests and
``edgetl fleet run --engine local`` use it. Flower 1.42's SuperLink serves its Fleet, Control and
runtime APIs over HTTP on one port (earlier versions used gRPC on three).

The app installs nothing at run time (``--disable-runtime-dependency-installation``): edgetl and
its ``fleet`` extra must already be installed where the ServerApp and ClientApps run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from edgetl._files import atomic_write_text
from edgetl.errors import EdgetlError
from edgetl.fleet.config import FleetConfig

APP_NAME = "edgetlfleet"
CONNECTION = "edgetl-local"
_START_SECONDS = 60.0


class FleetProcessError(EdgetlError):
    """A Flower process did not start or a run did not finish."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(directory: str | os.PathLike, config: FleetConfig) -> Path:
    """Write the fleet's Flower App (its ``pyproject.toml``) for ``flwr run``; ``config`` is its run config.

    The components are edgetl's own ServerApp and ClientApp, so the app directory holds no code.
    Override a setting at submission with ``flwr run DIR CONNECTION --run-config 'rounds=20'``.
    """
    record = config.to_record()
    if "devices" in record:  # Flower's run config holds scalars only
        record["devices"] = ",".join(record["devices"])
    lines = [
        "# The edgetl fleet's Flower App: `flwr run THIS_DIR CONNECTION` (written by edgetl.fleet.deployment.write_app)",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        'version = "1.0.0"',
        'description = "Federated MobileTL fine-tuning (edgetl fleet)"',
        'license = "Apache-2.0"',
        "dependencies = []  # edgetl[fleet] is installed where the apps run",
        "",
        "[tool.flwr.app]",
        'publisher = "edgetl"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "edgetl.fleet.server:app"',
        'clientapp = "edgetl.fleet.client:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml_value(value)}" for key, value in record.items()),
        "",
    ]
    return atomic_write_text(Path(directory) / "pyproject.toml", "\n".join(lines)).parent


def write_connection(flwr_home: str | os.PathLike, address: str, *, name: str = CONNECTION) -> Path:
    """``flwr``'s configuration (``$FLWR_HOME/config.toml``) naming one insecure SuperLink connection."""
    text = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n'
    return atomic_write_text(Path(flwr_home) / "config.toml", text)


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + _START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FleetProcessError(f"the SuperLink exited with status {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FleetProcessError(f"the SuperLink did not listen on 127.0.0.1:{port} within {_START_SECONDS:.0f}s; see {log}")


def node_config_arg(node: dict[str, Any]) -> str:
    """``--node-config`` of ``flower-supernode``: ``key=value`` pairs, strings quoted."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in node.items())


class LocalFleet:
    """A SuperLink and SuperNodes as processes on this machine, on loopback (a context manager).

    ``nodes``: each SuperNode's node config (e.g. ``{"partition-id": 0, "num-partitions": 2}`` or
    ``{"data": "/photos", "device": "pi4.toml"}``). Logs go to ``workdir/*.log``; the processes
    are started in their own sessions and stopped (their process groups) on exit.
    """

    def __init__(self, workdir: str | os.PathLike, nodes: list[dict[str, Any]]) -> None:
        self.workdir = Path(workdir)
        self.nodes = nodes
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        bin_dir = str(Path(sys.executable).parent)  # flower-superlink starts flower-superexec by name
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        self.bin = Path(bin_dir)

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        out = open(self.workdir / log, "ab")  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        finally:
            out.close()

    def __enter__(self) -> LocalFleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        write_connection(self.env["FLWR_HOME"], f"127.0.0.1:{self.port}")
        self.superlink = self._spawn(
            [str(self.bin / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
             "--disable-runtime-dependency-installation"],
            "superlink.log",
        )  # fmt: skip
        try:
            _wait_for_port(self.port, self.superlink, self.workdir / "superlink.log")
            for i, node in enumerate(self.nodes):
                self.supernodes.append(
                    self._spawn(
                        [str(self.bin / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                         "--port", str(free_port()), "--node-config", node_config_arg(node)],
                        f"supernode-{i}.log",
                    )
                )  # fmt: skip
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def submit(self, config: FleetConfig, *, timeout: float = 3600.0) -> subprocess.CompletedProcess:
        """Write the app for ``config`` and run it with ``flwr run --stream`` until it ends."""
        app = write_app(self.workdir / "app", config)
        try:
            done = subprocess.run(
                [str(self.bin / "flwr"), "run", str(app), CONNECTION, "--stream"],
                env=self.env, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise FleetProcessError(f"the fleet run did not finish within {timeout:.0f}s; logs in {self.workdir}") from None
        (self.workdir / "flwr-run.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise FleetProcessError(f"flwr run failed with status {done.returncode}; see {self.workdir / 'flwr-run.log'}")
        return done

    def kill_supernode(self, index: int) -> None:
        """``kill -9`` SuperNode ``index`` and the ClientApp it runs (a device losing power)."""
        _kill_group(self.supernodes[index])

    def __exit__(self, *exc) -> None:
        started = [*self.supernodes, *([self.superlink] if self.superlink else [])]
        # the SuperLink starts its SuperExec in a session of its own: stop it by id, with the rest
        children = []
        for proc in started:
            try:
                children += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in started:
            _kill_group(proc, signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)  # the process's own session (start_new_session): it and its children
        except ProcessLookupError:
            pass

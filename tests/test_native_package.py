"""deploy/native/package.sh: the .deb a Raspberry Pi (arm64) or an x86-64 Debian 12 machine installs
with ``apt install ./edgetl-device_VERSION_ARCH.deb`` and nothing else.

Both packages are built (arm64 cross-built), their metadata read back with dpkg-deb, their
dependencies resolved by apt (simulated) on this Debian 12 machine, and each extracted and run
(arm64 under qemu-aarch64) on the shared bundle.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgetl
from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "deploy" / "native"
PRIVATE = "usr/lib/edgetl-device"
#: what the private directory holds: the runner, edgetl's kernels, ExecuTorch's four libraries
FILES = [
    "edgetl-device",
    "libedgetl_kernels.so",
    "libexecutorch.so",
    "libexecutorch_backend_xnnpack.so",
    "libexecutorch_kernels_optimized.so",
    "libexecutorch_threadpool.so",
]
MULTIARCH = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not shutil.which("dpkg-deb"),
    reason="the packages are built on a Debian x86-64 machine (arm64 cross-built)",
)


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("packages")
    debs = {}
    for arch, lock_name in (("amd64", ".build.lock"), ("arm64", ".build-aarch64.lock")):
        with open(NATIVE / lock_name, "w") as lock:  # the build directories other tests build into
            fcntl.flock(lock, fcntl.LOCK_EX)
            cmd = ["bash", str(NATIVE / "package.sh"), arch, str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
        assert done.returncode == 0, done.stderr[-3000:]
        debs[arch] = Path(done.stdout.strip().splitlines()[-1])
    return debs


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


def extracted(deb: Path, into: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


def _readelf(path: Path, option: str) -> str:
    return subprocess.run(["readelf", option, str(path)], capture_output=True, text=True, check=True).stdout


def dynamic(path: Path, tag: str) -> list[str]:
    """A dynamic-section entry of an ELF file (NEEDED: every library; RUNPATH: its directories)."""
    out = _readelf(path, "-d")
    values = re.findall(rf"\({tag}\)\s+\S+ \S+: \[(.*)\]", out)
    return [d for v in values for d in (v.split(":") if tag == "RUNPATH" else [v])]


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_package_holds_the_runtime_privately_and_depends_on_debian_packages_only(packages, arch, tmp_path):
    deb = packages[arch]
    version = edgetl.__version__
    assert deb.name == f"edgetl-device_{version}_{arch}.deb"
    assert field(deb, "Package") == "edgetl-device" and field(deb, "Version") == version and field(deb, "Architecture") == arch
    depends = {re.match(r"[\w.+-]+", d.strip())[0] for d in field(deb, "Depends").split(",")}

    root = extracted(deb, tmp_path / "root")
    private = root / PRIVATE
    assert sorted(p.name for p in private.iterdir()) == FILES
    assert (root / "usr/bin/edgetl-device").resolve() == (private / "edgetl-device").resolve()
    installed = sum(p.stat().st_size for p in private.iterdir())
    assert abs(int(field(deb, "Installed-Size")) * 1024 - installed) <= 0.02 * installed + 8192
    runtime = sum((private / n).stat().st_size for n in FILES if n.startswith("libexecutorch"))
    print(f"{arch}: .deb {deb.stat().st_size / 1e6:.1f} MB, installed {installed / 1e6:.1f} MB, ExecuTorch's libraries "
          f"{runtime / 1e6:.1f} MB, runner {(private / 'edgetl-device').stat().st_size / 1e6:.2f} MB")  # fmt: skip

    # no build-machine path: every RUNPATH entry is relative to the library itself, and the runner
    # names no directory of this checkout
    for p in private.iterdir():
        assert all(d.startswith("$ORIGIN") for d in dynamic(p, "RUNPATH")), (p.name, dynamic(p, "RUNPATH"))
    assert str(ROOT).encode() not in (private / "edgetl-device").read_bytes()
    # every library the files need from outside the package comes from a package it depends on
    outside = {lib for p in private.iterdir() for lib in dynamic(p, "NEEDED")} - set(FILES)
    providers = set()
    for lib in sorted(outside):
        found = subprocess.run(["dpkg", "-S", f"/lib/{MULTIARCH[arch]}/{lib}"], capture_output=True, text=True)
        if found.returncode != 0:
            found = subprocess.run(["dpkg", "-S", f"/usr/lib/{MULTIARCH[arch]}/{lib}"], capture_output=True, text=True)
        assert found.returncode == 0, f"no {arch} package of this machine provides {lib}"
        providers.add(found.stdout.split(":")[0])
    assert providers <= depends, (providers, depends)
    # libc6's minimum is the newest glibc symbol version any file uses (Bookworm has 2.36)
    versions = {v for p in private.iterdir() for v in re.findall(r"GLIBC_2\.(\d+)", _readelf(p, "-V"))}
    newest = max(int(v) for v in versions)
    assert f"libc6 (>= 2.{newest})" in field(deb, "Depends") and newest <= 36, field(deb, "Depends")
    assert {"libjpeg62-turbo", "libpng16-16", "libssl3", "libc6"} <= providers
    # apt resolves those dependencies on this Debian 12 machine (simulated: nothing is installed)
    if shutil.which("apt-get"):
        sim = subprocess.run(["apt-get", "-s", "install", str(deb)], capture_output=True, text=True, timeout=300)
        assert sim.returncode == 0 and re.search(rf"Inst edgetl-device(:{arch})? \({version} ", sim.stdout), sim.stdout + sim.stderr


def test_the_extracted_packages_run(packages, runner, training_bundle, tmp_path):
    """Each package's /usr/bin/edgetl-device, on its own libraries: the amd64 one classifies exactly
    as the build's runner, the arm64 one (under qemu) within 1e-5 of it."""
    photos = make_image_folder(tmp_path / "photos", per_class=1, size=45, seed=3)
    args = ["--threads", "1", "classify", str(training_bundle), str(photos), "--json"]
    reference = subprocess.run([str(runner), *args], capture_output=True, text=True, check=True).stdout
    for arch, prefix in (("amd64", []), ("arm64", ["qemu-aarch64", "-L", "/"])):
        binary = extracted(packages[arch], tmp_path / arch) / "usr/bin/edgetl-device"
        info = subprocess.run([*prefix, str(binary), "info", str(training_bundle)], capture_output=True, text=True, timeout=300)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["runner"]["arch"] == {"amd64": "x86_64", "arm64": "aarch64"}[arch]
        out = subprocess.run([*prefix, str(binary), *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        if arch == "amd64":
            assert out.stdout == reference
        for got, want in zip(out.stdout.splitlines(), reference.splitlines(), strict=True):
            g, w = json.loads(got), json.loads(want)
            assert g["top"][0]["label"] == w["top"][0]["label"]
            probs = {e["label"]: e["prob"] for e in w["top"]}
            assert max(abs(e["prob"] - probs[e["label"]]) for e in g["top"]) <= 1e-5


def test_bad_arguments_are_one_line_and_status_2(tmp_path):
    for args, needle in (([], "usage: package.sh ARCH OUT_DIR"), (["i386", str(tmp_path)], "unknown ARCH 'i386'")):
        r = subprocess.run(["bash", str(NATIVE / "package.sh"), *args], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
    r = subprocess.run(["bash", str(NATIVE / "build.sh"), "--target", "riscv64", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "build.sh: unknown --target 'riscv64' (aarch64)"
    assert not any(tmp_path.iterdir())

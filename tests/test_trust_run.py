"""Trust, round two (issue 25), the run directory and the settings: one writer per run, resume
never retrains a finished run, weights bound to their sha256, nonsense settings and the machine's
limits refused up front, divergence reported as one line."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgetl._files import LOCK_FILE, lock_directory, unlock_directory
from edgetl._rss import available_memory_bytes, cgroup_headroom_bytes
from edgetl.cli import main
from edgetl.errors import ConfigError, DirectoryLockedError, RunError
from edgetl.train.config import FinetuneConfig
from edgetl.train.run import CHECKPOINT, DIGESTS, FINAL_WEIGHTS, PREVIOUS_CHECKPOINT, Run, read_weights
from edgetl.train.trainer import finetune

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

SMALL = dict(model="mobilenet_v2", image_size=32, batch_size=8, blocks=2, val_fraction=0.25, label_smoothing=0.0, augment=False)


def _config(tmp_path, folder, **kw) -> FinetuneConfig:
    return FinetuneConfig.from_dict({**SMALL, "data": str(folder), "out": str(tmp_path / "run"), "epochs": 1, **kw})


def _quiet(_line: str) -> None:
    pass


def test_weights_that_diverge_at_the_end_of_an_epoch_are_one_line(tmp_path, image_folder, capsys):
    """One SGD step an epoch at lr 1e30: the loss of that step is finite, the weights after it are not."""
    argv = ["finetune", "--model", "mobilenet_v2", "--data", str(image_folder), "--image-size", "32", "--batch-size", "8"]
    argv += ["--blocks", "2", "--epochs", "2", "--train-limit", "8", "--optimizer", "sgd", "--lr", "1e30", "--out", str(tmp_path / "run")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgetl: error: training diverged: non-finite ") and err.count("\n") == 1, err
    assert "nothing was saved" in err
    assert not (tmp_path / "run" / CHECKPOINT).exists() and not (tmp_path / "run" / FINAL_WEIGHTS).exists()


@pytest.mark.parametrize(
    "text,message",
    [
        (b"epochs = 1\n# caf\xe9\n", "is not UTF-8 text"),
        (b"seed = 18446744073709551616\n", "seed must be in [0, "),
        (b"seed = -1\n", "seed must be in [0, "),
        (b"warmup_epochs = inf\n", "warmup_epochs must be a finite number, got inf"),
        (b"momentum = inf\n", "momentum must be a finite number, got inf"),
    ],
)
def test_a_bad_config_file_is_one_line_and_writes_nothing(tmp_path, image_folder, capsys, text, message):
    config = tmp_path / "settings.toml"
    config.write_bytes(text)
    out = tmp_path / "run"
    code = main(["finetune", "--config", str(config), "--data", str(image_folder), "--out", str(out), "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgetl: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_device_profile_that_is_not_utf8_is_one_line(tmp_path, capsys):
    device = tmp_path / "pi.toml"
    device.write_bytes(b'name = "Pi \xff"\n')
    code = main(["plan", "--device", str(device), "--model", "mobilenet_v2", "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"edgetl: error: device profile {device} is not UTF-8 text (byte 11)\n", err


def test_an_image_size_beyond_the_image_limit_is_refused(tmp_path, image_folder, capsys):
    with pytest.raises(ConfigError, match=r"image_size must be <= 65535"):
        FinetuneConfig(image_size=65536)
    out = tmp_path / "run"
    code = main(["finetune", "--data", str(image_folder), "--out", str(out), "--image-size", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and err == "edgetl: error: image_size must be <= 65535 (the largest image side), got 100000\n", err
    assert not out.exists()


# --- one writer per run directory ------------------------------------------------------------------

_HOLD = (
    "import sys, time; from edgetl._files import lock_directory; lock_directory(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
)


def _holder(directory: Path) -> subprocess.Popen:
    """Another process holding ``directory``'s lock (as a running `edgetl finetune` does)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_directory_names_its_holder_and_kill_9_frees_it(tmp_path):
    proc = _holder(tmp_path / "dir")
    try:
        assert (tmp_path / "dir" / LOCK_FILE).read_text() == f"{proc.pid}\n"
        with pytest.raises(DirectoryLockedError, match=rf"in use by another process \(pid {proc.pid}, "):
            lock_directory(tmp_path / "dir")
    finally:
        proc.kill()
        proc.wait()
    fd = lock_directory(tmp_path / "dir")  # the kernel dropped the dead holder's lock
    assert (tmp_path / "dir" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    unlock_directory(fd)


def test_a_second_writer_of_a_run_is_refused_with_the_holders_pid(tmp_path, image_folder, capsys):
    config = _config(tmp_path, image_folder)
    finetune(config, log=_quiet)
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("config.json", CHECKPOINT, FINAL_WEIGHTS, "metrics.csv")}
    proc = _holder(run)
    try:
        code = main(["finetune", "--resume", "--out", str(run), "--data", str(image_folder), "--epochs", "2"])
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    holder = f"(pid {proc.pid}, which holds {run / LOCK_FILE})"
    assert code == 2 and err == f"edgetl: error: {run} is in use by another process {holder}; wait for it to end or stop it\n"
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_run_is_locked_while_it_trains_and_released_after(tmp_path, image_folder):
    seen: list[str] = []

    def try_to_lock(epoch, step):
        with pytest.raises(DirectoryLockedError) as refused:
            lock_directory(tmp_path / "run")
        seen.append(str(refused.value))

    finetune(_config(tmp_path, image_folder), on_step=try_to_lock, log=_quiet)
    assert seen and seen[0] == f"{tmp_path / 'run'} is already locked by this process (pid {os.getpid()}): release it first"
    unlock_directory(lock_directory(tmp_path / "run"))  # released when finetune returned


# --- resume never starts a finished run over ---------------------------------------------------------


def test_resume_of_a_finished_run_without_its_checkpoint_is_refused(tmp_path, image_folder, capsys):
    finetune(_config(tmp_path, image_folder), log=_quiet)
    run = tmp_path / "run"
    (run / CHECKPOINT).unlink()
    before = {name: (run / name).read_bytes() for name in (FINAL_WEIGHTS, "metrics.csv")}
    code = main(["finetune", "--resume", "--out", str(run), "--data", str(image_folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"edgetl: error: cannot resume {run}: it holds a finished {FINAL_WEIGHTS} but no {CHECKPOINT}")
    assert err.count("\n") == 1, err
    assert {name: (run / name).read_bytes() for name in before} == before


def test_resume_for_fewer_epochs_than_the_run_has_trained_is_refused(tmp_path, image_folder, capsys):
    finetune(_config(tmp_path, image_folder, epochs=2), log=_quiet)
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("config.json", FINAL_WEIGHTS, "metrics.csv")}
    code = main(["finetune", "--resume", "--out", str(run), "--data", str(image_folder), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"edgetl: error: cannot resume {run} for 1 epoch(s): it has trained 2 already\n", err
    assert {name: (run / name).read_bytes() for name in before} == before


def test_resume_of_a_run_that_never_ended_an_epoch_says_it_starts_at_epoch_1(tmp_path, image_folder):
    config = _config(tmp_path, image_folder)
    with Run(config.out) as run:
        run.start(config, ["blue", "green", "red"], resume=False)  # what a run killed in its first epoch leaves
    lines: list[str] = []
    result = finetune(config, resume=True, log=lines.append)
    assert lines[0] == f"resuming {run.path}: it holds no checkpoint (no epoch had ended), so training starts at epoch 1"
    assert [int(row["epoch"]) for row in result.history] == [1]


# --- weights bound to their sha256 -------------------------------------------------------------------


def _flip(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_weights_file_is_recorded_with_its_sha256(tmp_path, image_folder):
    finetune(_config(tmp_path, image_folder, epochs=2), log=_quiet)
    run = tmp_path / "run"
    digests = json.loads((run / DIGESTS).read_text())
    assert set(digests) == {CHECKPOINT, PREVIOUS_CHECKPOINT, FINAL_WEIGHTS}
    for name, digest in digests.items():
        assert hashlib.sha256((run / name).read_bytes()).hexdigest() == digest, name
    assert torch.load(run / PREVIOUS_CHECKPOINT, weights_only=True)["epoch"] == 1
    assert torch.load(run / CHECKPOINT, weights_only=True)["epoch"] == 2


def test_a_flipped_bit_in_model_pt_is_refused_by_export(tmp_path, image_folder, capsys):
    finetune(_config(tmp_path, image_folder), log=_quiet)
    run = tmp_path / "run"
    _flip(run / FINAL_WEIGHTS)
    with pytest.raises(RunError, match=rf"{run / FINAL_WEIGHTS} does not match its sha256 in {run / DIGESTS}"):
        read_weights(run)
    code = main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "bundle")])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err
        == f"edgetl: error: {run / FINAL_WEIGHTS} does not match its sha256 in {run / DIGESTS}: the file changed after edgetl wrote it\n"
    )
    assert not (tmp_path / "bundle").exists()


def test_a_damaged_checkpoint_resumes_from_the_epoch_before(tmp_path, image_folder):
    finetune(_config(tmp_path, image_folder, epochs=2), log=_quiet)
    run = tmp_path / "run"
    _flip(run / CHECKPOINT)
    lines: list[str] = []
    result = finetune(_config(tmp_path, image_folder, epochs=3), resume=True, log=lines.append)
    assert lines[0] == (
        f"warning: {run / CHECKPOINT} does not match its sha256 in {run / DIGESTS}: the file changed after edgetl wrote it; "
        f"using {PREVIOUS_CHECKPOINT} (epoch 1) instead"
    )
    assert lines[1] == f"resuming {run} after epoch 1"
    assert [int(row["epoch"]) for row in result.history] == [1, 2, 3]
    digests = json.loads((run / DIGESTS).read_text())
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):  # the damaged file was not kept as the previous one
        assert hashlib.sha256((run / name).read_bytes()).hexdigest() == digests[name], name
    assert torch.load(run / PREVIOUS_CHECKPOINT, weights_only=True)["epoch"] == 2


class _Died(BaseException):
    """The process ends here (as under kill -9, nothing after it runs)."""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_while_a_checkpoint_is_replaced_resumes_without_a_warning(tmp_path, image_folder, monkeypatch, when):
    """Killed just before or just after epoch 2's checkpoint is renamed into place: whichever
    checkpoint.pt is on disk is recorded, so the resume takes it as it is, with no false alarm."""
    import edgetl._files as files

    real_replace, run = os.replace, tmp_path / "run"

    def dying_replace(src, dst, *args, **kwargs):
        if Path(dst) == run / CHECKPOINT and torch.load(src, weights_only=True)["epoch"] == 2:
            if when == "after":
                real_replace(src, dst, *args, **kwargs)
            raise _Died
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(files.os, "replace", dying_replace)
    with pytest.raises(_Died):
        finetune(_config(tmp_path, image_folder, epochs=3), log=_quiet)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert isinstance(json.loads((run / DIGESTS).read_text())[CHECKPOINT], list)  # both digests, the old and the new
    assert read_weights(run).state_dict  # a reader meanwhile takes it too
    lines: list[str] = []
    finetune(_config(tmp_path, image_folder, epochs=2), resume=True, log=lines.append)  # "after": nothing left to train
    assert lines[0] == f"resuming {run} after epoch {1 if when == 'before' else 2}", lines[0]
    assert not any(line.startswith("warning") for line in lines)
    digests = json.loads((run / DIGESTS).read_text())
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT, FINAL_WEIGHTS):  # one digest each again, the file's own
        assert digests[name] == hashlib.sha256((run / name).read_bytes()).hexdigest(), name


def test_a_damaged_checkpoint_without_a_previous_one_is_refused(tmp_path, image_folder, capsys):
    finetune(_config(tmp_path, image_folder), log=_quiet)
    run = tmp_path / "run"
    _flip(run / CHECKPOINT)
    (run / FINAL_WEIGHTS).unlink()
    code = main(["finetune", "--resume", "--out", str(run), "--data", str(image_folder), "--epochs", "2"])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err
        == f"edgetl: error: {run / CHECKPOINT} does not match its sha256 in {run / DIGESTS}: the file changed after edgetl wrote it\n"
    )


# --- bounded by the machine ----------------------------------------------------------------------------


def _limited(gib: int):
    """preexec_fn: the child's address space capped (what `ulimit -v` does), so nothing here can exhaust the machine."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (gib * 2**30, gib * 2**30))


def test_workers_beyond_the_cpus_are_refused_before_any_work(tmp_path, image_folder, monkeypatch, capsys):
    from edgetl.train import trainer

    with pytest.raises(ConfigError, match=r"workers = 100000000000000000000 is more than the \d+ CPU\(s\) this process may use"):
        trainer.check_resources(FinetuneConfig(workers=10**20))
    monkeypatch.setattr(trainer, "usable_cpus", lambda: 1)  # a 1-CPU machine: 2 workers are already too many
    out = tmp_path / "run"
    code = main(["finetune", "--data", str(image_folder), "--out", str(out), "--image-size", "32", "--epochs", "1", "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err == "edgetl: error: workers = 2 is more than the 1 CPU(s) this process may use\n", err
    assert not out.exists()


def test_an_image_size_the_memory_cannot_hold_is_one_line_and_writes_nothing(tmp_path, image_folder):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "edgetl", "finetune", "--data", str(image_folder), "--out", str(out), "--image-size", "60000"]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, preexec_fn=_limited(8), timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("edgetl: error: a batch of 8 at 60000 px needs at least ") and done.stderr.count("\n") == 1, done.stderr
    assert not out.exists()


def test_the_memory_check_honours_ulimit_v(tmp_path, image_folder):
    """8000 px x 8 images need ~14 GiB: refused under a 6 GiB address-space limit whatever the machine has."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "edgetl", "finetune", "--data", str(image_folder), "--out", str(out), "--image-size", "8000"]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, preexec_fn=_limited(6), timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    available = done.stderr.split(" but ")[1].split(" is available to this process")[0]
    number, unit = available.split()
    assert unit in ("GiB", "MiB", "KiB", "B") and (unit != "GiB" or float(number) < 6), done.stderr
    assert not out.exists()
    profile = [
        sys.executable,
        "-m",
        "edgetl",
        "profile",
        "--model",
        "mobilenet_v2",
        "--blocks",
        "2",
        "--batch-size",
        "8",
        "--image-size",
        "3000",
    ]
    done = subprocess.run(profile, capture_output=True, text=True, env=ENV, preexec_fn=_limited(6), timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("edgetl: error: measuring batch 8 at 3000 px needs about"), done.stderr[-2000:]
    assert "is available to this process" in done.stderr and done.stderr.count("\n") == 1


def test_a_feature_cache_the_memory_cannot_hold_is_refused_before_it_is_built(tmp_path, image_folder, monkeypatch):
    from edgetl.train import trainer

    monkeypatch.setattr(trainer, "available_memory_bytes", lambda: 2 * 2**20)  # 2 MiB: a batch fits, 100 views do not
    config = _config(tmp_path, image_folder, cache_features=True, cache_views=100, augment=True)
    with pytest.raises(ConfigError, match=r"caching 100 view\(s\) of the bottom's features needs .* but 2\.0 MiB is available"):
        finetune(config, log=_quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_memory_check_honours_the_cgroup_limit(tmp_path, version):
    """A fake cgroup tree: the process's group allows 3 GiB and uses 2 (0.5 of it inactive page cache); its parent allows 10."""
    gib = 2**30
    if version == "v2":
        proc = "0::/user/job\n"
        leaf, parent = tmp_path / "user" / "job", tmp_path / "user"
        files = ("memory.max", "memory.current", "inactive_file")
    else:
        proc = "4:memory:/user/job\n1:cpu:/\n"
        leaf, parent = tmp_path / "memory" / "user" / "job", tmp_path / "memory" / "user"
        files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    for directory, limit, usage in ((leaf, 3 * gib, 2 * gib), (parent, 10 * gib, 2 * gib)):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / files[0]).write_text(f"{limit}\n")
        (directory / files[1]).write_text(f"{usage}\n")
        (directory / "memory.stat").write_text(f"anon 1\n{files[2]} {gib // 2}\n")
    (tmp_path / "cgroup").write_text(proc)
    assert cgroup_headroom_bytes(tmp_path, tmp_path / "cgroup") == 3 * gib - (2 * gib - gib // 2)
    assert available_memory_bytes(cgroup_root=tmp_path, proc_cgroup=tmp_path / "cgroup") <= 3 * gib - (2 * gib - gib // 2)
    (leaf / files[0]).write_text("max\n" if version == "v2" else f"{2**63 - 4096}\n")  # no limit of its own: the parent's counts
    assert cgroup_headroom_bytes(tmp_path, tmp_path / "cgroup") == 10 * gib - (2 * gib - gib // 2)

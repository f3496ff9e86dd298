"""A run is the unit of work: export and profile take a run's typed config and policy, with the flags
given replacing fields (``dataclasses.replace``), so no setting of the run is lost on the way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetl.cli import main
from edgetl.exporter.config import ExportConfig
from edgetl.models.zoo import load_model
from edgetl.profiler.report import profile
from edgetl.profiler.settings import StepSettings
from edgetl.train.config import FinetuneConfig
from edgetl.train.policy import TrainPolicy
from edgetl.train.run import Run

MODEL = "mobilenet_v3_small"
CLASSES = ["a", "b", "c"]


def _run(path: Path, policy: TrainPolicy, **config) -> Path:
    """A finished run of ``policy`` (random weights: what is read, not what was learnt, matters here)."""
    values = dict(model=MODEL, policy=policy, batch_size=3, image_size=32, optimizer="sgd", out=str(path)) | config
    cfg = FinetuneConfig(**values)
    with Run(path) as run:
        run.start(cfg, CLASSES, resume=False)
        run.save_final(load_model(MODEL, num_classes=len(CLASSES)).state_dict(), model_name=MODEL, classes=CLASSES, policy=policy)
    return path


@pytest.mark.parametrize(
    ("option", "named"),
    [({"saved_precision": "bf16"}, "saved_precision='bf16'"), ({"recompute": True}, "recompute")],
)
def test_an_export_with_a_memory_option_the_program_cannot_carry_is_refused_even_when_flags_change_k(tmp_path, capsys, option, named):
    run = _run(tmp_path / "run", TrainPolicy(2, **option))
    for flags in ([], ["--blocks", "1"], ["--method", "mobiletl"]):
        out = tmp_path / f"dist{len(flags)}"
        assert main(["export", "--checkpoint", str(run), "--out", str(out), "--training", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("edgetl: error: ") and "\n" not in err and named in err, (flags, err)
        assert not any(out.glob("*.pte")) if out.exists() else True


def test_export_settings_are_the_runs_with_the_flags_given_replacing_fields():
    run = FinetuneConfig(batch_size=5, image_size=96)
    assert ExportConfig.for_run(run) == ExportConfig(image_size=96, batch_size=5)
    assert ExportConfig.for_run(run, batch_size=None, image_size=64, lr=0.5) == ExportConfig(image_size=64, batch_size=5, lr=0.5)
    assert ExportConfig.for_run(None, batch_size=None) == ExportConfig()


def test_step_settings_keep_the_runs_memory_options_unless_a_flag_replaces_one():
    policy = TrainPolicy(3, activation_mask="packed", bottom_chunk=2, saved_precision="int8", recompute=True)
    base = StepSettings.of_run(FinetuneConfig(model=MODEL, policy=policy, batch_size=4, image_size=40, optimizer="sgd"), 7)
    assert base == StepSettings(MODEL, policy, 4, 40, num_classes=7, optimizer="sgd")
    assert base.with_overrides(blocks=None, recompute=None, batch_size=None) == base
    changed = base.with_overrides(blocks=1, recompute=False, image_size=32)
    assert changed.policy == TrainPolicy(1, activation_mask="packed", bottom_chunk=2, saved_precision="int8", recompute=False)
    assert (changed.image_size, changed.batch_size) == (32, 4)


def test_profile_of_a_run_counts_its_memory_options(tmp_path, capsys):
    """``edgetl profile --run`` profiles the run's policy as trained, memory options included; a flag
    replaces one of them and keeps the others."""
    policy = TrainPolicy(3, bottom_chunk=1, saved_precision="int8")
    run = _run(tmp_path / "run", policy)
    out = tmp_path / "r.json"

    def report_of(*flags: str) -> dict:
        assert main(["profile", "--run", str(run), *flags, "--json", str(out)]) == 0
        capsys.readouterr()
        return {k: v for k, v in json.loads(out.read_text()).items() if k != "torch_version"}

    def expected(p: TrainPolicy) -> dict:
        report = profile(MODEL, p, batch_size=3, image_size=32, num_classes=len(CLASSES), optimizer="sgd")
        return {k: v for k, v in report.to_dict().items() if k != "torch_version"}

    assert report_of() == expected(policy) != expected(TrainPolicy(3))
    assert report_of("--saved-precision", "fp32") == expected(TrainPolicy(3, bottom_chunk=1))

"""The memory profiler and planner: report rows, paper figures, device profiles, planner, CLI handlers."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edgetl import EdgetlError, MemoryReport, TrainPolicy, find_blocks, load_device, load_model, plan, prepare, profile
from edgetl.cli import profile as cli
from edgetl.models.blocks import feature_units
from edgetl.profiler.device import DeviceProfileError, parse_size
from edgetl.profiler.estimate import param_bytes, predict_step_peak
from edgetl.profiler.plot import plot_report
from edgetl.profiler.process_peak import calibrate_runtime, measure_process_peak

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"]


@pytest.fixture(scope="module")
def models():
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = load_model(name, num_classes=7)
        return cache[name]

    return get


# --- the report: predicted == measured, every block, both methods ----------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch_size", [2, 3])
@pytest.mark.parametrize("image_size", [64, 96])
def test_report_predicted_equals_measured_for_every_block(models, name, batch_size, image_size):
    model = models(name)
    k = len(find_blocks(model))
    report = profile(model, TrainPolicy(k), batch_size=batch_size, image_size=image_size)
    assert [r.name for r in report.rows] == [n for n, _ in feature_units(model)] + ["head"]
    assert sorted(r.block_index for r in report.rows if r.block_index is not None) == list(range(k))
    for row in report.rows:
        for method in ("vanilla", "mobiletl"):
            assert row.predicted[method] == row.measured[method], (name, row.name, method)
        if row.block_index is not None:
            assert row.trains and row.measured["vanilla"] > row.measured["mobiletl"] > 0
    assert report.rows[0].in_shape == (batch_size, 3, image_size, image_size)
    for method, totals in report.totals.items():
        assert totals.saved_predicted == totals.saved_measured == sum(r.measured[method] for r in report.rows)


def test_frozen_bottom_keeps_nothing_and_policy_method_is_ignored(models):
    model = models("mobilenet_v3_large")
    a = profile(model, TrainPolicy(3, "vanilla"), batch_size=2, image_size=64)
    b = profile(model, TrainPolicy(3, "mobiletl"), batch_size=2, image_size=64)
    assert a.to_dict()["rows"] == b.to_dict()["rows"]
    frozen = [r for r in a.rows if not r.trains]
    assert len(frozen) == len(feature_units(model)) - 4  # 3 blocks + the final conv stage train
    assert all(r.measured == r.predicted == {"vanilla": 0, "mobiletl": 0} for r in frozen)
    assert sum(r.block_index is not None and r.trains for r in a.rows) == 3


def test_parameter_bytes_match_the_prepared_network(models):
    model = models("mobilenet_v3_small")
    for method in ("vanilla", "mobiletl"):
        policy = TrainPolicy(4, method)
        net = prepare(model, policy)
        predicted = param_bytes(model, policy)
        assert predicted.weights == sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
        assert predicted.trainable == sum(p.numel() * p.element_size() for _, p in net.trainable_parameters())
    report = profile(model, TrainPolicy(4), batch_size=2, image_size=64, optimizer="sgd")
    t = report.totals
    assert t["mobiletl"].trainable_params < t["vanilla"].trainable_params  # internal BN scales freeze
    assert t["mobiletl"].optimizer_state == t["mobiletl"].trainable_params  # SGD momentum: 1 float
    assert sum(r.trainable_param_bytes["mobiletl"] for r in report.rows) == t["mobiletl"].trainable_params


def test_step_peak_estimate_components(models):
    model = models("mobilenet_v2")
    report = profile(model, TrainPolicy(6), batch_size=4, image_size=96, optimizer="adam")
    for method in ("vanilla", "mobiletl"):
        t = report.totals[method]
        est = predict_step_peak(model, TrainPolicy(6, method), batch_size=4, image_size=96)
        assert est == t.step_peak
        assert est.saved_activations == t.saved_measured and est.optimizer_state == 2 * t.trainable_params
        assert est.input_batch == 4 * 3 * 96 * 96 * 4 + 4 * 8
        assert est.total == est.model_bytes > est.weights + est.gradients + est.optimizer_state + est.saved_activations
    assert report.totals["mobiletl"].step_peak.total < report.totals["vanilla"].step_peak.total
    peaks = [predict_step_peak(model, TrainPolicy(k), batch_size=b, image_size=96).total for k in (2, 8) for b in (2, 8)]
    assert peaks[0] < peaks[1] and peaks[2] < peaks[3] and peaks[0] < peaks[2] and peaks[1] < peaks[3]


# --- the paper's per-IRB claim ------------------------------------------------------------------------


def _find_row(report: MemoryReport, **want):
    for r in report.rows:
        if r.block_index is not None and r.trains and all(getattr(r, k) == v for k, v in want.items()):
            return r
    raise AssertionError(f"no trained block with {want}")


def test_v2_block_reduction_pytorch_and_paper_accounting(models):
    """MobileNetV2 IRB, t = 6, stride 1, C in = C out (ReLU6, no SE). Paper: -46.3%."""
    report = profile(models("mobilenet_v2"), TrainPolicy(17), batch_size=2, image_size=96)
    row = _find_row(report, expand_ratio=6, stride=1, residual=True, se=False, activation="relu6")
    n, c, h, w = row.in_shape
    t, hw = 6 * c, n * h * w
    # closed forms per element of the C-channel map, independent of the analytic code:
    # PyTorch: vanilla keeps conv/BN/ReLU6 inputs in fp32 + BN statistics; MobileTL drops BN inputs and ReLU6 copies
    pytorch_van = 4 * hw * (c + 6 * t + c) + 4 * 2 * (2 * t + c)
    pytorch_mob = 4 * hw * (c + 2 * t + c) + 4 * 2 * c
    # paper: ReLU6 is 1 bit in both, no statistics; MobileTL drops the two internal BN inputs
    bits = 2 * (-(-n * t * h * w // 8))
    paper_van = 4 * hw * (c + 4 * t + c) + bits
    paper_mob = 4 * hw * (c + 2 * t + c) + bits
    assert row.measured == {"vanilla": pytorch_van, "mobiletl": pytorch_mob}
    assert row.paper == {"vanilla": paper_van, "mobiletl": paper_mob}
    assert row.paper_reduction_pct == pytest.approx(100 * (1 - 57.5 / 105.5), abs=0.05)  # 45.5%
    assert abs(row.paper_reduction_pct - 46.3) < 1.0
    assert row.reduction_pct > row.paper_reduction_pct + 10  # PyTorch's vanilla ReLU6 keeps fp32 inputs


def test_v3_block_reduction_pytorch_and_paper_accounting(models):
    """MobileNetV3-Large IRB, t = 6, stride 1, Hard-Swish + SE, residual. Paper: -53.3%."""
    model = models("mobilenet_v3_large")
    report = profile(model, TrainPolicy(4), batch_size=1, image_size=224)
    row = _find_row(report, expand_ratio=6, stride=1, residual=True, se=True, activation="hardswish")
    assert abs(row.paper_reduction_pct - 53.3) < 1.0
    assert row.reduction_pct > row.paper_reduction_pct  # masks reuse the next conv's input: 0 bytes
    # Hard-Swish keeps fp32 in both accountings, so vanilla bytes agree up to BN statistics and the SE terms
    assert row.measured["vanilla"] == pytest.approx(row.paper["vanilla"], rel=0.01)


# --- JSON, text, plot ---------------------------------------------------------------------------------


def test_json_round_trip_and_text_table(models):
    model = models("mobilenet_v3_small")
    report = profile(model, TrainPolicy(5), batch_size=2, image_size=64, num_classes=7)
    data = json.loads(report.to_json())
    assert data["units"] == "bytes" and data["optimizer"] == "adam"
    assert len(data["rows"]) == len(report.rows)
    for got, row in zip(data["rows"], report.rows, strict=True):
        for key in ("predicted", "measured", "paper"):
            assert got[key] == row.__getattribute__(key) and set(got[key]) == {"vanilla", "mobiletl"}
            assert all(isinstance(v, int) for v in got[key].values())
        assert got["in_shape"] == list(row.in_shape)
    assert data["totals"]["mobiletl"]["saved_measured"] == report.totals["mobiletl"].saved_measured
    assert data["totals"]["vanilla"]["step_peak_estimate"]["total"] == report.totals["vanilla"].step_peak.total
    full = report.render(collapse_frozen=False)
    for name, _ in find_blocks(model):
        assert name in full
    short = str(report)
    assert "frozen: stem + " in short and "head" in short and "saved for backward (autograd, exact)" in short
    trained = [name for name, _ in find_blocks(model)][-5:]
    assert all(name in short for name in trained)


def test_plot_and_missing_matplotlib(models, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    report = profile(models("mobilenet_v3_small"), TrainPolicy(3), batch_size=2, image_size=64)
    out = tmp_path / "plot.png"
    plot_report(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(EdgetlError, match=r"pip install 'edgetl\[plot\]'"):
        plot_report(report, tmp_path / "other.png")


# --- device profiles -----------------------------------------------------------------------------------


GOOD = """
name = "test board"
memory_total = "1GiB"
memory_budget = "512MiB"
safety_margin = 0.2
cores = 4
arch = "aarch64"
notes = "test"
"""


def test_every_shipped_device_profile_loads():
    paths = sorted((ROOT / "device_profiles").glob("*.toml"))
    assert len(paths) >= 5
    names = set()
    for path in paths:
        d = load_device(path)
        names.add(d.name)
        assert 0 < d.usable_bytes < d.memory_budget <= d.memory_total and len(d.notes) > 100
    for wanted in ("Raspberry Pi 4", "Raspberry Pi 5", "Zero 2 W", "Jetson Nano", "Android"):
        assert any(wanted in n for n in names), wanted


def test_sizes_are_parsed_strictly():
    assert parse_size("1.5GiB") == 1536 * 2**20
    assert parse_size("350MiB") == 350 * 2**20
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size(4096) == 4096
    for bad in ("1.5G", "1.5 gib", "12", "-1MiB", "0.1B", True, 1.5, "GiB"):
        with pytest.raises(DeviceProfileError):
            parse_size(bad, field="memory_budget")


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda t: t.replace('memory_budget = "512MiB"\n', ""), "memory_budget"),
        (lambda t: t.replace("cores = 4", 'cores = "four"'), "cores"),
        (lambda t: t.replace('"512MiB"', '"512M"'), "memory_budget"),
        (lambda t: t.replace("safety_margin = 0.2", "safety_margin = 1.5"), "safety_margin"),
        (lambda t: t.replace('arch = "aarch64"', 'arch = "arm"'), "arch"),
        (lambda t: t + "safty_margin = 0.1\n", "safty_margin"),
        (lambda t: t.replace('"512MiB"', '"2GiB"'), "memory_budget"),
    ],
)
def test_bad_device_profile_names_the_field_and_file(tmp_path, edit, field):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert load_device(good).usable_bytes == int(512 * 2**20 * 0.8)
    bad = tmp_path / "bad.toml"
    bad.write_text(edit(GOOD))
    with pytest.raises(DeviceProfileError) as info:
        load_device(bad)
    assert field in str(info.value) and str(bad) in str(info.value)


def test_missing_device_file(tmp_path):
    with pytest.raises(EdgetlError, match="not found"):
        load_device(tmp_path / "nope.toml")


# --- planner -------------------------------------------------------------------------------------------


def test_plan_prefers_more_blocks_then_larger_batches():
    pi4 = load_device(ROOT / "device_profiles" / "raspberry_pi_4_4gb.toml")
    p = plan(pi4, "mobilenet_v3_large", image_size=224)
    assert p.chosen.fits and p.runner_ups and all(c.fits for c in p.runner_ups)
    assert all(not c.fits for c in p.over_budget) and p.over_budget
    ks = [c.blocks for c in p.runner_ups]
    assert all(k <= p.chosen.blocks for k in ks) and ks == sorted(ks, reverse=True)
    if p.chosen.blocks < p.num_blocks:  # one more block does not fit at any batch size
        assert any(c.blocks == p.chosen.blocks + 1 for c in p.over_budget)
    vanilla = plan(pi4, "mobilenet_v3_large", image_size=224, method="vanilla")
    assert (vanilla.chosen.blocks, vanilla.chosen.batch_size) <= (p.chosen.blocks, p.chosen.batch_size)


def _device(tmp_path: Path, budget: int, runtime: int, margin: float = 0.2) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        f'name = "tiny test board"\nmemory_total = "8GiB"\nmemory_budget = {budget}\nsafety_margin = {margin}\n'
        f'runtime_overhead = {runtime}\ncores = 2\narch = "x86_64"\nnotes = "budget calibrated by the test"\n'
    )
    return path


@pytest.mark.slow
def test_plan_choice_fits_when_measured_and_refuses_when_nothing_fits(tmp_path):
    runtime = calibrate_runtime()  # this machine's interpreter + PyTorch, measured in a child process
    assert 100 * 2**20 < runtime < 2**30
    model, size = "mobilenet_v3_small", 128
    # 200 MiB for the model on top of the runtime, 10% margin: enough for a real choice, not for everything
    budget = runtime + 200 * 2**20
    p = plan(_device(tmp_path, budget, runtime, margin=0.1), model, image_size=size, num_classes=10)
    assert p.over_budget and 1 <= p.chosen.batch_size < 64 and p.chosen.estimate.model_bytes > 50 * 2**20
    measured = measure_process_peak(model, p.policy(), batch_size=p.chosen.batch_size, image_size=size, num_classes=10)
    assert measured.peak_rss <= p.device.memory_budget, (measured, p.chosen)

    with pytest.raises(EdgetlError, match="nothing fits"):
        plan(_device(tmp_path, runtime, runtime), model, image_size=size, num_classes=10)


@pytest.mark.slow
def test_profile_measures_process_peak_per_method(models):
    report = profile("mobilenet_v3_small", TrainPolicy(6), batch_size=8, image_size=96, num_classes=10, measure_process=True)
    procs = {m: report.totals[m].process for m in ("vanilla", "mobiletl")}
    for p in procs.values():
        assert p is not None and p.steps == 2 and p.runtime_rss > 50 * 2**20
        assert p.runtime_rss <= p.loaded_rss <= p.peak_rss and p.step_delta > 0
    text = report.render()
    assert "process peak RSS (OS, includes" in text and "step delta" in text
    assert json.loads(report.to_json())["totals"]["mobiletl"]["process"]["peak_rss"] == procs["mobiletl"].peak_rss


# --- CLI handlers ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetl")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_profile_parser(sub)
    cli.add_plan_parser(sub)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


def test_cli_profile_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        _run(
            [
                "profile",
                "--model",
                "mobilenet_v3_small",
                "--blocks",
                "3",
                "--batch-size",
                "2",
                "--image-size",
                "64",
                "--num-classes",
                "5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "vanilla meas" in text and "mobiletl meas" in text and "features.12" in text
    data = json.loads(out.read_text())
    assert data["blocks"] == 3 and data["rows"][-1]["name"] == "head"


def test_cli_plan_prints_choice_and_runner_ups(capsys):
    device = str(ROOT / "device_profiles" / "raspberry_pi_5_8gb.toml")
    assert _run(["plan", "--device", device, "--model", "mobilenet_v2", "--image-size", "160"]) == 0
    text = capsys.readouterr().out
    assert "chosen:" in text and "runner-ups:" in text and "Raspberry Pi 5" in text


@pytest.mark.parametrize(
    "argv,match",
    [
        (["profile", "--model", "resnet50", "--blocks", "2", "--batch-size", "2", "--image-size", "64"], "unknown model"),
        (["profile", "--model", "mobilenet_v3_small", "--blocks", "12", "--batch-size", "2", "--image-size", "64"], "only 11"),
        (["profile", "--model", "mobilenet_v3_small", "--blocks", "all", "--batch-size", "1", "--image-size", "32"], "batch size"),
        (["profile", "--model", "mobilenet_v3_small", "--blocks", "1", "--batch-size", "0", "--image-size", "64"], "batch size"),
        (["plan", "--device", "device_profiles/no_such_board.toml", "--model", "mobilenet_v2"], "not found"),
        (["plan", "--device", "device_profiles/raspberry_pi_zero_2w.toml", "--model", "mobilenet_v3_small"], "nothing fits"),
    ],
)
def test_cli_bad_input_is_a_clear_error(argv, match, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises((EdgetlError, ValueError), match=match):
        _run(argv)


def test_prepared_model_is_rejected(models):
    net = prepare(models("mobilenet_v3_small"), TrainPolicy(2))
    with pytest.raises(EdgetlError, match="original"):
        profile(net, TrainPolicy(2), batch_size=2, image_size=64)
    with pytest.raises(EdgetlError, match="unknown optimizer"):
        profile("mobilenet_v3_small", replace(TrainPolicy(2)), batch_size=2, image_size=64, optimizer="lion")

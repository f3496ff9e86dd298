"""The memory profiler and planner: report rows, paper figures, estimates, device profiles, planner, CLI."""

from __future__ import annotations

import copy
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

from edgetl._rss import current_rss_bytes, peak_rss_bytes, reset_peak
from edgetl.cli import main
from edgetl.errors import ConfigError, EdgetlError
from edgetl.models.blocks import LayerSpec, feature_units, find_blocks, layer_specs
from edgetl.models.zoo import MODELS, load_model, num_blocks
from edgetl.nn.compress import decompress_chunk
from edgetl.profiler.device import DeviceProfileError, load_device, parse_size
from edgetl.profiler.estimate import layer_working_set, param_bytes, predict_step_peak
from edgetl.profiler.native import predict_native_peak
from edgetl.profiler.planner import plan
from edgetl.profiler.plot import plot_report
from edgetl.profiler.predict import predict_units
from edgetl.profiler.process_peak import calibrate_runtime, measure_process_peak
from edgetl.profiler.render import render_report
from edgetl.profiler.report import METHOD_ORDER, MemoryReport, profile
from edgetl.profiler.shapes import conv_output_shape, float_bytes, walk
from edgetl.profiler.timeline import measure_step_timeline
from edgetl.profiler.units import head_layers, unit_layers
from edgetl.train.config import FinetuneConfig
from edgetl.train.optim import OPTIMIZERS, build_optimizer
from edgetl.train.policy import METHODS, TrainPolicy
from edgetl.train.prepare import prepare
from edgetl.train.run import Run

ROOT = Path(__file__).resolve().parents[1]
ALL_MODELS = list(MODELS)


@pytest.fixture(scope="module")
def models():
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = load_model(name, num_classes=7)
        return cache[name]

    return get


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- shapes: the one walk -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (5, 2, 2, 1), (3, 1, 2, 2), (3, 2, 0, 1)]
)
@pytest.mark.parametrize("size", [7, 8, 13])
def test_conv_output_shape_matches_torch(kernel, stride, padding, dilation, size):
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.zeros(2, 4, size, size)
    assert conv_output_shape(layer_specs(conv)[0], tuple(x.shape)) == tuple(conv(x).shape)


def test_walk_refuses_what_it_cannot_shape():
    linear = layer_specs(nn.Linear(8, 3))
    assert [out for *_, out in walk(linear, (2, 8))] == [(2, 3)]
    with pytest.raises(ValueError, match="expects 8 features"):
        list(walk(linear, (2, 9)))
    with pytest.raises(ValueError, match="no shape rule"):
        list(walk([LayerSpec("upsample")], (1, 2, 3, 3)))


def _leaf_working_set(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Largest input + output bytes of any leaf module during ``module(x)``, from forward hooks."""
    largest = 0

    def hook(_m, args, out):
        nonlocal largest
        largest = max(largest, _bytes([args[0], out]))

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            y = module(x)
    finally:
        for h in handles:
            h.remove()
    return largest, y


@pytest.mark.parametrize("name", ALL_MODELS)
def test_layer_working_set_matches_forward_hooks_for_every_unit(models, name):
    model = copy.deepcopy(models(name)).eval()  # a copy: the shared one stays in train mode for the report tests
    x = torch.randn(2, 3, 64, 64)
    live: dict[str, int] = {}  # per unit: largest leaf input + output, plus a residual block's input held for the addition
    for unit_name, unit in feature_units(model):
        measured, y = _leaf_working_set(unit, x)
        layers, residual = unit_layers(unit_name, unit), getattr(unit, "use_res_connect", False)
        assert layer_working_set(layers, tuple(x.shape)) == measured, unit_name
        live[unit_name] = measured + (_bytes([x]) if residual else 0)
        assert layer_working_set(layers, tuple(x.shape), residual=residual) == live[unit_name], unit_name
        x = y
    measured, y = _leaf_working_set(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.classifier), x)
    assert layer_working_set(head_layers(model), tuple(x.shape)) == measured
    assert y.shape == (2, 7)
    # the estimate's bottom phase: the frozen units' largest (with kernel scratch, which hooks cannot see)
    est = predict_step_peak(models(name), TrainPolicy(3), batch_size=2, image_size=64)
    assert est.bottom_working_set >= max(live[n] for n in list(live)[:-4])


# --- the report: predicted == measured, every block, both methods ----------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("batch_size,image_size", [(2, 64), (3, 96)])
def test_report_predicted_equals_measured_for_every_block(models, name, batch_size, image_size):
    model = models(name)
    k = len(find_blocks(model))
    report = profile(model, TrainPolicy(k), batch_size=batch_size, image_size=image_size)
    assert [r.name for r in report.rows] == [n for n, _ in feature_units(model)] + ["head"]
    assert sorted(r.block_index for r in report.rows if r.block_index is not None) == list(range(k))
    for row in report.rows:
        for method in METHODS:
            assert row.predicted[method] == row.measured[method], (name, row.name, method)
    blocks = [r for r in report.rows if r.block_index is not None]
    assert len(blocks) == k and all(r.trains and r.measured["vanilla"] > r.measured["mobiletl"] > 0 for r in blocks)
    assert report.rows[0].in_shape == (batch_size, 3, image_size, image_size)
    for method, totals in report.totals.items():
        assert totals.saved_predicted == totals.saved_measured == sum(r.measured[method] for r in report.rows)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_frozen_bottom_keeps_nothing_and_policy_method_is_ignored(models, name):
    model = models(name)
    a = profile(model, TrainPolicy(3, "vanilla"), batch_size=2, image_size=64)
    b = profile(model, TrainPolicy(3, "mobiletl"), batch_size=2, image_size=64)
    assert a.to_dict()["rows"] == b.to_dict()["rows"]
    frozen = [r for r in a.rows if not r.trains]
    assert len(frozen) == len(feature_units(model)) - 4  # 3 blocks + the final conv stage train
    assert all(r.measured == r.predicted == {"vanilla": 0, "mobiletl": 0} for r in frozen)
    assert [r.block_index for r in a.rows if r.block_index is not None and r.trains] == [len(find_blocks(model)) - i for i in (3, 2, 1)]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_parameter_bytes_match_the_prepared_network(models, name):
    model = models(name)
    for k in (0, 3, len(find_blocks(model))):
        for method in METHODS:
            policy = TrainPolicy(k, method)
            net = prepare(model, policy)
            predicted = param_bytes(model, policy)
            assert predicted.weights == _bytes([*net.parameters(), *net.buffers()]), (k, method)
            assert predicted.trainable == _bytes(p for _, p in net.trainable_parameters()), (k, method)
            assert predicted.trainable_count == sum(p.numel() for _, p in net.trainable_parameters()), (k, method)
    report = profile(model, TrainPolicy(4), batch_size=2, image_size=64, optimizer="sgd")
    t = report.totals
    assert t["mobiletl"].trainable_params < t["vanilla"].trainable_params  # internal BN scales freeze
    for method in METHODS:
        assert sum(r.trainable_param_bytes[method] for r in report.rows) == t[method].trainable_params


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", METHODS)
def test_gradient_and_optimizer_state_bytes_match_a_real_step(models, optimizer, method):
    """The estimate's G and O against the tensors a real step leaves (Adam's step counters aside)."""
    model, policy = models("mobilenet_v3_small"), TrainPolicy(4, method)
    est = predict_step_peak(model, policy, batch_size=2, image_size=32, optimizer=optimizer)
    net = prepare(model, policy).train()
    opt = build_optimizer(optimizer, net.trainable_parameters(), lr=1e-3)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert est.gradients == _bytes(p.grad for _, p in net.trainable_parameters())
    assert est.optimizer_state == _bytes(t for s in opt.state.values() for key, t in s.items() if key != "step")


def test_step_peak_estimate_components(models):
    model = models("mobilenet_v2")
    report = profile(model, TrainPolicy(6), batch_size=4, image_size=96, optimizer="adam")
    for method in METHODS:
        t = report.totals[method]
        est = predict_step_peak(model, TrainPolicy(6, method), batch_size=4, image_size=96)
        assert est == t.step_peak
        assert est.saved_activations == t.saved_measured and est.optimizer_state == 2 * t.trainable_params
        assert est.input_batch == 4 * 3 * 96 * 96 * 4 + 4 * 8
        assert est.total == est.model_bytes == est.live_peak + est.weights  # the loaded copy prepare() copied from
        assert est.phases()["top forward"] >= est.base + est.saved_activations  # everything stored is alive at the end of forward
        assert est.phases()["optimizer step"] > est.base + est.gradients
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


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def test_json_round_trip_and_text_table(models):
    model = models("mobilenet_v3_small")
    report = profile(model, TrainPolicy(5), batch_size=2, image_size=64, num_classes=7)
    data = json.loads(report.to_json())
    assert data["units"] == "bytes" and data["optimizer"] == "adam" and data["optimizer_state_floats_per_param"] == 2
    assert len(data["rows"]) == len(report.rows)
    for got, row in zip(data["rows"], report.rows, strict=True):
        for key in ("predicted", "measured", "paper"):
            assert got[key] == getattr(row, key) and list(got[key]) == list(METHOD_ORDER)
            assert all(isinstance(v, int) for v in got[key].values())
        assert got["in_shape"] == list(row.in_shape)
    assert data["totals"]["mobiletl"]["saved_measured"] == report.totals["mobiletl"].saved_measured
    assert data["totals"]["vanilla"]["step_peak_estimate"]["total"] == report.totals["vanilla"].step_peak.total

    full = render_report(report, collapse_frozen=False).splitlines()
    for r in report.rows:  # every unit has its line, with its measured bytes per method
        line = next(line for line in full if line.startswith((r.name if r.name != "head" else "head (pool") + " "))
        assert f"  {_kib(r.measured['vanilla'])}  " in line and f"  {_kib(r.measured['mobiletl'])}  " in line
    short = render_report(report).splitlines()
    frozen = [r for r in report.rows if not r.trains]
    assert sum("frozen: stem + " in line for line in short) == 1 and not any(line.startswith(f"{frozen[1].name} ") for line in short)
    total = next(line for line in short if line.startswith("total "))
    t = report.totals
    assert total.split()[1:5] == [_kib(t[m].saved_predicted if i % 2 == 0 else t[m].saved_measured) for m in METHOD_ORDER for i in (0, 1)]
    assert "saved for backward (autograd, exact)" in "\n".join(short)


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


# --- user errors are ConfigErrors ----------------------------------------------------------------------

PI5 = ROOT / "device_profiles" / "raspberry_pi_5_8gb.toml"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: profile("mobilenet_v3_small", TrainPolicy(2), batch_size=0, image_size=64), "batch size"),
        (lambda: profile("mobilenet_v3_small", "mobiletl", batch_size=2, image_size=64), "TrainPolicy"),
        (lambda: profile(42, TrainPolicy(2), batch_size=2, image_size=64), "model name or an nn.Module"),
        (lambda: profile("mobilenet_v3_small", TrainPolicy(12), batch_size=2, image_size=64), "only 11"),
        (lambda: profile("mobilenet_v3_small", TrainPolicy(2), batch_size=2, image_size=64, optimizer="lion"), "unknown optimizer"),
        (lambda: profile("mobilenet_v3_small", TrainPolicy(11), batch_size=1, image_size=32), "cannot train"),
        (lambda: predict_step_peak(load_model("mobilenet_v2", num_classes=2), TrainPolicy(2), batch_size=0, image_size=64), "batch"),
        (lambda: measure_process_peak("mobilenet_v3_small", TrainPolicy(1), batch_size=2, image_size=64, steps=0), "steps"),
        (
            lambda: measure_process_peak("mobilenet_v3_small", TrainPolicy(1), batch_size=2, image_size=64, optimizer="sgd_nomomentum"),
            "optim",
        ),
        (lambda: plan(PI5, "mobilenet_v3_small", method="both"), "unknown method"),
        (lambda: plan(PI5, "mobilenet_v3_small", runtime="gpu"), "unknown runtime"),
        (lambda: plan(PI5, "mobilenet_v3_small", runtime="native", optimizer="adam", program_memory=lambda p, b: None), "sgd or adamw"),
        (lambda: plan(PI5, "mobilenet_v3_small", batch_sizes=[0, 2]), "batch sizes"),
        (lambda: predict_native_peak(arena_bytes=-1, weights_file_bytes=0, trainable_bytes=0, feature_bytes=0, images=1), ">= 0"),
    ],
)
def test_bad_settings_raise_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_prepared_model_is_rejected(models):
    net = prepare(models("mobilenet_v3_small"), TrainPolicy(2))
    with pytest.raises(ConfigError, match="original"):
        profile(net, TrainPolicy(2), batch_size=2, image_size=64)


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


def test_every_shipped_device_profile_loads_and_explains_its_budget():
    paths = sorted((ROOT / "device_profiles").glob("*.toml"))
    names = set()
    for path in paths:
        d = load_device(path)
        names.add(d.name)
        assert 0 < d.usable_bytes < d.memory_budget <= d.memory_total
        # the notes say where the budget comes from: they name its figure ("3GiB" -> "3 GiB")
        number, unit = re.fullmatch(r"([\d.]+)(\w+)", tomllib.loads(path.read_text())["memory_budget"]).groups()
        assert re.search(rf"(?<![\d.]){re.escape(number)} ?{unit}", d.notes), path.name
    for wanted in ("Raspberry Pi 4", "Raspberry Pi 5", "Zero 2 W", "Jetson Nano", "Android"):
        assert sum(wanted in n for n in names) == 1, wanted


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
    with pytest.raises(DeviceProfileError, match="not found"):
        load_device(tmp_path / "nope.toml")


# --- planner -------------------------------------------------------------------------------------------


def _device(tmp_path: Path, budget: int, runtime: int, margin: float = 0.2) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        f'name = "tiny test board"\nmemory_total = "8GiB"\nmemory_budget = {budget}\nsafety_margin = {margin}\n'
        f'runtime_overhead = {runtime}\ncores = 2\narch = "x86_64"\nnotes = "budget calibrated by the test"\n'
    )
    return path


def test_plan_is_the_largest_k_then_batch_whose_estimate_fits(models, tmp_path):
    name, size, sizes, runtime = "mobilenet_v3_large", 160, (1, 2, 4, 8, 16, 32, 64), 100 * 2**20
    model = load_model(name, num_classes=1000)
    peak = {
        (k, b): predict_step_peak(model, TrainPolicy(k), batch_size=b, image_size=size, runtime_bytes=runtime).total
        for k in range(1, num_blocks(name) + 1)
        for b in sizes
    }
    budget = (peak[8, 1] + peak[9, 1]) // 2  # K = 9 fits at no batch size, K = 8 at some
    p = plan(_device(tmp_path, budget, runtime, margin=0.0), name, image_size=size)
    fitting = [kb for kb, v in peak.items() if v <= budget]
    assert (p.chosen.blocks, p.chosen.batch_size) == max(fitting) and p.chosen.blocks == 8
    assert p.chosen.peak == peak[max(fitting)] and p.chosen.fits
    assert all(c.fits for c in p.runner_ups) and [c.blocks for c in p.runner_ups] == sorted((c.blocks for c in p.runner_ups), reverse=True)
    assert (9, 1) in [(c.blocks, c.batch_size) for c in p.over_budget] and not any(c.fits for c in p.over_budget)
    vanilla = plan(_device(tmp_path, budget, runtime, margin=0.0), name, image_size=size, method="vanilla")
    assert (vanilla.chosen.blocks, vanilla.chosen.batch_size) <= (p.chosen.blocks, p.chosen.batch_size)


@pytest.mark.slow
def test_plan_choice_fits_when_measured_and_refuses_when_nothing_fits(tmp_path):
    runtime = calibrate_runtime()  # this machine's interpreter + PyTorch, measured in a child process
    assert 100 * 2**20 < runtime < 2**30
    model, size = "mobilenet_v3_small", 128
    # 200 MiB for the model on top of the runtime, 10% margin: enough for a real choice, not for everything
    budget = runtime + 200 * 2**20
    # plain policies: the memory options would fit everything here (their own test is below)
    p = plan(_device(tmp_path, budget, runtime, margin=0.1), model, image_size=size, num_classes=10, memory_options=False)
    assert p.over_budget and 1 <= p.chosen.batch_size < 64 and p.chosen.estimate.model_bytes > 50 * 2**20
    measured = measure_process_peak(model, p.policy(), batch_size=p.chosen.batch_size, image_size=size, num_classes=10)
    assert measured.peak_rss <= p.device.memory_budget, (measured, p.chosen)

    with pytest.raises(EdgetlError, match="nothing fits"):
        plan(_device(tmp_path, runtime, runtime), model, image_size=size, num_classes=10)


# --- the measured peak ----------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the high-water mark can only be reset on Linux")
def test_reset_peak_forgets_a_freed_allocation():
    before = current_rss_bytes()
    block = torch.ones(64 * 2**20)  # 256 MiB, every page written
    assert current_rss_bytes() >= before + 250 * 2**20
    del block
    before = peak_rss_bytes()
    assert reset_peak()
    assert peak_rss_bytes() < before - 128 * 2**20


@pytest.mark.slow
def test_profile_measures_process_peak_per_method():
    report = profile("mobilenet_v3_small", TrainPolicy(6), batch_size=8, image_size=96, num_classes=10, measure_process=True)
    procs = {m: report.totals[m].process for m in METHODS}
    for method, p in procs.items():
        assert p.method == method and p.steps == 2 and p.optimizer == "adam" and p.runtime_rss > 50 * 2**20
        assert p.runtime_rss <= p.loaded_rss <= p.peak_rss and p.step_delta > 0
        # the warm-up's backward faults in kernel code no earlier call ran; it keeps no tensors
        assert p.loaded_rss < p.warm_rss <= p.peak_rss and 0 < p.warm_delta < p.step_delta
        assert p.hwm_reset == sys.platform.startswith("linux")
    text = render_report(report)
    assert "process peak RSS (OS, includes" in text and "step delta" in text and "warm delta" in text
    assert json.loads(report.to_json())["totals"]["mobiletl"]["process"]["peak_rss"] == procs["mobiletl"].peak_rss


# --- the command line: edgetl profile / edgetl plan ----------------------------------------------------


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(*argv) -> (exit code, stdout, stderr)`` through ``edgetl.cli.main``."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # main sets it otherwise; keep the test process unchanged
    monkeypatch.chdir(ROOT)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_cli_profile_prints_table_and_writes_json(cli, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--model", "mobilenet_v3_small", "--blocks", "3", "--batch-size", "2", "--image-size", "64", "--num-classes", "5"]
    code, text, _ = cli("profile", *argv, "--json", str(out))
    assert code == 0
    report = profile("mobilenet_v3_small", TrainPolicy(3), batch_size=2, image_size=64, num_classes=5)
    assert text.startswith(render_report(report) + "\n") and f"JSON report written to {out}" in text
    data = json.loads(out.read_text())
    assert {k: v for k, v in data.items() if k != "torch_version"} == {k: v for k, v in report.to_dict().items() if k != "torch_version"}


def test_cli_profile_counts_the_rows_of_spare_classes(cli, tmp_path):
    argv = ["--model", "mobilenet_v3_small", "--blocks", "2", "--batch-size", "2", "--image-size", "64", "--num-classes", "5"]
    out = tmp_path / "r.json"
    assert cli("profile", *argv, "--spare-classes", "3", "--json", str(out))[0] == 0
    with_spare = profile("mobilenet_v3_small", TrainPolicy(2), batch_size=2, image_size=64, num_classes=8)
    plain = profile("mobilenet_v3_small", TrainPolicy(2), batch_size=2, image_size=64, num_classes=5)
    data = json.loads(out.read_text())
    assert data["num_classes"] == 8
    rows = 3 * (1024 + 1) * 4  # V3-Small's classifier input is 1024 wide; weight and bias, float32
    got, spare, base = data["totals"]["mobiletl"], with_spare.to_dict()["totals"]["mobiletl"], plain.to_dict()["totals"]["mobiletl"]
    assert got["trainable_params"] == spare["trainable_params"] == base["trainable_params"] + rows
    assert got["optimizer_state"] == base["optimizer_state"] + 2 * rows  # Adam: two floats per parameter


def _report_settings(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("model", "blocks", "batch_size", "image_size", "num_classes", "optimizer", "activation_mask")}


def test_cli_profile_takes_settings_from_a_run_and_flags_override_them(cli, tmp_path):
    run = tmp_path / "run"
    config = FinetuneConfig(
        model="mobilenet_v3_small",
        policy=TrainPolicy(3, activation_mask="packed"),
        batch_size=3,
        image_size=48,
        optimizer="sgd",
        out=str(run),
    )
    with Run(run) as opened:
        opened.start(config, ["a", "b", "c", "d"], resume=False)
    out = tmp_path / "r.json"
    assert cli("profile", "--run", str(run), "--json", str(out))[0] == 0
    assert _report_settings(out) == dict(
        model="mobilenet_v3_small", blocks=3, batch_size=3, image_size=48, num_classes=4, optimizer="sgd", activation_mask="packed"
    )
    argv = ["--blocks", "2", "--batch-size", "2", "--image-size", "64", "--optimizer", "adamw", "--num-classes", "6"]
    assert cli("profile", "--run", str(run), *argv, "--activation-mask", "reuse", "--json", str(out))[0] == 0
    assert _report_settings(out) == dict(
        model="mobilenet_v3_small", blocks=2, batch_size=2, image_size=64, num_classes=6, optimizer="adamw", activation_mask="reuse"
    )
    assert cli("plan", "--device", str(PI5), "--run", str(run), "--json", str(out))[0] == 0
    planned = json.loads(out.read_text())
    assert (planned["model"], planned["image_size"], planned["method"]) == ("mobilenet_v3_small", 48, "mobiletl")


def test_cli_profile_takes_settings_from_a_config_file_and_flags_override_them(cli, tmp_path):
    config = tmp_path / "finetune.toml"
    config.write_text(
        'model = "mobilenet_v2"\nbatch_size = 2\nimage_size = 40\noptimizer = "adamw"\n[policy]\nblocks = 4\nactivation_mask = "packed"\n'
    )
    out = tmp_path / "r.json"
    assert cli("profile", "--config", str(config), "--json", str(out))[0] == 0
    # the embedded Fashion-MNIST (the config's default data) has 10 classes
    assert _report_settings(out) == dict(
        model="mobilenet_v2", blocks=4, batch_size=2, image_size=40, num_classes=10, optimizer="adamw", activation_mask="packed"
    )
    assert cli("profile", "--config", str(config), "--model", "efficientnet_lite0", "--image-size", "32", "--json", str(out))[0] == 0
    assert _report_settings(out) == dict(
        model="efficientnet_lite0", blocks=4, batch_size=2, image_size=32, num_classes=10, optimizer="adamw", activation_mask="packed"
    )


def test_cli_plan_prints_choice_and_runner_ups(cli):
    code, text, _ = cli("plan", "--device", str(PI5), "--model", "mobilenet_v2", "--image-size", "160")
    assert code == 0
    expected = plan(PI5, "mobilenet_v2", image_size=160)
    assert text.strip() == expected.render() and "runner-ups:" in text
    # --max-blocks caps K (the Pi 5 fits every K of MobileNetV2 at 160 px)
    code, text, _ = cli("plan", "--device", str(PI5), "--model", "mobilenet_v2", "--image-size", "160", "--max-blocks", "3")
    capped = plan(PI5, "mobilenet_v2", image_size=160, max_blocks=3)
    assert code == 0 and text.strip() == capped.render() and capped.chosen.blocks == 3 < expected.chosen.blocks


@pytest.mark.parametrize(
    "argv,match",
    [
        (["profile", "--model", "resnet50", "--blocks", "2", "--batch-size", "2", "--image-size", "64"], "unknown model 'resnet50'"),
        (["profile", "--model", "mobilenet_v3_small", "--blocks", "12", "--batch-size", "2", "--image-size", "64"], "only 11"),
        (["profile", "--model", "mobilenet_v3_small", "--blocks", "all", "--batch-size", "1", "--image-size", "32"], "batch size"),
        (["profile", "--model", "mobilenet_v3_small", "--batch-size", "2", "--image-size", "64"], "give --blocks"),
        (["profile", "--run", "no/such/run", "--blocks", "1"], "not an edgetl run directory"),
        (["plan", "--device", "device_profiles/no_such_board.toml", "--model", "mobilenet_v2"], "not found"),
        (["plan", "--device", "device_profiles/raspberry_pi_zero_2w.toml", "--model", "mobilenet_v3_small"], "nothing fits"),
        (["plan", "--device", str(PI5), "--model", "mobilenet_v2", "--runtime", "native", "--optimizer", "adam"], "sgd or adamw"),
        (["plan", "--device", str(PI5), "--model", "mobilenet_v2", "--max-blocks", "18"], r"max_blocks must be in 1\.\.17"),
    ],
)
def test_cli_bad_input_is_one_error_line(cli, argv, match):
    code, out, err = cli(*argv)
    assert code == 2 and out == ""
    assert err.startswith("edgetl: error: ") and re.search(match, err) and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["profile", "--model", "mobilenet_v3_small", "--blocks", "1", "--batch-size", "0", "--image-size", "64"],
        ["profile", "--model", "mobilenet_v3_small", "--blocks", "1", "--optimizer", "sgd_nomomentum"],
        ["profile", "--run", "a", "--config", "b.toml"],
    ],
)
def test_cli_rejects_bad_flags_before_running(cli, argv):
    with pytest.raises(SystemExit) as info:
        cli(*argv)
    assert info.value.code == 2


# --- the whole step: predicted live bytes against the allocator's own events ------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_predicted_step_peak_is_within_10_percent_of_the_measured_live_bytes(name, method):
    """predict_step_peak (pure) against measure_step_timeline (torch's allocation events), phase by phase."""
    policy = TrainPolicy(4, method)
    measured = measure_step_timeline(name, policy, batch_size=8, image_size=96, num_classes=10)
    est = predict_step_peak(load_model(name, num_classes=10), policy, batch_size=8, image_size=96)
    assert abs(est.live_peak - measured.peak_bytes) <= 0.10 * measured.peak_bytes, (est.phases(), measured.phase_peaks())
    for phase, predicted in est.phases().items():
        assert abs(predicted - measured.phase_peaks()[phase]) <= 0.10 * measured.peak_bytes, phase
    # the frozen bottom is predicted exactly; when it called each unit whole, holding its input, it
    # measured above the prediction (MobileNetV3-Large's stem output beside block 2's expansion: 2% at
    # this size, 6% at 224 px)
    bottom = measured.phase_peaks()["bottom forward"]
    assert abs(est.phases()["bottom forward"] - bottom) <= 0.01 * bottom, (est.phases(), measured.phase_peaks())


INT8_V3_LARGE = TrainPolicy(5, saved_precision="int8")


@pytest.fixture(scope="module")
def int8_v3_large_phases() -> dict[str, int]:
    """Measured phase peaks of one step of INT8_V3_LARGE (MobileNetV3-Large, batch 8, 224 px): shared."""
    return measure_step_timeline("mobilenet_v3_large", INT8_V3_LARGE, batch_size=8, image_size=224, num_classes=10).phase_peaks()


def test_compressed_inputs_top_forward_and_backward_are_predicted_within_3_percent(int8_v3_large_phases):
    """saved_precision="int8" on MobileNetV3-Large (K=5, batch 8, 224 px): packing the activations' masks
    used 9 bytes an element (top forward measured 84.1 MiB, predicted 71.5) and backward's decompressed
    copies were not modelled (measured 91.8, predicted 84.5). Both phases now within 3%."""
    measured = int8_v3_large_phases
    predicted = predict_step_peak(load_model("mobilenet_v3_large", num_classes=10), INT8_V3_LARGE, batch_size=8, image_size=224).phases()
    for phase in ("top forward", "backward"):
        assert abs(predicted[phase] - measured[phase]) <= 0.03 * measured[phase], (phase, predicted, measured)


def test_backward_holds_one_decompressed_chunk_not_whole_fp32_maps(int8_v3_large_phases):
    """Backward used to turn the largest stored int8 input (8 x 672 x 14 x 14, 4.0 MiB in fp32) into two
    whole fp32 maps at once (``q.to(float32)`` and its product with the scales, beside a zero-filled
    gradient for the int8 tensor): measured backward 91.8 MiB. It now holds one chunk of
    ``decompress_chunk`` images (0.5 MiB) while the weight gradient is summed chunk by chunk: measured
    82.8, below the estimate that counts that one chunk (84.5; the whole maps would be 7 MiB over it)."""
    model = load_model("mobilenet_v3_large", num_classes=10)
    est = predict_step_peak(model, INT8_V3_LARGE, batch_size=8, image_size=224)
    rows = predict_units(model, INT8_V3_LARGE, batch_size=8, image_size=224)
    largest = max(float_bytes(s.shape) for r in rows for s in r.saved if s.precision == "int8")
    assert largest == 4 * 8 * 672 * 14 * 14
    assert decompress_chunk((8, 672, 14, 14)) * 4 * 672 * 14 * 14 <= largest // 4
    measured = int8_v3_large_phases["backward"]
    assert measured <= est.phases()["backward"], (measured, est.phases())


def test_plan_takes_the_cheapest_memory_options_that_fit_and_the_choice_fits_when_measured(tmp_path):
    """A budget between the plain policy's predicted peak and the best option's: the planner must pick options,
    the cheapest fitting ones by predicted time, and a real training step of its choice stays inside the budget."""
    from edgetl.profiler.planner import option_policies, option_time_cost

    runtime = calibrate_runtime()
    model, size, k, b = "mobilenet_v3_small", 128, num_blocks("mobilenet_v3_small"), 16
    net = load_model(model, num_classes=10)
    options = option_policies(k, "mobiletl", "reuse", b, ("fp32",))
    peaks = {o: predict_step_peak(net, o, batch_size=b, image_size=size, runtime_bytes=runtime).total for o in options}
    plain = peaks[TrainPolicy(k)]
    assert min(peaks.values()) < plain
    usable = (plain + min(peaks.values())) // 2
    device = load_device(_device(tmp_path, int(usable / 0.9) + 1, runtime, margin=0.1))
    p = plan(device, model, image_size=size, num_classes=10, batch_sizes=(b,), min_blocks=k)
    chosen = p.policy()
    assert (chosen.blocks, p.chosen.batch_size) == (k, b) and chosen != TrainPolicy(k)
    fitting = [o for o in options if peaks[o] <= device.usable_bytes]
    assert option_time_cost(chosen) == min(option_time_cost(o) for o in fitting)
    measured = measure_process_peak(model, chosen, batch_size=b, image_size=size, num_classes=10)
    assert measured.peak_rss <= device.memory_budget, (measured, p.chosen)


def test_profile_timeline_records_both_methods_in_child_processes_and_plots(tmp_path, capsys):
    png = tmp_path / "step.png"
    argv = ["profile", "--model", "mobilenet_v3_small", "--blocks", "4", "--batch-size", "4", "--image-size", "64"]
    assert main([*argv, "--num-classes", "10", "--timeline", str(png)]) == 0
    out = capsys.readouterr().out
    peaks = re.findall(r"^  step peak\s+([\d.]+) MiB\s+([\d.]+) MiB\s+([\d.]+) MiB\s+([\d.]+) MiB$", out, re.M)
    assert len(peaks) == 1, out
    measured_v, predicted_v, measured_m, predicted_m = map(float, peaks[0])
    assert abs(predicted_v - measured_v) <= 0.1 * measured_v and abs(predicted_m - measured_m) <= 0.1 * measured_m
    assert re.search(r"vanilla peak in .*\n    process \(OS\): runtime baseline [\d.]+ MiB, peak RSS", out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

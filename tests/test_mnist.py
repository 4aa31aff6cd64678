"""mixq.mnist: IDX parsing on the staged files, corrupted files; mixq.experiments.mnist: a tiny
end-to-end pipeline and the CLI."""
import gzip
import json

import numpy as np
import pytest
import torch

from mixq import data, mnist
from mixq import outliers
from mixq.experiments import mnist as pipeline

MNIST_DIR = data.find_data("mnist", required=False)
needs_mnist = pytest.mark.skipif(MNIST_DIR is None, reason="staged MNIST not found (see data/README.md)")


def _write_idx(path, arr: np.ndarray, code: int = 0x08, compress: bool = True):
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# ----------------------------------------------------------------------------- IDX parser
@needs_mnist
def test_read_idx_staged_train_files():
    images = mnist.read_idx(MNIST_DIR / "train-images-idx3-ubyte.gz")
    labels = mnist.read_idx(MNIST_DIR / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(range(10))
    assert images.max() == 255 and images.min() == 0


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.float32, 0x0D)])
def test_read_idx_roundtrip(tmp_path, compress, dtype, code):
    rng = np.random.default_rng()
    arr = (rng.standard_normal((3, 5, 7)) * 50).astype(dtype)
    got = mnist.read_idx(_write_idx(tmp_path / "x.idx", arr, code, compress))
    assert got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)


def test_read_idx_corrupted_files(tmp_path):
    good = gzip.compress(bytes([0, 0, 8, 1]) + np.array([100], ">u4").tobytes() + bytes(100))
    (tmp_path / "trunc.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupted gzip"):
        mnist.read_idx(tmp_path / "trunc.gz")
    (tmp_path / "magic.gz").write_bytes(gzip.compress(b"\x12\x34\x08\x01" + bytes(8)))
    with pytest.raises(ValueError, match="magic"):
        mnist.read_idx(tmp_path / "magic.gz")
    (tmp_path / "type.gz").write_bytes(gzip.compress(b"\x00\x00\x07\x01" + bytes(8)))
    with pytest.raises(ValueError, match="type code"):
        mnist.read_idx(tmp_path / "type.gz")
    short = np.zeros((10, 28, 28), np.uint8)
    _write_idx(tmp_path / "short.gz", short)
    raw = gzip.decompress((tmp_path / "short.gz").read_bytes())[:-5]
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match=r"shape \(10, 28, 28\)"):
        mnist.read_idx(tmp_path / "short.gz")
    with pytest.raises(FileNotFoundError):
        mnist.read_idx(tmp_path / "missing.gz")


def test_find_mnist_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MNIST IDX files"):
        mnist.find_mnist(tmp_path)


def test_load_mnist_from_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng()
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))
    tx, ty, vx, vy = mnist.load_mnist(tmp_path)
    assert tx.shape == (12, 28, 28) and vx.shape == (5, 28, 28) and ty.dtype == torch.int64
    assert 0.0 <= float(tx.min()) and float(tx.max()) <= 1.0
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.full(5, 11, np.uint8))
    with pytest.raises(ValueError, match="exceed 9"):
        mnist.load_mnist(tmp_path)


# ----------------------------------------------------------------------------- model pieces
def test_calibration_stats_and_quantize_mlp(seed):
    model = mnist.MLP((784, 32, 16, 10)).eval()
    calib = torch.rand(40, 28, 28)
    stats = mnist.calibration_stats(model, calib, batch_size=16)
    assert [s.shape[0] for s in stats] == [784, 32, 16]
    want0 = ((calib.reshape(40, -1) - mnist.MNIST_MEAN) / mnist.MNIST_STD).abs().amax(0)
    torch.testing.assert_close(stats[0], want0)
    h1 = torch.relu(model.layers[0]((calib.reshape(40, -1) - mnist.MNIST_MEAN) / mnist.MNIST_STD))
    torch.testing.assert_close(stats[1], h1.abs().amax(0).detach())

    q = mnist.quantize_mlp(model, "w4a4", 0.1, calib)
    assert [m.n_outliers for m in q.linears()] == [
        len(outliers.outliers_topk(s, fraction=0.1)) for s in stats]
    top = torch.topk(stats[1], q.linears()[1].n_outliers).indices
    assert set(q.linears()[1].outlier_idx.tolist()) == set(top.tolist())
    assert all(isinstance(m, torch.nn.Linear) for m in model.linears())   # original untouched
    fp = mnist.quantize_mlp(model, "fp32")
    assert fp is not model
    torch.testing.assert_close(fp(calib), model(calib), rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode"):
        mnist.quantize_mlp(model, "w3a3")
    with pytest.raises(ValueError, match="calib_x"):
        mnist.quantize_mlp(model, "w4a4", 0.05)
    with pytest.raises(ValueError, match="outlier_frac"):
        mnist.quantize_mlp(model, "w4a4", 0.9, calib)
    with pytest.raises(ValueError, match="w4a4"):
        mnist.quantize_mlp(model, "w8a8", 0.05, calib)
    with pytest.raises(TypeError, match="MLP"):
        mnist.quantize_mlp(torch.nn.Linear(3, 3), "fp16")


def test_evaluate_and_train_validate():
    with pytest.raises(ValueError, match="rows"):
        mnist.evaluate(mnist.MLP(), torch.rand(4, 28, 28), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="train_y"):
        mnist.train_mlp(torch.rand(4, 28, 28), torch.zeros(4, dtype=torch.int32))


# ----------------------------------------------------------------------------- pipeline
def test_inject_outliers_keeps_function_and_layer_error(seed):
    model = mnist.MLP((784, 48, 24, 10)).eval()
    x = torch.rand(64, 28, 28)
    inj, chans = mnist.inject_outliers(model, n_channels=3, scale=32.0, seed=seed)
    assert [len(c) for c in chans] == [3, 3]
    torch.testing.assert_close(inj(x), model(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        z = (x.reshape(64, -1) - mnist.MNIST_MEAN) / mnist.MNIST_STD
        h, h0 = torch.relu(inj.layers[0](z)), torch.relu(model.layers[0](z))
    torch.testing.assert_close(h[:, chans[0]], 32 * h0[:, chans[0]])
    rows = mnist.layer_error(inj, x, layer=1, fractions=(0.0, 0.125))
    assert [r["n_outliers"] for r in rows] == [0, 6]
    assert rows[1]["sqnr_db"] > rows[0]["sqnr_db"] + 6
    with pytest.raises(ValueError, match="n_channels"):
        mnist.inject_outliers(model, n_channels=0)
    with pytest.raises(ValueError, match="layer"):
        mnist.layer_error(model, x, layer=3)


@needs_mnist
def test_smoke_pipeline(tmp_path):
    rows = pipeline.run_pipeline(smoke=True, n_train=3000, n_test=1000, epochs=2, fractions=(0.05,),
                              json_path=tmp_path / "r.json", figure_path=tmp_path / "f.png",
                              progress=False)
    half = "FP16" if mnist.half_dtype() == torch.float16 else "BF16"
    by = {r["label"]: r for r in rows}
    by["FP16"] = by[half]
    assert [r["mode"] for r in rows] == ["FP32", half, "W8A8", "W4A16", "W4A4", "W4A4",
                                         "FP32", "W8A8", "W4A16", "W4A4", "W4A4"]
    for r in rows:
        assert {"mode", "accuracy", "weight_bytes", "ms_per_batch", "outlier_frac"} <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["ms_per_batch"] > 0 and r["weight_bytes"] > 0
    fp32 = by["FP32"]
    assert fp32["accuracy"] > 0.8                      # 2 epochs on 3000 images: ~0.87
    n_params = 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10
    assert fp32["weight_bytes"] == n_params * 4
    assert by["FP16"]["weight_bytes"] == n_params * 2
    assert by["W8A8"]["weight_bytes"] < fp32["weight_bytes"] / 3.5
    assert by["W4A4 RTN"]["weight_bytes"] < fp32["weight_bytes"] / 6
    w4o = by["W4A4 +5% outliers"]
    assert w4o["outlier_frac"] == 0.05 and w4o["n_outliers"] == [40, 26, 13]
    assert by["W4A4 RTN"]["weight_bytes"] < w4o["weight_bytes"] < fp32["weight_bytes"] / 4
    assert abs(by["FP16"]["accuracy"] - fp32["accuracy"]) <= 0.002
    assert by["FP16"]["logit_sqnr_db"] > by["W8A8"]["logit_sqnr_db"] > by["W4A4 RTN"]["logit_sqnr_db"]
    assert abs(by["[injected] FP32"]["accuracy"] - fp32["accuracy"]) <= 0.002
    assert by["[injected] W4A4 +5% outliers"]["accuracy"] > by["[injected] W4A4 RTN"]["accuracy"] + 0.1
    assert fp32["logit_sqnr_db"] is None and fp32["agreement"] == 1.0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert isinstance(saved, list) and len(saved) == len(rows)
    for got, row in zip(saved, rows):
        assert {k: got[k] for k in row} == json.loads(json.dumps(row))
        assert {"mode", "accuracy", "weight_bytes", "device", "torch"} <= got.keys()
    assert json.loads((tmp_path / "r.meta.json").read_text())["n_test"] == 1000
    assert (tmp_path / "f.png").stat().st_size > 1000
    table = pipeline.format_table(rows)
    assert all(r["label"] in table for r in rows) and len(table.splitlines()) == len(rows) + 2


def test_accuracy_plot_leaves_the_matplotlib_backend_alone(tmp_path, monkeypatch):
    """The plot draws on a Figure: it must not call matplotlib.use (a notebook's inline backend
    would stop showing figures) and still writes the PNG."""
    matplotlib = pytest.importorskip("matplotlib")
    calls = []
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: calls.append(a))
    rows = [{"mode": "FP32", "accuracy": 0.98, "outlier_frac": 0.0, "weight_spec": "-"},
            {"mode": "W4A4", "accuracy": 0.90, "outlier_frac": 0.0, "weight_spec": "tile",
             "logit_sqnr_db": 10.0},
            {"mode": "W4A4", "accuracy": 0.97, "outlier_frac": 0.05, "weight_spec": "tile",
             "logit_sqnr_db": 20.0}]
    out = pipeline.plot_accuracy_vs_outliers(rows, tmp_path / "p.png")
    assert calls == [] and out.stat().st_size > 1000

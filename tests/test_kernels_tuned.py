"""mixq.kernels.tuned: the per-GPU config file the GEMM launchers read before autotuning."""
import json

import pytest
import torch

from mixq.kernels import tuned
from mixq.kernels import w4a4 as w4a4_kernels

triton = pytest.importorskip("triton")


def test_gpu_slug():
    assert tuned.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert tuned.gpu_slug("NVIDIA H200") == "h200"
    assert tuned.gpu_slug("NVIDIA A100-SXM4-40GB") == "a100"
    assert tuned.gpu_slug("Tesla T4") == "t4"
    assert tuned.gpu_slug("Some GPU") == "some_gpu"


def test_export_and_reload(tmp_path, monkeypatch):
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(tuned, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuned, "_TABLES", {dev: {}})
    monkeypatch.setattr(tuned, "_HITS", {})
    cfg = triton.Config({"BM": 16, "BN": 128, "PERSISTENT": False}, num_warps=4, num_stages=5)
    key = (1, 4096, 4096, 128, 0, True, False, torch.bfloat16)
    tuned.remember("w4a4", key, cfg, dev)
    path = tuned.config_path(dev)
    assert path == tmp_path / "h100.json"
    tuned.export(path, dev)
    data = json.loads(path.read_text())
    assert data["format"] == tuned.FORMAT and data["device_name"].endswith("HBM3")
    assert data["kernels"]["w4a4"]["1,4096,4096,128,0,True,False,bfloat16"] == \
        {"kwargs": {"BM": 16, "BN": 128, "PERSISTENT": False}, "num_warps": 4, "num_stages": 5}
    tuned.clear()
    got = tuned.lookup("w4a4", key, dev)                       # read back from the file
    assert (got.kwargs, got.num_warps, got.num_stages) == (cfg.kwargs, 4, 5)
    assert tuned.lookup("w4a4", key[:-1] + (torch.float16,), dev) is None
    monkeypatch.setenv("MIXQ_TUNED_CONFIGS", "0")
    tuned.clear()
    assert tuned.lookup("w4a4", key, dev) is None               # switched off
    monkeypatch.delenv("MIXQ_TUNED_CONFIGS")
    path.write_text(json.dumps({"format": "other"}))
    tuned.clear()
    with pytest.raises(ValueError, match="h100.json"):
        tuned.lookup("w4a4", key, dev)
    path.write_text(json.dumps({"format": tuned.FORMAT, "kernels": {"w4a4": {"k": {"x": 1}}}}))
    tuned.clear()
    with pytest.raises(ValueError, match="malformed"):
        tuned.lookup("w4a4", key, dev)
    tuned.clear()


def test_w4a4_launch_uses_the_table_config(device, seed, monkeypatch):
    """A config found in the table is launched directly (no autotuner); a miss autotunes and
    remembers the winner."""
    from mixq.kernels.act_quant import act_quant
    from mixq.quant import pack_int4_blocked

    from mixq.kernels import w4a4_gemv
    monkeypatch.setattr(w4a4_gemv, "GEMV_MAX_M", 0)           # the tensor-core kernel at any M
    n, k, m = 70, 256, 5
    w_q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device)
    w = pack_int4_blocked(w_q, 128)
    ws = torch.rand(n, 1, device=device, dtype=torch.float16) + 0.5
    x_q, xs, _ = act_quant(torch.randn(m, k, device=device), out_format="int8")
    want = w4a4_kernels.w4a4_gemm(x_q, xs, w, ws)              # autotuned (or first config)
    key = (8, n, k, 128, 0, False, False, torch.bfloat16)        # m_bucket(5) = 8
    assert tuned.lookup("w4a4", key, x_q.device) is not None    # remembered
    seen = []
    chosen = triton.Config({"BM": 16, "BN": 64, "PERSISTENT": False}, num_warps=4, num_stages=2)

    def fake_lookup(kernel, key_, dev):
        seen.append((kernel, key_))
        return chosen
    monkeypatch.setattr(tuned, "lookup", fake_lookup)
    class NoTuner:                                             # launching it = autotuning
        def __getitem__(self, grid):
            pytest.fail("autotuned")
    monkeypatch.setattr(w4a4_kernels, "_pick_kernel", lambda m_: NoTuner())
    got = w4a4_kernels.w4a4_gemm(x_q, xs, w, ws)
    assert seen and seen[0][0] == "w4a4" and seen[0][1] == key
    assert torch.equal(got, want)

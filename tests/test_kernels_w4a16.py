"""mixq.kernels.w4a16: every regime and every autotune config against mixq.reference.w4a16_linear.

Tolerance (elementwise bound, used as assert_close's atol/rtol). With ``mag = |x| @ |W|^T``:

* fp32 accumulation in any order: ``|err| <= K * 2^-24 * mag`` (standard summation bound);
* "pre-scale" configs round each dequantized weight ``(q - z) * s`` to x's dtype before the
  MMA: ``|err| <= u * mag`` with unit roundoff u = 2^-8 (bf16) or 2^-11 (fp16);
  ("post-scale" configs feed the exact integers and are bounded by the line above);
* the final cast to the output dtype: ``|err| <= u_out * |y|`` (0 for fp32 output).

So ``atol = (u + K * 2^-24) * max(mag)`` and ``rtol = u_out`` (plus 1e-6 of slack for the
reference's own fp32 sums).
"""
import pytest
import torch

from mixq import quant, reference
from mixq.config import QuantSpec
from mixq.kernels import w4a16 as W
from mixq.kernels.w4a16 import w4a16_matmul, w4a16_regime

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 0.0}


def _problem(m, n, k, g, symmetric, x_dtype, device, bias=False):
    w = torch.randn(n, k) * torch.rand(n, 1)
    qt = quant.quantize(w, QuantSpec(4, symmetric, "group", group_size=g))
    x = torch.randn(m, k).to(x_dtype)
    b = torch.randn(n) if bias else None
    w_q = qt.q if symmetric else qt.q.to(torch.uint8)
    ref = reference.w4a16_linear(x, w_q, qt.scale, group_size=g, w_zero=qt.zero, bias=b)
    mag = x.float().abs() @ reference.dequantize_weight(w_q, qt.scale, group_size=g,
                                                        w_zero=qt.zero).abs().T
    dev = dict(device=device)
    args = (x.to(**dev), quant.pack_int4(qt.q).to(**dev), qt.scale.to(**dev),
            None if symmetric else qt.zero.to(**dev), None if b is None else b.to(**dev))
    return args, ref, mag


def _assert_close(y, ref, mag, x_dtype, k):
    atol = (UNIT_ROUNDOFF[x_dtype] + k * 2.0 ** -24) * float(mag.max()) + 1e-6
    torch.testing.assert_close(y.float().cpu(), ref, atol=atol, rtol=UNIT_ROUNDOFF[y.dtype] + 1e-6)


@pytest.mark.parametrize("m", [1, 3, 5, 17, 130])
@pytest.mark.parametrize("n,k,g", [(70, 256, 128), (33, 96, 32), (200, 128, 128), (19, 34, 17)])
def test_matches_reference(m, n, k, g, device, seed):
    x_dtype = (torch.bfloat16, torch.float16)[seed % 2]
    symmetric = seed % 3 != 0
    (x, w, s, z, b), ref, mag = _problem(m, n, k, g, symmetric, x_dtype, device, bias=seed % 2 == 0)
    y = w4a16_matmul(x, w, s, g, w_zero=z, bias=b)
    assert y.shape == (m, n) and y.dtype == x_dtype
    _assert_close(y, ref, mag, x_dtype, k)


@pytest.mark.parametrize("regime,m", [("gemv", 2), ("decode", 11), ("gemm", 20)])
def test_every_autotune_config(regime, m, device, seed):
    """The autotuner may pick any config on a GPU (the interpreter runs only the first)."""
    configs = {"gemv": W.GEMV_CONFIGS, "decode": W.DECODE_CONFIGS, "gemm": W.GEMM_CONFIGS}[regime]
    for i, cfg in enumerate(configs):
        symmetric = (i + seed) % 2 == 0
        (x, w, s, z, b), ref, mag = _problem(m, 72, 256, 128, symmetric, torch.bfloat16, device, bias=True)
        y = W._launch(x, w, s, z, b, 128, torch.float32, config=cfg, regime=regime)
        _assert_close(y, ref, mag, torch.bfloat16, 256)


def test_scales_gathered_per_column(device, seed):
    """Group smaller than the K tile (and not a power of two): per-element scales."""
    for m, regime in ((1, "gemv"), (6, "decode"), (18, "gemm")):
        (x, w, s, z, b), ref, mag = _problem(m, 40, 144, 48, True, torch.float16, device)
        y = w4a16_matmul(x, w, s, 48, out_dtype=torch.float32)
        assert w4a16_regime(m) == regime
        _assert_close(y, ref, mag, torch.float16, 144)


def test_int32_container_and_leading_dims(device, seed):
    (x, w, s, z, b), ref, mag = _problem(6, 48, 64, 32, True, torch.bfloat16, device)
    w32 = w.view(torch.int32)                                # (N, K/8), same bytes
    y = w4a16_matmul(x.reshape(2, 3, 64), w32, s, 32, out_dtype=torch.float32)
    assert y.shape == (2, 3, 48)
    _assert_close(y.reshape(6, 48), ref, mag, torch.bfloat16, 64)


def test_per_channel_scales(device, seed):
    (x, w, s, z, b), ref, mag = _problem(4, 24, 80, 80, False, torch.float16, device)
    _assert_close(w4a16_matmul(x, w, s, 80, w_zero=z), ref, mag, torch.float16, 80)


def test_split_k_is_deterministic_and_resets_counters(device, seed):
    """Split-K sums partials in a fixed order (same bits every call) and leaves its persistent
    tile counters at 0; some K slices are empty here (K=256 over 8 splits of BLOCK_K=128)."""
    cfg = W._cfg(16, 128, 8, 4, 3)
    (x, w, s, z, b), ref, mag = _problem(3, 50, 256, 128, True, torch.bfloat16, device)
    y1 = W._launch(x, w, s, z, b, 128, torch.float32, config=cfg, regime="gemv")
    y2 = W._launch(x, w, s, z, b, 128, torch.float32, config=cfg, regime="gemv")
    assert torch.equal(y1, y2)
    _assert_close(y1, ref, mag, torch.bfloat16, 256)
    assert int(W._COUNTERS[x.device].abs().sum()) == 0


def test_regimes():
    assert [w4a16_regime(m) for m in (1, 2, 3, 16, 17, 4096)] == [
        "gemv", "gemv", "decode", "decode", "gemm", "gemm"]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,group_size", [(96, 32), (384, 128), (256, 256)])
def test_dequantize_int4_is_exact(symmetric, k, group_size, device, seed):
    """(q - z) * s is exact in fp32, so the kernel's RNE cast must equal the reference's cast
    (groups smaller than the 128-column tile: a scale per element; else one per row)."""
    w = torch.randn(67, k)
    qt = quant.quantize(w, QuantSpec(4, symmetric, "group", group_size=group_size))
    w_q = qt.q if symmetric else qt.q.to(torch.uint8)
    ref = reference.dequantize_weight(w_q, qt.scale, group_size=group_size, w_zero=qt.zero)
    for dtype in (torch.bfloat16, torch.float16):
        got = W.dequantize_int4(quant.pack_int4(qt.q).to(device), qt.scale.to(device), group_size,
                                k, dtype, None if symmetric else qt.zero.to(device))
        assert got.dtype == dtype and torch.equal(got.cpu(), ref.to(dtype))


def test_large_m_dequant_path(monkeypatch, device, seed):
    """The M > 16 'dequant + vendor GEMM' path (picked by measurement on a GPU)."""
    monkeypatch.setattr(W, "GEMM_PATH_OVERRIDE", "dequant")
    for x_dtype, bias in ((torch.bfloat16, False), (torch.float16, True)):
        (x, w, s, z, b), ref, mag = _problem(20, 48, 128, 64, seed % 2 == 0, x_dtype, device, bias=bias)
        if b is not None:                     # this path adds the bias in x's dtype
            ref = ref - b.float().cpu() + b.to(x_dtype).float().cpu()
            b = b.to(x_dtype)
        _assert_close(w4a16_matmul(x, w, s, 64, w_zero=z, bias=b), ref, mag, x_dtype, 128)


def test_torch_compile_traces_the_custom_op(device, seed):
    (x, w, s, z, b), ref, mag = _problem(3, 40, 64, 32, True, torch.bfloat16, device)
    fn = torch.compile(lambda a: w4a16_matmul(a, w, s, 32), backend="aot_eager", fullgraph=True)
    _assert_close(fn(x), ref, mag, torch.bfloat16, 64)


def test_bad_inputs(device):
    (x, w, s, z, b), _, _ = _problem(4, 16, 64, 32, True, torch.bfloat16, device)
    with pytest.raises(ValueError, match="group_size"):
        w4a16_matmul(x, w, s, 48)                            # 48 does not divide 64
    with pytest.raises(TypeError, match="dtype"):
        w4a16_matmul(x.float(), w, s, 32)
    with pytest.raises(TypeError, match="dtype"):
        w4a16_matmul(x, w.to(torch.int16), s, 32)
    with pytest.raises(ValueError, match="contiguous"):
        w4a16_matmul(x.t().contiguous().t(), w, s, 32)
    with pytest.raises(ValueError, match="w_packed"):
        w4a16_matmul(x, w[:, :16].contiguous(), s, 32)
    with pytest.raises(ValueError, match="w_scale"):
        w4a16_matmul(x, w, s[:, :1].contiguous(), 32)
    with pytest.raises(TypeError, match="w_zero"):
        w4a16_matmul(x, w, s, 32, w_zero=s)
    with pytest.raises(ValueError, match="bias"):
        w4a16_matmul(x, w, s, 32, bias=torch.zeros(15, device=device))
    with pytest.raises(TypeError, match="out_dtype"):
        w4a16_matmul(x, w, s, 32, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="group_size"):
        w4a16_matmul(x, w, s, 32.0)


def test_cpu_tensor_rejected_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (x, w, s, z, b), _, _ = _problem(2, 16, 32, 32, True, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        w4a16_matmul(x, w, s, 32)


"""Tests for mixq.reference: exact integer GEMM and the W4A4 / W4A16 / W8A8 linear references.

The references are recomputed here independently, in float64, from dequantized tensors.
"""
import subprocess
import sys

import pytest
import torch

from mixq.config import QuantSpec
from mixq.quant import dequantize, quantize
from mixq.reference import (dequantize_weight, int_matmul, quantize_per_token, w4a4_linear,
                            w4a16_linear, w8a8_linear)


def _per_token_f64(x, bits):
    """Independent per-token symmetric quantization, returned dequantized in float64."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.float().abs().amax(dim=1, keepdim=True) / qmax).half().float()
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(x.float() / s).clamp(-qmax - 1, qmax)
    return q.double() * s.double()


def _weights(n, k, bits, group_size, device, asym=False):
    """Random integer weights and fp16 scales (N, K // g) or (N, 1)."""
    lo, hi = (0, 2 ** bits - 1) if asym else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    w_q = torch.randint(lo, hi + 1, (n, k), dtype=torch.int8, device=device)
    ng = 1 if group_size is None else k // group_size
    w_scale = (torch.rand(n, ng, device=device) * 0.02 + 1e-3).half()
    return w_q, w_scale


def _expand(t, k):
    return t.double().repeat_interleave(k // t.shape[1], dim=1)


def _close64(y, y64):
    """fp32 result vs float64 truth: ~1e-5 relative to the output's magnitude."""
    assert y.dtype == torch.float32
    tol = 1e-5 * float(y64.abs().max()) + 1e-12
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=tol)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_per_token(bits, seed, device):
    x = torch.randn(13, 37, device=device) * 4
    x[3] = 0.0                                               # all-zero token -> scale 1
    x_q, x_scale = quantize_per_token(x, bits)
    qt = quantize(x, QuantSpec(bits, True, "row"))
    assert x_q.dtype == torch.int8 and x_scale.dtype == torch.float16 and x_scale.shape == (13, 1)
    assert torch.equal(x_q, qt.q) and torch.equal(x_scale, qt.scale)
    assert float(x_scale[3]) == 1.0
    assert torch.equal(x_q.double() * x_scale.double(), _per_token_f64(x, bits))


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 13, 37), (33, 7, 300), (64, 48, 1000)])
@pytest.mark.parametrize("method", ["auto", "float64", "int_mm"])
def test_int_matmul_exact(m, n, k, method, seed, device):
    if method == "int_mm" and device.type == "cuda":
        pytest.skip("cuBLAS int8 GEMM has shape constraints; covered by test_nn kernel tests")
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    out = int_matmul(a, b, method=method)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    want = (a.cpu().long().unsqueeze(1) * b.cpu().long().unsqueeze(0)).sum(-1)   # int64 truth
    assert torch.equal(out.cpu().long(), want)
    assert torch.equal(out.double(), a.double() @ b.double().T)


def test_int_matmul_extremes_and_overflow():
    k = 131072                                               # 128*128*k = 2^31: one past int32
    a = torch.full((1, k), -128, dtype=torch.int8)
    with pytest.raises(ValueError, match="overflows int32"):
        int_matmul(a, a)
    out = int_matmul(a[:, :-1], a[:, :-1])                   # 2^31 - 16384 still fits
    assert int(out) == 128 * 128 * (k - 1)
    mixed = torch.tensor([[-128, 127]], dtype=torch.int8)
    assert int(int_matmul(mixed, mixed)) == 128 * 128 + 127 * 127


def test_int_matmul_bad_inputs():
    a = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(TypeError, match="a_q.*int8.*int16"):
        int_matmul(a.short(), a)
    with pytest.raises(ValueError, match="share K"):
        int_matmul(a, torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="b_q must have 2 dims"):
        int_matmul(a, torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="method"):
        int_matmul(a, a, method="fp32")
    with pytest.raises(ValueError, match="overflow an int32"):
        int_matmul(torch.zeros(1, 131072, dtype=torch.int8),
                   torch.zeros(1, 131072, dtype=torch.int8), method="int_mm")


@pytest.mark.parametrize("m,n,kq,group_size", [(1, 1, 16, None), (5, 13, 48, 16), (17, 9, 96, 32),
                                               (8, 31, 40, None), (3, 6, 128, 128)])
@pytest.mark.parametrize("n_out", [0, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w4a4_linear_vs_float64(m, n, kq, group_size, n_out, with_bias, seed, device):
    x = torch.randn(m, kq, device=device).half()
    w_q, w_scale = _weights(n, kq, 4, group_size, device)
    kw = {}
    y64 = _per_token_f64(x, 4) @ (w_q.double() * _expand(w_scale, kq)).T
    if n_out:
        kw["x_out"] = (torch.randn(m, n_out, device=device) * 20).half()
        kw["w_out"] = (torch.randn(n, n_out, device=device) * 0.05).half()
        y64 = y64 + kw["x_out"].double() @ kw["w_out"].double().T
    if with_bias:
        kw["bias"] = torch.randn(n, device=device).half()
        y64 = y64 + kw["bias"].double()
    y = w4a4_linear(x, w_q, w_scale, group_size=group_size, **kw)
    assert y.shape == (m, n)
    _close64(y, y64)


def test_w4a4_order_of_operations(seed):
    """The fp32 result follows the documented order exactly (what kernels reproduce)."""
    x = torch.randn(6, 64)
    w_q, w_scale = _weights(10, 64, 4, 16, "cpu")
    x_q, x_scale = quantize_per_token(x, 4)
    y = torch.zeros(6, 10)
    for j in range(4):
        acc = (x_q[:, j * 16:(j + 1) * 16].long() @ w_q[:, j * 16:(j + 1) * 16].long().T)
        y = y + acc.float() * w_scale[:, j].float()
    y = y * x_scale.float()
    torch.testing.assert_close(w4a4_linear(x, w_q, w_scale, group_size=16), y, rtol=0, atol=0)


@pytest.mark.parametrize("m,n,k,group_size", [(1, 3, 32, 16), (7, 11, 96, 32), (4, 5, 24, None)])
@pytest.mark.parametrize("asym", [False, True])
def test_w4a16_linear_vs_float64(m, n, k, group_size, asym, seed, device):
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    w_q, w_scale = _weights(n, k, 4, group_size, device, asym=asym)
    w_zero = None
    w64 = w_q.double()
    if asym:
        w_zero = torch.randint(0, 16, tuple(w_scale.shape), dtype=torch.uint8, device=device)
        w64 = w64 - _expand(w_zero, k)
    w64 = w64 * _expand(w_scale, k)
    bias = torch.randn(n, device=device)
    y = w4a16_linear(x, w_q, w_scale, group_size=group_size, w_zero=w_zero, bias=bias)
    _close64(y, x.double() @ w64.T + bias.double())
    torch.testing.assert_close(dequantize_weight(w_q, w_scale, group_size=group_size, w_zero=w_zero),
                               w64.float(), rtol=0, atol=0)


def test_w4a16_matches_quantized_weight(seed):
    w = torch.randn(12, 64)
    spec = QuantSpec(4, False, "group", group_size=32)
    qt = quantize(w, spec)
    x = torch.randn(3, 64)
    y = w4a16_linear(x, qt.q, qt.scale, group_size=32, w_zero=qt.zero)
    torch.testing.assert_close(y, x @ dequantize(qt).T)


@pytest.mark.parametrize("m,n,k", [(1, 1, 7), (9, 14, 65), (32, 20, 257)])
def test_w8a8_linear_vs_float64(m, n, k, seed, device):
    x = torch.randn(m, k, device=device) * 3
    w_q, w_scale = _weights(n, k, 8, None, device)
    bias = torch.randn(n, device=device).half()
    y = w8a8_linear(x, w_q, w_scale, bias=bias)
    y64 = _per_token_f64(x, 8) @ (w_q.double() * w_scale.double()).T + bias.double()
    _close64(y, y64)


def test_linear_bad_inputs():
    x = torch.randn(4, 32)
    w_q, w_scale = _weights(6, 32, 4, 16, "cpu")
    with pytest.raises(ValueError, match=r"w_q values must be in \[-8, 7\], got range \[-9"):
        w4a4_linear(x, torch.full((6, 32), -9, dtype=torch.int8), w_scale, group_size=16)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(N, 1\)"):
        w4a4_linear(x, w_q, w_scale)
    with pytest.raises(ValueError, match="group_size.*24 does not divide 32"):
        w4a4_linear(x, w_q, w_scale, group_size=24)
    with pytest.raises(ValueError, match=r"K = 32 columns.*\(4, 31\)"):
        w4a4_linear(x[:, :31], w_q, w_scale, group_size=16)
    with pytest.raises(ValueError, match="x_out and w_out go together"):
        w4a4_linear(x, w_q, w_scale, group_size=16, x_out=torch.randn(4, 2).half())
    with pytest.raises(ValueError, match=r"x_out must be \(M, k\)"):
        w4a4_linear(x, w_q, w_scale, group_size=16, x_out=torch.randn(4, 2), w_out=torch.randn(6, 3))
    with pytest.raises(TypeError, match="x must have dtype"):
        w4a4_linear(x.int(), w_q, w_scale, group_size=16)
    with pytest.raises(TypeError, match="w_q must have dtype"):
        w4a4_linear(x, w_q.float(), w_scale, group_size=16)
    with pytest.raises(ValueError, match="x has non-finite"):
        w4a4_linear(x.masked_fill(x > 1, float("nan")), w_q, w_scale, group_size=16)
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\)"):
        w8a8_linear(x, w_q, w_scale[:, :1], bias=torch.zeros(5))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        w4a16_linear(x, w_q, w_scale, group_size=16, w_zero=torch.zeros_like(w_scale))
    with pytest.raises(ValueError, match="w_zero must have the shape"):
        w4a16_linear(x, w_q.abs().clamp(max=15), w_scale, group_size=16,
                     w_zero=torch.zeros(6, 1, dtype=torch.uint8))


def test_reference_never_imports_triton():
    code = ("import sys, mixq, mixq.quant, mixq.reference, mixq.outliers; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

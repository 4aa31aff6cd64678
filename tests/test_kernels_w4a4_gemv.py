"""The decode GEMV (M <= MAX_M) equals the tensor-core W4A4 GEMM and the reference: bit
for bit without outliers (per channel and per group), to fp32 rounding with them; awkward
shapes, K tails, bias, every tuned geometry; `w4a4_gemm` dispatches small M to it."""
import pytest
import torch

from mixq.kernels import w4a4_gemv as gemv_module
from mixq.kernels.w4a4 import _launch, _reference_gemm, w4a4_gemm
from mixq.kernels.w4a4_gemv import MAX_M, _configs_for, _cfg, w4a4_gemv
from mixq.quant import blocked_columns, pack_int4_blocked


def _operands(m, n, k, group, n_out, bias, device, block_k=128):
    """x_q (M, Kx), x_scale (M,), w (N, Kpad/2), w_scale, x_out, w_out, bias."""
    kpad = blocked_columns(k, block_k)
    kx = kpad if group else k                        # groups need K a multiple of the group
    w_q = torch.randint(-8, 8, (n, kpad), dtype=torch.int8, device=device)
    w_q[:, k:] = 0                                   # padding columns are zero
    w = pack_int4_blocked(w_q, block_k)
    x_q = torch.randint(-8, 8, (m, kx), dtype=torch.int8, device=device)
    xs = (torch.rand(m, device=device) * 0.1 + 0.01).half()
    ws = (torch.rand(n, kx // group if group else 1, device=device) * 0.02 + 0.001).half()
    xo = (torch.randn(m, n_out, device=device) * 4).half() if n_out else None
    wo = (torch.randn(n, n_out, device=device) * 0.05).half() if n_out else None
    b = (torch.randn(n, device=device) * 0.1).half() if bias else None
    return x_q, xs, w, ws, xo, wo, b


def _same(got, want, bias):
    """Bit for bit; with a bias on a GPU, to one fp32 rounding (the compiler may fuse
    ``y * x_scale + bias`` into one FMA in one kernel and not in the other)."""
    if bias is None or bias is False or got.device.type == "cpu":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("m,n,k,group,n_out,bias", [
    (1, 37, 300, 0, 0, False),        # K tail inside a block, N not a multiple of BN
    (4, 9, 1000, 0, 0, True),
    (3, 70, 256, 128, 0, True),       # groups
    (2, 33, 512, 256, 0, False),
    (1, 16, 128, 0, 70, False),       # outliers, two 64-wide steps
    (4, 65, 640, 128, 17, True),
    (2, 21, 301, 0, 0, False),        # K not a multiple of 4: words straddle the end of x
    (3, 19, 640, 128, 0, False),      # 5 groups: the last 4-group step is part padding
    (16, 23, 384, 128, 0, False),     # MAX_M tokens
    (8, 17, 256, 0, 5, True),
])
def test_equals_tensor_core_kernel_and_reference(m, n, k, group, n_out, bias, device, seed):
    x_q, xs, w, ws, xo, wo, b = _operands(m, n, k, group, n_out, bias, device)
    got = w4a4_gemv(x_q, xs, w, ws, group, 128, xo, wo, b, torch.float32)
    tc = _launch(x_q, xs, w, ws, group, 128, xo, wo, b, torch.float32, int_out=False)
    ref = _reference_gemm(x_q, xs, w, ws, group or None, 128, xo, wo, b).to(device)
    assert got.shape == (m, n) and got.dtype == torch.float32
    if n_out == 0:                   # integer sums and the same float steps: exact
        _same(got, tc, bias)
        _same(got, ref, bias)
    else:                            # the outlier products add in another order
        torch.testing.assert_close(got, tc, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block_k,group", [(64, 0), (128, 128), (256, 256), (128, 512),
                                           (64, 192)])
def test_every_tuned_geometry(block_k, group, device, seed):
    m, n, k = 2, 24, 1152 if group == 192 else 1024
    x_q, xs, w, ws, xo, wo, b = _operands(m, n, k, group, 0, True, device, block_k)
    want = _reference_gemm(x_q, xs, w, ws, group or None, block_k, None, None, b).to(device)
    configs = _configs_for(block_k // 2, group)
    g2 = group // 2                  # a step holds whole groups or tiles one
    assert configs and all(group == 0 or c.kwargs["BKB"] % g2 == 0 or g2 % c.kwargs["BKB"] == 0
                           for c in configs)
    for c in {(c.kwargs["BN"], c.kwargs["BKB"]): c for c in configs}.values():
        got = w4a4_gemv(x_q, xs, w, ws, group, block_k, None, None, b, torch.float32, config=c)
        _same(got, want, b)


def test_gemm_dispatches_small_m(device, seed, monkeypatch):
    monkeypatch.setattr(gemv_module, "GEMV_MAX_M", 8)         # (default 1)
    x_q, xs, w, ws, xo, wo, b = _operands(8, 40, 384, 0, 5, False, device)
    calls = []
    real = gemv_module.w4a4_gemv
    monkeypatch.setattr(gemv_module, "w4a4_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = w4a4_gemm(x_q, xs, w, ws, x_out=xo, w_out=wo, out_dtype=torch.bfloat16)
    assert calls == [1] and y.shape == (8, 40) and y.dtype == torch.bfloat16
    x5 = torch.cat([x_q, x_q[:1]])
    w4a4_gemm(x5, torch.cat([xs, xs[:1]]), w, ws, x_out=torch.cat([xo, xo[:1]]), w_out=wo)
    assert calls == [1]               # M > GEMV_MAX_M: the tensor-core kernel
    monkeypatch.setattr(gemv_module, "GEMV_MAX_M", 0)         # off
    w4a4_gemm(x_q[:1], xs[:1], w, ws, x_out=xo[:1], w_out=wo)
    assert calls == [1]


def test_more_tokens_than_the_kernel_takes_is_an_error(device):
    x_q, xs, w, ws, *_ = _operands(MAX_M + 1, 8, 128, 0, 0, False, device)
    with pytest.raises(ValueError, match="MAX_M"):
        w4a4_gemv(x_q, xs, w, ws, 0, 128, None, None, None, torch.float32,
                  config=_cfg(8, 64, 4, 3))


def test_a_weight_view_not_word_aligned_runs_the_tensor_core_kernel(device, seed, monkeypatch):
    x_q, xs, w, ws, *_ = _operands(1, 12, 256, 0, 0, False, device)
    flat = torch.zeros(w.numel() + 1, dtype=torch.uint8, device=device)
    view = flat[1:].view_as(w)                 # contiguous, but at byte offset 1: not int32 words
    view.copy_(w)
    monkeypatch.setattr(gemv_module, "GEMV_MAX_M", 8)
    assert not gemv_module.takes_weight(view) and gemv_module.takes_weight(w)
    with pytest.raises(ValueError, match="int32 words"):
        w4a4_gemv(x_q, xs, view, ws, 0, 128, None, None, None, torch.float32)
    calls = []
    real = gemv_module.w4a4_gemv
    monkeypatch.setattr(gemv_module, "w4a4_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(w4a4_gemm(x_q, xs, view, ws), w4a4_gemm(x_q, xs, w, ws))
    assert calls == [1]                        # only the aligned weight took the GEMV

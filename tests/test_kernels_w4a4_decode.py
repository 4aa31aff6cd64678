"""The fused decode kernel equals act_quant + w4a4_gemm bit for bit (awkward shapes, outliers
gathered from their original channels, groups, bias, dtypes), and rejects bad input."""
import pytest
import torch

from mixq.kernels.act_quant import act_quant, outlier_gather_index
from mixq.kernels.w4a4 import w4a4_gemm
from mixq.kernels import w4a4_gemv
from mixq.kernels.w4a4_decode import DECODE_MAX_M, GEMV_MAX_M, w4a4_decode_gemm
from mixq.quant import blocked_columns, pack_int4_blocked


def _operands(n, k, n_out, group, device, bias):
    kq = k - n_out
    kb = blocked_columns(kq, 128)
    w_q = torch.randint(-8, 8, (n, kb), dtype=torch.int8, device=device)
    w_q[:, kq:] = 0                                     # the padding columns are zero
    w = pack_int4_blocked(w_q, 128)
    cols = 1 if group is None else kb // group
    ws = (torch.rand(n, cols, device=device) * 0.02 + 0.001).half()
    w_out = (torch.randn(n, n_out, device=device) * 0.05).half() if n_out else None
    b = (torch.randn(n, device=device) * 0.1).half() if bias else None
    return w, ws, w_out, b


@pytest.mark.parametrize("m,n,k,n_out,group,bias,dtype", [
    (1, 70, 200, 0, None, False, torch.float32),
    (3, 129, 304, 3, None, True, torch.bfloat16),
    (16, 64, 256, 48, 128, False, torch.float16),
    (5, 96, 640, 130, 128, True, torch.float32),       # > 128 outliers: the 64-wide steps
    (17, 33, 129, 1, None, False, torch.bfloat16),     # M past one 16-token tile
])
def test_equals_act_quant_then_gemm(m, n, k, n_out, group, bias, dtype, device, seed):
    w, ws, w_out, b = _operands(n, k, n_out, group, device, bias)
    x = (torch.randn(m, k, device=device) * 2).to(dtype)
    x[:, :n_out] *= 30                                   # outlier channels scattered in x
    idx = torch.randperm(k, device=device)[:n_out] if n_out else None
    gather = outlier_gather_index(k, idx) if n_out else None
    x_q, xs, xo = act_quant(x, outlier_idx=idx, out_format="int8", pad_to=128) if n_out else \
        act_quant(x, out_format="int8", pad_to=128)
    want = w4a4_gemm(x_q, xs, w, ws, group_size=group, x_out=xo if n_out else None,
                     w_out=w_out, bias=b, out_dtype=torch.float32)
    got = w4a4_decode_gemm(x, w, ws, n_outliers=n_out, gather_idx=gather, w_out=w_out, bias=b,
                           group_size=group, out_dtype=torch.float32)
    cuda_core = m <= GEMV_MAX_M or m <= w4a4_gemv.GEMV_MAX_M     # on either side
    if n_out == 0 or not cuda_core:
        assert torch.equal(got, want)
    else:   # a CUDA-core path sums the fp16 outlier products in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert DECODE_MAX_M == 16


def test_rejects_bad_input(device):
    w, ws, w_out, _ = _operands(8, 160, 4, None, device, False)
    x = torch.randn(2, 160, device=device)
    with pytest.raises(ValueError, match="w_out"):
        w4a4_decode_gemm(x, w, ws, n_outliers=4)
    with pytest.raises(ValueError, match="w_packed must have shape"):
        w4a4_decode_gemm(x, w, ws, n_outliers=40, w_out=torch.zeros(8, 40, dtype=torch.half,
                                                                   device=device))
    with pytest.raises(TypeError, match="x must have dtype"):
        w4a4_decode_gemm(x.double(), w, ws, n_outliers=4, w_out=w_out)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        w4a4_decode_gemm(x, w, ws[:4], n_outliers=4, w_out=w_out)
    with pytest.raises(ValueError, match="gather_idx"):
        w4a4_decode_gemm(x, w, ws, n_outliers=4, w_out=w_out,
                         gather_idx=torch.arange(10, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="group_size"):
        w4a4_decode_gemm(x, w, ws, n_outliers=4, w_out=w_out, group_size=64)

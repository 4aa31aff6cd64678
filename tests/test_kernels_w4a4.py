"""W4A4 GEMM kernel vs the pure-PyTorch reference (Triton interpreter on CPU, or CUDA).

Integer accumulators must match `mixq.reference.int_matmul` exactly; scaled outputs must match
`mixq.reference.w4a4_linear` to fp32 rounding (fp32 output) or to bf16 rounding (bf16 output).
Shapes are awkward on purpose: odd N, K not a multiple of the shuffle block, M not a multiple
of any tile.
"""
import pytest
import torch

from mixq.quant import pack_int4
from mixq.reference import int_matmul, quantize_per_token, w4a4_linear
from mixq.kernels.w4a4 import (W4A4_BLOCK_K, padded_in_features, prepare_w4a4_weight,
                               unprepare_w4a4_weight, w4a4_gemm, w4a4_int_accum)


def _rand_int4(shape, device):
    return torch.randint(-8, 8, shape, dtype=torch.int8, device=device)


def _problem(m, n, k, device, *, group_size=None, n_out=0, block_k=W4A4_BLOCK_K):
    """Random activations/weights in the kernel's input format and the reference's."""
    x = torch.randn(m, k, device=device) * torch.rand(1, k, device=device) * 4
    w_q = _rand_int4((n, k), device)
    n_scales = 1 if group_size is None else k // group_size
    w_scale = (torch.rand(n, n_scales, device=device) * 0.02 + 0.001).half()
    x_out = (torch.randn(m, n_out, device=device) * 8).half() if n_out else None
    w_out = (torch.randn(n, n_out, device=device) * 0.05).half() if n_out else None
    x_q, x_scale = quantize_per_token(x, 4)
    w_packed = prepare_w4a4_weight(w_q, block_k=block_k)
    return dict(x=x, w_q=w_q, w_scale=w_scale, x_out=x_out, w_out=w_out, x_q=x_q,
                x_scale=x_scale, w_packed=w_packed)


# ------------------------------------------------------------------------------------------
# Weight layout
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 63, 128, 200, 256])
@pytest.mark.parametrize("block_k", [64, 128, 256])
def test_prepare_roundtrip_and_layout(k, block_k, seed):
    n = 5
    w_q = _rand_int4((n, k), "cpu")
    packed = prepare_w4a4_weight(w_q, block_k=block_k)
    kpad = padded_in_features(k, block_k)
    assert packed.dtype == torch.uint8 and packed.shape == (n, kpad // 2)
    assert torch.equal(unprepare_w4a4_weight(packed, k, block_k=block_k), w_q)
    # Same result from the plain low-nibble-first packing (the W4A16 storage).
    assert torch.equal(prepare_w4a4_weight(pack_int4(w_q), k, block_k=block_k), packed)
    # Layout spelled out element by element: byte j of block b = (col b*B+j, col b*B+B/2+j).
    h = block_k // 2
    wpad = torch.zeros(n, kpad, dtype=torch.int64)
    wpad[:, :k] = w_q.long()
    for b in range(kpad // block_k):
        for j in (0, h - 1):
            lo = wpad[:, b * block_k + j] & 0xF
            hi = wpad[:, b * block_k + h + j] & 0xF
            assert torch.equal(packed[:, b * h + j].long(), lo | (hi << 4))


def test_prepare_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        prepare_w4a4_weight(torch.full((2, 4), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="in_features"):
        prepare_w4a4_weight(torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="dtype"):
        prepare_w4a4_weight(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="block_k"):
        prepare_w4a4_weight(torch.zeros(2, 4, dtype=torch.int8), block_k=96)
    with pytest.raises(ValueError, match="does not hold"):
        unprepare_w4a4_weight(torch.zeros(2, 3, dtype=torch.uint8), 128)


# ------------------------------------------------------------------------------------------
# Exact integer accumulator
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 3, 17, 130])
@pytest.mark.parametrize("n,k,block_k", [(67, 98, 128), (33, 256, 64), (129, 130, 256)])
def test_int_accum_exact(m, n, k, block_k, device, seed):
    x_q = _rand_int4((m, k), device)
    w_q = _rand_int4((n, k), device)
    acc = w4a4_int_accum(x_q, prepare_w4a4_weight(w_q, block_k=block_k), block_k=block_k)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc, int_matmul(x_q, w_q))


def test_int_accum_extremes_and_int8_activations(device, seed):
    """All -8 (the largest products) and full-range int8 activations (W4A8) stay exact."""
    m, n, k = 5, 64, 256
    w_q = torch.full((n, k), -8, dtype=torch.int8, device=device)
    w_q[1::2] = 7
    x_q = torch.full((m, k), -8, dtype=torch.int8, device=device)
    packed = prepare_w4a4_weight(w_q)
    assert torch.equal(w4a4_int_accum(x_q, packed), int_matmul(x_q, w_q))
    x8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    assert torch.equal(w4a4_int_accum(x8, packed), int_matmul(x8, w_q))


# ------------------------------------------------------------------------------------------
# Scaled output vs reference.w4a4_linear
# ------------------------------------------------------------------------------------------

def _reference(p, group_size, bias=None):
    return w4a4_linear(p["x"], p["w_q"], p["w_scale"], group_size=group_size,
                       x_out=p["x_out"], w_out=p["w_out"], bias=bias)


@pytest.mark.parametrize("m", [1, 3, 17, 130])
@pytest.mark.parametrize("n_out", [0, 5, 32])
@pytest.mark.parametrize("n,k,group_size", [(67, 98, None), (129, 256, 128)])
def test_gemm_matches_reference(m, n_out, n, k, group_size, device, seed):
    p = _problem(m, n, k, device, group_size=group_size, n_out=n_out)
    bias = torch.randn(n, device=device) if m == 3 else None
    ref = _reference(p, group_size, bias)
    y = w4a4_gemm(p["x_q"], p["x_scale"], p["w_packed"], p["w_scale"], group_size=group_size,
                  x_out=p["x_out"], w_out=p["w_out"], bias=bias, out_dtype=torch.float32)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    scale = float(ref.abs().max())
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=2e-6 * scale)
    y16 = w4a4_gemm(p["x_q"], p["x_scale"], p["w_packed"], p["w_scale"], group_size=group_size,
                    x_out=p["x_out"], w_out=p["w_out"], bias=bias)
    assert y16.dtype == torch.bfloat16
    # One bf16 ulp: the GPU rounds to nearest, the interpreter's cast may truncate.
    torch.testing.assert_close(y16.float(), ref, rtol=2 ** -7, atol=1e-5 * scale)


@pytest.mark.parametrize("block_k,group_size", [(64, 64), (64, 256), (256, 256)])
def test_gemm_block_k_and_groups(block_k, group_size, device, seed):
    m, n, k = 9, 65, 512
    p = _problem(m, n, k, device, group_size=group_size, n_out=3, block_k=block_k)
    y = w4a4_gemm(p["x_q"], p["x_scale"], p["w_packed"], p["w_scale"], group_size=group_size,
                  block_k=block_k, x_out=p["x_out"], w_out=p["w_out"], out_dtype=torch.float32)
    ref = _reference(p, group_size)
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("m", [3, 130])
def test_gemm_accepts_x_q_padded_to_kpad(m, device, seed):
    """x_q with the prepared weight's Kpad columns (act_quant(..., pad_to=block_k)) gives the
    result of the unpadded x_q: the pad weight columns are zero (no tail step, no copy)."""
    from mixq.kernels.act_quant import act_quant
    from mixq.kernels.w4a4 import padded_in_features
    n, k, n_out = 70, 200, 8
    p = _problem(m, n, k - n_out, device, n_out=n_out)
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    x_q, x_scale, x_out = act_quant(x, n_outliers=n_out, out_format="int8")
    x_qp, x_scalep, x_outp = act_quant(x, n_outliers=n_out, out_format="int8",
                                       pad_to=padded_in_features(k - n_out))
    assert x_qp.shape == (m, padded_in_features(k - n_out))
    args = dict(x_out=x_out, w_out=p["w_out"], out_dtype=torch.float32)
    y = w4a4_gemm(x_q, x_scale, p["w_packed"], p["w_scale"], **args)
    y_pad = w4a4_gemm(x_qp, x_scalep, p["w_packed"], p["w_scale"], **args)
    assert torch.equal(y, y_pad)


def test_gemm_fp16_output_and_1d_scale(device, seed):
    p = _problem(4, 70, 128, device, n_out=16)
    y = w4a4_gemm(p["x_q"], p["x_scale"].reshape(-1), p["w_packed"], p["w_scale"],
                  x_out=p["x_out"], w_out=p["w_out"], out_dtype=torch.float16)
    ref = _reference(p, None)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -10, atol=1e-4 * float(ref.abs().max()))


def test_empty_outliers_and_empty_batch(device, seed):
    p = _problem(3, 64, 128, device)
    none = w4a4_gemm(p["x_q"], p["x_scale"], p["w_packed"], p["w_scale"], out_dtype=torch.float32)
    x_out = torch.zeros(3, 0, dtype=torch.float16, device=device)
    w_out = torch.zeros(64, 0, dtype=torch.float16, device=device)
    empty = w4a4_gemm(p["x_q"], p["x_scale"], p["w_packed"], p["w_scale"], x_out=x_out,
                      w_out=w_out, out_dtype=torch.float32)
    assert torch.equal(none, empty)
    y = w4a4_gemm(p["x_q"][:0], p["x_scale"][:0], p["w_packed"], p["w_scale"])
    assert y.shape == (0, 64)


def test_custom_op_registered_and_opcheck(device, seed):
    p = _problem(3, 64, 128, device, n_out=4)
    args = (p["x_q"], p["x_scale"].reshape(-1), p["w_packed"], p["w_scale"], 0, 128,
            p["x_out"], p["w_out"], None, torch.bfloat16)
    y = torch.ops.mixq.w4a4_gemm(*args)
    assert y.shape == (3, 64)
    torch.library.opcheck(torch.ops.mixq.w4a4_gemm.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.mixq.w4a4_int_accum.default, (p["x_q"], p["w_packed"], 128),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument
# ------------------------------------------------------------------------------------------

def test_bad_inputs(device):
    p = _problem(4, 64, 256, device, n_out=4)
    xq, xs, wp, ws = p["x_q"], p["x_scale"], p["w_packed"], p["w_scale"]

    def call(**kw):
        args = dict(x_q=xq, x_scale=xs, w_packed=wp, w_scale=ws)
        args.update(kw)
        return w4a4_gemm(args.pop("x_q"), args.pop("x_scale"), args.pop("w_packed"),
                         args.pop("w_scale"), **args)

    with pytest.raises(TypeError, match="x_q"):
        call(x_q=xq.float())
    with pytest.raises(TypeError, match="w_packed"):
        call(w_packed=wp.view(torch.int8))
    with pytest.raises(ValueError, match="x_q must be contiguous"):
        call(x_q=torch.randint(-8, 8, (256, 4), dtype=torch.int8, device=device).T)
    with pytest.raises(ValueError, match="w_packed"):
        call(w_packed=wp[:, :-1].contiguous())                     # K mismatch
    with pytest.raises(ValueError, match="x_scale"):
        call(x_scale=xs[:3])
    with pytest.raises(ValueError, match=r"w_scale must have shape \(N, 1\)"):
        call(w_scale=ws[:10])
    with pytest.raises(ValueError, match="group_size=96 must divide K=256"):
        call(group_size=96, w_scale=ws)
    with pytest.raises(ValueError, match="multiple of block_k"):
        call(group_size=64, w_scale=ws.expand(64, 4).contiguous())
    with pytest.raises(ValueError, match="w_scale must have shape"):
        call(group_size=128, w_scale=ws)
    with pytest.raises(ValueError, match="go together"):
        call(x_out=p["x_out"])
    with pytest.raises(ValueError, match="x_out must be"):
        call(x_out=p["x_out"][:, :3].contiguous(), w_out=p["w_out"])
    with pytest.raises(ValueError, match="x_out must be"):
        call(x_out=p["x_out"][:2], w_out=p["w_out"])
    with pytest.raises(TypeError, match="share a dtype"):
        call(x_out=p["x_out"], w_out=p["w_out"].bfloat16())
    with pytest.raises(TypeError, match="x_out"):
        call(x_out=p["x_out"].float(), w_out=p["w_out"].float())
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.zeros(63, device=device))
    with pytest.raises(TypeError, match="out_dtype"):
        call(out_dtype=torch.int32)
    with pytest.raises(ValueError, match="block_k"):
        call(block_k=100)
    with pytest.raises(ValueError, match="device"):
        call(x_q=xq.to("meta"))
    with pytest.raises(ValueError, match="w_packed"):
        w4a4_int_accum(xq[:, :100].contiguous(), wp, block_k=64)


def test_mixed_devices_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device next to the CPU")
    p = _problem(4, 64, 128, "cuda")
    with pytest.raises(ValueError, match="device"):
        w4a4_gemm(p["x_q"], p["x_scale"].cpu(), p["w_packed"], p["w_scale"])


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("n_out", [0, 7])
def test_explicit_configs_incl_persistent(persistent, n_out, device, seed):
    """Every tile-loop form (one program per tile, or persistent programs striding over many
    tiles) gives the same exact result; covers configs the interpreter's autotune never picks."""
    import triton
    from mixq.kernels import w4a4

    m, n, k = 40, 200, 300                     # 3 x 4 = 12 tiles of 16 x 64 > 4 programs
    p = _problem(m, n, k, device, n_out=n_out)
    cfg = triton.Config({"BM": 16, "BN": 64, "PERSISTENT": persistent}, num_warps=4,
                        num_stages=3)
    acc = w4a4._launch(p["x_q"], None, p["w_packed"], None, 0, W4A4_BLOCK_K, None, None, None,
                       torch.int32, True, config=cfg)
    assert torch.equal(acc, int_matmul(p["x_q"], p["w_q"]))
    y = w4a4._launch(p["x_q"], p["x_scale"].reshape(-1), p["w_packed"], p["w_scale"], 0,
                     W4A4_BLOCK_K, p["x_out"], p["w_out"], None, torch.float32, False, config=cfg)
    ref = _reference(p, None)
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("m", [5, 130])
def test_many_outliers_loop(m, device, seed):
    """More than 128 outlier channels take the multi-step fp16 path; M >= 128 with a K tail takes
    the zero-padded-x path, smaller M the peeled tail step."""
    p = _problem(m, 64, 100, device, n_out=150)
    y = w4a4_gemm(p["x_q"], p["x_scale"], p["w_packed"], p["w_scale"], x_out=p["x_out"],
                  w_out=p["w_out"], out_dtype=torch.float32)
    ref = _reference(p, None)
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))

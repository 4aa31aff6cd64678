"""mixq.nn: each quantized linear against the mixq.reference / mixq.quant math."""
import math

import pytest
import torch
from torch import nn

from mixq import nn as qnn
from mixq import quant, reference
from mixq.config import QuantSpec

EXACT = dict(rtol=0, atol=0)
FP32 = dict(rtol=1e-5, atol=1e-5)
ROW4 = QuantSpec(4, True, "row")
TILE4 = QuantSpec(4, True, "tile", tile=(8, 8))


def _linear(k: int, n: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


def _pad(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.zeros(rows, cols)
    out[:w.shape[0], :w.shape[1]] = w
    return out


def _random_outliers(k_in: int, k: int) -> torch.Tensor:
    return torch.randperm(k_in)[:k]


def _split(x, w, idx):
    """Regular (original order) and outlier (ascending) columns of x (M, K) and w (N, K)."""
    idx = torch.sort(idx).values
    mask = torch.ones(x.shape[1], dtype=torch.bool)
    mask[idx] = False
    return x[:, mask], x[:, idx], w[:, mask], w[:, idx]


# ----------------------------------------------------------------------------- FP16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_linear_matches_half_matmul(seed, dtype):
    lin = _linear(37, 19)
    x = torch.randn(11, 37)
    m = qnn.FP16Linear.from_linear(lin, dtype=dtype)
    want = nn.functional.linear(x.to(dtype), lin.weight.to(dtype), lin.bias.to(dtype)).float()
    got = m(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, **EXACT)
    assert m.weight_nbytes() == (19 * 37 + 19) * 2


# ----------------------------------------------------------------------------- W8A8
def test_w8a8_matches_reference(seed):
    lin = _linear(53, 29)
    x = torch.randn(17, 53) * 3
    m = qnn.W8A8Linear.from_linear(lin)
    qt = quant.quantize(lin.weight.detach(), QuantSpec(8, True, "row"))
    torch.testing.assert_close(m.w_q, qt.q, **EXACT)
    want = reference.w8a8_linear(x, qt.q, qt.scale, bias=lin.bias.detach().half())
    torch.testing.assert_close(m(x), want, **EXACT)
    assert m.weight_nbytes() == 29 * 53 + 29 * 2 + 29 * 2


# ----------------------------------------------------------------------------- W4A16
def test_w4a16_row_matches_reference(seed):
    lin = _linear(45, 21)
    x = torch.randn(9, 45)
    m = qnn.W4A16Linear.from_linear(lin, weight_spec=ROW4)
    qt = quant.quantize(lin.weight.detach(), ROW4)
    want = reference.w4a16_linear(x, qt.q, qt.scale, group_size=None, bias=lin.bias.detach().half())
    torch.testing.assert_close(m(x), want, **EXACT)


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_group_pads_k(seed, symmetric):
    n, k, g = 13, 50, 16                      # 50 is not a multiple of 16 -> padded to 64
    spec = QuantSpec(4, symmetric, "group", group_size=g)
    lin = _linear(k, n)
    x = torch.randn(7, k)
    m = qnn.W4A16Linear.from_linear(lin, weight_spec=spec)
    assert m.k_padded == 64 and m.w_q.shape == (n, 64)
    w_hat = quant.fake_quantize(_pad(lin.weight.detach(), n, 64), spec)[:, :k]
    want = x @ w_hat.T + lin.bias.detach().half().float()
    torch.testing.assert_close(m(x), want, **FP32)
    zero_bytes = 0 if symmetric else n * 4            # uint8 zero points
    assert m.weight_nbytes() == n * 32 + n * 4 * 2 + zero_bytes + n * 2


def test_w4a16_tile_pads_rows_and_cols(seed):
    n, k = 13, 30                             # neither a multiple of 8
    lin = _linear(k, n)
    x = torch.randn(5, k)
    m = qnn.W4A16Linear.from_linear(lin, weight_spec=TILE4)
    w_hat = quant.fake_quantize(_pad(lin.weight.detach(), 16, 32), TILE4)[:n, :k]
    torch.testing.assert_close(m.dequantized_weight()[:, :k], w_hat, **EXACT)
    want = x @ w_hat.T + lin.bias.detach().half().float()
    torch.testing.assert_close(m(x), want, **FP32)
    # packed int4 (13, 32/2) + 2x4 fp16 tile scales + fp16 bias
    assert m.weight_nbytes() == 13 * 16 + 2 * 4 * 2 + 13 * 2


def test_packed_weight_roundtrips(seed):
    """W4A16 keeps `pack_int4` codes; W4A4 the GEMM's blocked layout (K padded to 128)."""
    lin = _linear(41, 10)
    m = qnn.W4A16Linear.from_linear(lin, weight_spec=QuantSpec(4, True, "row"))
    assert m.w_packed.dtype == torch.uint8 and m.w_packed.shape == (10, 21)
    torch.testing.assert_close(quant.unpack_int4(m.w_packed, 41), m.w_q, **EXACT)
    a = qnn.W4A4Linear.from_linear(lin, weight_spec=ROW4)
    assert a.weight_layout == qnn.WEIGHT_LAYOUT_W4A4
    assert a.w_packed.dtype == torch.uint8 and a.w_packed.shape == (10, 64)
    torch.testing.assert_close(quant.unpack_int4_blocked(a.w_packed, 41, 128), a.w_q, **EXACT)
    torch.testing.assert_close(a.w_q, m.w_q, **EXACT)          # same codes, other layout


# ----------------------------------------------------------------------------- W4A4
def test_w4a4_row_no_outliers_is_reference(seed):
    lin = _linear(67, 23)
    x = torch.randn(12, 67)
    m = qnn.W4A4Linear.from_linear(lin, weight_spec=ROW4)
    assert m.int_path and m.n_outliers == 0
    qt = quant.quantize(lin.weight.detach(), ROW4)
    want = reference.w4a4_linear(x, qt.q, qt.scale, bias=lin.bias.detach().half())
    torch.testing.assert_close(m(x), want, **EXACT)


def test_w4a4_row_with_outliers_is_split_reference(seed):
    n, k_in, k = 23, 67, 5
    lin = _linear(k_in, n)
    x = torch.randn(12, k_in)
    idx = _random_outliers(k_in, k)
    x[:, idx] *= 40                            # make them real outliers
    m = qnn.W4A4Linear.from_linear(lin, weight_spec=ROW4, outlier_idx=idx)
    x_reg, x_out, w_reg, w_out = _split(x, lin.weight.detach(), idx)
    qt = quant.quantize(w_reg, ROW4)
    want = reference.w4a4_linear(x_reg, qt.q, qt.scale, x_out=x_out.half(), w_out=w_out.half(),
                                 bias=lin.bias.detach().half())
    torch.testing.assert_close(m(x), want, **EXACT)
    torch.testing.assert_close(m.outlier_idx, torch.sort(idx).values, **EXACT)


def test_w4a4_group_with_outliers_pads(seed):
    n, k_in, k, g = 19, 75, 3, 16             # Kq = 72 -> padded to 80
    spec = QuantSpec(4, True, "group", group_size=g)
    lin = _linear(k_in, n, bias=False)
    x = torch.randn(6, k_in)
    idx = _random_outliers(k_in, k)
    m = qnn.W4A4Linear.from_linear(lin, weight_spec=spec, outlier_idx=idx)
    assert m.k_padded == 80
    x_reg, x_out, w_reg, w_out = _split(x, lin.weight.detach(), idx)
    qt = quant.quantize(_pad(w_reg, n, 80), spec)
    want = reference.w4a4_linear(_pad(x_reg, 6, 80), qt.q, qt.scale, group_size=g,
                                 x_out=x_out.half(), w_out=w_out.half())
    torch.testing.assert_close(m(x), want, **EXACT)
    assert m.weight_nbytes() == n * 64 + n * 5 * 2 + n * k * 2     # codes: 80 -> 128 columns


def test_w4a4_tile_is_fake_quant(seed):
    n, k_in, k = 13, 40, 3                    # Kq = 37 -> padded to 40; 13 rows -> 2 tile rows
    lin = _linear(k_in, n)
    x = torch.randn(10, k_in) * 2
    idx = _random_outliers(k_in, k)
    m = qnn.W4A4Linear.from_linear(lin, weight_spec=TILE4, outlier_idx=idx)
    assert not m.int_path
    x_reg, x_out, w_reg, w_out = _split(x, lin.weight.detach(), idx)
    x_hat = quant.fake_quantize(x_reg, ROW4)
    w_hat = quant.fake_quantize(_pad(w_reg, 16, 40), TILE4)[:n, :k_in - k]
    want = (x_hat @ w_hat.T + x_out.half().float() @ w_out.half().float().T
            + lin.bias.detach().half().float())
    torch.testing.assert_close(m(x), want, **FP32)
    assert m.weight_nbytes() == n * 64 + 2 * 5 * 2 + n * k * 2 + n * 2  # 40 -> 128 columns


def test_w4a4_act_bits_8_row(seed):
    lin = _linear(33, 9)
    x = torch.randn(4, 33)
    m = qnn.W4A4Linear.from_linear(lin, weight_spec=ROW4, act_bits=8)
    assert not m.int_path
    want = (quant.fake_quantize(x, QuantSpec(8, True, "row"))
            @ quant.fake_quantize(lin.weight.detach(), ROW4).T + lin.bias.detach().half().float())
    torch.testing.assert_close(m(x), want, **FP32)


def test_outliers_reduce_error(seed):
    lin = _linear(64, 32)
    x = torch.randn(32, 64)
    idx = torch.tensor([3, 40])
    x[:, idx] *= 100
    y = lin(x).detach()
    err_rtn = (qnn.W4A4Linear.from_linear(lin, weight_spec=ROW4)(x) - y).norm()
    err_out = (qnn.W4A4Linear.from_linear(lin, weight_spec=ROW4, outlier_idx=idx)(x) - y).norm()
    assert err_out < err_rtn / 3


def test_leading_dims_and_dtype(seed):
    lin = _linear(24, 8)
    m = qnn.W4A4Linear.from_linear(lin, weight_spec=ROW4, outlier_idx=torch.tensor([1]))
    x = torch.randn(2, 3, 24)
    y = m(x.bfloat16())
    assert y.shape == (2, 3, 8) and y.dtype == torch.bfloat16
    torch.testing.assert_close(m(x).reshape(6, 8), m(x.reshape(6, 24)), **EXACT)


def test_quantize_linear_and_module_nbytes(seed):
    seq = nn.Sequential(_linear(16, 8), nn.ReLU(), _linear(8, 4))
    assert qnn.module_weight_nbytes(seq) == (16 * 8 + 8 + 8 * 4 + 4) * 4
    seq[0] = qnn.quantize_linear(seq[0], "W4A4")
    assert isinstance(seq[0], qnn.W4A4Linear) and seq[0].weight_spec == qnn.DEFAULT_W4_SPEC
    assert qnn.module_weight_nbytes(seq) == seq[0].weight_nbytes() + (8 * 4 + 4) * 4
    assert isinstance(qnn.quantize_linear(seq[2], "w8a8"), qnn.W8A8Linear)
    assert isinstance(qnn.quantize_linear(seq[2], "w4a16"), qnn.W4A16Linear)
    assert qnn.quantize_linear(seq[2], "bf16").dtype == torch.bfloat16


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise():
    lin = _linear(16, 8)
    with pytest.raises(TypeError, match="linear"):
        qnn.W4A4Linear.from_linear(torch.randn(8, 16))
    with pytest.raises(TypeError, match="weight_spec"):
        qnn.W4A4Linear.from_linear(lin, weight_spec="int4")
    with pytest.raises(ValueError, match="symmetric"):
        qnn.W4A4Linear.from_linear(lin, weight_spec=QuantSpec(4, False, "row"))
    with pytest.raises(ValueError, match="bits"):
        qnn.W4A16Linear.from_linear(lin, weight_spec=QuantSpec(8, True, "row"))
    with pytest.raises(ValueError, match="granularity"):
        qnn.W8A8Linear.from_linear(lin, weight_spec=QuantSpec(8, True, "group", group_size=16))
    with pytest.raises(ValueError, match="act_bits"):
        qnn.W4A4Linear.from_linear(lin, act_bits=9)
    with pytest.raises(ValueError, match="outlier_idx"):
        qnn.W4A4Linear.from_linear(lin, outlier_idx=torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="repeated"):
        qnn.W4A4Linear.from_linear(lin, outlier_idx=torch.tensor([2, 2]))
    with pytest.raises(TypeError, match="outlier_idx"):
        qnn.W4A4Linear.from_linear(lin, outlier_idx=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="at least one"):
        qnn.W4A4Linear.from_linear(lin, outlier_idx=torch.arange(16))
    with pytest.raises(TypeError, match="dtype"):
        qnn.FP16Linear.from_linear(lin, dtype=torch.float32)
    with pytest.raises(ValueError, match="mode"):
        qnn.quantize_linear(lin, "w2a2")
    bad = _linear(16, 8)
    with torch.no_grad():
        bad.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        qnn.W8A8Linear.from_linear(bad)
    m = qnn.W4A4Linear.from_linear(lin)
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\)"):
        m(torch.randn(4, 15))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.ones(4, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="Tensor"):
        m([[0.0] * 16])


# ----------------------------------------------------------------------------- kernel dispatch
@pytest.mark.parametrize("spec", [QuantSpec(4, True, "row"), QuantSpec(4, True, "group", group_size=128)])
@pytest.mark.parametrize("n_out", [0, 3])
def test_w4a4_kernel_dispatch_matches_reference(spec, n_out, seed, device):
    """The Triton path of W4A4Linear (forced on CPU under the interpreter) equals the reference
    path: same int codes and scales, int32 accumulation, fp32 epilogue."""
    k_in, n = 128 + n_out + (0 if spec.granularity == "group" else 37), 19
    lin = nn.Linear(k_in, n)
    idx = torch.randperm(k_in)[:n_out].sort().values
    m = qnn.W4A4Linear.from_linear(lin, weight_spec=spec, outlier_idx=idx).to(device)
    assert m.kernel_path
    x = torch.randn(5, k_in, device=device)
    x[:, idx] *= 30
    m.use_kernels = False
    want = m(x)
    m.use_kernels = True
    got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- kernel dispatch
@pytest.mark.parametrize("m,k,n", [(1, 37, 19), (23, 64, 40), (5, 100, 9)])
def test_w8a8_kernel_path_equals_reference(seed, m, k, n, device):
    """act_quant(bits=8) + torch._int_mm + the same fp32 epilogue == reference, bit for bit."""
    lin = _linear(k, n).to(device)
    x = torch.randn(m, k, device=device) * 3
    ref = qnn.W8A8Linear.from_linear(lin)
    ref.use_kernels = False
    ker = qnn.W8A8Linear.from_linear(lin)
    ker.use_kernels = True
    for dtype in (torch.float32, torch.bfloat16):
        torch.testing.assert_close(ker(x.to(dtype)), ref(x.to(dtype)), **EXACT)
    assert ker.w_kernel.shape == (math.ceil(n / 8) * 8, math.ceil(k / 8) * 8)
    assert "w_kernel" not in ker.state_dict()


def test_int8_mm_with_padded_weight(seed):
    from mixq.kernels.w8a8 import int8_mm, pad_weight_for_int_mm
    a = torch.randint(-128, 128, (7, 13), dtype=torch.int8)
    b = torch.randint(-128, 128, (11, 13), dtype=torch.int8)
    got = int8_mm(a, pad_weight_for_int_mm(b), n=11)
    torch.testing.assert_close(got, reference.int_matmul(a, b), **EXACT)
    with pytest.raises(ValueError, match="empty"):
        int8_mm(a[:0], b)
    with pytest.raises(ValueError, match="does not cover"):
        int8_mm(a, b[:, :5])


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "group", group_size=32), ROW4,
                                  QuantSpec(4, False, "group", group_size=16)],
                         ids=lambda s: s.describe())
def test_w4a16_kernel_path_matches_reference(seed, spec, device):
    """The Triton W4A16 kernel (bf16/fp16 in, fp32 accumulate) against the fp32 reference."""
    lin = _linear(80, 24).to(device)
    x = torch.randn(3, 80, device=device)
    ref = qnn.W4A16Linear.from_linear(lin, weight_spec=spec)
    ref.use_kernels = False
    ker = qnn.W4A16Linear.from_linear(lin, weight_spec=spec)
    ker.use_kernels = True
    for dtype in (torch.float16, torch.bfloat16):
        want = ref(x.to(dtype).float())          # same rounded inputs, fp32 math
        got = ker(x.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


# ----------------------------------------------------------------------------- int4 memory
def _int4_bytes(m) -> int:
    """What an int4 layer must hold at least: packed codes, scales, zeros, outliers, bias."""
    return sum(t.numel() * t.element_size() for t in
               (m.w_packed, m.w_scale, m.w_zero, getattr(m, "w_out", None), m.bias,
                getattr(m, "perm", None), getattr(m, "outlier_idx", None)) if t is not None)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_w_q_is_derived_from_packed(seed, symmetric):
    """w_q is a read-only unpack of w_packed (signed or unsigned codes), never saved."""
    spec = QuantSpec(4, symmetric, "group", group_size=16)
    lin = _linear(45, 11)
    m = qnn.W4A16Linear.from_linear(lin, weight_spec=spec)
    w = _pad(lin.weight.detach(), 11, m.k_padded)
    torch.testing.assert_close(m.w_q, quant.quantize(w, spec).q, **EXACT)
    assert m.w_q.dtype == torch.int8 and "w_q_cache" not in m._buffers   # reading keeps no copy
    assert set(m.state_dict()) == {"w_scale", "w_packed", "bias"} | (set() if symmetric
                                                                     else {"w_zero"})
    with pytest.raises(AttributeError):
        m.w_q = torch.zeros(11, m.k_padded, dtype=torch.int8)
    assert qnn.module_memory_bytes(m) == _int4_bytes(m) == m.weight_nbytes()


@pytest.mark.parametrize("cls", [qnn.W4A16Linear, qnn.W4A4Linear])
def test_reference_cache_is_released(seed, cls):
    """The reference path caches the int8 codes (1 byte/weight), release_unpacked frees them,
    and the next forward rebuilds them with the same result."""
    lin = _linear(53, 17)
    m = cls.from_linear(lin, weight_spec=ROW4)
    m.use_kernels = False
    x = torch.randn(4, 53)
    y = m(x)
    assert m._buffers["w_q_cache"].shape == (17, m.k_padded)
    assert "w_q_cache" not in m.state_dict()
    assert qnn.module_memory_bytes(m) == _int4_bytes(m) + 17 * m.k_padded
    m.release_unpacked()
    assert qnn.module_memory_bytes(m) == _int4_bytes(m)
    torch.testing.assert_close(m(x), y, **EXACT)
    m.to("cpu")                                     # moving drops caches instead of copying them
    assert "w_q_cache" not in m._buffers
    torch.testing.assert_close(m(x), y, **EXACT)


def test_w4a16_kernel_path_holds_packed_only(seed, device):
    """Kernel path (Triton interpreter on CPU): no int8 copy; ~0.5 byte/weight + scales,
    under 0.30x the bf16 weight."""
    n, k, g = 24, 256, 64
    m = qnn.W4A16Linear.from_linear(_linear(k, n, bias=False).to(device),
                                    weight_spec=QuantSpec(4, True, "group", group_size=g))
    m.use_kernels = True
    m(torch.randn(3, k, dtype=torch.float16, device=device))
    assert set(m._buffers) == {"w_scale", "w_zero", "w_packed", "bias"}    # no cache built
    held = qnn.module_memory_bytes(m)
    assert held == n * k // 2 + n * (k // g) * 2 == m.weight_nbytes()
    assert held <= 0.30 * n * k * 2


def test_w4a4_kernel_path_holds_the_weight_once(seed, device):
    """The GEMM reads w_packed as stored: the kernel path adds only the int32 gather index."""
    spec = QuantSpec(4, True, "row")
    m = qnn.W4A4Linear.from_linear(_linear(256, 9).to(device), weight_spec=spec,
                                   outlier_idx=torch.tensor([3], device=device))
    m.use_kernels = True
    x = torch.randn(2, 256, device=device)
    y = m(x)
    assert {k for k, t in m._buffers.items() if t is not None} - set(m.state_dict()) == \
        {"gather_idx"}
    assert set(m.state_dict()) == {"perm", "outlier_idx", "w_scale", "w_packed", "w_out", "bias"}
    assert m.w_packed.shape == (9, 128)                   # 255 int4 columns padded to 256
    assert qnn.module_memory_bytes(m) == _int4_bytes(m) + 256 * 4
    m.use_kernels = False
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-4)


def test_caches_follow_new_codes(seed):
    """Loading other codes in place (load_state_dict) or via set_int4_codes never reuses a
    cache built from the old ones."""
    a = qnn.W4A4Linear.from_linear(_linear(40, 8), weight_spec=ROW4)
    b = qnn.W4A4Linear.from_linear(_linear(40, 8), weight_spec=ROW4)
    a.use_kernels = b.use_kernels = False
    x = torch.randn(3, 40)
    a(x)
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x), **EXACT)
    a(x)
    a.set_int4_codes(b.w_q.flip(0).contiguous(), b.w_scale.flip(0).contiguous())
    b.w_packed.copy_(b.w_packed.flip(0))           # in place: the version counter moves
    b.w_scale.copy_(b.w_scale.flip(0))
    torch.testing.assert_close(a(x), b(x), **EXACT)
    torch.testing.assert_close(a.w_q, b.w_q, **EXACT)


def test_set_int4_codes_and_memory_bytes_reject_bad_input(seed):
    m = qnn.W4A16Linear.from_linear(_linear(20, 6), weight_spec=ROW4)
    with pytest.raises(ValueError, match=r"w_q must have shape \(6, 20\)"):
        m.set_int4_codes(m.w_q[:, :5], m.w_scale)
    with pytest.raises(TypeError, match="w_q"):
        m.set_int4_codes(m.w_q.float(), m.w_scale)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        m.set_int4_codes(m.w_q, m.w_scale[:3])
    with pytest.raises(ValueError, match="w_zero"):
        m.set_int4_codes(m.w_q, m.w_scale, torch.zeros(6, 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="module"):
        qnn.module_memory_bytes("layer")
    emb = nn.Embedding(10, 4)
    tied = nn.ModuleDict({"emb": emb, "head": nn.Linear(4, 10, bias=False)})
    tied["head"].weight = emb.weight                  # tied: held once
    assert qnn.module_memory_bytes(tied) == 10 * 4 * 4


@pytest.mark.parametrize("group", [None, 128])
def test_w4a4_decode_and_prefill_kernels_agree(seed, device, group, monkeypatch):
    """With the fused decode kernel switched on for M <= 16 rows (more take act_quant + GEMM),
    the same rows give the same outputs bit for bit, and both match the reference."""
    monkeypatch.setattr(qnn.linear, "W4A4_DECODE_MAX_M", 16)
    spec = QuantSpec(4, True, "row") if group is None else QuantSpec(4, True, "group", group)
    lin = _linear(300, 40).to(device)
    m = qnn.W4A4Linear.from_linear(lin, weight_spec=spec,
                                   outlier_idx=torch.tensor([2, 77, 299], device=device))
    m.use_kernels = True
    x = torch.randn(40, 300, device=device)
    many = m(x)                                       # 40 rows: act_quant + w4a4_gemm
    few = m(x[:5])                                    # 5 rows: w4a4_decode_gemm
    assert torch.equal(few, many[:5])
    m.use_kernels = False
    torch.testing.assert_close(few, m(x[:5]), rtol=1e-5, atol=1e-4)

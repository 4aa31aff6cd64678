"""mixq.kernels.act_quant: per-token int4 codes and scales bit-identical to mixq.reference,
outlier channels copied exactly."""
import pytest
import torch

import mixq.kernels.act_quant as aq
from mixq import quant, reference
from mixq.kernels.act_quant import act_quant

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _activations(m, k, dtype, device):
    x = torch.randn(m, k, device=device) * (torch.rand(m, 1, device=device) * 3)
    x[:, -2:] *= 40                                          # large outlier-like channels
    if m > 2:
        x[1] = 0                                             # an all-zero token: scale 0 -> 1
    return x.to(dtype)


def _expected(x_int4, x_outliers, out_format, bits=4):
    ref_q, ref_scale = reference.quantize_per_token(x_int4.cpu(), bits)
    if out_format == "packed":
        ref_q = quant.pack_int4(ref_q)
    return ref_q, ref_scale, x_outliers.cpu().to(torch.float16)


def _assert_equal(got, want):
    for g, w, name in zip(got, want, ("x_q", "x_scale", "x_out")):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w), f"{name} differs"


@pytest.mark.parametrize("m", [1, 3, 17, 130])
@pytest.mark.parametrize("k,n_outliers", [(33, 0), (64, 5), (97, 8), (300, 1)])
@pytest.mark.parametrize("out_format", ["packed", "int8"])
def test_last_k_outliers(m, k, n_outliers, out_format, device, seed):
    x = _activations(m, k, DTYPES[seed % 3], device)
    kq = k - n_outliers
    got = act_quant(x, n_outliers=n_outliers, out_format=out_format)
    _assert_equal(got, _expected(x[:, :kq], x[:, kq:], out_format))


@pytest.mark.parametrize("m,k,n_out", [(1, 40, 3), (17, 65, 6), (130, 128, 9)])
@pytest.mark.parametrize("out_format", ["packed", "int8"])
def test_outlier_index(m, k, n_out, out_format, device, seed):
    x = _activations(m, k, DTYPES[seed % 3], device)
    idx = torch.randperm(k, device=device)[:n_out]          # arbitrary order
    keep = torch.ones(k, dtype=torch.bool, device=device)
    keep[idx] = False
    got = act_quant(x, outlier_idx=idx, out_format=out_format)
    _assert_equal(got, _expected(x[:, keep], x[:, idx], out_format))


def test_empty_outlier_index_equals_no_outliers(device, seed):
    x = _activations(5, 31, torch.float16, device)
    got = act_quant(x, outlier_idx=torch.empty(0, dtype=torch.long, device=device))
    _assert_equal(got, _expected(x, x[:, :0], "packed"))


def test_two_pass_loop(monkeypatch, device, seed):
    """Rows wider than one register tile: absmax pass, then a re-read quantize pass."""
    monkeypatch.setattr(aq, "_SINGLE_PASS_MAX", 32)
    monkeypatch.setattr(aq, "_LOOP_BLOCK_K", 16)
    x = _activations(6, 77, torch.bfloat16, device)
    for fmt in ("packed", "int8"):
        _assert_equal(act_quant(x, n_outliers=4, out_format=fmt), _expected(x[:, :73], x[:, 73:], fmt))
    idx = torch.tensor([70, 3, 41], device=device)
    keep = torch.ones(77, dtype=torch.bool, device=device)
    keep[idx] = False
    _assert_equal(act_quant(x, outlier_idx=idx), _expected(x[:, keep], x[:, idx], "packed"))


@pytest.mark.parametrize("k,n_out,pad_to", [(77, 4, 16), (300, 5, 128), (129, 0, 128), (64, 0, 64)])
@pytest.mark.parametrize("out_format", ["packed", "int8"])
def test_pad_to_appends_zero_codes(k, n_out, pad_to, out_format, monkeypatch, device, seed):
    """pad_to: the codes of the unpadded call, then zero codes up to a multiple of pad_to;
    scales and outliers unchanged (single-pass and two-pass kernels)."""
    x = _activations(5, k, DTYPES[seed % 3], device)
    kq = k - n_out
    ks = -(-kq // pad_to) * pad_to
    plain = act_quant(x, n_outliers=n_out, out_format=out_format)
    for single_max in (aq._SINGLE_PASS_MAX, 32):
        monkeypatch.setattr(aq, "_SINGLE_PASS_MAX", single_max)
        monkeypatch.setattr(aq, "_LOOP_BLOCK_K", 16 if single_max == 32 else aq._LOOP_BLOCK_K)
        x_q, x_scale, x_out = act_quant(x, n_outliers=n_out, out_format=out_format, pad_to=pad_to)
        width = ks if out_format == "int8" else (ks + 1) // 2
        assert x_q.shape == (5, width)
        stored = plain[0].shape[1]
        assert torch.equal(x_q[:, :stored], plain[0])
        assert not x_q[:, stored:].any()
        assert torch.equal(x_scale, plain[1]) and torch.equal(x_out, plain[2])


def test_pad_to_rejects_bad_values(device):
    x = _activations(2, 16, torch.float16, device)
    for bad in (0, -128, 1.5, True):
        with pytest.raises(ValueError, match="pad_to"):
            act_quant(x, pad_to=bad)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths(bits, device, seed):
    x = _activations(9, 50, torch.float16, device)
    fmt = "packed" if bits <= 4 else "int8"
    _assert_equal(act_quant(x, n_outliers=2, out_format=fmt, bits=bits),
                  _expected(x[:, :48], x[:, 48:], fmt, bits))


def test_round_half_to_even(device):
    # absmax 7 -> scale exactly 1: ties 0.5->0, 1.5->2, 2.5->2, -2.5->-2, 3.5->4
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 100.0]], device=device)
    x_q, x_scale, x_out = act_quant(x, n_outliers=1, out_format="int8")
    assert x_q.cpu().tolist() == [[7, 0, 2, 2, 0, -2, -2, 4]]
    assert x_scale.item() == 1.0 and x_out.item() == 100.0


def test_out_dtype(device, seed):
    x = _activations(4, 40, torch.float32, device)
    _, _, x_out = act_quant(x, n_outliers=3, out_dtype=torch.bfloat16)
    assert x_out.dtype == torch.bfloat16
    assert torch.equal(x_out.cpu(), x[:, 37:].cpu().to(torch.bfloat16))   # round-to-nearest-even


def test_torch_compile_traces_the_custom_op(device, seed):
    x = _activations(3, 48, torch.float16, device)
    fn = torch.compile(lambda t: act_quant(t, n_outliers=4), backend="aot_eager", fullgraph=True)
    _assert_equal(fn(x), _expected(x[:, :44], x[:, 44:], "packed"))


def test_bad_inputs(device):
    x = torch.randn(4, 32, device=device, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        act_quant(x.to(torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        act_quant(x.t())
    with pytest.raises(ValueError, match="dims"):
        act_quant(x[0])
    with pytest.raises(ValueError, match="out_format"):
        act_quant(x, out_format="int4")
    with pytest.raises(ValueError, match="bits"):
        act_quant(x, bits=8)                                 # packed holds 4-bit codes
    with pytest.raises(ValueError, match="bits"):
        act_quant(x, bits=9, out_format="int8")
    with pytest.raises(ValueError, match="int4 channel"):
        act_quant(x, n_outliers=32)
    with pytest.raises(ValueError, match="n_outliers"):
        act_quant(x, n_outliers=-1)
    idx = torch.tensor([1, 5], device=device)
    with pytest.raises(ValueError, match="either"):
        act_quant(x, n_outliers=2, outlier_idx=idx)
    with pytest.raises(ValueError, match="distinct"):
        act_quant(x, outlier_idx=torch.tensor([1, 1], device=device))
    with pytest.raises(ValueError, match="range"):
        act_quant(x, outlier_idx=torch.tensor([0, 32], device=device))
    with pytest.raises(TypeError, match="dtype"):
        act_quant(x, outlier_idx=idx.float())
    with pytest.raises(TypeError, match="out_dtype"):
        act_quant(x, out_dtype=torch.int8)


def test_cpu_tensor_rejected_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        act_quant(torch.randn(2, 16))


@pytest.mark.parametrize("m,k,n_out", [(1, 70, 3), (5, 200, 1), (33, 129, 7)])
def test_precomputed_gather_index_equals_outlier_index(m, k, n_out, device, seed):
    """A gather index built once (what W4A4Linear keeps) gives the codes of `outlier_idx`,
    padding included, with no validation pass on the hot path."""
    x = torch.randn(m, k, device=device)
    idx = torch.randperm(k, device=device)[:n_out]
    gather = aq.outlier_gather_index(k, idx)
    want = act_quant(x, outlier_idx=idx, out_format="int8", pad_to=128)
    got = act_quant(x, n_outliers=n_out, gather_idx=gather, out_format="int8", pad_to=128)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_gather_index_rejects_bad_input(device):
    x = torch.randn(3, 32, device=device)
    gather = torch.arange(32, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="not both"):
        act_quant(x, outlier_idx=torch.tensor([1], device=device), gather_idx=gather)
    with pytest.raises(TypeError, match="gather_idx"):
        act_quant(x, n_outliers=1, gather_idx=gather.long())
    with pytest.raises(ValueError, match="gather_idx must have shape"):
        act_quant(x, n_outliers=1, gather_idx=gather[:31].contiguous())

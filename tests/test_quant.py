"""Tests for mixq.quant: RTN quantize/dequantize, int4 packing, memory accounting, metrics."""
import math

import pytest
import torch

from mixq.config import QuantSpec
from mixq.quant import (COMPRESSION_TABLE_ISSUE_MAE, QTensor, compression_ratio,
                        compression_table, dequantize, fake_quantize, mae, pack_int4,
                        quantize, quantized_nbytes, rel_fro_error, scale_shape, sqnr_db,
                        unpack_int4)

# (spec kwargs, awkward shape): odd sizes, non-square, sizes that are multiples of the block only.
CASES = [
    (dict(granularity="tensor"), (7, 13)),
    (dict(granularity="tensor"), (1, 1)),
    (dict(granularity="row"), (33, 65)),
    (dict(granularity="row"), (1, 7)),
    (dict(granularity="group", group_size=16), (5, 48)),
    (dict(granularity="group", group_size=32), (3, 96)),
    (dict(granularity="group", group_size=48), (2, 144)),
    (dict(granularity="tile"), (24, 40)),
    (dict(granularity="tile", tile=(3, 5)), (9, 15)),
    (dict(granularity="tile", tile=(1, 7)), (4, 21)),
]


def _spec(kw, bits, symmetric):
    return QuantSpec(bits=bits, symmetric=symmetric, **kw)


def _block_ids(shape, spec):
    """Independent map element -> block index (row-major over blocks) via explicit loops."""
    rows, cols = shape
    if spec.granularity == "tensor":
        br, bc = rows, cols
    elif spec.granularity == "row":
        br, bc = 1, cols
    elif spec.granularity == "group":
        br, bc = 1, spec.group_size
    else:
        br, bc = spec.tile
    ids = torch.empty(shape, dtype=torch.int64)
    nbc = cols // bc
    for r in range(rows):
        for c in range(cols):
            ids[r, c] = (r // br) * nbc + c // bc
    return ids, (rows // br, nbc)


@pytest.mark.parametrize("kw,shape", CASES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_matches_blockwise_loop_and_error_bound(kw, shape, bits, symmetric, seed):
    spec = _spec(kw, bits, symmetric)
    x = torch.randn(shape) * torch.rand(shape) * 3 + (0.5 if not symmetric else 0.0)
    qt = quantize(x, spec)
    assert isinstance(qt, QTensor)
    assert qt.q.shape == x.shape and qt.scale.shape == scale_shape(shape, spec)
    assert qt.scale.dtype == torch.float16
    assert int(qt.q.min()) >= spec.qmin and int(qt.q.max()) <= spec.qmax
    assert (qt.zero is None) == symmetric

    # Independent per-block recomputation of the scale (element loop over blocks).
    ids, nblocks = _block_ids(shape, spec)
    flat_ids = ids.flatten()
    for b in range(nblocks[0] * nblocks[1]):
        vals = x.flatten()[flat_ids == b]
        if symmetric:
            want = (vals.abs().max() / spec.qmax).half()
        else:
            want = ((vals.max().clamp(min=0) - vals.min().clamp(max=0)) / spec.qmax).half()
        assert qt.scale.flatten()[b] == want

    deq = dequantize(qt)
    s_full = qt.scale.float().flatten()[ids]
    err = (x - deq).abs()
    if symmetric:
        bound = s_full / 2
    else:  # the fp16 rounding of the scale may clip the top of the range slightly (docstring)
        bound = s_full * (0.5 + spec.qmax * 2.0 ** -11)
    assert bool((err <= bound * (1 + 1e-6) + 1e-7).all()), float((err - bound).max())

    # With float32 scales the half-step bound holds for asymmetric grids too.
    qt32 = quantize(x, spec, scale_dtype=torch.float32)
    err32 = (x - dequantize(qt32)).abs()
    bound32 = qt32.scale.flatten()[ids] / 2
    assert bool((err32 <= bound32 * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quantize_other_input_dtypes(dtype, seed):
    x = torch.randn(6, 32).to(dtype)
    spec = QuantSpec(4, True, "group", group_size=16)
    y = fake_quantize(x, spec)
    assert y.dtype == dtype and y.shape == x.shape
    ref = fake_quantize(x.float(), spec)      # same math on the fp32 copy of x
    torch.testing.assert_close(y, ref.to(dtype), rtol=0, atol=0)


def _representable(shape, spec, generator):
    """x = (q - z) * s built from integers, every block containing qmin-side and qmax codes."""
    ids, nb = _block_ids(shape, spec)
    n = nb[0] * nb[1]
    s = (torch.rand(n, generator=generator) * 0.5 + 0.01).half().float()
    if spec.symmetric:
        q = torch.randint(-spec.qmax, spec.qmax + 1, shape, generator=generator)
        z = torch.zeros(n)
    else:
        q = torch.randint(0, spec.qmax + 1, shape, generator=generator)
        z = torch.randint(0, spec.qmax + 1, (n,), generator=generator).float()
    flat = ids.flatten()
    qf = q.flatten()
    for b in range(n):  # plant the range ends so absmax / (hi - lo) is exactly qmax * s
        pos = torch.nonzero(flat == b).flatten()
        qf[pos[0]] = spec.qmax
        if not spec.symmetric and pos.numel() > 1:
            qf[pos[1]] = 0
        elif not spec.symmetric:
            z[b] = 0
    q = qf.reshape(shape)
    x = (q.float() - z[ids]) * s[ids]
    return x, q, s.reshape(nb), z.reshape(nb)


@pytest.mark.parametrize("kw,shape", CASES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_representable_values_are_exact(kw, shape, bits, symmetric, seed):
    spec = _spec(kw, bits, symmetric)
    g = torch.Generator().manual_seed(seed)
    x, q, s, z = _representable(shape, spec, g)
    qt = quantize(x, spec)
    assert torch.equal(qt.q.long(), q.long())
    assert torch.equal(qt.scale.float(), s)
    if not symmetric:
        assert torch.equal(qt.zero.float(), z)
    assert torch.equal(dequantize(qt), x)


def test_round_half_to_even_and_zero_block():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 7.0]])
    qt = quantize(x, QuantSpec(4, True, "row"))          # absmax 7 -> scale exactly 1
    assert torch.equal(qt.q, torch.tensor([[0, 2, 2, 0, -2, 7]], dtype=torch.int8))
    z = torch.zeros(2, 16)
    qz = quantize(z, QuantSpec(4, True, "row"))
    assert torch.equal(qz.scale, torch.ones(2, 1, dtype=torch.float16))
    assert torch.equal(dequantize(qz), z)


def test_asymmetric_8bit_codes_are_uint8():
    x = torch.rand(4, 32) * 2.0                          # one-sided data uses the full grid
    qt = quantize(x, QuantSpec(8, False, "row"))
    assert qt.q.dtype == torch.uint8 and int(qt.q.max()) == 255
    assert qt.zero.dtype == torch.uint8 and int(qt.zero.max()) == 0


def test_finer_granularity_lowers_error(seed):
    x = torch.randn(64, 256)
    errs = [mae(x, fake_quantize(x, QuantSpec(4, True, g, group_size=16)))
            for g in ("tensor", "row", "group")]
    assert errs[0] > errs[1] > errs[2]
    assert sqnr_db(x, fake_quantize(x, QuantSpec(8, True, "row"))) > \
        sqnr_db(x, fake_quantize(x, QuantSpec(4, True, "row"))) + 20


# --------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("container", [torch.uint8, torch.int8, torch.int32])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 17), (2, 5, 9), (4, 64)])
def test_pack_unpack_roundtrip(container, signed, shape, seed):
    lo, hi = (-8, 7) if signed else (0, 15)
    q = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    packed = pack_int4(q, container)
    per = 2 if container != torch.int32 else 8
    assert packed.dtype == container
    assert packed.shape == (*shape[:-1], math.ceil(shape[-1] / per))
    assert torch.equal(unpack_int4(packed, shape[-1], signed=signed), q)


def test_pack_known_bytes():
    assert pack_int4(torch.tensor([1, 2], dtype=torch.int8)).tolist() == [0x21]
    assert pack_int4(torch.tensor([-1, 0, 5], dtype=torch.int8)).tolist() == [0x0F, 0x05]
    assert pack_int4(torch.tensor([-1, -1]), torch.int8).tolist() == [-1]
    word = pack_int4(torch.arange(8), torch.int32)
    assert word.tolist() == [0x76543210]
    top = pack_int4(torch.tensor([0, 0, 0, 0, 0, 0, 0, -8]), torch.int32)
    assert top.tolist() == [0x80000000 - 2 ** 32]


def test_pack_matches_quantized_weights(seed):
    w = torch.randn(10, 34)
    qt = quantize(w, QuantSpec(4, True, "row"))
    assert torch.equal(unpack_int4(pack_int4(qt.q), 34), qt.q)


def test_pack_bad_inputs():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([0, 8], dtype=torch.int8), signed=True)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([-1, 3], dtype=torch.int8), signed=False)
    with pytest.raises(ValueError, match="range"):
        pack_int4(torch.tensor([-1, 12], dtype=torch.int8))
    with pytest.raises(TypeError, match="dtype"):
        pack_int4(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="container"):
        pack_int4(torch.tensor([0, 1]), torch.int16)
    with pytest.raises(ValueError, match="empty"):
        pack_int4(torch.zeros(0, dtype=torch.int8))
    with pytest.raises(ValueError, match="expected last dim"):
        unpack_int4(torch.zeros(3, 4, dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="dtype"):
        unpack_int4(torch.zeros(3, dtype=torch.int16), 6)


# --------------------------------------------------------------------------------- memory

ISSUE_COMPRESSION = {
    "GLOBAL": "3.999999", "ROWWISE": "3.996098", "GROUPWISE g16": "3.200000",
    "GROUPWISE g32": "3.555556", "GROUPWISE g64": "3.764706", "GROUPWISE g128": "3.878788",
    "GROUPWISE g256": "3.938462", "GROUPWISE g512": "3.968992", "GROUPWISE g1024": "3.984436",
    "GROUPWISE g2048": "3.992203", "GROUPWISE g4096": "3.996098",
}


def _table_spec(name):
    if name == "GLOBAL":
        return QuantSpec(4, True, "tensor")
    if name == "ROWWISE":
        return QuantSpec(4, True, "row")
    return QuantSpec(4, True, "group", group_size=int(name.split("g")[-1]))


@pytest.mark.parametrize("name", list(ISSUE_COMPRESSION))
def test_issue_compression_numbers(name):
    assert f"{compression_ratio((4096, 4096), _table_spec(name)):.6f}" == ISSUE_COMPRESSION[name]


def test_compression_table_rows(seed, capsys):
    x = torch.randn(3, 4096).half()
    rows = compression_table(x, verbose=True)
    assert [r["name"] for r in rows] == list(ISSUE_COMPRESSION)
    for r in rows:
        assert r["compression"] == compression_ratio(x.shape, r["spec"])
        assert r["mae"] == mae(x, fake_quantize(x, r["spec"]))
        assert r["mae_issue"] is None                   # issue values only for the default matrix
    out = capsys.readouterr().out
    assert "GROUPWISE g128" in out and "mae_issue" in out
    assert set(COMPRESSION_TABLE_ISSUE_MAE) <= set(ISSUE_COMPRESSION)
    # groups that do not divide K are skipped
    assert [r["name"] for r in compression_table(torch.randn(2, 48), verbose=False)] == \
        ["GLOBAL", "ROWWISE", "GROUPWISE g16"]


def test_quantized_nbytes_hand_computed():
    g16 = QuantSpec(4, True, "group", group_size=16)
    assert quantized_nbytes((6, 64), g16) == 6 * 32 + 6 * 4 * 2
    g16a = QuantSpec(4, False, "group", group_size=16)
    assert quantized_nbytes((6, 64), g16a) == 6 * 32 + 6 * 4 * 2 + 6 * 4 * 2
    assert quantized_nbytes((6, 64), g16a, zero_bytes=1) == 6 * 32 + 6 * 4 * 2 + 6 * 4
    assert quantized_nbytes((5, 7), QuantSpec(8, True, "row")) == 35 + 10
    assert quantized_nbytes((3, 5), QuantSpec(4, True, "row")) == 3 * 3 + 3 * 2
    assert quantized_nbytes((16, 24), QuantSpec(4, True, "tile")) == 16 * 12 + 6 * 2
    assert quantized_nbytes((2, 10), QuantSpec(3, True, "tensor"), scale_bytes=4) == 2 * 4 + 4
    assert compression_ratio((6, 64), g16, orig_bytes=4) == 6 * 64 * 4 / 240


@pytest.mark.parametrize("shape,kw", [((10, 34), dict(granularity="row")),
                                      ((8, 96), dict(granularity="group", group_size=32)),
                                      ((9, 15), dict(granularity="tile", tile=(3, 5)))])
def test_quantized_nbytes_matches_real_storage(shape, kw, seed):
    spec = QuantSpec(4, True, **kw)
    qt = quantize(torch.randn(shape), spec)
    real = pack_int4(qt.q).numel() + qt.scale.numel() * qt.scale.element_size()
    assert quantized_nbytes(shape, spec) == real


# --------------------------------------------------------------------------------- metrics

def test_metrics_hand_computed():
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    approx = torch.tensor([1.0, 2.0, 3.0, 5.0])
    assert mae(ref, approx) == pytest.approx(0.25, abs=1e-15)
    assert rel_fro_error(ref, approx) == pytest.approx(1 / math.sqrt(30), rel=1e-14)
    assert sqnr_db(ref, approx) == pytest.approx(10 * math.log10(30), rel=1e-14)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert mae(ref.half(), approx) == pytest.approx(0.25, abs=1e-15)
    with pytest.raises(ValueError, match="same shape"):
        mae(ref, approx[:3])
    with pytest.raises(ValueError, match="all zeros"):
        rel_fro_error(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        sqnr_db(ref, torch.tensor([1.0, float("nan"), 3.0, 4.0]))


# --------------------------------------------------------------------------------- bad inputs

def test_quantize_bad_inputs():
    row = QuantSpec(4, True, "row")
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([[1.0, 2.0]], row)
    with pytest.raises(TypeError, match="dtype"):
        quantize(torch.ones(2, 4, dtype=torch.int32), row)
    with pytest.raises(TypeError, match="dtype"):
        quantize(torch.ones(2, 4, dtype=torch.bool), row)
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize(torch.ones(2, 4), "int4")
    with pytest.raises(ValueError, match="non-finite.*1 NaN"):
        quantize(torch.tensor([[1.0, float("nan")]]), row)
    with pytest.raises(ValueError, match="non-finite.*1 Inf"):
        quantize(torch.tensor([[1.0, float("inf")]]), row)
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.zeros(0, 4), row)
    with pytest.raises(ValueError, match="2 dims.*shape \\(8,\\)"):
        quantize(torch.ones(8), row)
    with pytest.raises(ValueError, match="2 dims"):
        quantize(torch.ones(2, 2, 16), QuantSpec(4, True, "group", group_size=16))
    with pytest.raises(ValueError, match="group_size.*16 does not divide 40"):
        quantize(torch.ones(2, 40), QuantSpec(4, True, "group", group_size=16))
    with pytest.raises(ValueError, match="tile.*8 does not divide 12"):
        quantize(torch.ones(12, 16), QuantSpec(4, True, "tile"))
    with pytest.raises(ValueError, match="group_size must be an int in 16..4096"):
        QuantSpec(4, True, "group", group_size=8)
    with pytest.raises(ValueError, match="overflows"):
        quantize(torch.tensor([[1e6, 1.0]]), row)
    with pytest.raises(TypeError, match="scale_dtype"):
        quantize(torch.ones(2, 4), row, scale_dtype=torch.int8)


def test_tensor_granularity_any_ndim(seed):
    x = torch.randn(2, 3, 5)
    qt = quantize(x, QuantSpec(8, True, "tensor"))
    assert qt.scale.shape == (1, 1, 1)
    assert torch.equal(qt.scale.float(), (x.abs().max() / 127).half().float().reshape(1, 1, 1))
    assert bool(((x - dequantize(qt)).abs() <= qt.scale.float() / 2 + 1e-7).all())

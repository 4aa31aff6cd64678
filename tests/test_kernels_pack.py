"""mixq.kernels.pack: the Triton quantize+pack kernel is bit-identical to mixq.quant."""
import pytest
import torch

from mixq import quant
from mixq.config import QuantSpec
from mixq.kernels.pack import int4_container_view, quantize_pack_int4

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _weights(n, k, dtype, device):
    w = (torch.randn(n, k, device=device) * torch.rand(n, 1, device=device) * 4).to(dtype)
    w[0, :] = 0                                              # an all-zero row: scale 0 -> 1
    if n > 2:
        w[2, : k // 2] = w[2, : k // 2].abs()                # one-sided data (asymmetric case)
    return w


def _check_against_reference(w, spec, container=torch.uint8, scale_dtype=torch.float16):
    got = quantize_pack_int4(w, spec, container=container, scale_dtype=scale_dtype)
    ref = quant.quantize(w.cpu(), spec, scale_dtype=scale_dtype)
    assert got.packed.dtype == container
    assert torch.equal(got.packed.cpu(), quant.pack_int4(ref.q, container))
    assert got.scale.dtype == scale_dtype
    assert torch.equal(got.scale.cpu(), ref.scale)
    if spec.symmetric:
        assert got.zero is None
    else:
        assert torch.equal(got.zero.cpu(), ref.zero)


@pytest.mark.parametrize("n,k", [(1, 1), (5, 33), (17, 64), (130, 97), (300, 48)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_row_matches_reference(n, k, symmetric, device, seed):
    dtype = DTYPES[seed % 3]
    _check_against_reference(_weights(n, k, dtype, device), QuantSpec(4, symmetric, "row"))


@pytest.mark.parametrize("n,k,g", [(3, 64, 16), (17, 96, 32), (130, 256, 128), (9, 34, 17), (40, 510, 255)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_group_matches_reference(n, k, g, symmetric, device, seed):
    dtype = DTYPES[seed % 3]
    _check_against_reference(_weights(n, k, dtype, device), QuantSpec(4, symmetric, "group", group_size=g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int32_container_and_input_dtypes(dtype, device, seed):
    w = _weights(7, 44, dtype, device)                       # 44 nibbles -> 22 bytes -> 6 words
    _check_against_reference(w, QuantSpec(4, True, "group", group_size=22), container=torch.int32)
    _check_against_reference(w, QuantSpec(4, False, "row"), container=torch.int32)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_scale_dtypes(scale_dtype, device, seed):
    w = _weights(11, 64, torch.float32, device)
    _check_against_reference(w, QuantSpec(4, True, "group", group_size=32), scale_dtype=scale_dtype)
    _check_against_reference(w, QuantSpec(4, False, "row"), scale_dtype=scale_dtype)


def test_round_half_to_even(device):
    # absmax 7 -> scale exactly 1, so w/s lands on .5 ties: 0.5->0, 1.5->2, 2.5->2, -2.5->-2
    w = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]], device=device)
    got = quantize_pack_int4(w)
    q = quant.unpack_int4(got.packed.cpu(), 8)
    assert q.tolist() == [[7, 0, 2, 2, 0, -2, -2, 4]]
    assert got.scale.item() == 1.0


def test_container_view_matches_pack_int4(seed):
    q = torch.randint(-8, 8, (5, 27), dtype=torch.int8)
    assert torch.equal(int4_container_view(quant.pack_int4(q)), quant.pack_int4(q, torch.int32))


def test_bad_inputs(device):
    w = torch.randn(8, 64, device=device)
    with pytest.raises(ValueError, match="group_size"):
        quantize_pack_int4(w, QuantSpec(4, True, "group", group_size=48))
    with pytest.raises(TypeError, match="dtype"):
        quantize_pack_int4(w.to(torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        quantize_pack_int4(w.double())
    with pytest.raises(ValueError, match="contiguous"):
        quantize_pack_int4(w.t())
    with pytest.raises(ValueError, match="dims"):
        quantize_pack_int4(w.reshape(-1))
    with pytest.raises(ValueError, match="bits=4"):
        quantize_pack_int4(w, QuantSpec(8, True, "row"))
    with pytest.raises(ValueError, match="granularity"):
        quantize_pack_int4(w, QuantSpec(4, True, "tile", tile=(8, 8)))
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize_pack_int4(w, "row")
    with pytest.raises(TypeError, match="container"):
        quantize_pack_int4(w, container=torch.int16)
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_pack_int4(bad)


def test_cpu_tensor_rejected_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        quantize_pack_int4(torch.randn(4, 32))

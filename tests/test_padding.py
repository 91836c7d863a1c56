"""unpad / pad: index ops (torch gather / scatter), CPU without the interpreter, autograd-aware."""
import pytest
import torch

# import from the module (the package attribute ``bertfast.kernels.pad`` resolves lazily to the same function)
from bertfast.kernels.padding import pad, unpad


def _mask(lengths, S, dtype=torch.int64):
    lengths = torch.as_tensor(lengths)
    return (torch.arange(S)[None, :] < lengths[:, None]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float32])
def test_unpad_prefix_mask(dtype):
    B, S, E = 3, 6, 4
    hidden = torch.randn(B, S, E)
    mask = _mask([6, 1, 3], S, dtype)
    packed, idx, cu, mx = unpad(hidden, mask)
    assert packed.shape == (10, E)
    assert idx.dtype == torch.int64 and idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 12, 13, 14]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 6, 7, 10]
    assert isinstance(mx, int) and mx == 6
    torch.testing.assert_close(packed, hidden[mask.bool()])
    back = pad(packed, idx, B, S)
    torch.testing.assert_close(back, hidden * mask.bool()[..., None])


def test_unpad_arbitrary_mask_multi_dim_and_empty_rows():
    B, S = 3, 5
    hidden = torch.randn(B, S, 2, 3)
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 1]])
    packed, idx, cu, mx = unpad(hidden, mask)
    assert packed.shape == (5, 2, 3)
    assert cu.tolist() == [0, 3, 3, 5] and mx == 3
    torch.testing.assert_close(packed, hidden[mask.bool()])
    back = pad(packed, idx, B, S)
    assert back.shape == (B, S, 2, 3)
    torch.testing.assert_close(back[mask.bool()], packed)
    assert torch.count_nonzero(back[~mask.bool()]) == 0


def test_all_padding():
    hidden = torch.randn(2, 4, 3)
    packed, idx, cu, mx = unpad(hidden, torch.zeros(2, 4))
    assert packed.shape == (0, 3) and idx.numel() == 0 and cu.tolist() == [0, 0, 0] and mx == 0
    assert torch.count_nonzero(pad(packed, idx, 2, 4)) == 0


def test_autograd_gather_scatter():
    B, S, E = 2, 5, 3
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]])
    hidden = torch.randn(B, S, E, dtype=torch.float64, requires_grad=True)

    def roundtrip(h):
        packed, idx, _, _ = unpad(h, mask)
        return pad(packed * 2.0, idx, B, S)

    assert torch.autograd.gradcheck(roundtrip, (hidden,))
    out = roundtrip(hidden)
    (g,) = torch.autograd.grad(out.sum(), hidden)
    torch.testing.assert_close(g, 2.0 * mask[..., None].double().expand(B, S, E))
    packed = torch.randn(8, E, dtype=torch.float64, requires_grad=True)
    _, idx, _, _ = unpad(hidden, mask)
    assert torch.autograd.gradcheck(lambda p: pad(p, idx, B, S), (packed,))


def test_dtype_preserved():
    hidden = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    packed, idx, _, _ = unpad(hidden, _mask([2, 3], 3))
    assert packed.dtype == torch.bfloat16 and pad(packed, idx, 2, 3).dtype == torch.bfloat16


@pytest.mark.parametrize("match,call", [
    ("expected \\(B, S, ...\\)", lambda: unpad(torch.randn(4), torch.ones(1, 4))),
    ("attention_mask has shape", lambda: unpad(torch.randn(2, 4, 3), torch.ones(2, 5))),
    ("only 0 and 1", lambda: unpad(torch.randn(2, 4, 3), torch.full((2, 4), -1e4))),
    ("1-D int64", lambda: pad(torch.randn(3, 2), torch.tensor([0, 1, 2], dtype=torch.int32), 2, 2)),
    ("3 tokens but indices has 2", lambda: pad(torch.randn(3, 2), torch.tensor([0, 1]), 2, 2)),
    ("batch must be", lambda: pad(torch.randn(2, 2), torch.tensor([0, 1]), 2.0, 2)),
])
def test_bad_input_raises(match, call):
    with pytest.raises(ValueError, match=match):
        call()

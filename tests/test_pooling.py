"""mean_pool and ScalarMix: hand-computed values, edge cases, gradients, error messages."""
import pytest
import torch

from bertfast.pooling import ScalarMix, mean_pool


# ---------------------------------------------------------------------------- mean_pool
def test_mean_pool_hand_computed():
    hidden = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],  # last position is padding
            [[2.0, 0.0], [4.0, 2.0], [6.0, 4.0]],  # no padding
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = mean_pool(hidden, mask)
    expected = torch.tensor([[2.0, 3.0], [4.0, 2.0]])
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32


def test_mean_pool_fully_padded_row_is_zero_not_nan():
    hidden = torch.randn(3, 4, 5)
    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = mean_pool(hidden, mask)
    assert not torch.isnan(out).any()
    assert torch.equal(out[1], torch.zeros(5))
    torch.testing.assert_close(out[0], hidden[0, 0])
    torch.testing.assert_close(out[2], hidden[2].mean(0))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.float16, torch.float32])
def test_mean_pool_mask_dtypes(mask_dtype):
    hidden = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).to(mask_dtype)
    out = mean_pool(hidden, mask)
    torch.testing.assert_close(out[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(out[1], hidden[1].mean(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mean_pool_low_precision_accumulates_in_fp32(dtype):
    # 4096 copies of a value: a half-precision running sum would be far off; fp32 is exact
    hidden = torch.full((1, 4096, 4), 0.1, dtype=dtype)
    mask = torch.ones(1, 4096, dtype=torch.long)
    out = mean_pool(hidden, mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), hidden[:, 0].float())
    out32 = mean_pool(hidden, mask, dtype=torch.float32)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, hidden[:, 0].float(), rtol=0, atol=1e-6)


def test_mean_pool_without_mask_and_errors():
    hidden = torch.randn(2, 3, 4)
    torch.testing.assert_close(mean_pool(hidden, None), hidden.mean(1))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mean_pool(hidden, torch.ones(2, 4))
    with pytest.raises(ValueError, match="hidden must be"):
        mean_pool(torch.randn(3, 4), torch.ones(3))


def test_mean_pool_gradient():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mean_pool(hidden, mask).sum().backward()
    expected = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]).unsqueeze(-1).expand(2, 3, 4)
    torch.testing.assert_close(hidden.grad, expected)


# ---------------------------------------------------------------------------- ScalarMix
def test_scalar_mix_weights_are_softmax():
    mix = ScalarMix(3, initial_scalar_parameters=[0.0, 1.0, 2.0])
    w = mix.normalized_weights()
    torch.testing.assert_close(w, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert (w > 0).all()
    # default: a plain average, gamma 1
    mix = ScalarMix(4)
    torch.testing.assert_close(mix.normalized_weights(), torch.full((4,), 0.25))
    assert float(mix.gamma.detach()) == 1.0


def test_scalar_mix_hand_computed():
    torch.manual_seed(1)
    layers = [torch.randn(2, 5, 6) for _ in range(3)]
    s = [0.5, -1.0, 2.0]
    mix = ScalarMix(3, initial_scalar_parameters=s)
    with torch.no_grad():
        mix.gamma.fill_(1.7)
    out = mix(layers)
    e = [pow(2.718281828459045, x) for x in s]
    w = [x / sum(e) for x in e]
    expected = 1.7 * (w[0] * layers[0] + w[1] * layers[1] + w[2] * layers[2])
    torch.testing.assert_close(out, expected)
    # a stacked tensor works like a sequence
    torch.testing.assert_close(mix(torch.stack(layers)), expected)


def test_scalar_mix_gradients_reach_scalars_and_gamma():
    layers = [torch.randn(2, 4, 3) * (k + 1) for k in range(3)]
    mix = ScalarMix(3)
    mix(layers).pow(2).sum().backward()
    assert mix.scalar_parameters.grad is not None and mix.gamma.grad is not None
    assert mix.scalar_parameters.grad.abs().sum() > 0
    assert mix.gamma.grad.abs().sum() > 0
    # and to the inputs
    x = [torch.randn(1, 2, 3, requires_grad=True) for _ in range(2)]
    ScalarMix(2)(x).sum().backward()
    torch.testing.assert_close(x[0].grad, torch.full((1, 2, 3), 0.5))


def test_scalar_mix_not_trainable():
    mix = ScalarMix(2, trainable=False)
    assert not mix.scalar_parameters.requires_grad and not mix.gamma.requires_grad
    x = [torch.randn(2, 3, requires_grad=True) for _ in range(2)]
    mix(x).sum().backward()
    assert mix.scalar_parameters.grad is None and x[0].grad is not None


def test_scalar_mix_low_precision_keeps_dtype():
    layers = [torch.randn(2, 3, 4, dtype=torch.bfloat16) for _ in range(2)]
    out = ScalarMix(2)(layers)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ((layers[0].float() + layers[1].float()) / 2).bfloat16().float())


def test_scalar_mix_layer_norm_masked():
    torch.manual_seed(2)
    b, t, h = 2, 5, 4
    layers = [torch.randn(b, t, h) * 3 + 1 for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    # garbage in the padded positions must not change the result at real positions
    layers_garbage = [x.clone() for x in layers]
    for x in layers_garbage:
        x[0, 3:] = 1e4
    mix = ScalarMix(2, do_layer_norm=True)
    out = mix(layers, mask)
    out_g = mix(layers_garbage, mask)
    torch.testing.assert_close(out[0, :3], out_g[0, :3])
    torch.testing.assert_close(out[1], out_g[1])

    def norm(x, n):  # by hand: stats over the n real tokens x hidden units of one row
        real = x[:n]
        return (x - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-12)

    expected_row0 = 0.5 * norm(layers[0][0], 3) + 0.5 * norm(layers[1][0], 3)
    torch.testing.assert_close(out[0, :3], expected_row0[:3])
    expected_row1 = 0.5 * norm(layers[0][1], 5) + 0.5 * norm(layers[1][1], 5)
    torch.testing.assert_close(out[1], expected_row1)
    # without a mask: statistics over every position
    out_nomask = mix(layers)
    torch.testing.assert_close(out_nomask[1], expected_row1)


def test_scalar_mix_errors():
    with pytest.raises(ValueError, match="expected num_layers=3"):
        ScalarMix(3)([torch.randn(2, 4)] * 2)
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape \(2, 5\)"):
        ScalarMix(2)([torch.randn(2, 4), torch.randn(2, 5)])
    with pytest.raises(ValueError, match="initial_scalar_parameters has 2 values"):
        ScalarMix(3, initial_scalar_parameters=[0.0, 1.0])
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        ScalarMix(0)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ScalarMix(2, do_layer_norm=True)([torch.randn(2, 3, 4)] * 2, torch.ones(2, 4))


def test_scalar_mix_over_bert_like_hidden_states():
    # 7 = embeddings + 6 layers (MiniLM); a state_dict round trip keeps the weights
    hs = tuple(torch.randn(2, 6, 8) for _ in range(7))
    mix = ScalarMix(7, initial_scalar_parameters=list(range(7)))
    mix2 = ScalarMix(7)
    mix2.load_state_dict(mix.state_dict())
    torch.testing.assert_close(mix2(hs), mix(hs))
    assert "num_layers=7" in repr(mix)

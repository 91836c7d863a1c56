"""The int8 path and VNNI: fbgemm is asked whether its int8 GEMM sums weight pairs in a
saturating int16 (AVX2, AVX-512 without VNNI) or in int32 (AVX512-VNNI), and the int8 weights
keep the pair bound only where it is needed.  Either way no output saturates."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from bertfast import cpu_linear
from bertfast import quantize as Q

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")),
                                 reason="no fbgemm in this torch")]


def _exact(q, lin, x):
    """The int8 layer's arithmetic in float64: what a non-saturating kernel returns."""
    xq = x.double() * q.inv_smooth_in.double()
    s = xq.abs().amax(1, keepdim=True).clamp_min(1e-30)
    codes = torch.round(xq / s * Q._ACT_QMAX).clamp(-Q._ACT_QMAX, Q._ACT_QMAX)
    wq = q._packed.unpack()[0]
    w = wq.int_repr().double() * wq.q_per_channel_scales().double()[:, None]
    return (codes / Q._ACT_QMAX * s) @ w.t() + lin.bias.double()


def test_the_probe_agrees_with_the_cpu_when_nothing_overrides_fbgemm():
    if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS"):
        pytest.skip("FBGEMM_ENABLE_INSTRUCTIONS is set")
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    assert Q.fbgemm_pairs_saturate() == ("avx512_vnni" not in flags)


def test_weight_pairs_are_bounded_exactly_where_fbgemm_saturates():
    w = torch.zeros(2, 8)
    w[0, :2] = 1.0  # one pair of two big weights
    w[1, 0] = 1.0  # one big weight
    scales = Q.weight_scales(w)
    if Q.fbgemm_pairs_saturate():
        assert torch.allclose(scales, torch.tensor([2.0 / 127, 1.0 / 127]))
    else:  # VNNI: the full 8-bit grid for both rows
        assert torch.allclose(scales, torch.tensor([1.0 / 127, 1.0 / 127]))


def test_big_weight_pairs_never_saturate():
    """Neighbouring input channels both large, activations at the top of the grid: with the bound
    (AVX2) or without it (VNNI) the kernel returns the exact int8 arithmetic."""
    lin = nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01)
        lin.weight[:, 0::2] = 0.3
        lin.weight[:, 1::2] = 0.3
    q = Q.QuantizedLinear(lin, None, outlier_channels=0).eval()
    x = torch.cat([torch.ones(8, 256), -torch.ones(8, 256)])
    with torch.inference_mode():
        y = q(x)
    assert torch.allclose(y.double(), _exact(q, lin, x), rtol=1e-5, atol=1e-3)


def test_fbgemm_forced_to_avx2_is_detected_and_gets_the_bound():
    code = ("import torch; from bertfast import quantize as Q; w = torch.zeros(1, 4); w[0, :2] = 1.0; "
            "print(Q.fbgemm_pairs_saturate(), round(float(Q.weight_scales(w)[0]) * 127, 3))")
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "2.0"]


def test_the_cpu_flags_name_vnni():
    f = cpu_linear.parse_features({"model name": "x", "flags": "avx2 avx512f avx512_vnni"})
    assert f.vnni and f.flags()["VNNI"]
    assert not cpu_linear.parse_features({"model name": "x", "flags": "avx2"}).vnni

import platform

import pytest
import torch

from palm.kernels import gemv, load_cpu_gemv

x86_avx2 = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.skipif(not x86_avx2, reason="the GEMV kernel needs x86 with AVX2")
def test_kernel_builds_on_x86_with_avx2():
    assert load_cpu_gemv()


@pytest.mark.skipif(not x86_avx2, reason="the GEMV kernel needs x86 with AVX2")
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 11])
@pytest.mark.parametrize("k", [64, 100])  # 100: a tail that is not a multiple of the 32-wide steps
def test_gemv_matches_matmul(rows, k):
    torch.manual_seed(rows)
    x = torch.randn(rows, k)
    weight = torch.randn(37, k)
    torch.testing.assert_close(gemv(x, weight, None), x @ weight.T, atol=1e-4, rtol=1e-5)
    bf16 = weight.bfloat16()
    torch.testing.assert_close(gemv(x, bf16, None), x @ bf16.float().T, atol=1e-4, rtol=1e-5)
    int8 = torch.randint(-127, 128, (37, k), dtype=torch.int8)
    scale = torch.rand(37)
    # The int8 kernel rounds x to int16 with max|x| / 16383 per level: each product moves by at
    # most half a level times |w| * scale.
    exact = (x @ int8.float().T) * scale
    rounding = x.abs().amax(dim=1, keepdim=True) / 16383 / 2 * (int8.abs().float().sum(dim=1) * scale)
    assert ((gemv(x, int8, scale) - exact).abs() <= rounding + 1e-4).all()

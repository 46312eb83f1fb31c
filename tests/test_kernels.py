import platform

import pytest
import torch

import torch.nn.functional as F

from palm.inference.cpu import (KERNEL_MAX_ROWS, TILED_MAX_ROWS, KernelLinear, gemv_kernel_faster, onednn_linear,
                                onednn_matmul_faster, single_query_attention, swap_in_kernels, tiled_kernel_faster)
from palm.kernels.decode import decode_attention, gemv, load_cpu_kernels

x86_avx2 = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.skipif(not x86_avx2, reason="the GEMV kernel needs x86 with AVX2")
def test_kernel_builds_on_x86_with_avx2():
    assert load_cpu_kernels()


@pytest.mark.skipif(not x86_avx2, reason="the GEMV kernel needs x86 with AVX2")
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 11, 64])  # fp32 from 2 rows on: the tiled path, 3 rows at a time
@pytest.mark.parametrize("k", [64, 100])  # 100: a tail that is not a multiple of the 32-wide steps
def test_gemv_matches_matmul(rows, k):
    torch.manual_seed(rows)
    x = torch.randn(rows, k)
    weight = torch.randn(37, k)  # 37: weight rows left over after the tiles of 4
    exact = (x.double() @ weight.double().T).float()
    torch.testing.assert_close(gemv(x, weight, None), exact, atol=1e-4, rtol=1e-5)
    fp32_scale = torch.rand(37)
    torch.testing.assert_close(gemv(x, weight, fp32_scale), exact * fp32_scale, atol=1e-4, rtol=1e-5)
    bf16 = weight.bfloat16()
    torch.testing.assert_close(gemv(x, bf16, None), x @ bf16.float().T, atol=1e-4, rtol=1e-5)
    int8 = torch.randint(-127, 128, (37, k), dtype=torch.int8)
    scale = torch.rand(37)
    # The int8 kernel rounds x to int16 with max|x| / 16383 per level: each product moves by at
    # most half a level times |w| * scale.
    exact = (x @ int8.float().T) * scale
    rounding = x.abs().amax(dim=1, keepdim=True) / 16383 / 2 * (int8.abs().float().sum(dim=1) * scale)
    assert ((gemv(x, int8, scale) - exact).abs() <= rounding + 1e-4).all()


@pytest.mark.skipif(not x86_avx2, reason="the attention kernel needs x86 with AVX2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,dim_head", [(1, 8), (4, 16), (12, 64), (3, 136)])  # 136 = 64 + 64 + 8
@pytest.mark.parametrize("keys", [1, 13, 300])
def test_decode_attention_matches_sdpa(dtype, heads, dim_head, keys):
    """Against PyTorch's attention on a slice of a larger cache, three sequences with masks of
    every kind: left padding then causal, scattered keys, and every key visible."""
    torch.manual_seed(keys + heads)
    cache_k, cache_v = torch.randn(2, 3, 1, keys + 9, dim_head, dtype=dtype)
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]  # the kernel reads strided rows
    q = torch.randn(3, heads, 1, dim_head, dtype=dtype).transpose(1, 2)  # (b, 1, heads, d), not contiguous
    mask = torch.zeros(3, 1, 1, keys, dtype=torch.bool)
    mask[0, ..., keys // 3 :] = True
    mask[1] = torch.rand(1, 1, keys) < 0.3
    mask[1, ..., -1] = True
    mask[2] = True
    scale = dim_head**-0.5
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    got = decode_attention(q, k, v, mask, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected, **tolerance)
    torch.testing.assert_close(decode_attention(q, k, v, None, scale).float(),
                               F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale), **tolerance)


@pytest.mark.skipif(not x86_avx2, reason="the attention kernel needs x86 with AVX2")
def test_decode_attention_far_apart_scores_and_no_visible_key():
    # Scores 200 apart: the smaller weights underflow to exactly 0 instead of overflowing; a
    # sequence with no visible key gets zeros (PyTorch's attention gives NaN).
    q = torch.ones(2, 1, 1, 8)
    k = torch.zeros(2, 1, 3, 8)
    k[:, :, 1] = 25.0  # score 200 with scale 1
    v = torch.arange(3.0).view(1, 1, 3, 1).expand(2, 1, 3, 8).contiguous()
    mask = torch.tensor([[True, True, True], [False, False, False]]).view(2, 1, 1, 3)
    out = decode_attention(q, k, v, mask, 1.0)
    assert torch.equal(out[0], torch.ones(1, 1, 8)) and torch.equal(out[1], torch.zeros(1, 1, 8))


def test_single_query_attention_falls_back_to_pytorch_where_the_kernel_does_not_apply(monkeypatch):
    import palm.inference.cpu as cpu

    kernel_calls = []
    real = cpu.decode_attention

    def spy(*args):
        kernel_calls.append(args)
        return real(*args)

    monkeypatch.setattr(cpu, "decode_attention", spy)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4, 12), torch.randn(1, 1, 9, 12), torch.randn(1, 1, 9, 12)  # head dim 12
    additive = torch.zeros(1, 1, 1, 9)
    additive[..., :2] = float("-inf")
    needs_grad = q[..., :8].clone().requires_grad_()
    # head dim not a multiple of 8; fp16; an additive (float) mask; a query that needs its gradient
    cases = [(q, k, v, None), (q.half(), k.half(), v.half(), None), (q[..., :8], k[..., :8], v[..., :8], additive),
             (needs_grad, k[..., :8], v[..., :8], None)]
    for q_, k_, v_, mask in cases:
        expected = F.scaled_dot_product_attention(q_.float(), k_.float(), v_.float(), attn_mask=mask)
        got = single_query_attention(q_, k_, v_, attn_mask=mask)
        assert got.dtype == q_.dtype
        torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=2e-3)
    assert kernel_calls == []  # every case above went to PyTorch
    if x86_avx2 and load_cpu_kernels():  # and the same call where the kernel applies does reach it
        single_query_attention(q[..., :8], k[..., :8], v[..., :8], attn_mask=additive == 0)
        assert len(kernel_calls) == 1


def test_products_too_large_for_the_gemv_kernel_go_through_onednn_and_equal_matmul(monkeypatch):
    import palm.inference.cpu as cpu

    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    x = torch.randn(3, KERNEL_MAX_ROWS, 64)  # 24 rows
    try:
        onednn_linear(x[0], weight)
    except (RuntimeError, AttributeError, NotImplementedError):
        pytest.skip("this PyTorch build cannot run oneDNN's fp32 inner product")
    calls = []
    monkeypatch.setattr(cpu, "onednn_linear", lambda *args: calls.append(args) or onednn_linear(*args))
    exact = (x.double() @ weight.double().T).float()
    with torch.no_grad():
        torch.testing.assert_close(KernelLinear(weight, onednn=True)(x), exact, atol=1e-4, rtol=1e-5)
    assert len(calls) == 1
    with torch.no_grad():  # the same product without the flag, and one that needs gradients, stay with PyTorch
        torch.testing.assert_close(KernelLinear(weight, onednn=False)(x), exact, atol=1e-4, rtol=1e-5)
    trained = KernelLinear(torch.nn.Parameter(weight.clone()), onednn=True)
    trained(x).sum().backward()
    torch.testing.assert_close(trained.weight.grad, x.reshape(-1, 64).sum(0).expand(48, 64), atol=1e-4, rtol=1e-5)
    assert len(calls) == 1


@pytest.mark.skipif(not x86_avx2, reason="the GEMV kernel needs x86 with AVX2")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [5, 50, 768])  # 5: no vector step at all; 50: a tail past 8-wide steps
def test_tiled_fp32_products_match_matmul_and_give_each_row_its_result_alone(threads, k):
    """Row counts around the tiles of 3, weight rows over several chunks and a tail of
    weight rows, on one thread and two; a row's result is bit for bit the one it gets alone
    (M = 1, the row kernel), so that a serving batch does not change anyone's tokens."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(k)
        weight, scale = torch.randn(203, k), torch.rand(203)
        for rows in (2, 3, 6, 7, 64):
            x = torch.randn(rows, k)
            exact = (x.double() @ weight.double().T).float()
            got = gemv(x, weight, None)
            torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(gemv(x, weight, scale), exact * scale, atol=1e-4, rtol=1e-5)
            alone = torch.cat([gemv(x[i : i + 1], weight, None) for i in range(rows)])
            assert torch.equal(got, alone)
    finally:
        torch.set_num_threads(previous)


kernels_here = pytest.mark.skipif(not (x86_avx2 and load_cpu_kernels()), reason="palm's CPU kernels do not run here")


@kernels_here
def test_fp32_products_up_to_the_tiled_limit_reach_the_kernel_where_it_is_chosen(monkeypatch):
    import palm.inference.cpu as cpu

    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    try:
        onednn_linear(torch.randn(KERNEL_MAX_ROWS + 1, 96), weight)
    except (RuntimeError, AttributeError, NotImplementedError):
        pytest.skip("this PyTorch build cannot run oneDNN's fp32 inner product")
    kernel_calls, onednn_calls = [], []
    monkeypatch.setattr(cpu, "gemv", lambda *args: kernel_calls.append(args[0].shape[0]) or gemv(*args))
    monkeypatch.setattr(cpu, "onednn_linear", lambda *args: onednn_calls.append(args[0].shape[0]) or onednn_linear(*args))
    tiled, untiled = KernelLinear(weight, onednn=True, tiled=True), KernelLinear(weight, onednn=True, tiled=False)
    with torch.no_grad():
        for rows in (KERNEL_MAX_ROWS + 1, TILED_MAX_ROWS, TILED_MAX_ROWS + 1):
            x = torch.randn(rows, 96)
            exact = (x.double() @ weight.double().T).float()
            torch.testing.assert_close(tiled(x), exact, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(untiled(x), exact, atol=1e-4, rtol=1e-5)
    assert kernel_calls == [KERNEL_MAX_ROWS + 1, TILED_MAX_ROWS]
    assert onednn_calls == [KERNEL_MAX_ROWS + 1, TILED_MAX_ROWS, TILED_MAX_ROWS + 1, TILED_MAX_ROWS + 1]
    # only fp32 weights take the tiled path, and only where the kernel is chosen: int8 and bf16
    # products of more rows, and those of a layer kept off the kernel, stay with oneDNN or PyTorch
    int8 = KernelLinear(torch.randint(-127, 128, (48, 96), dtype=torch.int8), torch.rand(48), tiled=True)
    bf16 = KernelLinear(weight.bfloat16(), tiled=True)
    no_kernel = KernelLinear(weight, onednn=True, gemv=False, tiled=True)
    assert int8.kernel_max_rows == bf16.kernel_max_rows == no_kernel.kernel_max_rows == KERNEL_MAX_ROWS


@kernels_here
def test_the_tiled_choice_needs_a_5_percent_lead_and_is_applied_by_the_swap(monkeypatch, request):
    import palm.inference.cpu as cpu

    onednn_matmul_faster(torch.float32)  # asked for by the choice: measured now, before the timings are faked
    request.addfinalizer(cpu.tiled_kernel_faster.cache_clear)

    def choice(kernel_s: float, other_s: float) -> bool:
        cpu.tiled_kernel_faster.cache_clear()
        times = iter([kernel_s, other_s])  # the kernel's pass is timed first
        monkeypatch.setattr(cpu, "_best_time", lambda fn, repeats=5: next(times))
        return cpu.tiled_kernel_faster()

    assert choice(0.94, 1.0) is True and choice(0.96, 1.0) is False
    monkeypatch.undo()
    cpu.tiled_kernel_faster.cache_clear()  # measured again for the swap
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False).bfloat16())
    swap_in_kernels(model)
    assert model[0].kernel_max_rows == (TILED_MAX_ROWS if tiled_kernel_faster() else KERNEL_MAX_ROWS)
    assert not isinstance(model[1], KernelLinear) or model[1].kernel_max_rows == KERNEL_MAX_ROWS


def test_the_onednn_choice_is_measured_per_dtype_and_applied_by_the_swap():
    assert onednn_matmul_faster(torch.int8) is False and onednn_matmul_faster(torch.float16) is False
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False).bfloat16())
    swap_in_kernels(model)
    for layer in model:
        expected = onednn_matmul_faster(layer.weight.dtype)
        assert layer.onednn is expected if isinstance(layer, KernelLinear) else not expected


@pytest.mark.skipif(not x86_avx2, reason="the GEMV kernel needs x86 with AVX2")
def test_bf16_decoding_leaves_the_kernel_only_on_native_bf16_cpus_that_time_it_faster(monkeypatch, request):
    import palm.inference.cpu as cpu

    assert gemv_kernel_faster(torch.float32) and gemv_kernel_faster(torch.int8)
    onednn_matmul_faster(torch.bfloat16)  # the swap below asks for it: measured now, before the timings are faked
    request.addfinalizer(cpu.gemv_kernel_faster.cache_clear)  # forget the faked choices below
    timed = []

    def choice(native: bool, kernel_s: float, pytorch_s: float) -> bool:
        cpu.gemv_kernel_faster.cache_clear()
        monkeypatch.setattr(cpu, "cpu_has_native_bf16", lambda: native)
        times = iter([kernel_s, pytorch_s])  # the kernel's pass is timed first
        monkeypatch.setattr(cpu, "_best_time", lambda fn, repeats=5: timed.append(fn) or next(times))
        return cpu.gemv_kernel_faster(torch.bfloat16)

    assert choice(False, 2.0, 1.0) is True and timed == []  # no native units: the kernel, nothing timed
    assert choice(True, 1.0, 2.0) is True and len(timed) == 2
    assert choice(True, 2.0, 1.0) is False
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=False).bfloat16()
    swapped = swap_in_kernels(torch.nn.Sequential(layer))[0]
    # the swap applies the choice (and keeps PyTorch's layer when neither the kernel nor oneDNN is chosen)
    assert swapped.gemv is False if isinstance(swapped, KernelLinear) else not onednn_matmul_faster(torch.bfloat16)
    calls = []
    monkeypatch.setattr(cpu, "gemv", lambda *args: calls.append(args) or gemv(*args))
    x = torch.randn(2, 64).bfloat16()
    exact = F.linear(x, layer.weight)
    with torch.no_grad():
        for module in (swapped, KernelLinear(layer.weight, onednn=True, gemv=False)):
            torch.testing.assert_close(module(x), exact)  # PyTorch's matmul itself, not oneDNN's nor the kernel's
        assert calls == []
        KernelLinear(layer.weight)(x)  # while the same product with the kernel chosen reaches it
    assert len(calls) == 1

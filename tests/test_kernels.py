"""The CPU kernels: compiled results against a float64 oracle and the torch path, every dtype combination,
odd shapes, the row cut-off, the fallbacks (LMFORGE_KERNELS=0, no compiler, a failed build, non-contiguous
inputs, autograd) and the errors.

Tolerances: fp32 outputs may differ from the exact sum by the fp32 accumulation error, bounded here by
4e-5 * sum|x_k w_k| (K <= 1100 summed in 8-lane vectors, unit roundoff 6e-8; any lost or doubled term is
far larger). bf16 outputs are that fp32 sum rounded once to bf16, which has 8 significant bits: at most
half an ulp, i.e. 2**-8 * |y| relative, on top of the same accumulation bound. The compiled int8 kernel
first rounds each row of x to int16 in blocks of 256 entries, each block scaled by its largest |x| / 32767:
every entry moves by at most half a step, 1/65534 of its block's largest, which adds sum_k |w_k| * that
to the bound.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.errors import ConfigError
from lmforge.kernels import _build

SHAPES = [(1, 1), (37, 29), (130, 67), (48, 256)]  # (N, K): tails in both, K below and above a vector
LONG_SHAPES = [(40, 700), (9, 1100)]  # int8: several blocks of 256 along K, the last one partial; rows of many lines


@pytest.fixture
def no_kernels(monkeypatch):
    """The process as LMFORGE_KERNELS=0 leaves it; the real state comes back afterwards."""
    monkeypatch.setenv("LMFORGE_KERNELS", "0")
    _build.reset()
    yield
    monkeypatch.delenv("LMFORGE_KERNELS")
    _build.reset()


def inputs(dtype, m, n, k, bias, residual, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (m, k) if lead is None else (*lead, k)
    x = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    r = torch.randn((*shape[:-1], n), generator=g).to(dtype) if residual else None
    return x, w, b, r


def oracle(x, w, b, r, scale=None):
    """The exact result (float64) and sum|terms|, the scale of the fp32 accumulation error."""
    x64, w64 = x.double(), w.double()
    y, mag = x64 @ w64.T, x64.abs() @ w64.abs().T
    if scale is not None:
        y, mag = y * scale.double(), mag * scale.double()
    for t in (b, r):
        if t is not None:
            y, mag = y + t.double(), mag + t.double().abs()
    return y, mag


def int16_rounding(x, w, scale, block=256):
    """The int8 kernel's rounding of x to int16 carried through the product: sum_k |w_k| * step_k * s,
    where step_k = (largest |x| of k's block) / 65534 is half the block's int16 step."""
    k = x.shape[-1]
    rows = F.pad(x.double().abs().reshape(-1, k), (0, -k % block))
    step = rows.view(rows.shape[0], -1, block).amax(-1).repeat_interleave(block, dim=1)[:, :k] / 65534
    return ((step @ w.double().abs().T) * scale.double()).view(*x.shape[:-1], w.shape[0])


def assert_close(y, x, w, b, r, scale=None, roundings=1):
    """Within the bounds of the module docstring; roundings=2 for torch paths that round to bf16 twice
    (the product, then the sum with the residual)."""
    ref, mag = oracle(x, w, b, r, scale)
    assert y.dtype == x.dtype and y.shape == ref.shape
    bound = 4e-5 * mag
    if scale is not None:
        bound = bound + int16_rounding(x, w, scale)
    if y.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * (ref.abs() if roundings == 1 else ref.abs() + mag)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_compiled_linear_matches_the_exact_result(compiled, dtype, m):
    for n, k in SHAPES + LONG_SHAPES:
        for bias in (False, True):
            for residual in (False, True):
                x, w, b, r = inputs(dtype, m, n, k, bias, residual, seed=n + k)
                assert_close(kernels.linear(x, w, b, r), x, w, b, r)
    assert compiled.counts["gemv"] == 4 * len(SHAPES + LONG_SHAPES)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_compiled_int8_linear_matches_the_dequantised_result(compiled, x_dtype, m):
    for n, k in SHAPES + LONG_SHAPES:
        for bias, residual in ((False, False), (True, True), (True, False)):
            x, _, b, r = inputs(x_dtype, m, n, k, bias, residual, seed=n)
            g = torch.Generator().manual_seed(k)
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            scale = torch.rand(n, generator=g) / 64
            assert_close(kernels.int8_linear(x, q, scale, b, r), x, q, b, r, scale)
    assert compiled.counts["gemv"] == 3 * len(SHAPES + LONG_SHAPES)


GROUP_SHAPES = [(37, 32), (130, 96), (40, 704), (9, 1088)]  # K = whole groups of 32: one, several, partial x blocks


def grouped(n, k, group, seed):
    """int8 weights with one fp32 scale per `group` entries along each row, and the fp32 matrix they stand for."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, k // group, generator=g) / 64
    return q, scale, (q.double().view(n, k // group, group) * scale.double()[..., None]).view(n, k)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 20])
def test_compiled_int8_linear_with_group_scales(compiled, x_dtype, m):
    for n, k in GROUP_SHAPES:
        for bias, residual in ((False, False), (True, True), (True, False)):
            x, _, b, r = inputs(x_dtype, m, n, k, bias, residual, seed=n)
            q, scale, w = grouped(n, k, 32, seed=k)
            # the oracle multiplies by the dequantized weight; scale ones: the int16 rounding bound of x
            assert_close(kernels.int8_linear(x, q, scale, b, r), x, w, b, r, torch.ones(n))
    assert compiled.counts["gemv"] == 3 * len(GROUP_SHAPES)


def test_other_group_sizes_and_the_torch_path_agree(compiled, monkeypatch):
    x, _, b, r = inputs(torch.float32, 2, 40, 704, True, True, seed=5)
    q, scale, w = grouped(40, 704, 64, seed=6)  # groups of 64: the torch path
    assert_close(kernels.int8_linear(x, q, scale, b, r), x, w, b, r)
    assert compiled.counts["gemv"] == 0
    q, scale, w = grouped(40, 704, 32, seed=7)
    assert_close(kernels.int8_linear(x, q, scale, b, r), x, w, b, r, torch.ones(40))
    assert compiled.counts["gemv"] == 1
    assert_close(kernels._torch_int8_linear(x, q, scale, b, r), x, w, b, r)  # the same groups in torch
    with pytest.raises(ConfigError, match="groups dividing 704"):
        kernels.int8_linear(x, q, torch.rand(40, 7))


def test_int8_blocks_of_x_are_scaled_on_their_own(compiled):
    # One block of x holds an entry 10^4 times the rest: only that block's entries lose precision, the
    # others' products stay within the bound of their own (small) largest entries.
    x = torch.randn(2, 700)
    x[:, 300] = 1e4
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (40, 700), dtype=torch.int8, generator=g)
    scale = torch.rand(40, generator=g) / 64
    assert_close(kernels.int8_linear(x, q, scale), x, q, None, None, scale)
    rest = x.clone()
    rest[:, 256:512] = 0
    only = x - rest  # the outlier's block alone: the kernel is linear in the blocks
    y = kernels.int8_linear(x, q, scale) - kernels.int8_linear(only, q, scale)
    assert_close(y, rest, q, None, None, scale)


def test_int8_non_finite_inputs_give_nan(compiled):
    q = torch.ones(4, 600, dtype=torch.int8)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 600)
        x[0, 400] = bad
        assert kernels.int8_linear(x, q, torch.ones(4)).isnan().all()


def test_bf16_output_rounds_to_nearest_even_like_torch(compiled):
    # sums that fall exactly halfway between two bf16 values: 1 + 2**-8 (-> 1, even) and
    # 1 + 2**-7 + 2**-8 (-> 1 + 2**-6, even); truncation or round-half-up would give another value
    for k in (2, 64):  # the scalar tail and the vector loop
        x = torch.zeros(2, k, dtype=torch.bfloat16)
        x[0, :2] = torch.tensor([1.0, 2.0**-8])
        x[1, :2] = torch.tensor([1.0 + 2.0**-7, 2.0**-8])
        w = torch.zeros(1, k, dtype=torch.bfloat16)
        w[0, :2] = 1.0
        y = kernels.linear(x, w)
        expected = (x.float() @ w.float().T).to(torch.bfloat16)
        assert y.flatten().tolist() == expected.flatten().tolist() == [1.0, 1.0 + 2.0**-6]


def test_shapes_1d_and_leading_dimensions(compiled):
    x, w, b, r = inputs(torch.float32, 1, 24, 40, True, True)
    y1 = kernels.linear(x[0], w, b, r[0])
    assert y1.shape == (24,)
    assert_close(y1, x[0], w, b, r[0])
    x3, w3, b3, r3 = inputs(torch.bfloat16, None, 24, 40, True, True, lead=(2, 3))
    y3 = kernels.linear(x3, w3, b3, r3)
    assert y3.shape == (2, 3, 24)
    assert_close(y3, x3, w3, b3, r3)
    assert compiled.counts["gemv"] == 2


@pytest.mark.parametrize("dtype, m, k, runs_compiled", [
    (torch.float32, 13, 70, True),     # fp32: compiled, in blocks of 8 rows (8 + 5), the weights read once
    (torch.float32, 64, 70, True),
    (torch.float32, 65, 70, False),    # beyond 64 rows: torch's GEMM
    (torch.float32, 21, 1100, True),   # rows longer than 1024: compiled up to 32 rows of x (8 + 8 + 4 + 1)
    (torch.float32, 32, 1100, True),
    (torch.float32, 33, 1100, False),
    (torch.bfloat16, 13, 70, True),    # bf16: compiled
    (torch.bfloat16, 70, 70, False),   # beyond 64 rows: torch (in fp32 where bf16 GEMM is slow)
])
def test_many_rows(compiled, dtype, m, k, runs_compiled):
    x, w, b, r = inputs(dtype, m, 50, k, True, True)
    runs_compiled = runs_compiled and not (dtype is torch.bfloat16 and kernels._native_bf16())
    assert_close(kernels.linear(x, w, b, r), x, w, b, r, roundings=1 if runs_compiled else 2)
    assert compiled.counts["gemv"] == (1 if runs_compiled else 0)


@pytest.mark.parametrize("m", [13, 70])
def test_int8_many_rows(compiled, m):
    x, _, b, r = inputs(torch.bfloat16, m, 50, 70, True, True)
    q = torch.randint(-127, 128, (50, 70), dtype=torch.int8)
    scale = torch.rand(50) / 64
    assert_close(kernels.int8_linear(x, q, scale, b, r), x, q, b, r, scale)
    assert compiled.counts["gemv"] == (1 if m <= 64 else 0)


def test_non_contiguous_inputs_fall_back_to_torch(compiled):
    x, w, b, r = inputs(torch.float32, 2, 33, 40, True, True)
    w_t = w.T.contiguous().T  # same values, column-major
    assert not w_t.is_contiguous()
    assert_close(kernels.linear(x, w_t, b, r), x, w, b, r)
    wide = torch.randn(2, 80)
    x_strided = wide[:, ::2]
    assert_close(kernels.linear(x_strided, w, b, r), x_strided, w, b, r)
    assert compiled.counts["gemv"] == 0
    assert_close(kernels.linear(x, w, b, r), x, w, b, r)
    assert compiled.counts["gemv"] == 1


def test_autograd_uses_torch(compiled):
    x, w, b, _ = inputs(torch.float32, 1, 6, 10, True, False)
    w.requires_grad_(True)
    kernels.linear(x, w, b).sum().backward()
    assert torch.allclose(w.grad, x.expand(6, 10))
    assert compiled.counts["gemv"] == 0
    with torch.no_grad():
        kernels.linear(x, w, b)
    assert compiled.counts["gemv"] == 1


def test_bound_gemv_adds_into_the_residual_in_place(compiled):
    x, w, b, r = inputs(torch.bfloat16, 1, 32, 32, True, True)
    expected = kernels.linear(x, w, b, r)
    g = kernels.bind(w, b)
    h = r.clone()
    out = g(x, residual=h, out=h)
    assert out is h and torch.equal(h, expected)
    buf = torch.empty(1, 32, dtype=torch.bfloat16)
    assert g(x, r, out=buf) is buf and torch.equal(buf, expected)
    calls = compiled.counts["gemv"]
    same = x.clone()
    assert_close(g(same, r, out=same), x, w, b, r, roundings=2)  # out aliasing x: torch computes, then copies
    assert compiled.counts["gemv"] == calls


@pytest.mark.parametrize("use_kernels", [True, False])
def test_a_planned_gemv_reads_its_tensors_at_each_call(use_kernels, request):
    spy = request.getfixturevalue("compiled" if use_kernels else "no_kernels")
    x, w, b, r = inputs(torch.float32, 1, 40, 24, True, True, seed=2)
    x, r = x.view(-1), r.view(-1)
    g = kernels.bind(w, b)
    out, h = torch.empty(40), r.clone()
    project, accumulate = g.plan(x, out), g.plan(x, h, residual=h)  # the second adds into h in place
    for _ in range(3):
        x.copy_(torch.randn(24))  # the caller rewrites its buffers between calls
        expected_h = g(x, h)
        assert project() is out and torch.equal(out, g(x))
        assert accumulate() is h and torch.equal(h, expected_h)
    if use_kernels:
        assert spy.counts["gemv"] == 4 * 3
    # trainable weights: the kernel under no_grad / inference_mode, torch's autograd path otherwise
    trainable = kernels.bind(torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone()))
    run = trainable.plan(x, out)
    with torch.no_grad():
        assert torch.equal(run(), g(x))
    if use_kernels:
        assert spy.counts["gemv"] == 4 * 3 + 2
    y = run()
    assert y.requires_grad and torch.allclose(y, g(x).detach(), atol=1e-5)


def test_a_planned_attention_writes_the_cache_and_checks_its_range(compiled):
    keys, values = torch.zeros(2, 10, 8), torch.zeros(2, 10, 8)
    attend = kernels.OneQueryAttention(keys, values, 4, 0.5)
    q, k, v, y = torch.empty(4, 8), torch.empty(2, 8), torch.empty(2, 8), torch.empty(4, 8)
    run = attend.plan(q, k, v, y)
    for n in range(10):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape))
        assert run(0, n + 1) is y
        assert torch.equal(keys[:, n], k) and torch.equal(values[:, n], v)
        assert torch.allclose(y.double(), attention_oracle(q, keys, values, 0, n + 1, 0.5), atol=1e-5)
    assert compiled.counts["attend"] == 10
    with pytest.raises(ValueError, match="outside the cache"):
        run(0, 11)
    # where the kernel does not apply (a non-contiguous query), the plan runs the torch path into y
    strided = q.t().contiguous().t()
    fallback = attend.plan(strided, k, v, y)
    assert fallback(0, 3) is y and compiled.counts["attend"] == 10
    assert torch.allclose(y.double(), attention_oracle(q, keys, values, 0, 3, 0.5), atol=1e-5)


def test_the_torch_path_gives_the_same_results(no_kernels):
    assert not kernels.available()
    assert "LMFORGE_KERNELS=0" in kernels.why_unavailable()
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 5):
            x, w, b, r = inputs(dtype, m, 37, 29, True, True)
            assert_close(kernels.linear(x, w, b, r), x, w, b, r, roundings=2)
            q = torch.randint(-127, 128, (37, 29), dtype=torch.int8)
            scale = torch.rand(37) / 64
            assert_close(kernels.int8_linear(x, q, scale, b, r), x, q, b, r, scale)


def test_a_missing_compiler_or_failed_build_falls_back_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    _build.reset()
    try:
        assert not kernels.available()
        assert "no C++ compiler" in kernels.why_unavailable()
        monkeypatch.delenv("CXX")
        broken = tmp_path / "gemv.cpp"
        broken.write_text("this is not C++\n")
        monkeypatch.setattr(_build, "SOURCE", broken)
        _build.reset()
        x, w, b, r = inputs(torch.float32, 1, 5, 7, True, True)
        assert_close(kernels.linear(x, w, b, r), x, w, b, r)  # silently the torch path
        assert "failed" in kernels.why_unavailable() and "error" in kernels.why_unavailable()
    finally:
        monkeypatch.undo()
        _build.reset()


def test_the_build_happens_once_across_threads(compiled):
    _build.reset()
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(_build.ops())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and all(s is seen[0] for s in seen) and seen[0] is not None


@pytest.mark.parametrize("use_kernels", [True, False])
def test_bad_inputs_raise_config_errors_naming_the_shapes(monkeypatch, use_kernels):
    if not use_kernels:
        monkeypatch.setenv("LMFORGE_KERNELS", "0")
    _build.reset()
    try:
        x = torch.randn(2, 8)
        with pytest.raises(ConfigError, match=r"\(2, 8\).*\(4, 6\)"):
            kernels.linear(x, torch.randn(4, 6))
        with pytest.raises(ConfigError, match="dtype"):
            kernels.linear(x, torch.randn(4, 8, dtype=torch.bfloat16))
        with pytest.raises(ConfigError, match=r"bias of shape \(3,\)"):
            kernels.linear(x, torch.randn(4, 8), torch.randn(3))
        with pytest.raises(ConfigError, match=r"residual \(2, 3\)"):
            kernels.linear(x, torch.randn(4, 8), None, torch.randn(2, 3))
        with pytest.raises(ConfigError, match="int8"):
            kernels.int8_linear(x, torch.randn(4, 8), torch.rand(4))
        with pytest.raises(ConfigError, match=r"scale of shape \(5,\)"):
            kernels.int8_linear(x, torch.zeros(4, 8, dtype=torch.int8), torch.rand(5))
        with pytest.raises(ConfigError, match=r"\(2, 8\).*\(4, 6\)"):
            kernels.bind(torch.zeros(4, 6, dtype=torch.int8), None, torch.rand(4))(x)
    finally:
        monkeypatch.undo()
        _build.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_uses_torch(dtype):
    x, w, b, r = (t.cuda() for t in inputs(dtype, 1, 37, 29, True, True))
    y = kernels.linear(x, w, b, r)
    assert y.is_cuda
    assert_close(y.cpu(), *(t.cpu() for t in (x, w, b, r)), roundings=2)
    q = torch.randint(-127, 128, (37, 29), dtype=torch.int8)
    scale = torch.rand(37) / 64
    y8 = kernels.int8_linear(x, q.cuda(), scale.cuda(), b, r)
    assert y8.is_cuda
    assert_close(y8.cpu(), x.cpu(), q, b.cpu(), r.cpu(), scale, roundings=2)


def attention_oracle(q, keys, values, start, end, scale):
    h, d = q.shape
    return F.scaled_dot_product_attention(
        q.double().view(1, h, 1, d), keys.double()[None, :, start:end], values.double()[None, :, start:end],
        scale=scale, enable_gqa=keys.shape[0] != h).view(h, d)


ATTENTION_CASES = [  # (H, KV, L, D, start, end): MHA, GQA with a window start, MQA, one position, D tails
    (12, 12, 64, 64, 0, 33), (14, 2, 300, 64, 5, 300), (4, 1, 40, 20, 3, 17), (16, 8, 100, 128, 0, 1),
    (2, 2, 2000, 64, 0, 2000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_matches_sdpa(compiled, dtype):
    # fp32: sums and softmax in fp32 (the exponential within a few ulp); bf16: the output rounded once.
    for h, kv, length, d, start, end in ATTENTION_CASES:
        g = torch.Generator().manual_seed(h + d)
        keys, values = (torch.randn(kv, length, d, generator=g).to(dtype) for _ in range(2))
        q = (torch.randn(h, d, generator=g) * 3).to(dtype)
        y = kernels.OneQueryAttention(keys, values, h, d**-0.5)(q, start, end)
        ref = attention_oracle(q, keys, values, start, end, d**-0.5)
        assert y.dtype == dtype and y.shape == (h, d)
        tol = 1e-5 if dtype is torch.float32 else 2.0**-8 * ref.abs().max().item() + 1e-5
        assert (y.double() - ref).abs().max().item() <= tol
    assert compiled.counts["attend"] == len(ATTENTION_CASES)


def test_one_query_attention_reads_the_cache_as_it_is_written(compiled):
    keys, values = torch.zeros(2, 10, 8), torch.zeros(2, 10, 8)
    attend = kernels.OneQueryAttention(keys, values, 4, 0.5)
    q = torch.randn(4, 8)
    for n in range(10):
        keys[:, n], values[:, n] = torch.randn(2, 8), torch.randn(2, 8)
        assert torch.allclose(attend(q, 0, n + 1).double(), attention_oracle(q, keys, values, 0, n + 1, 0.5), atol=1e-5)
    assert compiled.counts["attend"] == 10


def test_one_query_attention_falls_back_to_torch(no_kernels):
    keys, values = torch.randn(2, 30, 16), torch.randn(2, 30, 16)
    q = torch.randn(6, 16)
    y = kernels.OneQueryAttention(keys, values, 6, 0.25)(q, 4, 30)
    assert torch.allclose(y.double(), attention_oracle(q, keys, values, 4, 30, 0.25), atol=1e-5)
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        kernels.OneQueryAttention(keys, values, 5, 0.25)


def norms(dtype, k, g):
    weight = (1 + torch.randn(k, generator=g) / 4).to(dtype)
    bias = (torch.randn(k, generator=g) / 4).to(dtype)
    layer = torch.nn.LayerNorm(k, eps=1e-5).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    from lmforge.model import RMSNorm

    rms = RMSNorm(k, 1e-6).to(dtype)
    with torch.no_grad():
        rms.weight.copy_(weight)
    return [kernels.Norm("layernorm", layer.weight, layer.bias, layer.eps, layer.forward),
            kernels.Norm("rmsnorm", rms.weight, None, rms.eps, rms.forward)]


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("m", [1, 3])
def test_fused_norm_and_gelu_match_the_separate_modules(compiled, weights, m):
    # The kernel normalizes x (rounded to x's dtype, as the module's output is) and applies GELU to its
    # output; against the modules and torch's GELU run one after another. bf16: a normalized entry may
    # round the other way (one bf16 step: 2**-8 relative), and the output is rounded once more.
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    gelu = kernels.Activation("gelu_tanh", lambda y: torch.nn.functional.gelu(y, approximate="tanh"))
    for n, k in [(37, 29), (300, 768)]:
        g = torch.Generator().manual_seed(n)
        x = (torch.randn(m, k, generator=g) * 3 + 1).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        scale = None
        if weights == "int8":
            w, scale = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g) / 64
        for norm in norms(dtype, k, g):
            for activation in (None, gelu):
                calls = compiled.counts["gemv"]
                y = kernels.bind(w, b, scale, norm, activation)(x)
                assert compiled.counts["gemv"] == calls + 1
                h = norm.apply(x)
                ref, mag = oracle(h, w, b, None, scale)
                bound = 4e-5 * mag
                if scale is not None:
                    bound = bound + int16_rounding(h, w, scale)
                if dtype is torch.bfloat16:
                    bound = bound + 2.0**-8 * mag
                if activation is not None:
                    ref, bound = torch.nn.functional.gelu(ref, approximate="tanh"), 1.13 * bound
                if dtype is torch.bfloat16:
                    bound = bound + 2.0**-8 * ref.abs()
                err = (y.double() - ref).abs()
                assert (err <= bound + 1e-6).all(), (norm.kind, activation, (err - bound).max().item())


def test_fused_norm_and_gelu_fall_back_to_the_modules(no_kernels):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    r = torch.randn(2, 8, generator=g)
    gelu = kernels.Activation("gelu_tanh", lambda y: torch.nn.functional.gelu(y, approximate="tanh"))
    for norm in norms(torch.float32, 16, g):
        y = kernels.bind(w, b, None, norm, gelu)(x, r)
        expected = torch.nn.functional.gelu(torch.nn.functional.linear(norm.apply(x), w, b), approximate="tanh") + r
        torch.testing.assert_close(y, expected)

import shutil

import pytest
import torch
import torch.nn.functional as F

from mightylm import kernels
from mightylm.kernels import ops


def input_major(out: int, n_in: int) -> torch.Tensor:
    return torch.randn(n_in, out).t()  # (out, in) view over (in, out) storage


needs_kernel = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")) or not kernels._cpu_has_avx2_fma(),
    reason="needs a C compiler and an x86-64 CPU with AVX2/FMA",
)


@needs_kernel
def test_kernel_builds_here():
    assert kernels.gemv_library() is not None


@needs_kernel
@pytest.mark.parametrize("out,n_in", [(576, 576), (13, 7), (1, 1), (49152 // 16, 576), (200, 1533)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_f_linear(out, n_in, with_bias):
    torch.manual_seed(out + n_in)
    w = input_major(out, n_in)
    b = torch.randn(out) if with_bias else None
    x = torch.randn(1, 1, n_in)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y = ops.linear(x, w, b)
        assert y.shape == (1, 1, out)
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-4, rtol=1e-4)


def test_other_cases_fall_back_to_f_linear():
    w = input_major(32, 16)
    for x, weight in [(torch.randn(2, 3, 16), w), (torch.randn(1, 16), w.contiguous()),
                      (torch.randn(1, 16, dtype=torch.float64), w.double())]:
        torch.testing.assert_close(ops.linear(x, weight), F.linear(x, weight))
    x = torch.randn(1, 16, requires_grad=True)
    ops.linear(x, w).sum().backward()  # autograd path stays PyTorch's
    assert x.grad is not None


@needs_kernel
@pytest.mark.parametrize("out,n_in", [(576, 576), (7, 64), (1536, 576), (96, 1536)])
def test_int8_int4_and_nf4_gemv_match_their_dequantized_weights(out, n_in):
    from torch import nn

    from mightylm.compress.nf4 import NF4_LEVELS, NF4Linear
    from mightylm.compress.quantize import Int4Linear, Int8Linear

    torch.manual_seed(out)
    lin = nn.Linear(n_in, out)
    x = torch.randn(1, 1, n_in)
    with torch.no_grad():
        q8, q4, i4 = Int8Linear.from_linear(lin), NF4Linear.from_linear(lin), Int4Linear.from_linear(lin, 32)
        q4(x)  # computes the float absmax the kernel reads
        direct = {q8: ops.gemv_int8(x, q8.weight, q8.weight_scale, lin.bias),
                  q4: ops.gemv_nf4(x, q4.weight, q4._absmax, NF4_LEVELS, out, 64, lin.bias),
                  i4: ops.gemv_int4(x, i4.weight, i4.weight_scale, i4.weight_zero, out, 32, lin.bias)}
        for module, y in direct.items():
            assert y is not None  # the kernel ran (no fallback)
            expected = F.linear(x, module.dequantize(), lin.bias)
            torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(module(x), y, atol=0, rtol=0)  # and the module takes that path


@pytest.fixture
def isa():
    before = kernels.kernel_isa()
    yield kernels.set_kernel_isa
    if before is not None:
        kernels.set_kernel_isa(before)


def _q8x_reference(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, out: int, n_in: int) -> torch.Tensor:
    """The int8-activation product in PyTorch, the kernel's arithmetic written out: x rounded per block of 32 to
    xq = round(x / dx), dx = max|x| / 127 (float32, as the kernel computes them), exact integer block sums, then
    Q4_0 d dx (q . xq - 8 sum xq), Q4_1 d dx (q . xq) + m dx sum xq, Q5_0 d dx (q . xq - 16 sum xq), Q8_0
    d dx (q . xq), summed in float64."""
    from mightylm.compress.gguf_blocks import BLOCKS

    xb = x.reshape(n_in // 32, 32)
    dx = xb.abs().amax(dim=1) / 127
    xq = torch.round(xb * torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))[:, None])
    blocks = raw.view(out, n_in // 32, BLOCKS[ggml_type][1])
    d = blocks[..., :2].contiguous().view(torch.float16).double()[..., 0] * dx.double()
    if ggml_type == 8:
        q = blocks[..., 2:].contiguous().view(torch.int8).double()
    else:
        packed = blocks[..., -16:]
        q = torch.cat([packed & 15, packed >> 4], dim=-1).double()
        if ggml_type == 6:  # the fifth bits: bit j of the uint32 after d
            qh = blocks[..., 2:6].contiguous().view(torch.int32)
            q = q + 16 * ((qh >> torch.arange(32, dtype=torch.int32)) & 1).double()
    dots = (q * xq.double()).sum(-1)  # (out, blocks): exact integers
    xs = xq.double().sum(-1)
    if ggml_type == 6:
        return (d * (dots - 16 * xs)).sum(-1)
    if ggml_type == 2:
        return (d * (dots - 8 * xs)).sum(-1)
    if ggml_type == 3:
        m = blocks[..., 2:4].contiguous().view(torch.float16).double()[..., 0]
        return (d * dots + m * dx.double() * xs).sum(-1)
    return (d * dots).sum(-1)


def _every_row_count_as_alone(rows, tiles, ggml_type, out, bias):
    """Products of 2 .. len(rows) rows in one call (each count below 8 its own copy of the kernel's loop, then 8 + 1,
    8 + 2, ...) equal each row multiplied alone: what a prompt, a speculative pass or a server's batch relies on."""
    alone = torch.cat([ops.matmul_ggml(r[None], tiles, ggml_type, out, bias, activations="int8") for r in rows])
    for n in range(2, len(rows) + 1):
        together = ops.matmul_ggml(rows[:n], tiles, ggml_type, out, bias, activations="int8")
        assert torch.equal(together, alone[:n]), (ggml_type, n)
    return together


def test_int8_activation_products_equal_their_integer_arithmetic(isa, kernel_path):
    """matmul_ggml(activations="int8") over weights in tiles of 16 rows (tile_blocks), on each path (kernel_path)
    (VNNI's vpdpbusd; AVX2's maddubs): equal to the integer arithmetic written out in PyTorch, within the
    activations' rounding of the float32 product (Q8_0 codes of -128 included), every row of several exactly what
    it gets alone, and the same bits on every path (the integers are exact, the float operations the same)."""
    from mightylm.compress.gguf_blocks import BLOCKS, dequantize_blocks, tile_blocks, untile_blocks

    path = kernel_path
    torch.manual_seed(0)
    out = 304  # 19 tiles of 16 rows
    for ggml_type, n_in in ((8, 576), (2, 576), (3, 576), (6, 576), (2, 544), (3, 544), (6, 544)):  # 544: odd blocks
        size = BLOCKS[ggml_type][1]
        raw = torch.randint(0, 256, (out, n_in // 32, size), dtype=torch.uint8)
        scales = (torch.rand(out, n_in // 32, 2) / 50).half().view(torch.uint8).view(out, n_in // 32, 4)
        raw[..., :4 if ggml_type == 3 else 2] = scales[..., :4 if ggml_type == 3 else 2]
        raw = raw.view(out, -1)
        tiles = tile_blocks(raw, ggml_type)
        assert tiles.shape == raw.shape and torch.equal(untile_blocks(tiles, ggml_type), raw)
        x = torch.randn(1, n_in)
        x[0, 64:96] = 0  # a block of zeros: dx = 0
        isa(path)
        got = ops.matmul_ggml(x, tiles, ggml_type, out, None, activations="int8")
        expected = _q8x_reference(x[0], raw, ggml_type, out, n_in)
        torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        exact = F.linear(x, dequantize_blocks(raw, ggml_type, (out, n_in)))[0]
        error = (got[0] - exact).norm() / exact.norm()
        assert 1e-5 < error < 0.02, f"type {ggml_type}: relative error {error:.2e} against the float32 product"
        # several rows in one call (a prompt, a speculative step, a server's batch; 11: a pass of 8 and one of 3):
        # each row exactly what it gets alone
        rows, bias = torch.randn(11, n_in), torch.randn(out)
        together = _every_row_count_as_alone(rows, tiles, ggml_type, out, bias)
        isa("avx2")  # the baseline path: the same bits
        assert torch.equal(ops.matmul_ggml(rows, tiles, ggml_type, out, bias, activations="int8"), together)
    # Q6_K in tiles too: x rounded per 32 the same way, integer dots per group of 16 weighted by the int8 scales
    n_in = 512
    raw = torch.randint(0, 256, (out, n_in // 256, 210), dtype=torch.uint8)
    raw[..., 208:] = (torch.rand(out, n_in // 256, 1) / 500).half().view(torch.uint8)
    raw[:16, 0, :192] = 0  # one tile's first super-block: every code 0, q - 32 = -32 (the largest 16-bit sums below)
    raw = raw.view(out, -1)
    tiles = tile_blocks(raw, 14)
    assert tiles.shape == raw.shape and torch.equal(untile_blocks(tiles, 14), raw)
    w = dequantize_blocks(raw, 14, (out, n_in)).double()  # d * scale * (q - 32): exact but for one rounding
    rows, bias = torch.randn(6, n_in), torch.randn(out)
    rows[1, 32:64] = 0
    rows[2, :256] = 5.0  # with the codes of -32 above: four steps' pair sums reach 4 * 2 * 32 * 127
    rows[3, :256] = -5.0
    isa(path)
    together = ops.matmul_ggml(rows, tiles, 14, out, bias, activations="int8")
    for r in range(len(rows)):
        xb = rows[r].reshape(-1, 32)
        dx = xb.abs().amax(dim=1) / 127
        xq = torch.round(xb * torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))[:, None])
        expected = w @ (xq * dx[:, None]).double().flatten() + bias.double()
        torch.testing.assert_close(together[r].double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        alone = ops.matmul_ggml(rows[r:r + 1], tiles, 14, out, bias, activations="int8")
        assert torch.equal(alone[0], together[r])
    _every_row_count_as_alone(torch.randn(11, n_in), tiles, 14, out, bias)
    isa("avx2")
    assert torch.equal(ops.matmul_ggml(rows, tiles, 14, out, bias, activations="int8"), together)
    for ggml_type in (2, 3, 6):  # the largest sums: codes of 15 (Q5_0: 31) times 127 everywhere (AVX2 adds 8 steps,
        # Q5_0's 2, in 16 bits)
        size, n_in = BLOCKS[ggml_type][1], 576
        raw = torch.full((out, n_in // 32, size), 255, dtype=torch.uint8)
        scale_bytes = 4 if ggml_type == 3 else 2  # d (and Q4_1's m) in fp16
        raw[..., :scale_bytes] = torch.tensor([0.01, 0.02]).half().view(torch.uint8)[:scale_bytes]
        raw = raw.view(out, -1)
        x = torch.full((2, n_in), 3.0)
        x[1] = -3.0
        got = ops.matmul_ggml(x, tile_blocks(raw, ggml_type), ggml_type, out, None, activations="int8")
        for r in range(2):
            torch.testing.assert_close(got[r].double(), _q8x_reference(x[r], raw, ggml_type, out, n_in))
    with pytest.raises(ValueError, match="tiles"):
        tile_blocks(raw[:40], 3)  # 40 rows: not whole tiles


def _greedy(lib, x: torch.Tensor, tiles: torch.Tensor, ggml_type: int, out: int) -> list[int] | None:
    best = torch.empty(len(x), dtype=torch.long)
    if lib.mighty_gemm_ggml_q8x_best(x.data_ptr(), len(x), tiles.data_ptr(), ggml_type, x.shape[1], out,
                                     torch.get_num_threads(), best.data_ptr()):
        return None
    return best.tolist()


def test_the_greedy_head_finds_each_rows_first_largest_without_writing_its_outputs(isa, kernel_path):
    """mighty_gemm_ggml_q8x_best (lite's greedy head) on each path: each row's index of the largest output of the
    int8-activation product, found while the tiles make them (each thread's groups 64 at a time), is numpy's argmax
    of the product's outputs: 1 to 16 rows, every tiled type, ties at the largest (the first wins, within a thread's
    batch of groups and across threads) and a NaN output (numpy's argmax gives the first NaN). Q6_K and more than 16
    rows are refused."""
    from mightylm.compress.gguf_blocks import BLOCKS, tile_blocks

    torch.manual_seed(4)
    lib, out, n_in = kernels.gemv_library(), 16 * 300, 64  # 300 tiles: 150 a thread, in batches of 64, 64, 22
    isa(kernel_path)
    for ggml_type in (8, 2, 3, 6):
        size = BLOCKS[ggml_type][1]
        raw = torch.randint(0, 256, (out, n_in // 32, size), dtype=torch.uint8)
        scales = (torch.rand(out, n_in // 32, 2) / 50).half().view(torch.uint8).view(out, n_in // 32, 4)
        raw[..., :4 if ggml_type == 3 else 2] = scales[..., :4 if ggml_type == 3 else 2]
        tiles = tile_blocks(raw.view(out, -1), ggml_type)
        for rows in (1, 2, 3, 5, 8, 9, 16):
            x = torch.randn(rows, n_in)
            logits = ops.matmul_ggml(x, tiles, ggml_type, out, None, activations="int8")
            assert _greedy(lib, x, tiles, ggml_type, out) == logits.numpy().argmax(-1).tolist(), (ggml_type, rows)
    raw = torch.randint(0, 256, (out, n_in // 32, 34), dtype=torch.uint8)  # Q8_0: codes below 100, d 0.01 or less
    raw[..., 2:] %= 100
    raw[..., :2] = (torch.rand(out, n_in // 32, 1) / 100).half().view(torch.uint8)
    for row in (1000, 1010, 3000):  # the same largest output in three rows: 1000 and 1010 in one batch of groups
        raw[row, :, 2:], raw[row, :, :2] = 100, torch.tensor([1.0]).half().view(torch.uint8)
    x = torch.rand(3, n_in) + 0.5  # positive: rows 1000, 1010 and 3000 the largest
    logits = ops.matmul_ggml(x, tile_blocks(raw.view(out, -1), 8), 8, out, None, activations="int8")
    assert bool((logits[:, 1000] == logits[:, 3000]).all()) and _greedy(lib, x, tile_blocks(raw.view(out, -1), 8),
                                                                        8, out) == [1000] * 3
    raw[2500, 0, :2] = torch.tensor([float("nan")]).half().view(torch.uint8)  # one output NaN: it wins
    raw[4000, 0, :2] = torch.tensor([float("nan")]).half().view(torch.uint8)
    tiles = tile_blocks(raw.view(out, -1), 8)
    logits = ops.matmul_ggml(x, tiles, 8, out, None, activations="int8")
    assert logits[:, 2500].isnan().all() and logits.numpy().argmax(-1).tolist() == [2500] * 3
    assert _greedy(lib, x, tiles, 8, out) == [2500] * 3
    assert _greedy(lib, torch.randn(17, n_in), tiles, 8, out) is None  # more rows than a pass has: refused
    q6 = tile_blocks(torch.randint(0, 256, (out, 210), dtype=torch.uint8), 14)
    assert _greedy(lib, torch.randn(1, 256), q6, 14, out) is None


LIMBS_TOP = 127 * (255 * 255 + 255 + 1)  # gguf_blocks.c: a block's largest |x| becomes this integer


def _random_blocks(ggml_type: int, out: int, n_in: int) -> torch.Tensor:
    """Random stored rows (out, row bytes) of a block type, with small fp16 scales (Q6_K: super-blocks of 256)."""
    from mightylm.compress.gguf_blocks import BLOCKS

    per, size = BLOCKS[ggml_type]
    raw = torch.randint(0, 256, (out, n_in // per, size), dtype=torch.uint8)
    at = {3: slice(0, 4), 14: slice(208, 210)}.get(ggml_type, slice(0, 2))  # d (and Q4_1's m) in fp16
    raw[..., at] = (torch.rand(out, n_in // per, (at.stop - at.start) // 2) / 50).half().view(torch.uint8)
    return raw.view(out, -1)


@pytest.mark.parametrize("ggml_type, n_in", [(8, 576), (2, 576), (3, 576), (6, 576), (2, 544), (3, 544), (14, 512)],
                         ids=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_0-odd", "Q4_1-odd", "Q6_K"])
def test_int24_activation_products_are_float32_products(kernel_path, ggml_type, n_in):
    """matmul_ggml(activations="int24"): each row of x written in three int8 limbs of 24 bits per block, through the
    int8 tiles, on each path: within float32 rounding of the float64 product of the dequantized weights (at most a
    few units of 2^-24 of sum |w| times each value's block maximum; F.linear's float32 error is of the same size), a
    thousand times closer than int8 activations; every row of several exactly what it gets alone; the same bits on
    every path."""
    from mightylm.compress.gguf_blocks import dequantize_blocks, tile_blocks

    torch.manual_seed(1)
    out = 304
    raw = _random_blocks(ggml_type, out, n_in)
    tiles = tile_blocks(raw, ggml_type)
    w = dequantize_blocks(raw, ggml_type, (out, n_in)).double()
    x = torch.randn(11, n_in)
    x[0, 64:96] = 0  # a block of zeros
    x[1, 5] = 300.0  # an outlier: its block's other values keep 24 bits of it
    x[2] *= torch.logspace(-6, 6, n_in)  # blocks of every size
    x[3, :32] = 1e-25  # a block below 2^-64 counts as zeros
    bias = torch.randn(out)
    got = ops.matmul_ggml(x, tiles, ggml_type, out, bias, activations="int24")
    x[3, :32] = 0  # what the product took them for (below, held to the same bound)
    exact = x.double() @ w.T + bias.double()
    block_max = x.abs().reshape(11, -1, 32).amax(-1).repeat_interleave(32, -1).double()
    bound = 2.0 ** -24 * (block_max @ w.abs().T + bias.abs().double())
    error = (got.double() - exact).abs()
    assert (error <= 4 * bound).all(), f"{float((error / bound).max()):.2f} units of the bound"
    float32 = (F.linear(x, w.float(), bias).double() - exact).abs().max()
    int8 = (ops.matmul_ggml(x, tiles, ggml_type, out, bias, activations="int8").double() - exact).abs().max()
    assert error.max() < 16 * float32 and error.max() < int8 / 1000  # ours up to 2.6x F.linear's here
    x[3, :32] = 1e-25
    alone = torch.cat([ops.matmul_ggml(r[None], tiles, ggml_type, out, bias, activations="int24") for r in x])
    assert torch.equal(alone, got)  # 33 limb rows: passes of 8 and a last of 1
    kernels.set_kernel_isa("avx2")
    assert torch.equal(ops.matmul_ggml(x, tiles, ggml_type, out, bias, activations="int24"), got)


def test_int24_activations_write_every_integer_exactly(kernel_path):
    """Integer activations whose block maximum is LIMBS_TOP are their own 24-bit values (dx = 1): through Q8_0
    identity weights the product returns every integer of -LIMBS_TOP .. LIMBS_TOP bit for bit (each one's three
    digits right, whatever the rounded reciprocals in the kernel do). A block holding a NaN or an infinity makes NaN
    of every output, as in float arithmetic."""
    from mightylm.compress.gguf_blocks import tile_blocks

    n = 64
    raw = torch.zeros(n, n // 32, 34, dtype=torch.uint8)
    for i in range(n):  # row i: d = 1, q = 1 at column i
        raw[i, i // 32, :2] = torch.tensor([1.0]).half().view(torch.uint8)
        raw[i, i // 32, 2 + i % 32] = 1
    tiles = tile_blocks(raw.view(n, -1), 8)
    every = torch.arange(-LIMBS_TOP, LIMBS_TOP + 1, dtype=torch.int32)
    every = torch.cat([every, torch.zeros(-len(every) % 31, dtype=torch.int32)]).view(-1, 31)
    x = torch.cat([torch.full((len(every), 1), LIMBS_TOP, dtype=torch.int32), every], dim=1)  # dx = 1 in each block
    x = x.float().view(-1, n)  # integers below 2^24: exact
    for part in x.split(len(x) // 4):
        assert torch.equal(ops.matmul_ggml(part, tiles, 8, n, None, activations="int24"), part)
    x = x[:3].clone()
    x[0, 3], x[1, 40] = float("nan"), float("inf")
    got = ops.matmul_ggml(x, tiles, 8, n, None, activations="int24")
    assert got[:2].isnan().all() and torch.equal(got[2], x[2])


@pytest.mark.parametrize("out, n_in", [(37, 64), (576, 1536), (1536, 576), (100, 1024)])
def test_every_kernel_path_agrees_with_pytorch(kernel_path, out, n_in):
    """The float32, int8 and GGUF-block products of each instruction-set path (AVX2 baseline, AVX-512 + VNNI, and
    AVX-512 emulated where the CPU lacks it) against PyTorch; each row of a GGUF-block product of several rows the
    bits it gets alone."""
    path = kernel_path
    assert kernels.kernel_isa() == path
    torch.manual_seed(0)
    x, w, b = torch.randn(1, n_in), torch.randn(out, n_in), torch.randn(out)
    input_major = w.t().contiguous().t()  # (out, in) view of an (in, out) row-major tensor: the decode layout
    torch.testing.assert_close(ops.linear(x, input_major, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    if n_in % 32 == 0:
        q = torch.randint(-127, 128, (out, n_in), dtype=torch.int8)
        scale = torch.rand(out) / 100
        expected = F.linear(x, q.float() * scale[:, None], b)
        got = ops.gemv_int8(x, q, scale, b)
        # the kernel rounds x to int16 (relative 1.5e-5 of max|x|): the error grows with the row's length
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(scale.max()) * n_in ** 0.5 * 127)
        from mightylm.compress.gguf_blocks import BLOCKS, dequantize_blocks

        def rows_alone(xs, raw, ggml_type, got):  # every row of a pass (a speculative step's, a server's batch)
            assert all(torch.equal(got[r], ops.matmul_ggml(xs[r:r + 1], raw, ggml_type, out, b)[0])  # as it is
                       for r in range(len(xs)))  # alone, bit for bit: int8 activations after it round the same

        def rows_and_products(raw, ggml_type, w):  # a lookup's rows value for value the dequantizer's (w); products
            some = torch.tensor([0, out - 1, 3 % out])  # of 1 row (streaming the blocks) and several (sharing each
            assert torch.equal(ops.ggml_rows(raw, ggml_type, some, n_in), w[some])  # block's unpacking)
            for rows in (1, 3, 5, 15):
                xs = torch.randn(rows, n_in)
                expected = F.linear(xs, w, b)
                got = ops.matmul_ggml(xs, raw, ggml_type, out, b)
                # float32 arithmetic in another order: float rounding, nothing more
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * float(expected.abs().max()))
                rows_alone(xs, raw, ggml_type, got)

        for ggml_type in (8, 2, 3, 6):  # GGUF's Q8_0, Q4_0, Q4_1 and Q5_0 blocks as stored, with finite fp16 scales
            size = BLOCKS[ggml_type][1]
            raw = torch.randint(0, 256, (out, n_in // 32, size), dtype=torch.uint8)
            scales = (torch.rand(out, n_in // 32, 2) / 50).half().view(torch.uint8).view(out, n_in // 32, 4)
            raw[..., :4 if ggml_type == 3 else 2] = scales[..., :4 if ggml_type == 3 else 2]
            raw = raw.view(out, -1)
            rows_and_products(raw, ggml_type, dequantize_blocks(raw, ggml_type, (out, n_in)))
        if n_in % 256 == 0:  # Q6_K, a K-quant: super-blocks of 256 (6-bit codes, int8 scales per 16, fp16 d)
            raw = torch.randint(0, 256, (out, n_in // 256, 210), dtype=torch.uint8)
            raw[..., 208:] = (torch.rand(out, n_in // 256, 1) / 500).half().view(torch.uint8)
            raw = raw.view(out, -1)
            rows_and_products(raw, 14, dequantize_blocks(raw, 14, (out, n_in)))
        if n_in % 256 == 0:  # Q4_K: super-blocks of 256 (fp16 d and dmin, 6-bit scales and mins per 32, 4-bit codes)
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            raw = torch.randint(0, 256, (out, n_in // 256, 144), dtype=torch.uint8)
            raw[..., :4] = (torch.rand(out, n_in // 256, 2) / 50).half().view(torch.uint8).view(out, n_in // 256, 4)
            raw = raw.view(out, -1)
            rows_and_products(raw, 12, torch.from_numpy(dequantize(raw.numpy(), GGMLQuantizationType.Q4_K))
                              .reshape(out, n_in))  # against gguf's dequantizer
        for ggml_type, dtype in ((1, torch.float16), (30, torch.bfloat16)):  # F16 / BF16 rows as stored
            raw = (torch.randn(out, n_in) / 10).to(dtype).view(torch.uint8)  # (out, 2 in) bytes
            for rows in (1, 15):
                xs = torch.randn(rows, n_in)
                expected = F.linear(xs, dequantize_blocks(raw, ggml_type, (out, n_in)), b)
                got = ops.matmul_ggml(xs, raw, ggml_type, out, b)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * float(expected.abs().max()))
                rows_alone(xs, raw, ggml_type, got)


def _fields_against_stored(raw, kind: int, w, n_in: int, rng):
    """Products of raw's rows (ggml `kind`) in our layout (kernels.as_fields, read back by from_fields) for 1 to 17
    rows of x, with a bias: within float32 rounding of the float64 weights w, and each row of a pass the bits it
    gets alone."""
    import numpy as np

    lib, out = kernels.gemv_library(), raw.shape[0]
    fields, bias = kernels.as_fields(raw, kind), rng.standard_normal(out).astype(np.float32)
    assert np.array_equal(kernels.from_fields(fields, kind, n_in), raw)  # read back byte for byte

    def product(x):
        y = np.empty((len(x), out), np.float32)
        lib.mighty_gemm_ggml(x.ctypes.data, len(x), fields.ctypes.data, kernels.FIELDS[kind], bias.ctypes.data,
                             y.ctypes.data, n_in, out, 2)
        return y

    for rows in (1, 2, 3, 8, 9, 17):
        x = rng.standard_normal((rows, n_in)).astype(np.float32)
        got = product(x)
        expected = x.astype(np.float64) @ w.T + bias
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6 * np.abs(expected).max())
        assert all(np.array_equal(got[r], product(x[r:r + 1])[0]) for r in range(rows))
    return fields


@pytest.mark.parametrize("n_in", [32, 64, 96, 160, 896])  # 1, 2, 3, 5, 28 blocks: runs of 3 and every tail
def test_q5_0_fields_multiply_as_the_stored_q5_0_blocks(kernel_path, n_in):
    """Q5_0 rows in q5_0_fields.c's layout (lite's Q5_0 on AVX2): products within float32 rounding of the dequantized
    weights for 1 to 17 rows of x and odd or even output rows, with a bias, each row of a pass the bits it gets
    alone."""
    import numpy as np

    rng = np.random.default_rng(n_in)
    for out in (1, 6, 7):
        raw = rng.integers(0, 256, (out, n_in // 32, 22), dtype=np.uint8)
        raw[..., :2] = rng.uniform(0.001, 0.05, (out, n_in // 32, 1)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(out, -1)
        q8 = kernels.as_q8_0(raw, 6).reshape(out, -1, 34)  # d and the codes q - 16, exactly (as_q8_0 is tested)
        w = (q8[..., :2].copy().view(np.float16).astype(np.float64) * q8[..., 2:].view(np.int8)).reshape(out, n_in)
        fields = _fields_against_stored(raw, 6, w, n_in, rng)
        blocks, tail = divmod(n_in // 32, 3)
        assert fields.shape == (out, 70 * blocks + {0: 0, 1: 34, 2: 68}[tail])  # 70 bytes a run of 3 blocks (Q5_0: 66)


@pytest.mark.parametrize("n_in", [256, 768])
def test_q6_k_fields_multiply_as_the_stored_q6_k_blocks(kernel_path, n_in):
    """Q6_K rows in q6_k_fields.c's layout (lite's Q6_K on AVX2): products within float32 rounding of gguf's
    dequantized weights for 1 to 17 rows of x and odd or even output rows, with a bias, each row of a pass the bits
    it gets alone."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(n_in)
    for out in (1, 6, 7):
        raw = rng.integers(0, 256, (out, n_in // 256, 210), dtype=np.uint8)
        raw[..., 208:] = rng.uniform(0.0001, 0.002, (out, n_in // 256, 1)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(out, -1)
        w = dequantize(raw, GGMLQuantizationType.Q6_K).reshape(out, n_in).astype(np.float64)
        fields = _fields_against_stored(raw, 14, w, n_in, rng)
        assert fields.shape == (out, n_in // 256 * 242)  # 7 vectors of five 6-bit fields + scales and d (stored 210)


@pytest.mark.parametrize("n_in", [32, 64, 96, 128, 160, 576])  # 1, 2, 3, 4, 5, 18 blocks: groups of 4 and every tail
@pytest.mark.parametrize("kind", [2, 3], ids=["Q4_0", "Q4_1"])
def test_q4_fields_multiply_as_the_stored_q4_blocks(kernel_path, kind, n_in):
    """Q4_0 / Q4_1 rows in q4_fields.c's layout (lite's and the torch path's on AVX-512): the same bytes reordered
    within each row, read back byte for byte; products within float32 rounding of the dequantized weights for 1 to
    17 rows of x and odd or even output rows, with a bias, each row of a pass the bits it gets alone, on every kernel
    path."""
    import numpy as np

    rng = np.random.default_rng(n_in + kind)
    head = 2 if kind == 2 else 4
    for out in (1, 6, 7):
        raw = rng.integers(0, 256, (out, n_in // 32, head + 16), dtype=np.uint8)
        d = rng.uniform(0.001, 0.05, (out, n_in // 32, 1)).astype(np.float16)
        raw[..., :2] = d.view(np.uint8)
        m = rng.uniform(-0.5, 0.0, (out, n_in // 32, 1)).astype(np.float16)
        if kind == 3:
            raw[..., 2:4] = m.view(np.uint8)
        q = np.concatenate([raw[..., head:] & 15, raw[..., head:] >> 4], axis=-1).astype(np.float64)  # (out, nb, 32)
        w = d.astype(np.float64) * (q - 8) if kind == 2 else d.astype(np.float64) * q + m.astype(np.float64)
        raw = raw.reshape(out, -1)
        fields = _fields_against_stored(raw, kind, w.reshape(out, n_in), n_in, rng)
        assert fields.shape == raw.shape and not np.array_equal(fields, raw)


@needs_kernel
def test_the_vector_exp_is_within_two_ulp_of_libm():
    """The native block's softmax and SiLU take e^x eight at a time (gemv.c's exp8): within 2 ulp of torch.exp
    over float32's range (tails of fewer than eight included), and what it does past the range."""
    lib = kernels.gemv_library()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-87.0, 88.0, 200_003), torch.randn(10_007, generator=g) * 5,
                   torch.tensor([0.0, -0.0, 1e-8, -1e-8, 0.5 * 0.6931472, -0.5 * 0.6931472])])
    y = x.clone()
    lib.mighty_exp(y.data_ptr(), y.numel())
    ulp = (y.double() - x.double().exp()).abs() / torch.finfo(torch.float32).eps / x.double().exp()
    assert float(ulp.max()) <= 2.0, float(ulp.max())
    edges = torch.tensor([-1000.0, -100.0, 100.0, float("-inf"), float("nan")])
    lib.mighty_exp(edges.data_ptr(), edges.numel())
    assert edges[4].isnan()  # a diverged model's NaN is not hidden
    assert float(edges[0]) < 2e-38 and float(edges[1]) < 2e-38 and float(edges[3]) < 2e-38  # ~0: a softmax weight
    assert 1e38 < float(edges[2]) < float("inf")



@needs_kernel
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 8), (4097,), (4, 256, 1536)])
def test_swiglu_and_its_gradient_match_pytorchs(shape):
    """Training's silu(gate) * up (kernels.ops.swiglu): the value and both gradients as PyTorch's two ops give them,
    tails of fewer than eight values and several threads' chunks included, and large |gate| (the exp's clamp)."""
    g = torch.Generator().manual_seed(len(shape))
    gate = (torch.randn(shape, generator=g) * 4).requires_grad_()
    with torch.no_grad():
        gate.view(-1)[:3] = torch.tensor([-120.0, 95.0, 0.0])[: gate.numel()]
    up = torch.randn(shape, generator=g).requires_grad_()
    dh = torch.randn(shape, generator=g)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        h = ops.swiglu(gate, up)
        assert h.grad_fn is not None and "SwiGLU" in type(h.grad_fn).__name__  # the kernel ran
        ours = torch.autograd.grad(h, (gate, up), dh)
        want = F.silu(gate) * up
        theirs = torch.autograd.grad(want, (gate, up), dh)
        torch.testing.assert_close(h, want, atol=1e-6, rtol=1e-5)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # inference keeps PyTorch's ops (bit for bit)
        assert torch.equal(ops.swiglu(gate, up), F.silu(gate) * up)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 13), (4, 256, 576)])  # tails of fewer than 8 values, SmolLM2's rows
def test_rms_norm_and_its_gradients_match_pytorchs(shape):
    """Training's RMSNorm (kernels.ops.rms_norm): the value and the gradients of x and of the weight (trained, as in
    full fine-tuning, or frozen, as under LoRA: none asked) as F.rms_norm gives them, on one and two threads."""
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    dy = torch.randn(shape, generator=g)
    for trained in (True, False):
        w = (torch.rand(shape[-1], generator=g) + 0.5).requires_grad_(trained)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = ops.rms_norm(x, w, 1e-5)
            assert "RMSNorm" in type(y.grad_fn).__name__  # the kernel ran
            want = F.rms_norm(x, shape[-1:], w, 1e-5)
            torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)
            inputs = (x, w) if trained else (x,)
            ours, theirs = torch.autograd.grad(y, inputs, dy), torch.autograd.grad(want, inputs, dy)
            torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-4)
            if trained:  # a sum over every row, in another order: float32 rounding of up to 1,024 terms of ~1
                torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # inference keeps PyTorch's op (bit for bit)
        assert torch.equal(ops.rms_norm(x, w, 1e-5), F.rms_norm(x, shape[-1:], w, 1e-5))


@needs_kernel
def test_fit_trains_swiglu_through_the_kernel_with_pytorchs_gradients(tmp_path):
    """train.fit hands the model's feed-forwards and norms the kernels: one step's loss and gradients equal PyTorch's
    ops'."""
    import mightylm
    from mightylm.config import ModelConfig
    from mightylm.data.loader import Loader
    from mightylm.train import TrainConfig, _native_activations, fit

    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    torch.manual_seed(0)
    model = mightylm.Transformer(config)
    idx = torch.randint(0, 64, (2, 17))

    def gradients():
        model.zero_grad()
        model(idx[:, :-1], labels=idx[:, 1:]).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    _native_activations(model)
    assert all(m.act_mul is ops.swiglu for m in model.modules() if isinstance(m, mightylm.model.MLP))
    assert model.softmax_grad is ops.softmax_cross_entropy_  # the loss's softmax step too
    assert all(m.normalize is ops.rms_norm for m in model.modules() if isinstance(m, mightylm.model.RMSNorm))
    for a, b in zip(gradients(), plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    fresh = mightylm.Transformer(config)
    items = [{"input_ids": idx[i, :-1], "labels": idx[i, 1:]} for i in range(2)]
    fit(fresh, Loader(items, 2, shuffle=False), tmp_path, TrainConfig(steps=1, batch_size=2, eval_every=10**9,
                                                                      save_every=10**9), progress=False)
    assert all(m.act_mul is ops.swiglu for m in fresh.modules() if isinstance(m, mightylm.model.MLP))


@needs_kernel
@pytest.mark.parametrize("rows,vocab", [(1, 7), (5, 200), (33, 49152)])  # tails of fewer than 8 and 16 values
def test_softmax_cross_entropy_turns_logits_into_the_gradient_of_their_loss(rows, vocab):
    """The loss's step over a chunk (kernels/cross_entropy.c): the summed cross-entropy and, in place, scale * (softmax
    - one-hot), as log_softmax gives them in float64; large logits (no overflow: the row's maximum comes off first)
    and several threads; it declines (None, nothing written) what it cannot take."""
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=g) * 6
    logits[0, :3] = torch.tensor([80.0, -90.0, 79.0])[: vocab]
    labels = torch.randint(0, vocab, (rows,), generator=g)
    logp = torch.log_softmax(logits.double(), -1)
    want_loss = -logp.gather(1, labels[:, None]).sum()
    want_grad = logp.exp()
    want_grad[torch.arange(rows), labels] -= 1
    for threads in (1, 2):
        torch.set_num_threads(threads)
        got = logits.clone()
        loss = ops.softmax_cross_entropy_(got, labels, 0.25)
        assert loss.dtype == torch.float32 and loss.shape == ()
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.double(), 0.25 * want_grad, rtol=1e-5, atol=1e-8)
    bad = labels.clone()
    bad[-1] = vocab
    for args in ((logits.clone(), bad), (logits.double(), labels), (logits.t(), labels[:1].expand(vocab))):
        before = args[0].clone()
        assert ops.softmax_cross_entropy_(*args, 1.0) is None and torch.equal(args[0], before)


@needs_kernel
def test_the_loss_through_the_softmax_kernel_equals_pytorchs():
    """linear_cross_entropy with the kernel's step (one buffer, chunks twice as many rows): the loss and both
    gradients as logits then F.cross_entropy, some rows unscored; a bad label still gets PyTorch's error."""
    from mightylm.model import IGNORE_INDEX, linear_cross_entropy

    torch.manual_seed(3)
    h = torch.randn(50, 32, requires_grad=True)
    w = torch.randn(256, 32, requires_grad=True)
    labels = torch.randint(0, 256, (50,))
    labels[::4] = IGNORE_INDEX
    expected = F.cross_entropy(h @ w.T, labels, ignore_index=IGNORE_INDEX)
    want = torch.autograd.grad(expected * 1.5, (h, w))
    workspace = {}
    loss = linear_cross_entropy(h, w, labels, 256 * 8, workspace, ops.softmax_cross_entropy_)
    assert workspace["chunks"][0].shape == (16, 256) and workspace["chunks"][1] is None  # one buffer of 2 x 8 rows
    torch.testing.assert_close(loss, expected)
    for got, ref in zip(torch.autograd.grad(loss * 1.5, (h, w)), want):
        torch.testing.assert_close(got, ref)
    labels[1] = 256
    with pytest.raises((IndexError, RuntimeError)):
        linear_cross_entropy(h, w, labels, 256 * 8, None, ops.softmax_cross_entropy_)


def _attention_reference(q, keys, values, seen):
    """softmax(q k / sqrt(hd)) v in float64 for one query over the slots `seen` of its kv head"""
    scores = keys[seen].double() @ q.double() / q.numel() ** 0.5  # (keys and values widened from their dtype)
    return torch.softmax(scores, 0) @ values[seen].double()


@needs_kernel
@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (4, 4, 16), (6, 2, 12), (2, 1, 80), (4, 2, 128)])
@pytest.mark.parametrize("rows,pos", [(1, 0), (1, 37), (3, 200), (5, 1000), (16, 130)])
@pytest.mark.parametrize("cache", [torch.float32, torch.float16])
def test_attention_over_the_cache_equals_softmax_attention(nh, nkv, hd, rows, pos, cache, kernel_path):
    """The native block's attention (kernels/attention.c: the queries of a kv head's group and of every row of a
    pass scored together, a sequence's slots split into stretches combined at the end) gives each row the softmax
    attention of its own head over slots 0 .. its own, for 1, 2 and 3 threads, with the same bits whatever the
    threads and whether the row comes alone or in a pass (greedy speculation relies on it); and in a server's batch
    (pads) each sequence sees only its own cache from its first slot, a padding slot only itself, with the bits of
    the sequence alone. A float16 cache: the same against the float16 keys and values widened. On each kernel path,
    with the AVX2 path's bits (AVX-512 weighs the values 16 columns a register, in the same order)."""
    lib = kernels.gemv_library()
    g = torch.Generator().manual_seed(nh * hd + rows + pos)
    max_len, q_out, kv_out = pos + rows + 3, nh * hd, nkv * hd
    qkv_out, group = q_out + 2 * kv_out, nh // nkv
    qkv = torch.randn(rows, qkv_out, generator=g)
    keys, values = (torch.randn(2, nkv, max_len, hd, generator=g) * 2).to(cache)

    def attend(qkv, keys, values, pos, rows, threads=2, seq_rows=1, pads=None):
        att = torch.full((rows, q_out), float("nan"))
        lib.mighty_attention(qkv.data_ptr(), qkv_out, att.data_ptr(), keys.data_ptr(), values.data_ptr(),
                             cache == torch.float16, nh, nkv, hd, keys.shape[-2], pos, rows, seq_rows,
                             None if pads is None else pads.data_ptr(), nkv * keys.shape[-2] * hd, threads)
        return att

    att = attend(qkv, keys, values, pos, rows, threads=1)
    for r in range(rows):
        for h in range(nh):
            expected = _attention_reference(qkv[r, h * hd:(h + 1) * hd], keys[h // group], values[h // group],
                                            slice(0, pos + r + 1))
            torch.testing.assert_close(att[r, h * hd:(h + 1) * hd].double(), expected, atol=2e-5, rtol=1e-4)
        assert torch.equal(attend(qkv[r:r + 1], keys, values, pos + r, 1), att[r:r + 1])  # alone
    for threads in (2, 3):
        assert torch.equal(attend(qkv, keys, values, pos, rows, threads), att)
    if kernel_path != "avx2":
        kernels.set_kernel_isa("avx2")
        assert torch.equal(attend(qkv, keys, values, pos, rows), att)
        kernels.set_kernel_isa(kernel_path)
    # a batch: 3 sequences of `rows` tokens each at slots pos.., left-padded up to pads[s]
    seqs = 3
    pads = torch.tensor([0, pos // 2, pos + rows // 2], dtype=torch.long)
    qkv = torch.randn(seqs * rows, qkv_out, generator=g)
    keys, values = torch.randn(2, seqs, nkv, max_len, hd, generator=g).to(cache)
    att = attend(qkv, keys, values, pos, seqs * rows, seq_rows=rows, pads=pads)
    for s in range(seqs):
        for i in range(rows):
            slot, r = pos + i, s * rows + i
            seen = slice(slot, slot + 1) if slot < pads[s] else slice(int(pads[s]), slot + 1)
            for h in range(nh):
                expected = _attention_reference(qkv[r, h * hd:(h + 1) * hd], keys[s, h // group],
                                                values[s, h // group], seen)
                torch.testing.assert_close(att[r, h * hd:(h + 1) * hd].double(), expected, atol=2e-5, rtol=1e-4)
    # the middle sequence alone, its slots from 0 (its first real slot), equals its rows in the batch
    first = int(pads[1])
    alone = attend(qkv[rows:2 * rows], keys[1, :, first:].contiguous(), values[1, :, first:].contiguous(), pos - first,
                   rows)
    assert torch.equal(alone, att[rows:2 * rows])

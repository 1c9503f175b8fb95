"""Weight-only expert quantization (runtime.quantize): error bounds, packing, bytes, the axis of each layout."""
import pytest
import torch

from runtime.families.arch import ExpertFormat
from runtime.quantize import (INT4, INT8, SCHEMES, QuantizedWeight, dequantize, dequantize_expert, expert_matrices,
                              expert_packed_bytes, packed_bytes, quantize, quantize_expert)

SHAPES = [(64, 256), (48, 48), (32, 16), (5, 2)]      # partial last groups, a row shorter than a group


def _per_column(scale: torch.Tensor, scheme, cols: int) -> torch.Tensor:
    return scale.float() if scheme.group is None else scale.float().repeat_interleave(scheme.group, 1)[:, :cols]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_error_is_within_half_a_step(scheme, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, shape[0])[:, None]
    m = quantize(w, scheme)
    back = dequantize(m, scheme, torch.float32)
    assert back.shape == w.shape and back.dtype == torch.float32
    step = _per_column(m.scale, scheme, shape[1])                                     # [out, in]
    assert ((w - back).abs() <= step / 2 * (1 + 1e-5)).all()
    assert m.scale.dtype == scheme.scale_dtype and m.scale.shape == (shape[0], scheme.groups(shape[1]))
    rel = (w - back).norm() / w.norm()
    assert rel < (0.01 if scheme.bits == 8 else 0.15)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_representable_weights_are_exact_and_bytes_add_up(scheme):
    # codes in -qmax..qmax, each scale group holding +-qmax once, scales powers of two: w == q * scale exactly
    g = torch.Generator().manual_seed(1)
    rows, cols = 16, 96
    q = torch.randint(-scheme.qmax, scheme.qmax + 1, (rows, cols), generator=g)
    size = scheme.group or cols
    q[:, ::size] = scheme.qmax
    scale = 2.0 ** torch.randint(-8, 2, (rows, scheme.groups(cols)), generator=g).float()
    w = q.float() * _per_column(scale, scheme, cols)
    m = quantize(w, scheme)
    assert torch.equal(m.scale.float(), scale)
    assert torch.equal(dequantize(m, scheme, torch.float32), w)
    assert torch.equal(dequantize(m, scheme, torch.bfloat16), w.to(torch.bfloat16))
    assert m.q.nbytes + m.scale.nbytes == packed_bytes((rows, cols), scheme)


def test_int4_nibble_layout_and_int8_codes():
    w = torch.tensor([[-7.0, 7.0, 0.0, 1.0]])
    m = quantize(w, INT4)                       # scale = 7 / 7 = 1; codes + 8 = 1, 15, 8, 9; column 2j low nibble
    assert m.q.dtype == torch.uint8 and m.q.tolist() == [[0xF1, 0x98]]
    m8 = quantize(torch.tensor([[-127.0, 63.0, 0.5, 1.5]]), INT8)
    assert m8.q.dtype == torch.int8 and m8.q.tolist() == [[-127, 63, 0, 2]]       # round half to even


def test_zero_weights_and_odd_int4_rows():
    m = quantize(torch.zeros(3, 64), INT4)
    assert (m.scale == 1).all() and torch.equal(dequantize(m, INT4, torch.float32), torch.zeros(3, 64))
    with pytest.raises(ValueError, match="odd"):
        quantize(torch.ones(2, 33), INT4)


def test_bytes_of_the_fixture_expert():
    # gate_up [512, 256] + down [256, 256]; int4: half a byte a weight + one fp16 scale per 32 inputs
    fmt = ExpertFormat("glu", hidden=256, intermediate=256)
    assert expert_packed_bytes(fmt, INT4, torch.bfloat16) == 768 * 128 + 768 * 8 * 2
    assert expert_packed_bytes(fmt, INT8, torch.bfloat16) == 768 * 256 + 768 * 2


@pytest.mark.parametrize("kind", ["glu", "gptoss"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_expert_layouts_quantize_along_the_input_dimension(kind, scheme):
    """Output channels of very different magnitudes: per-output-channel scales keep every channel's relative error
    small; quantizing along the wrong axis would drown the small channels."""
    fmt = ExpertFormat(kind, hidden=64, intermediate=32)
    g = torch.Generator().manual_seed(2)
    w = {k: torch.randn(*s, generator=g) for k, s in fmt.shapes().items()}
    for name, transposed in expert_matrices(fmt).items():
        out_dim = 1 if transposed else 0
        mag = torch.logspace(-4, 0, w[name].shape[out_dim])
        w[name] = w[name] * (mag[None, :] if transposed else mag[:, None])
    packed = quantize_expert(w, fmt, scheme)
    assert sum(t.nbytes for t in packed.values()) == expert_packed_bytes(fmt, scheme, torch.float32)
    back = dequantize_expert(packed, fmt, scheme, torch.float32)
    assert {k: tuple(v.shape) for k, v in back.items()} == fmt.shapes()
    for name, transposed in expert_matrices(fmt).items():
        a, b = (w[name].t(), back[name].t()) if transposed else (w[name], back[name])   # [out, in]
        rel = (a - b).norm(dim=1) / a.norm(dim=1)                                          # per output channel
        assert rel.max() < (0.01 if scheme.bits == 8 else 0.2), (name, float(rel.max()))
    for bias in set(w) - set(expert_matrices(fmt)):
        assert torch.equal(back[bias], w[bias])


def test_quantized_weight_is_plain_tensors_that_fit_a_preallocated_slot():
    w = torch.randn(32, 64)
    m = quantize(w, INT4)
    slot = QuantizedWeight(torch.empty_like(m.q), torch.empty_like(m.scale))    # a cache slot, allocated once
    slot.q.copy_(m.q)
    slot.scale.copy_(m.scale)
    assert torch.equal(dequantize(slot, INT4, torch.float32), dequantize(m, INT4, torch.float32))


def test_int4_whole_groups_dequantize_as_the_formula():
    """The whole-group fast path is the module docstring's W' = q x scale (float32, rounded once), column by column."""
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(3))
    qw = quantize(w, INT4)
    codes = torch.empty(24, 96, dtype=torch.int8)
    codes[:, 0::2] = (qw.q & 0x0F).to(torch.int8) - 8
    codes[:, 1::2] = (qw.q >> 4).to(torch.int8) - 8
    want = codes.float() * qw.scale.float().repeat_interleave(INT4.group, dim=1)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize(qw, INT4, dtype), want.to(dtype))


@pytest.mark.parametrize("scheme", [INT8, INT4])
@pytest.mark.parametrize("shape", [(512, 256), (64, 32), (48, 96)])
def test_kernels_compute_what_the_dequantized_matrix_computes(scheme, shape):
    """x @ W'^T from the codes (torch's CPU weight-only kernels) equals F.linear with the dequantized matrix, to
    bf16 rounding (the kernel sums in float32 with bf16-rounded scales); exactly in float32 on the identity."""
    from runtime.quantize import KernelMatrix, kernel_fits, to_tiles

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(5, shape[1], generator=g).to(torch.bfloat16)
    m = quantize(w, scheme)
    assert kernel_fits(shape, scheme)
    km = KernelMatrix(to_tiles(m.q, shape[1]) if scheme.bits == 4 else m.q, m.scale, scheme)
    deq = dequantize(m, scheme, torch.float32)                                       # [out, in]
    assert torch.equal(km.linear(torch.eye(shape[1])), deq.t())
    want = x.double() @ deq.double().t()
    got = km.linear(x)
    assert got.dtype == torch.bfloat16 and got.shape == (5, shape[0])
    assert (got.double() - want).abs().max() <= 0.02 * want.abs().max()


def test_kernel_shapes():
    from runtime.quantize import kernel_fits

    assert kernel_fits((24, 40), INT8)
    assert not kernel_fits((24, 64), INT4)          # output channels: a multiple of 16
    assert not kernel_fits((32, 48), INT4)          # input columns: whole groups of 32

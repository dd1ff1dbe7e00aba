"""util.fast_quant against bitsandbytes' own quantizers: every output tensor must be bitwise identical."""

import bitsandbytes.functional as bnbF
import pytest
import torch

from util import fast_quant
from util import quant as quant_mod
from util.fast_quant import int8_rowwise, quantize_4bit_blocks
from util.quant import QUANT_MODES, quantize_4bit_chunked, quantize_8bit_chunked

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
QTYPES = ["nf4", "fp4"]


def _bnb_4bit(x, quant_type, blocksize=64):
    return torch.ops.bitsandbytes.quantize_4bit.default(x, blocksize, quant_type, torch.uint8)


def _assert_4bit_same(x, quant_type, blocksize=64):
    ref_packed, ref_absmax = _bnb_4bit(x, quant_type, blocksize)
    packed, absmax = quantize_4bit_blocks(x, blocksize, quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert absmax.dtype == torch.float32 and absmax.shape == ref_absmax.shape
    assert torch.equal(absmax, ref_absmax)  # NaN-free inputs only here
    mismatch = (packed != ref_packed).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} bytes differ, first at {mismatch[:4].flatten().tolist()}"


def _specials(n, dtype, seed):
    """Random weights plus zeros, -0.0, an all-zero block, huge and tiny values."""
    torch.manual_seed(seed)
    x = torch.randn(n) * 0.05
    if n >= 200:
        x[:5] = 0.0
        x[5] = -0.0
        x[64:128] = 0.0  # an all-zero block
        x[130] = torch.finfo(dtype).max / 2  # huge: every other value of its block scales to ~0
        x[140] = -torch.finfo(dtype).max
        x[150] = 1e-8
    if n >= 256:
        x[192:256] = torch.finfo(dtype).tiny * torch.arange(64)  # a block of tiny values
    if n >= 320:
        x[256:320] = 1e-41 * torch.arange(64)  # fp32 / bf16 denormals: absmax < 1e-38, bnb clamps it (fp16: zeros)
    return x.to(dtype)


def _unit_blocks(values, blocksize=64):
    """Place fp32 `values` in blocks whose absmax is exactly 1.0 (scale factor 1: values reach the code unchanged)."""
    per = blocksize - 1
    pad = (-values.numel()) % per
    v = torch.cat([values, torch.zeros(pad)]).view(-1, per)
    ones = torch.ones(v.shape[0], 1)
    ones[1::2] = -1.0
    return torch.cat([ones, v], dim=1).reshape(-1)


def _midpoints(quant_type):
    code = bnbF.get_4bit_type(quant_type, device="cpu")
    s = torch.sort(code).values
    return (s[:-1] + s[1:]) / 2


def _neighbours(x, k):
    """x and its k nearest fp32 neighbours on each side."""
    out = [x]
    lo = hi = x
    for _ in range(k):
        lo = torch.nextafter(lo, torch.full_like(lo, -2.0))
        hi = torch.nextafter(hi, torch.full_like(hi, 2.0))
        out += [lo, hi]
    return torch.cat(out)


@pytest.mark.parametrize("quant_type", QTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 127, 128, 130, 200, 1000, 4096 * 3 + 17])
def test_4bit_sizes_and_special_values(quant_type, dtype, n):
    _assert_4bit_same(_specials(n, dtype, seed=n), quant_type)


@pytest.mark.parametrize("quant_type", QTYPES)
@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_4bit_other_blocksizes(quant_type, blocksize):
    _assert_4bit_same(_specials(3 * blocksize + 5, torch.bfloat16, seed=blocksize), quant_type, blocksize)


@pytest.mark.parametrize("quant_type", QTYPES)
def test_4bit_exact_midpoints_and_their_neighbours(quant_type):
    # Scale 1: the fp32 inputs are the scaled values; ties must go to the lower code, as bucketize does.
    mids = _midpoints(quant_type)
    values = _neighbours(torch.cat([mids, -mids, torch.tensor([0.0, -0.0, 1.0, -1.0])]), 40).clamp(-1, 1)
    _assert_4bit_same(_unit_blocks(values), quant_type)
    _assert_4bit_same(_unit_blocks(values)[:-7], quant_type)  # ... also in a trailing partial block (divides)


@pytest.mark.parametrize("quant_type", QTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_4bit_midpoints_under_a_non_trivial_scale(quant_type, dtype):
    # Block absmax a != 1: inputs whose scaled value x * fp32(1 / a) lands on, or next to, a midpoint.
    torch.manual_seed(1)
    mids = torch.cat([_midpoints(quant_type), -_midpoints(quant_type)])
    blocks = []
    for a in torch.rand(12) * 3 + 0.01:
        a = a.to(dtype).float()
        inv = 1.0 / a
        cand = _neighbours(mids / inv, 30 if dtype == torch.float32 else 0).to(dtype).float()
        hits = cand[((cand * inv) - mids.repeat(cand.numel() // mids.numel())).abs() < 1e-3]
        blocks.append(torch.cat([a.view(1), hits.clamp(-a, a)]))
    x = torch.cat([_unit_pad(b) for b in blocks]).to(dtype)
    _assert_4bit_same(x, quant_type)


@pytest.mark.parametrize("quant_type", QTYPES)
def test_4bit_fp16_input_exactly_on_an_nf4_midpoint(quant_type):
    # Found by search: fp16 x = 0.29443359375 in a block of absmax 0.482177734375 scales to an nf4 midpoint exactly.
    a, x = 0.482177734375, 0.29443359375
    assert float(torch.tensor(x) * (1.0 / torch.tensor(a))) in _midpoints("nf4").abs().tolist()
    block = torch.tensor([a, x, -x] * 21 + [x]).to(torch.float16)
    _assert_4bit_same(block, quant_type)
    _assert_4bit_same(block[:33], quant_type)  # as a trailing partial block (division instead of the reciprocal)


def _unit_pad(block, blocksize=64):
    """Split `block` (first element = the absmax) into blocks of `blocksize` that each start with the absmax."""
    a, rest = block[:1], block[1:]
    per = blocksize - 1
    rest = torch.cat([rest, torch.zeros((-rest.numel()) % per)]).view(-1, per)
    return torch.cat([a.expand(rest.shape[0], 1), rest], dim=1).reshape(-1)


@pytest.mark.parametrize("quant_type", QTYPES)
def test_4bit_every_16bit_bucket_end(quant_type):
    # Both ends of every 65536-value bucket the lookup table is built on (all of them within [-1, 1]).
    keys = torch.arange(0, 0x3F81, dtype=torch.int32)
    ends = torch.cat([keys << 16, (keys << 16) | 0xFFFF, (keys << 16) | 0x8000]).view(torch.float32)
    ends = ends[ends.abs() <= 1]
    _assert_4bit_same(_unit_blocks(torch.cat([ends, -ends])), quant_type)


@pytest.mark.parametrize("quant_type", QTYPES)
def test_4bit_every_bf16_value(quant_type):
    # All finite bf16 values: with absmax 1 (scale exact) and with absmax 3 (scale rounds).
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    every = every[torch.isfinite(every)]
    unit = _unit_blocks(every[every.abs() <= 1]).to(torch.bfloat16)
    _assert_4bit_same(unit, quant_type)
    three = _unit_pad(torch.cat([torch.tensor([3.0]), every[every.abs() <= 3]])).to(torch.bfloat16)
    _assert_4bit_same(three, quant_type)


@pytest.mark.parametrize("quant_type", QTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_4bit_inf_and_nan(quant_type, dtype):
    # Not weights anyone should have, but the bits must still agree: a block with inf scales to NaN and 0.
    x = _specials(256 + 33, dtype, seed=3).float()
    x[10], x[70], x[140], x[260] = float("inf"), float("-inf"), float("nan"), float("inf")
    x = x.to(dtype)
    ref_packed, ref_absmax = _bnb_4bit(x, quant_type)
    packed, absmax = quantize_4bit_blocks(x, 64, quant_type)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax.nan_to_num(), ref_absmax.nan_to_num()) and torch.equal(absmax.isnan(), ref_absmax.isnan())


@pytest.mark.parametrize("quant_type", QTYPES)
def test_4bit_step_boundaries_and_out_arguments(monkeypatch, quant_type):
    monkeypatch.setattr(fast_quant, "STEP_ELEMENTS", 256)  # many steps, a ragged last step, then a partial block
    x = _specials(256 * 5 + 64 * 2 + 11, torch.bfloat16, seed=5)
    ref_packed, ref_absmax = _bnb_4bit(x, quant_type)
    packed = torch.full_like(ref_packed, 0xAA)
    absmax = torch.full_like(ref_absmax, -1.0)
    got = quantize_4bit_blocks(x, 64, quant_type, out=packed, absmax_out=absmax)
    assert got[0] is packed and got[1] is absmax
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)


@pytest.mark.parametrize("quant_type", QTYPES)
def test_4bit_medium_random_tensor(quant_type):
    torch.manual_seed(0)
    _assert_4bit_same((torch.randn(512, 4096) * 0.02).to(torch.bfloat16), quant_type)


def _assert_chunked_4bit_same(w, spec):
    ref_packed, ref = bnbF.quantize_4bit(
        w, blocksize=64, compress_statistics=spec.compress_statistics, quant_type=spec.quant_type
    )
    packed, state = quantize_4bit_chunked(w, spec, device=torch.device("cpu"), dtype=w.dtype)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.code, ref.code)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == (ref.shape, ref.dtype, 64, ref.quant_type)
    if spec.compress_statistics:
        assert torch.equal(state.offset, ref.offset)
        assert torch.equal(state.state2.absmax, ref.state2.absmax) and torch.equal(state.state2.code, ref.state2.code)
        assert state.state2.blocksize == ref.state2.blocksize
    else:
        assert state.offset is None and ref.offset is None


@pytest.mark.parametrize("mode", ["4bit", "4bit_fp4"])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (1, 100), (3, 7), (65, 33), (37, 300)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_4bit_matches_whole_tensor_bitsandbytes(monkeypatch, mode, compress, shape, dtype):
    monkeypatch.setattr(quant_mod, "CHUNK_ELEMENTS", 256)  # rows not a multiple of the chunk
    monkeypatch.setattr(fast_quant, "STEP_ELEMENTS", 128)  # several steps per chunk, shared by the workers
    base = QUANT_MODES[mode]
    w = _specials(shape[0] * shape[1], dtype, seed=shape[0]).view(shape)
    _assert_chunked_4bit_same(w, type(base)(base.name, 4, base.quant_type, compress))


def test_chunked_4bit_medium_random_tensor():
    torch.manual_seed(0)
    _assert_chunked_4bit_same((torch.randn(512, 4096) * 0.02).to(torch.bfloat16), QUANT_MODES["4bit"])


@pytest.mark.parametrize("quant_type", QTYPES)
def test_4bit_via_rounds_like_a_cast_copy(monkeypatch, quant_type):
    monkeypatch.setattr(fast_quant, "STEP_ELEMENTS", 256)
    x = _specials(256 * 3 + 64 + 9, torch.float32, seed=9) * 1.001  # fp32 values that bf16 / fp16 must round
    for via in [(torch.bfloat16,), (torch.float16,), (torch.bfloat16, torch.float16), (torch.float32,)]:
        ref = x
        for dtype in via:
            ref = ref.to(dtype)
        ref_packed, ref_absmax = _bnb_4bit(ref, quant_type)
        packed, absmax = quantize_4bit_blocks(x, 64, quant_type, via=via)
        assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax), via


@pytest.mark.parametrize("mode", ["4bit", "4bit_fp4"])
def test_chunked_4bit_from_an_fp32_checkpoint_into_a_bf16_model(monkeypatch, mode):
    monkeypatch.setattr(quant_mod, "CHUNK_ELEMENTS", 512)
    monkeypatch.setattr(fast_quant, "STEP_ELEMENTS", 256)
    spec = QUANT_MODES[mode]
    w = _specials(40 * 72, torch.bfloat16, seed=4).float().view(40, 72) * 1.001  # bf16 must round these
    ref_packed, ref = bnbF.quantize_4bit(
        w.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type=spec.quant_type
    )
    packed, state = quantize_4bit_chunked(w, spec, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert torch.equal(packed, ref_packed) and state.dtype == torch.bfloat16
    assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.state2.absmax, ref.state2.absmax)
    assert torch.equal(state.offset, ref.offset)


def _int8_inputs(rows, cols, seed):
    torch.manual_seed(seed)
    a = torch.randn(rows, cols) * 0.05
    if rows >= 3 and cols >= 4:
        a[1] = 0.0  # an all-zero row: 127 / 0 = inf, 0 * inf = NaN -> 0
        a[0, :3] = torch.tensor([-0.0, 65504.0, 1e-7])
        a[2, 1] = -65504.0
    return a.to(torch.float16)


@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (3, 5), (37, 100), (5, 4096), (300, 999)])
def test_int8_rowwise_matches_bitsandbytes(monkeypatch, shape):
    monkeypatch.setattr(fast_quant, "STEP_ELEMENTS", 2048)  # several steps
    a = _int8_inputs(*shape, seed=shape[1])
    ref_cb, ref_scb, _ = bnbF.int8_vectorwise_quant(a.clone())
    cb, scb = int8_rowwise(a)
    assert cb.dtype == torch.int8 and scb.dtype == torch.float32
    assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)


def test_int8_rowwise_ties_and_inf():
    # Values whose scaled value is exactly k + 0.5 (round half to even) and a row holding inf.
    a = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 0.0], [float("inf"), 1.0, -2.0, 0, 0, 0, 0, 0]])
    a = a.to(torch.float16)
    ref_cb, ref_scb, _ = bnbF.int8_vectorwise_quant(a.clone())
    cb, scb = int8_rowwise(a)
    assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", [None, torch.bfloat16])
def test_chunked_8bit_matches_bitsandbytes(monkeypatch, dtype, model_dtype):
    monkeypatch.setattr(quant_mod, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(fast_quant, "STEP_ELEMENTS", 300)
    w = (_int8_inputs(70, 130, seed=7).float() * 1.001).to(dtype)  # values bf16 and fp16 must round
    ref_cb, ref_scb, _ = bnbF.int8_vectorwise_quant(w.to(model_dtype or dtype).to(torch.float16))
    cb, scb = quantize_8bit_chunked(w, device=torch.device("cpu"), dtype=model_dtype)
    assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)


def test_probe_agrees_with_this_bitsandbytes_and_leaves_the_global_rng_alone(monkeypatch):
    # util.quant takes the fast path only where the probe agrees; it must here, or the tests above prove nothing.
    monkeypatch.setattr(fast_quant, "_agreement", {})
    state = torch.get_rng_state()
    assert all(fast_quant.agrees_with_bitsandbytes(kind) for kind in ("nf4", "fp4", "int8"))
    assert torch.equal(torch.get_rng_state(), state)


def test_falls_back_to_bitsandbytes_where_the_probe_disagrees(monkeypatch):
    monkeypatch.setattr(fast_quant, "_agreement", {"nf4": False, "int8": False})

    def unused(*args, **kwargs):
        raise AssertionError("fast path taken")

    monkeypatch.setattr(quant_mod, "quantize_4bit_blocks", unused)
    monkeypatch.setattr(quant_mod, "int8_rowwise", unused)
    w = _specials(64 * 10, torch.bfloat16, seed=2).view(10, 64)
    _assert_chunked_4bit_same(w, QUANT_MODES["4bit"])
    ref_cb, ref_scb, _ = bnbF.int8_vectorwise_quant(w.to(torch.float16))
    cb, scb = quantize_8bit_chunked(w, device=torch.device("cpu"))
    assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)


def test_independent_of_the_default_dtype(monkeypatch):
    monkeypatch.setattr(fast_quant, "_tables", {})  # tables and probe built while the default dtype is float64
    monkeypatch.setattr(fast_quant, "_agreement", {})
    w = _specials(64 * 9 + 5, torch.bfloat16, seed=6).view(1, -1)
    torch.set_default_dtype(torch.float64)
    try:
        _assert_chunked_4bit_same(w, QUANT_MODES["4bit"])
        _assert_4bit_same(w, "fp4")
        ref_cb, ref_scb, _ = bnbF.int8_vectorwise_quant(w.to(torch.float16))
        cb, scb = quantize_8bit_chunked(w, device=torch.device("cpu"))
        assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", QTYPES)
def test_4bit_same_bits_on_cuda_as_on_cpu(quant_type):
    x = _specials(4096 * 8 + 17, torch.bfloat16, seed=11)
    cpu = quantize_4bit_blocks(x, 64, quant_type)
    gpu = quantize_4bit_blocks(x.cuda(), 64, quant_type)
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])

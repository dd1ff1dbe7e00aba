import re
import resource

import pytest
import torch
from torch import nn

from model.layers import RotaryEmbedding
from model.llama import Transformer
from tests.helpers import params_of, tiny_args, write_tiny_checkpoint
from util import lazy_init
from util.build import build_model
from util.checkpoint import CheckpointError, open_checkpoint, write_meta_checkpoint
from util.lazy_init import materialize_and_load, meta_init, real_init
from util.quant import QuantLinear, quantize_model


def _meta_model(args=None, dtype=torch.float32, quant=None):
    with meta_init(dtype):
        model = Transformer(args or tiny_args())
    return quantize_model(model, quant)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def garbage(monkeypatch):
    """Fresh storage arrives full of NaN / random bytes, as uninitialized memory may."""
    fills = iter(range(1000))

    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if dtype.is_floating_point:
            return t.fill_(float("nan") if next(fills) % 2 else 1e30)
        return t.random_()

    monkeypatch.setattr(lazy_init, "_empty", alloc)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    args, sd = write_tiny_checkpoint(path, seed=3)
    return args, sd, path


def test_meta_build_has_no_storage():
    model = _meta_model()
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors)


def test_meta_init_restores_default_state_even_on_error():
    before = (torch.get_default_dtype(), torch.get_default_device())
    with pytest.raises(RuntimeError, match="boom"), meta_init(torch.bfloat16):
        assert torch.empty(1).is_meta and torch.get_default_dtype() == torch.bfloat16
        raise RuntimeError("boom")
    assert (torch.get_default_dtype(), torch.get_default_device()) == before
    assert not torch.empty(1).is_meta


def test_real_init_builds_real_modules_inside_meta_init():
    with meta_init(torch.bfloat16):
        lazy = nn.Linear(4, 4)
        with real_init():
            real = nn.Linear(4, 4)
        after = nn.Linear(4, 4)
        with pytest.raises(ValueError), real_init():  # restored even when the constructor raises
            raise ValueError("backbone failed")
        assert torch.empty(1).is_meta and torch.get_default_dtype() == torch.bfloat16
    assert lazy.weight.is_meta and after.weight.is_meta
    assert not real.weight.is_meta and real.weight.dtype == torch.float32


def test_init_is_seeded_and_no_tensor_escapes_init(garbage):
    a, b, c = _meta_model(), _meta_model(), _meta_model()
    ra = materialize_and_load(a, None, seed=5)
    materialize_and_load(b, None, seed=5)
    materialize_and_load(c, None, seed=6)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert ra.initialized == len(sa) + 2 and ra.loaded == 0  # + the rope tables (not in the state dict)
    for key in sa:
        assert torch.isfinite(sa[key]).all() and torch.equal(sa[key], sb[key]), key
    assert not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])
    assert torch.equal(sa["layers.0.ffn_norm.weight"], torch.ones(tiny_args().dim))
    # the rope tables were computed, not left as garbage
    fresh = RotaryEmbedding(tiny_args().head_dim, tiny_args().max_seq_len)
    assert torch.equal(a.rope.cos, fresh.cos) and torch.equal(a.rope.sin, fresh.sin)


def test_quantized_init_is_seeded_too(garbage):
    a, b = _meta_model(quant="4bit"), _meta_model(quant="4bit")
    report = materialize_and_load(a, None, seed=5)
    materialize_and_load(b, None, seed=5)
    assert report.quantized == 7 * tiny_args().n_layers
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_init_does_not_depend_on_which_tensors_are_loaded(ckpt, tmp_path):
    # a module initialized by seed gets the same values whether or not its neighbours came from a checkpoint
    args, sd, _ = ckpt
    write_meta_checkpoint(tmp_path, {k: v for k, v in sd.items() if "layers.1." not in k}, params=params_of(args))
    full_init = _meta_model()
    materialize_and_load(full_init, None, seed=1)
    partial = _meta_model()
    report = materialize_and_load(partial, [tmp_path], seed=1, allow_missing=lambda m, key: "layers.1." in key)
    assert torch.equal(partial.layers[1].attention.wq.weight, full_init.layers[1].attention.wq.weight)
    assert torch.equal(partial.layers[0].attention.wq.weight, sd["layers.0.attention.wq.weight"])
    assert all(k.startswith("layers.1.") for k in report.missing_keys) and len(report.missing_keys) == 9


def test_real_tensors_are_left_alone():
    model = _meta_model()
    mine = torch.full((tiny_args().dim,), 3.0)
    model.norm.weight = nn.Parameter(mine)  # already real: e.g. loaded earlier, or a real backbone
    materialize_and_load(model, None, seed=0)
    assert model.norm.weight.data_ptr() == mine.data_ptr() and torch.equal(model.norm.weight, mine)


def test_module_with_a_real_tensor_keeps_it_when_reset_parameters_runs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.empty(3))
            self.b = nn.Parameter(torch.empty(3))

        def reset_parameters(self):
            nn.init.zeros_(self.a)
            nn.init.zeros_(self.b)

    with meta_init():
        m = Two()
    m.a = nn.Parameter(torch.ones(3))
    materialize_and_load(m, None)
    assert torch.equal(m.a, torch.ones(3)) and torch.equal(m.b, torch.zeros(3))


def test_module_without_reset_parameters_is_named():
    class NoInit(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.empty(2))

    with meta_init():
        model = nn.Sequential(nn.Linear(2, 2), NoInit())
    with pytest.raises(TypeError, match=r"NoInit \(1\).*scale.*reset_parameters"):
        materialize_and_load(model, None)


def test_checkpoint_values_cast_to_model_dtype_and_pages_released(ckpt, monkeypatch):
    args, sd, path = ckpt
    released = []
    reader = open_checkpoint(path)
    real_release = reader.release
    monkeypatch.setattr(reader, "release", lambda key: (released.append(key), real_release(key)))
    model = _meta_model(dtype=torch.bfloat16)
    report = materialize_and_load(model, [reader])
    assert sorted(released) == sorted(sd) and report.loaded == len(sd)
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert torch.equal(model.layers[0].attention.wq.weight, sd["layers.0.attention.wq.weight"].bfloat16())
    assert report.model_bytes == sum(v.numel() * 2 for v in sd.values()) + 2 * 4 * (
        args.max_seq_len * args.head_dim // 2
    )
    # the peak of this materialization, in bytes: about what the process holds now (the model is alive; the interpreter
    # may have touched a few more pages since, CI saw one 4 KiB page), at most the process's lifetime peak
    # (tests/util/test_memory_bounds.py bounds the growth itself). The kernel's RSS counters are cached per CPU, so
    # two readings of them differ by some pages (seen: 4 and 32 KiB). A unit slip (kB vs bytes) is off by 1000x.
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/status") as f:
        rss_now = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert rss_now - 2**20 <= report.peak_rss <= lifetime_peak + 2**20


@pytest.mark.parametrize("quant", ["4bit", "4bit_fp4", "8bit"])
def test_lazy_quantized_equals_eager_quantized_bitwise(ckpt, quant):
    args, sd, path = ckpt
    lazy, report = build_model(args, [path], quant=quant, dtype=torch.bfloat16)
    assert report.quantized == 7 * args.n_layers and report.loaded == len(sd)
    torch.set_default_dtype(torch.bfloat16)
    try:
        eager = Transformer(args)
    finally:
        torch.set_default_dtype(torch.float32)
    eager.load_state_dict(sd)
    quantize_model(eager, quant)
    tokens = torch.randint(0, args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lazy(tokens), eager(tokens))
    assert sum(isinstance(m, QuantLinear) for m in lazy.modules()) == 7 * args.n_layers


def test_vocab_size_minus_one_is_filled_from_the_checkpoint(ckpt):
    args, sd, path = ckpt
    model, _ = build_model(args.replace(vocab_size=-1), [path], dtype=torch.float32)
    assert model.args.vocab_size == sd["tok_embeddings.weight"].shape[0]


def test_later_checkpoint_wins(ckpt, tmp_path):
    args, sd, path = ckpt
    delta = {"norm.weight": torch.full_like(sd["norm.weight"], 0.5)}
    write_meta_checkpoint(tmp_path, delta, params=params_of(args))
    model, report = build_model(args, [path, tmp_path], dtype=torch.float32)
    assert torch.equal(model.norm.weight, delta["norm.weight"])
    assert torch.equal(model.output.weight, sd["output.weight"]) and report.loaded == len(sd)


# --- bad input: each a clear error naming the culprit ---
def test_missing_keys_are_listed(ckpt, tmp_path):
    args, sd, _ = ckpt
    partial = {k: v for k, v in sd.items() if k != "layers.1.feed_forward.w2.weight"}
    write_meta_checkpoint(tmp_path, partial, params=params_of(args))
    with pytest.raises(KeyError, match=r"layers\.1\.feed_forward\.w2\.weight"):
        build_model(args, [tmp_path], dtype=torch.float32)


def test_extra_keys_are_listed_and_rope_freqs_ignored(ckpt, tmp_path):
    args, sd, _ = ckpt
    extra = dict(sd, **{"layers.7.attention.wq.weight": sd["layers.0.attention.wq.weight"]})
    extra["rope.freqs"] = torch.ones(args.head_dim // 2)  # Meta's checkpoints carry it; we compute our own
    write_meta_checkpoint(tmp_path, extra, params=params_of(args))
    with pytest.raises(KeyError, match=r"layers\.7\.attention\.wq\.weight") as e:
        build_model(args, [tmp_path], dtype=torch.float32)
    assert "rope.freqs" not in str(e.value)
    _, report = build_model(args, [tmp_path], dtype=torch.float32, strict=False)
    assert report.unexpected_keys == ["layers.7.attention.wq.weight"] and report.ignored_keys == ["rope.freqs"]


def test_wrong_shape_names_key_file_expected_and_got(ckpt, tmp_path):
    args, sd, _ = ckpt
    write_meta_checkpoint(tmp_path, sd, params=params_of(args))
    with pytest.raises(
        ValueError, match=r"'tok_embeddings\.weight' in .*consolidated\.00\.pth.*\[512, 128\].*\[512, 64\]"
    ):
        build_model(args.replace(dim=128, n_heads=8, n_kv_heads=4), [tmp_path], dtype=torch.float32)


@pytest.mark.parametrize("problem", ["shape", "missing", "unexpected"])
def test_a_checkpoint_that_fails_validation_allocates_nothing(ckpt, tmp_path, monkeypatch, problem):
    # Every check runs before the first allocation: a mistake in the last layer costs no memory and no time.
    args, sd, _ = ckpt
    last = f"layers.{args.n_layers - 1}.feed_forward.w2.weight"
    bad, named = dict(sd), last
    if problem == "shape":
        bad[last] = sd[last][:, :-1].clone()
    elif problem == "missing":
        del bad[last]
    else:
        named = "layers.9.feed_forward.w2.weight"
        bad[named] = sd[last]
    write_meta_checkpoint(tmp_path, bad, params=params_of(args))
    allocated = []
    monkeypatch.setattr(lazy_init, "_empty", lambda *a: allocated.append(a) or torch.empty(*a))
    model = _meta_model(args, quant="4bit")
    with pytest.raises((ValueError, KeyError), match=re.escape(named)):
        materialize_and_load(model, [tmp_path])
    assert allocated == [] and all(t.is_meta for t in model.state_dict().values())


def test_nan_in_checkpoint_is_caught(ckpt, tmp_path):
    args, sd, _ = ckpt
    bad = dict(sd)
    bad["norm.weight"] = sd["norm.weight"].clone()
    bad["norm.weight"][3] = float("nan")
    write_meta_checkpoint(tmp_path, bad, params=params_of(args))
    with pytest.raises(ValueError, match=r"norm\.weight.*NaN"):
        build_model(args, [tmp_path], dtype=torch.float32)


def test_truncated_checkpoint_is_a_clear_error(ckpt, tmp_path):
    args, sd, path = ckpt
    data = (path / "consolidated.00.pth").read_bytes()
    (tmp_path / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "params.json").write_text((path / "params.json").read_text())
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        build_model(args, [tmp_path], dtype=torch.float32)

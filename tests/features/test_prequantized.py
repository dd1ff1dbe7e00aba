"""Pre-quantized checkpoints: quantize once (save_quantized), then load the packed weights as they are."""

import json
import shutil

import pytest
import safetensors.torch
import torch

from model.args import ModelArgs
from model.llama import Transformer
from tests.helpers import params_of, random_state_dict, tiny_args, write_tiny_checkpoint
from tests.multiprocess import run_multiprocess
from util import quant as quant_mod
from util.build import build_model
from util.checkpoint import CheckpointError, open_checkpoint, save_quantized, write_meta_checkpoint
from util.dist import init_distributed
from util.lazy_init import materialize_and_load, meta_init
from util.quant import QuantLinear, QuantSpec, quantize_model

TOKENS = torch.randint(0, tiny_args().vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
ADAPTERS = dict(lora_rank=4, lora_alpha=8.0, adapter_len=2, adapter_layers=1, bias_tuning=True)
N_QUANT = 7 * tiny_args().n_layers  # wq wk wv wo w1 w2 w3 per block (the output head is on the block list)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp")
    write_tiny_checkpoint(path, seed=5)
    return path


def _perturb_trainables(model, seed=1):
    """Adapters start as exact no-ops; make them matter, so a round trip that lost them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


def _logits(model):
    with torch.no_grad():
        return model.eval()(TOKENS)


def _packed(model):
    return {
        f"{n}.{k}": v.clone()
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for k, v in m.packed_tensors().items()
    }


@pytest.fixture(scope="module")
def nf4_dir(ckpt, tmp_path_factory):
    model, _ = build_model(None, [ckpt], quant="4bit")
    out = tmp_path_factory.mktemp("nf4")
    save_quantized(model, out)
    return out, _logits(model)


@pytest.mark.parametrize("adapters", [False, True], ids=["base", "lora+adapter+bias"])
@pytest.mark.parametrize("quant", ["4bit", "4bit_fp4", "8bit"])
def test_round_trip_is_bitwise_and_quantizes_nothing(ckpt, tmp_path, monkeypatch, quant, adapters):
    args = tiny_args(**ADAPTERS) if adapters else tiny_args()
    built, built_report = build_model(args, [ckpt], quant=quant)
    assert built_report.quantized == N_QUANT
    if adapters:
        _perturb_trainables(built)
    save_quantized(built, tmp_path)
    expected, packed = _logits(built), _packed(built)

    def refuse(*a, **k):
        raise AssertionError("a pre-quantized load must not quantize")

    monkeypatch.setattr(QuantLinear, "quantize_weight_", refuse)
    loaded, report = build_model(None, [tmp_path], quant=quant)  # config (with the adapters) from params.json
    assert report.quantized == 0 and report.prequantized == N_QUANT
    assert bool(built_report.missing_keys) == adapters  # the adapters were initialized, now they are loaded
    assert report.loaded == built_report.loaded + len(built_report.missing_keys)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert torch.equal(_logits(loaded), expected)
    got = _packed(loaded)
    assert got.keys() == packed.keys() and all(torch.equal(got[k], packed[k]) for k in packed)
    for m in loaded.modules():
        if isinstance(m, QuantLinear):  # its own storage, not a view into the mapped file
            data = m.weight.data
            assert data.untyped_storage().nbytes() == data.numel() * data.element_size()
            assert not m.weight.requires_grad
    trainable = sorted(n for n, p in loaded.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in built.named_parameters() if p.requires_grad)
    if adapters:  # the loaded model trains: gradients reach the adapters through the packed base
        loaded.train()
        loaded(TOKENS).float().square().mean().backward()
        assert all(
            p.grad is not None and torch.isfinite(p.grad).all() for n, p in loaded.named_parameters() if p.requires_grad
        )


def test_files_and_recorded_settings(nf4_dir, ckpt):
    out, _ = nf4_dir
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.safetensors", "lazyllama.json", "params.json"]
    index = json.loads((out / "lazyllama.json").read_text())
    q = index["quantization"]
    assert {k: q[k] for k in ("mode", "bits", "quant_type", "blocksize", "compress_statistics")} == {
        "mode": "4bit",
        "bits": 4,
        "quant_type": "nf4",
        "blocksize": 64,
        "compress_statistics": True,
    }
    assert q["model_parallel_size"] == 1 and q["nested_blocksize"] == 256 and q["dtype"] == "bfloat16"
    wq, wo = q["weights"]["layers.0.attention.wq.weight"], q["weights"]["layers.1.attention.wo.weight"]
    assert (wq["shard_dim"], wo["shard_dim"]) == (0, 1) and wq["shape"] == [64, 64]
    assert wq["tensors"] == ["packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset"]
    assert len(q["weights"]) == N_QUANT
    built_args = ModelArgs.from_dict(params_of(tiny_args()))  # the config the model was built with
    assert json.loads((out / "params.json").read_text()) == built_args.to_dict()
    # plain safetensors: the library reads it; the packed weight replaces the full-precision one
    sd = safetensors.torch.load_file(out / "consolidated.00.safetensors")
    assert "layers.0.attention.wq.weight" not in sd and "output.weight" in sd
    assert sd["layers.0.attention.wq.weight.packed"].dtype == torch.uint8
    assert sd["layers.0.attention.wq.weight.absmax"].dtype == torch.uint8  # double-quantized
    assert sd["layers.0.attention.wq.weight.nested_offset"].shape == (1,)
    with safetensors.safe_open(out / "consolidated.00.safetensors", "pt") as f:
        assert json.loads(f.metadata()["quantization"]) == q  # every rank file describes itself
    reader = open_checkpoint(out)
    assert reader.quantization == q
    reader.close()
    assert open_checkpoint(ckpt).quantization is None


def test_load_releases_every_page_it_read(nf4_dir, monkeypatch):
    out, expected = nf4_dir
    reader = open_checkpoint(out)
    released = []
    real = reader.release
    monkeypatch.setattr(reader, "release", lambda key: (released.append(key), real(key)))
    with meta_init(torch.bfloat16):
        model = Transformer(tiny_args())
    quantize_model(model, "4bit")
    report = materialize_and_load(model, [reader])
    assert sorted(released) == sorted(reader.keys()) and report.quantized == 0
    assert torch.equal(_logits(model), expected)
    reader.close()


def test_base_only_save_leaves_adapters_out(ckpt, tmp_path):
    args = tiny_args(**ADAPTERS)
    model, _ = build_model(args, [ckpt], quant="4bit")
    _perturb_trainables(model)
    save_quantized(model, tmp_path, adapters=False)
    keys = open_checkpoint(tmp_path).keys()
    assert not [k for k in keys if "lora" in k or "adapter" in k or "bias_tune" in k]
    # Built with the adapters again: they are initialized (exact no-ops), the base is the saved one.
    adapted, report = build_model(None, [tmp_path], quant="4bit")
    assert (
        report.quantized == 0
        and report.missing_keys
        and all("lora" in k or "adapter" in k or "bias_tune" in k for k in report.missing_keys)
    )
    base, _ = build_model(tiny_args(), [ckpt], quant="4bit")
    assert torch.equal(_logits(adapted), _logits(base))


def test_bf16_packed_weights_load_into_an_fp32_model(nf4_dir):
    out, _ = nf4_dir
    bf16, _ = build_model(None, [out], quant="4bit")
    fp32, report = build_model(None, [out], quant="4bit", dtype=torch.float32)
    assert report.quantized == 0
    a, b = bf16.layers[0].feed_forward.w2, fp32.layers[0].feed_forward.w2
    assert b.dequantized_weight().dtype == torch.float32
    assert torch.equal(a.dequantized_weight(), b.dequantized_weight().bfloat16())  # the same 4-bit values


@pytest.mark.parametrize("quant", ["4bit", "4bit_fp4", "8bit"])
def test_our_quantizer_builds_the_model_bitsandbytes_builds(ckpt, monkeypatch, quant):
    kind = {"4bit": "nf4", "4bit_fp4": "fp4", "8bit": "int8"}[quant]
    assert quant_mod._fast_quant_on(torch.device("cpu"), kind)  # else this would compare bitsandbytes with itself
    ours, _ = build_model(None, [ckpt], quant=quant)
    monkeypatch.setattr(quant_mod, "_fast_quant_on", lambda device, kind: False)
    reference, _ = build_model(None, [ckpt], quant=quant)
    packed, ref_packed = _packed(ours), _packed(reference)
    assert all(torch.equal(packed[k], ref_packed[k]) for k in ref_packed)
    assert torch.equal(_logits(ours), _logits(reference))


# --- bad input: clear errors saying what to do ---
@pytest.mark.parametrize(
    "asked, pattern",
    [
        ("4bit_fp4", r"asks for 4bit_fp4 \(fp4, blocksize 64"),
        ("8bit", r"asks for 8bit at"),
        (None, r"asks for no quantization \(--quant none\)"),
    ],
)
def test_other_quant_mode_than_saved(nf4_dir, asked, pattern):
    out, _ = nf4_dir
    saved = r"saved as 4bit \(nf4, blocksize 64, double-quantized absmax\) at model-parallel size 1"
    with pytest.raises(ValueError, match=saved) as e:
        build_model(None, [out], quant=asked)
    assert e.match(pattern) and e.match(r"Build with --quant 4bit .* or re-quantize from the full-precision")


@pytest.mark.parametrize(
    "saved_spec, pattern",
    [
        (QuantSpec("4bit", 4, "nf4", True, 128), r"saved as 4bit \(nf4, blocksize 128,.*QuantSpec\(.*blocksize=128"),
        (QuantSpec("4bit", 4, "nf4", False), r"saved as 4bit \(nf4, blocksize 64, plain absmax\)"),
    ],
    ids=["blocksize", "compress_statistics"],
)
def test_other_blocksize_or_statistics_than_saved(ckpt, tmp_path, saved_spec, pattern):
    model, _ = build_model(None, [ckpt], quant=saved_spec)
    save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match=pattern):
        build_model(None, [tmp_path], quant="4bit")
    loaded, report = build_model(None, [tmp_path], quant=saved_spec)  # the same settings load
    assert report.quantized == 0 and torch.equal(_logits(loaded), _logits(model))


def test_truncated_prequantized_file_names_the_file(nf4_dir, tmp_path):
    out, _ = nf4_dir
    shutil.copytree(out, tmp_path / "cut")
    f = tmp_path / "cut" / "consolidated.00.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.safetensors.*truncated"):
        build_model(None, [tmp_path / "cut"], quant="4bit")


def test_other_block_list_than_saved(ckpt, tmp_path):
    model, _ = build_model(None, [ckpt], quant="4bit", block_list=())  # the output head quantized too
    save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match=r"output\.weight is stored pre-quantized .*block list"):
        build_model(None, [tmp_path], quant="4bit")


def test_saving_an_unquantized_model_is_refused(ckpt, tmp_path):
    model, _ = build_model(None, [ckpt])
    with pytest.raises(CheckpointError, match=r"no quantized linear layers.*save_model"):
        save_quantized(model, tmp_path)


def test_later_full_precision_checkpoint_wins_over_packed(nf4_dir, tmp_path):
    out, nf4_logits = nf4_dir
    write_tiny_checkpoint(tmp_path, seed=11)  # other weights than the ones the packed checkpoint was made from
    model, report = build_model(None, [out, tmp_path], quant="4bit")  # later wins: quantized from tmp_path
    assert report.quantized == N_QUANT and report.prequantized == 0 and report.unexpected_keys == []
    alone, _ = build_model(None, [tmp_path], quant="4bit")
    assert _packed(model).keys() == _packed(alone).keys()
    for key, value in _packed(alone).items():
        assert torch.equal(_packed(model)[key], value), key
    assert torch.equal(_logits(model), _logits(alone)) and not torch.allclose(_logits(model), nf4_logits)


# --- model parallel: one spawn, two processes ---
def _mp_worker(rank, ckpt, out_dirs):
    import torch.distributed as dist

    init_distributed(model_parallel_size=2)
    results = {}
    for (quant, adapters), out in zip([("4bit", False), ("4bit_fp4", True), ("8bit", False)], out_dirs):
        args = tiny_args(**ADAPTERS) if adapters else tiny_args()
        built, _ = build_model(args, [ckpt], quant=quant)
        if adapters:
            _perturb_trainables(built)  # same seed on every rank: replicated tensors stay identical
        save_quantized(built, out)
        dist.barrier()  # every rank's file is written before anyone reads
        loaded, report = build_model(None, [out], quant=quant)
        results[quant] = (_logits(built), _logits(loaded), report.quantized, report.prequantized)
    return results


def test_model_parallel_2_round_trip_and_size_mismatch(ckpt, tmp_path):
    outs = [tmp_path / name for name in ("nf4", "fp4_adapters", "int8")]
    r0, r1 = run_multiprocess(_mp_worker, 2, ckpt, outs)
    for quant in ("4bit", "4bit_fp4", "8bit"):
        built, loaded, quantized, prequantized = r0[quant]
        assert torch.equal(loaded, built) and torch.equal(r1[quant][1], built), quant
        assert quantized == 0 and prequantized == N_QUANT and r1[quant][2] == 0
    assert sorted(p.name for p in outs[0].glob("*.safetensors")) == [
        "consolidated.00.safetensors",
        "consolidated.01.safetensors",
    ]
    assert json.loads((outs[0] / "lazyllama.json").read_text())["quantization"]["model_parallel_size"] == 2
    # at size 1 the packed rank shards cannot be used: say what to do
    mismatch = r"at model-parallel size 2; this build asks for .* at model-parallel size 1"
    with pytest.raises(ValueError, match=mismatch) as e:
        build_model(None, [outs[0]], quant="4bit")
    assert e.match(r"--quant 4bit .*and --model_parallel_size 2, or re-quantize from the full-precision checkpoint")


@pytest.mark.gpu
def test_prequantized_load_lands_on_the_gpu(nf4_dir, ckpt):
    out, _ = nf4_dir
    loaded, report = build_model(None, [out], quant="4bit", device="cuda")
    assert report.quantized == 0 and report.prequantized == N_QUANT
    assert all(t.device.type == "cuda" for t in list(loaded.parameters()) + list(loaded.buffers()))
    for m in loaded.modules():
        if isinstance(m, QuantLinear):
            assert all(t.device.type == "cuda" for t in m.packed_tensors().values())
    cpu, _ = build_model(None, [out], quant="4bit")
    got, ref = _packed(loaded), _packed(cpu)
    assert all(torch.equal(got[k].cpu(), ref[k]) for k in ref)
    built, _ = build_model(None, [ckpt], quant="4bit", device="cuda")  # bitsandbytes' CUDA quantizer
    with torch.no_grad():
        a, b = loaded.eval()(TOKENS.cuda()), built.eval()(TOKENS.cuda())
    if all(torch.equal(v.cpu(), ref[k]) for k, v in _packed(built).items()):  # same bits (test_fast_quant checks)
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


# --- CheckpointReader.read_into: the file-to-storage fast path equals read() everywhere ---
def _split_save(path, sd, world_size, dims):
    from util.checkpoint import save_checkpoint

    for rank in range(world_size):
        local = {k: v if dims[k] is None else v.chunk(world_size, dims[k])[rank] for k, v in sd.items()}
        save_checkpoint(path, local, shard_dims=dims, rank=rank, world_size=world_size)


@pytest.mark.parametrize("fmt", ["lazyllama-1", "lazyllama-2", "hf", "meta"])
def test_read_into_equals_read(tmp_path, monkeypatch, fmt):
    from util.checkpoint import meta_split_dim, write_hf_checkpoint
    from util.checkpoint import reader as ck

    args = tiny_args()
    sd = random_state_dict(args, seed=2, dtype=torch.bfloat16)
    sd["scalar"] = torch.tensor(3.0)
    dims = {k: meta_split_dim(k) for k in sd}
    if fmt.startswith("lazyllama"):
        _split_save(tmp_path, sd, int(fmt[-1]), dims)
    elif fmt == "hf":
        write_hf_checkpoint(tmp_path, {k: v for k, v in sd.items() if k != "scalar"}, params=params_of(args))
    else:
        write_meta_checkpoint(tmp_path, sd, params=params_of(args), num_shards=2)
    reader = open_checkpoint(tmp_path)
    preads = []
    real = ck._pread_into
    monkeypatch.setattr(ck, "_pread_into", lambda *a: (preads.append(a[0]), real(*a)))
    for key in sorted(reader.keys()):
        for world_size, shard_dim in [(1, None), (2, 0), (2, 1), (4, 0)]:
            if shard_dim is not None and (shard_dim >= len(sd[key].shape) or sd[key].shape[shard_dim] % world_size):
                continue
            for rank in range(world_size):
                want = reader.read(key, shard_dim=shard_dim, rank=rank, world_size=world_size)
                for dtype in (torch.bfloat16, torch.float32):  # the stored dtype (pread) and a cast (copy)
                    out = torch.full(want.shape, float("nan"), dtype=dtype)
                    reader.read_into(key, out, shard_dim=shard_dim, rank=rank, world_size=world_size)
                    assert torch.equal(out, want.to(dtype)), (key, shard_dim, rank, world_size, dtype)
    # safetensors formats read whole / dim-0 slices from the file; Meta's .pth (a zip) never does
    assert bool(preads) == (fmt != "meta")
    reader.close()


def test_read_into_reads_the_file_not_the_mapping(tmp_path, monkeypatch):
    from util.checkpoint.safetensors import SafetensorsFile

    sd = {"a": torch.randn(6, 4), "b": torch.randn(6, 4).bfloat16()}
    _split_save(tmp_path, sd, 2, {"a": 0, "b": 1})
    reader = open_checkpoint(tmp_path)

    def no_mapping(self, name):
        raise AssertionError("read_into touched the mapping")

    monkeypatch.setattr(SafetensorsFile, "tensor", no_mapping)
    out = torch.empty(3, 4)
    assert torch.equal(reader.read_into("a", out, shard_dim=0, rank=1, world_size=2), sd["a"][3:])
    full = torch.empty(6, 4)
    assert torch.equal(reader.read_into("a", full), sd["a"])  # two rank pieces, one pread each
    with pytest.raises(AssertionError, match="touched the mapping"):  # dim-1 slices are not contiguous bytes
        reader.read_into("b", torch.empty(6, 2, dtype=torch.bfloat16), shard_dim=1, rank=0, world_size=2)

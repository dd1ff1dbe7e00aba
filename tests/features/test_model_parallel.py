"""Model parallel 2 (two real processes, gloo) against model parallel 1 in this process."""

import pytest
import torch

from model.llama import Transformer
from tests.helpers import tiny_args, write_tiny_checkpoint
from tests.multiprocess import run_multiprocess
from util.build import build_model
from util.checkpoint import save_model
from util.dist import DistInfo, dp_group, init_distributed, mp_group, mp_src_rank, position
from util.lazy_init import materialize_and_load, meta_init
from util.quant import QuantLinear, quantize_model

TOKENS = torch.randint(0, tiny_args().vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def _shard_dims(model):
    dims = {}
    for mod_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            dims[f"{mod_name}.{name}" if mod_name else name] = getattr(module, "shard_dims", {}).get(name)
    return dims


def _worker(rank, ckpt, save_dir):
    info = init_distributed(model_parallel_size=2)
    assert (info.model_parallel_size, info.model_parallel_rank, info.data_parallel_size) == (2, rank, 1)
    assert position() == info and info.writes and info.is_main == (rank == 0)  # each rank writes its shard
    assert torch.distributed.get_world_size(mp_group()) == 2 and torch.distributed.get_world_size(dp_group()) == 1
    assert mp_src_rank() == 0
    args = tiny_args()
    out = {}

    # 1. a meta build at size 2 allocates nothing and holds local shapes
    with meta_init(torch.float32):
        model = Transformer(args)
    quantize_model(model, "4bit")
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.layers[0].attention.wq.weight.shape == (args.dim // 2, args.dim)
    assert model.layers[0].attention.wo.weight.shape == (args.dim, args.dim // 2)
    assert model.tok_embeddings.weight.shape == (args.vocab_size, args.dim // 2)

    # 2. seeded init: each rank's shard
    with meta_init(torch.float32):
        model = Transformer(args)
    materialize_and_load(model, None, seed=3)
    out["init"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["dims"] = _shard_dims(model)

    # 3. logits from a size-1 checkpoint, full precision and 4-bit
    fp, _ = build_model(args, [ckpt], dtype=torch.float32)
    q4, report = build_model(args, [ckpt], quant="4bit", dtype=torch.float32)
    with torch.no_grad():
        out["fp"], out["4bit"] = fp(TOKENS), q4(TOKENS)
    out["wq_packed"] = q4.layers[0].attention.wq.weight.data.clone()
    out["dequantized"] = {
        f"{name}.weight": (m.dequantized_weight().float(), m.shard_dims["weight"])
        for name, m in q4.named_modules()
        if isinstance(m, QuantLinear)
    }
    out["quantized"] = report.quantized

    # 4. save at size 2 (each rank its shard)
    save_model(fp, save_dir, config=args.to_dict())
    return out


def test_a_process_without_groups_is_rank_0_of_1():
    assert position() == DistInfo() and position().writes and position().is_main
    assert dp_group() is None and mp_group() is None and mp_src_rank() == 0
    info = init_distributed(1)
    assert info == position() and (info.world_size, info.model_parallel_size, info.data_parallel_size) == (1, 1, 1)
    assert mp_group() is not None and dp_group() is not None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mp_ckpt")
    args, sd = write_tiny_checkpoint(path, seed=4)
    return path


@pytest.fixture(scope="module")
def mp2(ckpt, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("saved_mp2")
    return run_multiprocess(_worker, 2, ckpt, save_dir), save_dir


def test_mp2_init_is_the_slices_of_mp1_init(mp2):
    (r0, r1), _ = mp2
    with meta_init(torch.float32):
        model = Transformer(tiny_args())
    materialize_and_load(model, None, seed=3)
    for key, full in model.state_dict().items():
        dim = r0["dims"][key]
        merged = r0["init"][key] if dim is None else torch.cat([r0["init"][key], r1["init"][key]], dim=dim)
        assert torch.equal(merged, full), key
        if dim is None:
            assert torch.equal(r0["init"][key], r1["init"][key]), f"replicated {key} differs across ranks"


def test_mp2_logits_equal_mp1(mp2, ckpt):
    (r0, r1), _ = mp2
    fp, _ = build_model(None, [ckpt], dtype=torch.float32)
    q4, _ = build_model(None, [ckpt], quant="4bit", dtype=torch.float32)
    with torch.no_grad():
        ref_fp, ref_4bit = fp(TOKENS), q4(TOKENS)
    assert torch.equal(r0["fp"], r1["fp"]) and torch.equal(r0["4bit"], r1["4bit"])  # every rank computes the same
    torch.testing.assert_close(r0["fp"], ref_fp, rtol=1e-5, atol=1e-5)  # only the reduction order differs
    # Column-parallel shards quantize exactly as the matching rows of the full weight (blocks do not straddle
    # ranks); row-parallel shards have their own blocks, so 4-bit logits agree within quantization noise.
    full_packed = q4.layers[0].attention.wq.weight.data
    assert torch.equal(torch.cat([r0["wq_packed"], r1["wq_packed"]]), full_packed)
    assert r0["quantized"] == 7 * tiny_args().n_layers
    noise = (ref_4bit - ref_fp).abs().max()
    assert (r0["4bit"] - ref_fp).abs().max() < 2 * noise
    # Exactly: the size-2 4-bit model computes with its dequantized shards. Put them together into a size-1
    # full-precision model: same logits up to reduction order.
    sd = dict(fp.state_dict())
    for key, (w0, dim) in r0["dequantized"].items():
        sd[key] = torch.cat([w0, r1["dequantized"][key][0]], dim=dim)
    fp.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(r0["4bit"], fp(TOKENS), rtol=1e-5, atol=1e-5)


def test_checkpoint_saved_at_mp2_loads_at_mp1(mp2, ckpt):
    (r0, _), save_dir = mp2
    from_mp2, report = build_model(None, [save_dir], dtype=torch.float32)
    original, _ = build_model(None, [ckpt], dtype=torch.float32)
    for key, value in original.state_dict().items():
        assert torch.equal(from_mp2.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(from_mp2(TOKENS), original(TOKENS))


# --- adapters under model parallel ---
LORA = dict(lora_rank=4, lora_alpha=8.0, adapter_len=2, adapter_layers=1, bias_tuning=True)


def _train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, tiny_args().vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _adapter_worker(rank, ckpt, save_dir):
    init_distributed(model_parallel_size=2)
    args = tiny_args()
    base, _ = build_model(args, [ckpt], quant="4bit", dtype=torch.float32)
    adapted, _ = build_model(args.replace(**LORA), [ckpt], quant="4bit", dtype=torch.float32)
    with torch.no_grad():
        noop = torch.equal(base(TOKENS), adapted(TOKENS))
    torch.manual_seed(0)
    model, _ = build_model(args.replace(**LORA), [ckpt], dtype=torch.float32)
    _train_steps(model)
    save_model(model, save_dir, config=args.replace(**LORA).to_dict(), trainable_only=True)
    with torch.no_grad():
        return noop, model(TOKENS)


def test_adapters_under_model_parallel(ckpt, tmp_path):
    (noop0, trained0), (noop1, trained1) = run_multiprocess(_adapter_worker, 2, ckpt, tmp_path)
    assert noop0 and noop1  # untrained LoRA + adapter + biases on a 4-bit base are exact no-ops at size 2
    cfg = tiny_args(**LORA)
    torch.manual_seed(0)
    model, _ = build_model(cfg, [ckpt], dtype=torch.float32)
    _train_steps(model)  # the same training at size 1: gradients of split and replicated tensors agree
    with torch.no_grad():
        torch.testing.assert_close(trained0, model(TOKENS), rtol=1e-4, atol=1e-4)
    reloaded, report = build_model(cfg, [ckpt, tmp_path], dtype=torch.float32)  # delta saved at 2, loaded at 1
    assert report.missing_keys == []
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS), trained0, rtol=1e-5, atol=1e-5)

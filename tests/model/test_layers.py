import torch

from model.init import meta_init
from model.layers import ColumnParallelLinear, ParallelEmbedding, RMSNorm, RotaryEmbedding, RowParallelLinear
from model.layers import parallel as par
from model.layers.parallel import init_sharded_, linear_weight_fill


def _full_init(shape, shard_dim, world_size, seed, fill):
    """Each rank's shard, generated independently, then put back together."""
    shards = []
    for rank in range(world_size):
        local = list(shape)
        if shard_dim is not None:
            local[shard_dim] //= world_size
        shards.append(
            init_sharded_(
                torch.empty(local), fill, shard_dim=shard_dim, rank=rank, world_size=world_size, base_seed=seed
            )
        )
    return torch.cat(shards, dim=shard_dim) if shard_dim is not None else shards[0]


def test_sharded_init_equals_slicing_one_full_init(monkeypatch):
    # Small blocks so that shards cut through blocks, and blocks through shards.
    monkeypatch.setattr(par, "INIT_BLOCK_ELEMENTS", 3 * 24)
    fill = linear_weight_fill(24)
    full = _full_init((40, 24), None, 1, seed=7, fill=fill)
    for ws in (2, 4, 8):
        assert torch.equal(_full_init((40, 24), 0, ws, 7, fill), full)
        assert torch.equal(_full_init((40, 24), 1, ws, 7, fill), full)
    assert not torch.equal(_full_init((40, 24), None, 1, seed=8, fill=fill), full)
    bound = 1 / 24**0.5
    assert full.abs().max() <= bound and full.std() > bound / 3  # U(-b, b), not degenerate


def test_sharded_init_never_allocates_the_full_tensor(monkeypatch):
    shapes = []
    real_empty = torch.empty

    def spy(*shape, **kw):
        t = real_empty(*shape, **kw)
        shapes.append(t.numel())
        return t

    monkeypatch.setattr(par.torch, "empty", spy)
    monkeypatch.setattr(par, "INIT_BLOCK_ELEMENTS", 64 * 16)
    local = real_empty(64, 32)  # rank 1 of 4 of a [64, 128] row-parallel weight
    init_sharded_(local, linear_weight_fill(128), shard_dim=1, rank=1, world_size=4, base_seed=3)
    assert max(shapes) <= 64 * 16 < 64 * 128


def test_meta_build_allocates_nothing():
    with meta_init(torch.bfloat16):
        layers = [ColumnParallelLinear(8, 16), RowParallelLinear(16, 8), ParallelEmbedding(10, 8), RMSNorm(8)]
        rope = RotaryEmbedding(8, 16)
    for m in layers + [rope]:
        for t in list(m.parameters()) + list(m.buffers()):
            assert t.is_meta
    assert layers[0].weight.dtype == torch.bfloat16
    assert rope.cos.dtype == torch.float32  # tables stay fp32 whatever the model dtype


def test_reset_parameters_touches_only_own_tensors_and_is_seeded():
    lin = ColumnParallelLinear(8, 16, bias=True)
    norm = RMSNorm(8)
    with torch.no_grad():
        lin.bias.fill_(1.23)
        norm.weight.fill_(1.23)
    torch.manual_seed(0)
    lin.reset_parameters()
    w0 = lin.weight.clone()
    torch.manual_seed(0)
    lin.reset_parameters()
    norm.reset_parameters()
    assert torch.equal(lin.weight, w0)
    assert torch.equal(lin.bias, torch.zeros(16))
    assert torch.equal(norm.weight, torch.ones(8))


def test_parallel_linears_match_nn_linear_on_one_rank():
    col, row = ColumnParallelLinear(8, 16, bias=True), RowParallelLinear(16, 8, bias=True)
    with torch.no_grad():
        col.bias.normal_()
        row.bias.normal_()
    x = torch.randn(3, 8)
    assert torch.allclose(col(x), x @ col.weight.T + col.bias)
    h = torch.randn(3, 16)
    assert torch.allclose(row(h), h @ row.weight.T + row.bias)


def test_rope_matches_complex_rotation():
    rope = RotaryEmbedding(8, 16, theta=10000.0)
    x = torch.randn(2, 5, 3, 8)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).double() / 8))
    angles = torch.outer(torch.arange(16).double(), freqs)[4:9]
    xc = torch.view_as_complex(x.double().reshape(2, 5, 3, 4, 2))
    ref = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    torch.testing.assert_close(rope(x, start_pos=4), ref.float(), rtol=1e-5, atol=1e-5)

"""Trainer plumbing without the host: sharded resumable batches, checkpoints, digests."""

import os

import pytest
import torch

from locref_core.train.common import (
    DistEnv,
    Progress,
    autocast_dtype,
    cpu_has_bf16,
    init_distributed,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    sharded_batches,
    step_generator,
    weights_digest,
)


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor(i)


def take(it, n):
    return [next(it).tolist() for _ in range(n)]


def test_two_ranks_split_every_epoch_and_resume_mid_epoch():
    envs = [DistEnv(rank=r, world_size=2) for r in (0, 1)]
    runs = [sharded_batches(Numbers(), 2, env, seed=3) for env in envs]
    assert all(per_epoch == 2 for _, per_epoch in runs)  # 5 per rank -> 2 full batches of 2
    epoch0 = [take(it, 2) for it, _ in runs]
    seen = sorted(i for rank in epoch0 for batch in rank for i in batch)
    assert len(set(seen)) == 8  # disjoint shards
    full = take(sharded_batches(Numbers(), 2, envs[0], seed=3)[0], 7)
    for start in (1, 2, 3, 5):
        resumed = take(sharded_batches(Numbers(), 2, envs[0], seed=3, start_step=start)[0],
                       7 - start)
        assert resumed == full[start:]
    assert full[:2] != full[2:4]  # a new shuffle per epoch


def test_too_small_a_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="--batch-size 8"):
        sharded_batches(Numbers(), 8, DistEnv(rank=0, world_size=2), seed=0)


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, net, opt, '{"a": 1}', {"lr": 0.1}, {"k": 5}, keep=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == [
        "step_00000002", "step_00000003"]
    expected_next = torch.rand(3)
    digest = weights_digest(net)

    torch.manual_seed(123)
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    state = load_checkpoint(str(tmp_path), other, other_opt, '{"a": 1}')  # the newest
    assert state["step"] == 3 and state["extra"] == {"k": 5}
    assert weights_digest(other) == digest
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_next)  # RNG as it was when saved
    with pytest.raises(ValueError, match="same flags"):
        load_checkpoint(str(tmp_path), other, other_opt, '{"a": 2}')
    with pytest.raises(ValueError, match="no checkpoint here"):
        load_checkpoint(str(tmp_path / "empty"), other, other_opt, '{"a": 1}')


def test_digest_is_bit_exact_and_handles_scalars():
    a = torch.nn.BatchNorm1d(3)  # has a 0-dim num_batches_tracked buffer
    b = torch.nn.BatchNorm1d(3)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.weight[0] += 1e-7
    assert weights_digest(a) != weights_digest(b)


def test_single_process_fallback_and_step_generators(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    Progress(env, total=2, every=1).update(0, 1.0, kl=0.5)  # logs, no process group needed
    # losses a caller already averaged over ranks are not reduced again (no process group here:
    # an all-reduce would raise)
    Progress(DistEnv(rank=1, world_size=2), total=2, every=1, averaged=True).update(0, 1.0)
    with pytest.raises(ValueError, match="process group"):
        Progress(DistEnv(rank=1, world_size=2), total=2, every=1).update(0, 1.0)
    draw = [torch.rand(2, generator=step_generator(0, s, r)) for s, r in [(5, 0), (5, 1), (6, 0)]]
    assert torch.equal(draw[0], torch.rand(2, generator=step_generator(0, 5, 0)))
    assert not torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    with pytest.raises(ValueError, match="auto, cuda or cpu"):
        init_distributed("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI's CPU wheel
    with pytest.raises(ValueError, match="--device cuda was asked for but torch sees no CUDA "
                                         "device; use cpu"):
        init_distributed("cuda")
    assert init_distributed("auto").device == torch.device("cpu")


def test_cpu_autocast_is_fp32_unless_bf16_is_asked(monkeypatch, caplog):
    from locref_core.train import common

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("no", cpu) is None
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert "emulates" not in caplog.text
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: False)
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert "--mixed-precision bf16 on a CPU without bf16 instructions" in caplog.text
    with pytest.raises(ValueError, match="fp16 needs a GPU; on CPU use bf16"):
        autocast_dtype("fp16", cpu)


@pytest.mark.parametrize("flags,native", [
    ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),
    ("fpu sse2 avx2 amx_tile amx_bf16", True),
    ("fpu sse2 avx2 avx512f avx512bw", False),
])
def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
    assert cpu_has_bf16(str(info)) is native
    assert cpu_has_bf16(str(tmp_path / "missing")) is False

import pickle

import pytest
import torch

from locref_core.fgdm.adapter import (
    FactorAdapter,
    FactorConfig,
    TimeResBlock,
    control_for_unet,
    merge_control,
    sinusoidal_embedding,
)
from locref_core.fgdm.convert_official import convert, extract_adapter, read_checkpoint
from locref_core.fgdm.weights import load_factor, read_factor_config, save_factor

SMALL = dict(channels=(32, 64, 128, 128), emb_channels=128)


def randomised(cfg):
    torch.manual_seed(0)
    adapter = FactorAdapter(cfg).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.05)
    return adapter


@pytest.mark.parametrize("h, w", [(32, 32), (64, 96), (9, 13)])
@pytest.mark.parametrize("timed", [True, False])
def test_feature_shapes_follow_the_unet(h, w, timed):
    adapter = randomised(FactorConfig(time_conditioned=timed, **SMALL))
    emb = torch.randn(2, 128) if timed else None
    feats = adapter(torch.randn(2, 4, h, w), emb)
    sizes = [(h, w)]
    for _ in range(3):
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    assert [tuple(f.shape) for f in feats] == [(2, c, *s) for c, s in zip(SMALL["channels"], sizes)]


def test_features_depend_on_x_t_and_on_the_timestep():
    adapter = randomised(FactorConfig(**SMALL))
    x, emb = torch.randn(1, 4, 16, 16), torch.randn(1, 128)
    base = adapter(x, emb)
    other_x = adapter(torch.randn(1, 4, 16, 16), emb)
    other_t = adapter(x, torch.randn(1, 128))
    for a, b, c in zip(base, other_x, other_t):
        assert not torch.allclose(a, b) and not torch.allclose(a, c)
    plain = randomised(FactorConfig(time_conditioned=False, **SMALL))
    with pytest.raises(ValueError, match="timestep-conditioned"):
        adapter(x)
    assert torch.equal(plain(x)[0], plain(x, emb)[0])  # the plain variant ignores time
    with pytest.raises(ValueError, match=r"takes 4 input channels \(x_t and earlier factors' "
                                         r"latents\), got 8"):
        adapter(torch.randn(1, 8, 16, 16), emb)


def test_a_config_without_the_unets_four_scales_is_refused():
    with pytest.raises(ValueError, match=r"an SD-1.5 factor adapter has 4 scales, got channels "
                                         r"\(32, 64\)"):
        FactorConfig(channels=(32, 64), emb_channels=128)


def test_zero_adapter_gives_zero_features():
    adapter = FactorAdapter(FactorConfig(**SMALL))
    with torch.no_grad():
        for p in adapter.parameters():
            p.zero_()
    assert all((f == 0).all() for f in adapter(torch.randn(1, 4, 8, 8), torch.randn(1, 128)))


def test_sinusoidal_embedding_matches_ldm():
    t = torch.tensor([0.0, 999.0])
    emb = sinusoidal_embedding(t, 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.isclose(emb[1, 0], torch.cos(torch.tensor(999.0)))


def test_control_list_and_merge():
    feats = [torch.ones(1) * (k + 1) for k in range(4)]
    ours = control_for_unet(feats)
    assert len(ours) == 12 and ours[11 - 2] is feats[0] and ours[11 - 11] is feats[3]
    assert sum(f is not None for f in ours) == 4
    merged = merge_control(None, ours, 0.5)
    assert merged["input"][9].item() == 0.5
    theirs = {"input": [torch.ones(1)] * 12, "output": ["skip"]}
    merged = merge_control(theirs, ours, 1.0)
    assert merged["input"][9].item() == 2.0 and merged["input"][0].item() == 5.0
    assert merged["input"][1].item() == 1.0 and merged["output"] == ["skip"]
    assert theirs["input"][9].item() == 1.0  # the caller's dict is not modified


def test_save_load_round_trip(tmp_path):
    adapter = randomised(FactorConfig(kind="depth", time_conditioned=False, **SMALL))
    path = str(tmp_path / "depth.safetensors")
    save_factor(adapter, path)
    again = load_factor(path)
    assert again.cfg == adapter.cfg
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(),
                                                 again.state_dict().values()))
    assert read_factor_config(path) == adapter.cfg  # the header alone
    for read in (load_factor, read_factor_config):
        with pytest.raises(ValueError, match="only .safetensors"):
            read(str(tmp_path / "x.pth"))


def test_a_file_that_does_not_match_its_config_names_the_mismatches(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapter = randomised(FactorConfig(kind="depth", time_conditioned=False, **SMALL))
    good = str(tmp_path / "depth.safetensors")
    save_factor(adapter, good)
    with safe_open(good, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    first, second = sorted(tensors)[:2]
    del tensors[first]
    tensors[second] = torch.zeros(3, 3)
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata=meta)
    with pytest.raises(ValueError, match=r"bad.safetensors: does not match the factor config "
                       r"\(\d+ tensors expected\): 1 missing .*1 with the wrong shape"):
        load_factor(bad)
    assert read_factor_config(bad) == adapter.cfg  # the header is sound; the tensors are not


@pytest.mark.parametrize("meta_change, needle", [
    ({"format_version": "99"}, r"other.safetensors: factor format version '99'; this pack reads"),
    ({"config": "{not json"}, r"other.safetensors: bad or missing factor config in the metadata"),
    ({"config": '{"kind": "seg", "colour": 1}'}, r"bad or missing factor config in the metadata"),
])
def test_a_factor_file_from_another_version_or_with_a_broken_config_is_named(
        tmp_path, meta_change, needle):
    """A factor written by another version of the pack, or whose config was edited, is refused
    by both readers with the file's name, before any tensor is matched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = str(tmp_path / "depth.safetensors")
    save_factor(randomised(FactorConfig(kind="depth", time_conditioned=False, **SMALL)), good)
    with safe_open(good, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    other = str(tmp_path / "other.safetensors")
    save_file(tensors, other, metadata={**meta, **meta_change})
    for read in (load_factor, read_factor_config):
        with pytest.raises(ValueError, match=needle):
            read(other)
    without = {k: v for k, v in meta.items() if k != "config"}
    save_file(tensors, other, metadata=without)
    with pytest.raises(ValueError, match="bad or missing factor config in the metadata"):
        load_factor(other)


def test_config_validation():
    with pytest.raises(ValueError, match="kind 'pose'"):
        FactorConfig(kind="pose")
    with pytest.raises(ValueError, match="multiple of 4"):
        FactorConfig(in_channels=6)
    with pytest.raises(ValueError, match=r"norm_groups=3 must divide"):
        FactorConfig(norm_groups=3, **SMALL)


def test_norm_groups_default_and_older_configs():
    assert FactorConfig().norm_groups == 32  # SD-1.5's, as the official release builds it
    old = '{"channels": [32, 64, 128, 128], "emb_channels": 128, "kind": "seg"}'
    assert FactorConfig.from_json(old).norm_groups == 32  # files from before the field
    cfg = FactorConfig(norm_groups=4, **SMALL)
    assert FactorConfig.from_json(cfg.to_json()) == cfg
    norms = [m for m in FactorAdapter(cfg).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {4}


@pytest.mark.parametrize("groups, hears_time", [(32, False), (8, True), (4, True)])
def test_one_channel_a_group_removes_the_time_embedding(groups, hears_time):
    """At 32 channels in 32 groups each norm removes each channel's mean, and with it the
    time embedding's per-channel constant: the block's output no longer depends on t."""
    torch.manual_seed(0)
    block = TimeResBlock(32, 32, 16, down=False, groups=groups).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(1, 32, 8, 8)
    a, b = block(x, torch.randn(1, 16)), block(x, torch.randn(1, 16))
    assert torch.allclose(a, b, atol=1e-5) != hears_time


def lightning_checkpoint(adapter):
    state = {f"model.diffusion_model.adapter.{k}": v for k, v in adapter.state_dict().items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2)
    return {"state_dict": state, "epoch": 3, "global_step": 1000,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5}]}]}


@pytest.mark.parametrize("timed", [True, False])
def test_converter_extracts_the_adapter(tmp_path, timed):
    small = SMALL if timed else {"channels": SMALL["channels"]}  # emb width unused untimed
    adapter = randomised(FactorConfig(time_conditioned=timed, in_channels=8, **small))
    src, dst = tmp_path / "fgdm_seg.pth", tmp_path / "seg.safetensors"
    torch.save(lightning_checkpoint(adapter), src)
    cfg = convert(str(src), str(dst))
    assert cfg == adapter.cfg
    loaded = load_factor(str(dst))
    x = torch.randn(1, 8, 8, 8)
    emb = torch.randn(1, 128) if timed else None
    assert torch.equal(loaded(x, emb)[3], adapter(x, emb)[3])


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_converter_refuses_pickles_that_need_more_than_weights(tmp_path):
    src = tmp_path / "evil.pth"
    with open(src, "wb") as f:
        pickle.dump({"state_dict": {"x": Payload()}}, f, protocol=2)
    with pytest.raises(ValueError, match="refused"):
        read_checkpoint(str(src))
    plain = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}},
               plain)
    with pytest.raises(ValueError, match="no FG-DM adapter weights"):
        extract_adapter(read_checkpoint(str(plain)), str(plain))
    torch.save([torch.zeros(1)], plain)
    with pytest.raises(ValueError, match=r"sd.ckpt: not a checkpoint \(a list, no state dict\)"):
        read_checkpoint(str(plain))


def test_converter_command_line_writes_the_factor_with_its_kind(tmp_path, caplog):
    from locref_core.fgdm.convert_official import infer_config, main

    adapter = randomised(FactorConfig(time_conditioned=False, in_channels=8,
                                      channels=SMALL["channels"]))
    src, dst = tmp_path / "fgdm_depth.pth", tmp_path / "depth.safetensors"
    torch.save(lightning_checkpoint(adapter), src)
    with caplog.at_level("INFO", logger="locref_core.fgdm.convert_official"):
        main([str(src), str(dst), "--kind", "depth", "--palette", "ade150"])
    cfg = read_factor_config(str(dst))
    assert (cfg.kind, cfg.palette, cfg.channels) == ("depth", "ade150", adapter.cfg.channels)
    assert f"wrote {dst}" in caplog.text
    with pytest.raises(ValueError, match="adapter weights have no conv_in.weight"):
        infer_config({"body.0.block1.weight": torch.zeros(1)}, "seg", "coco183")

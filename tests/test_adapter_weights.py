import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from locref_core.adapter import SD15_SITE_CHANNELS, AdapterConfig, LocRefAdapter, site_key
from locref_core.grid import SD15_SITES
from locref_core.weights import IP_ADAPTER_IDS, load_adapter, save_adapter, save_whole


def ip_adapter_tensors(embed=1024, tokens=4):
    g = torch.Generator().manual_seed(1)
    t = {"image_proj.proj.weight": torch.randn(tokens * 768, embed, generator=g),
         "image_proj.proj.bias": torch.randn(tokens * 768, generator=g),
         "image_proj.norm.weight": torch.randn(768, generator=g),
         "image_proj.norm.bias": torch.randn(768, generator=g)}
    for ip_id, site in zip(IP_ADAPTER_IDS, SD15_SITES):
        c = SD15_SITE_CHANNELS[site]
        t[f"ip_adapter.{ip_id}.to_k_ip.weight"] = torch.randn(c, 768, generator=g).half()
        t[f"ip_adapter.{ip_id}.to_v_ip.weight"] = torch.randn(c, 768, generator=g).half()
    return t


def metadata_and_tensors(path):
    """A saved file's metadata and tensors, to write back changed."""
    with safe_open(path, framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_projection_shapes_and_null_tokens():
    adapter = LocRefAdapter(AdapterConfig(tokens=4))
    tokens = adapter.project(torch.randn(3, 1024))
    assert tokens.shape == (3, 4, 768)
    assert adapter.null_tokens().shape == (1, 4, 768)
    k, v = adapter.site_kv(("middle", 0), tokens, "ci")
    assert k.shape == v.shape == (3, 4, 1280)
    assert adapter.site_kv(("input", 1), tokens, "ri")[0].shape == (3, 4, 320)


def test_paper_config_is_tens_of_millions_of_parameters():
    params = sum(p.numel() for p in LocRefAdapter(AdapterConfig()).parameters())
    assert 20e6 < params < 60e6  # the paper reports 56M trainable parameters


def test_ip_adapter_file_maps_to_all_sixteen_sites(tmp_path):
    tensors = ip_adapter_tensors()
    path = str(tmp_path / "ip-adapter_sd15.safetensors")
    save_file(tensors, path)
    adapter = load_adapter(path)
    assert adapter.cfg.hidden_dim is None and adapter.cfg.shared_kv and adapter.cfg.tokens == 4
    for ip_id, site in zip(IP_ADAPTER_IDS, SD15_SITES):
        kv = adapter.kv_ri[site_key(site)]
        assert torch.equal(kv.to_k.weight, tensors[f"ip_adapter.{ip_id}.to_k_ip.weight"].float())
        assert torch.equal(kv.to_v.weight, tensors[f"ip_adapter.{ip_id}.to_v_ip.weight"].float())
        width = adapter.site_kv(site, torch.ones(1, 4, 768), "ci")[0].shape[-1]
        assert width == kv.to_k.out_features
    assert adapter.kv_ri["middle_0"].to_k.weight.shape == (1280, 768)  # id 31 is the middle block
    assert torch.equal(adapter.appearance.proj.weight, tensors["image_proj.proj.weight"])


def test_locref_format_round_trips(tmp_path):
    adapter = LocRefAdapter(AdapterConfig(tokens=2, hidden_dim=64, embed_dim=32))
    path = str(tmp_path / "mine.safetensors")
    save_adapter(adapter, path)
    again = load_adapter(path)
    assert again.cfg == adapter.cfg
    for (k, a), (k2, b) in zip(adapter.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("meta_change, needle", [
    ({"format_version": "99"}, r"other.safetensors: LocRef format version '99'; this pack reads "
                               r"version \d+\. Update the pack\."),
    ({"config": "[1, 2"}, r"other.safetensors: bad or missing adapter config in the metadata"),
    ({"config": '{"tokens": 2, "width": 9}'}, r"bad or missing adapter config in the metadata "
                                             r"\(unknown adapter config keys \['width'\]\)"),
])
def test_a_locref_file_from_another_version_or_with_a_broken_config_is_named(
        tmp_path, meta_change, needle):
    """A LocRef file written by a newer pack, or whose config was edited, is refused with the
    file's name and what to do, before any tensor is matched."""
    good = str(tmp_path / "mine.safetensors")
    save_adapter(LocRefAdapter(AdapterConfig(tokens=2, hidden_dim=64, embed_dim=32)), good)
    meta, tensors = metadata_and_tensors(good)
    other = str(tmp_path / "other.safetensors")
    save_file(tensors, other, metadata={**meta, **meta_change})
    with pytest.raises(ValueError, match=needle):
        load_adapter(other)


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t.pop("ip_adapter.31.to_k_ip.weight"), "another model"),
    (lambda t: t.update({"image_proj.latents": torch.zeros(1, 16, 768)}), "Plus"),
    (lambda t: t.update({"image_proj.proj.0.weight": torch.zeros(1)}), "Full Face"),
    (lambda t: t.update({"ip_adapter.1.to_k_ip.weight": torch.zeros(640, 768)}), "wrong shape"),
])
def test_unsupported_ip_adapters_are_named(tmp_path, mutate, needle):
    tensors = ip_adapter_tensors()
    mutate(tensors)
    path = str(tmp_path / "other.safetensors")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=needle) as err:
        load_adapter(path)
    assert "other.safetensors" in str(err.value)


def test_locref_file_with_wrong_tensors_names_the_mismatch(tmp_path):
    adapter = LocRefAdapter(AdapterConfig(tokens=2, hidden_dim=None, embed_dim=32))
    path = str(tmp_path / "bad.safetensors")
    save_adapter(adapter, path)
    meta, tensors = metadata_and_tensors(path)
    tensors.pop("kv_ri.input_1.to_k.weight")
    tensors["appearance.norm.weight"] = torch.zeros(5)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=r"bad.safetensors.*1 missing.*wrong shape"):
        load_adapter(path)
    tensors["kv_ri.input_1.to_q.weight"] = torch.zeros(4, 4)  # a tensor no adapter has
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['kv_ri.input_1.to_k.weight'\]\); "
                                         r"1 unexpected \(e.g. \['kv_ri.input_1.to_q.weight'\]\)"):
        load_adapter(path)


def test_pickles_and_unknown_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only .safetensors"):
        load_adapter(str(tmp_path / "ip-adapter_sd15.bin"))
    path = str(tmp_path / "random.safetensors")
    save_file({"foo": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="random.safetensors is .* no LocRef, IP-Adapter or FG-DM"):
        load_adapter(path)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_adapter(str(tmp_path / "broken.safetensors"))


def test_save_whole_renames_into_place_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "rows.safetensors"
    save_whole({"a": torch.arange(3.0)}, path, metadata={"k": "v"})
    assert torch.equal(load_file(str(path))["a"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.safetensors"]
    with pytest.raises(ValueError):  # safetensors refuses a non-contiguous tensor
        save_whole({"a": torch.zeros(4, 4).t()}, path)
    assert torch.equal(load_file(str(path))["a"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.safetensors"]

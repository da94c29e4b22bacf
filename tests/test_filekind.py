"""The weight-file sniffer: each common wrong file is named, from its bytes, never unpickled."""

import pathlib
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file
from test_adapter_weights import ip_adapter_tensors

from locref_core.adapter import AdapterConfig, LocRefAdapter
from locref_core.convert_pickle import convert
from locref_core.fgdm.adapter import FactorAdapter, FactorConfig
from locref_core.fgdm.weights import load_factor, save_factor
from locref_core.filekind import explain, sniff
from locref_core.weights import load_adapter, save_adapter

SMALL_FACTOR = FactorConfig(channels=(32, 64, 128, 128), emb_channels=128)


def sdxl_ip_adapter_tensors():
    """ip-adapter_sdxl's layout in miniature: 2048-wide context, 70 attention layers."""
    t = {"image_proj.proj.weight": torch.zeros(4 * 2048, 8),
         "image_proj.proj.bias": torch.zeros(4 * 2048),
         "image_proj.norm.weight": torch.zeros(2048), "image_proj.norm.bias": torch.zeros(2048)}
    for i in range(1, 141, 2):
        t[f"ip_adapter.{i}.to_k_ip.weight"] = torch.zeros(4, 2048)
        t[f"ip_adapter.{i}.to_v_ip.weight"] = torch.zeros(4, 2048)
    return t


def write(tmp_path, name, tensors, metadata=None):
    path = str(tmp_path / name)
    save_file(tensors, path, metadata=metadata)
    return path


class Alarm:
    """Unpickling this touches a file: proof that a loader unpickled it."""

    marker = ""

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickles_under_a_safetensors_name_are_named_never_unpickled(tmp_path):
    zipped = tmp_path / "ip-adapter_sd15.safetensors"
    torch.save({"image_proj": {"proj.weight": torch.zeros(2)}}, zipped)
    found = sniff(str(zipped))
    assert found.kind == "pickle" and "PyTorch pickle" in found.what
    with pytest.raises(ValueError, match=r"ip-adapter_sd15.safetensors is a PyTorch pickle .*"
                       r"renamed to \.safetensors\. The pack never loads pickles.*convert_pickle"):
        load_adapter(str(zipped))
    alarm = Alarm()
    alarm.marker = str(tmp_path / "unpickled")
    legacy = tmp_path / "legacy.safetensors"
    legacy.write_bytes(pickle.dumps(alarm, protocol=2))
    assert sniff(str(legacy)).kind == "pickle"
    for load in (load_adapter, load_factor):
        with pytest.raises(ValueError, match="legacy.safetensors is a pickle"):
            load(str(legacy))
    with pytest.raises(ValueError, match="convert_official"):
        load_factor(str(legacy))
    assert not (tmp_path / "unpickled").exists()


def test_empty_and_cut_short_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.safetensors is an empty file \(0 bytes\)\. The "
                       "download or copy did not finish"):
        load_adapter(str(empty))
    full = pathlib.Path(write(tmp_path, "full.safetensors", {"a": torch.zeros(1000)}))
    data = full.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:2000])
    with pytest.raises(ValueError, match=rf"cut.safetensors is cut short: its header says the "
                       rf"file holds {len(data)} bytes, but it has 2000\. An interrupted"):
        load_factor(str(cut))
    cut.write_bytes(data[:20])
    assert sniff(str(cut)).kind == "truncated" and "header alone" in sniff(str(cut)).what
    cut.write_bytes(data[:5])
    assert sniff(str(cut)).kind == "truncated"
    assert sniff(str(full)).kind == "safetensors"


def test_other_bytes_are_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    assert sniff(str(path)).kind == "not_safetensors"
    path.write_bytes((10).to_bytes(8, "little") + b"[1, 2, 3] ")
    assert sniff(str(path)).kind == "not_safetensors"
    with pytest.raises(ValueError, match="notes.safetensors is not a safetensors file"):
        load_adapter(str(path))


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t.update({"image_proj.latents": torch.zeros(1, 16, 768)}), "IP-Adapter Plus "),
    (lambda t: t.update({"image_proj.proj.0.weight": torch.zeros(1)}), "Full Face / FaceID"),
    (lambda t: t.update({"lora.down.weight": torch.zeros(1)}), "FaceID .LoRA"),
    (lambda t: t.pop("ip_adapter.31.to_k_ip.weight"), "another model .15 attention layers"),
    (lambda t: t.pop("image_proj.norm.weight"), "incomplete IP-Adapter"),
])
def test_ip_adapter_variants_are_named(tmp_path, mutate, needle):
    tensors = ip_adapter_tensors(embed=8)
    mutate(tensors)
    found = sniff(write(tmp_path, "x.safetensors", tensors))
    assert found.kind == "ip_adapter_other" and re.search(needle, found.what), found.what


def test_an_sd2_ip_adapter_names_its_text_width(tmp_path):
    """Sixteen layers as SD-1.5's, but keys and values read a 1024-wide text context."""
    tensors = ip_adapter_tensors(embed=8)
    for k in [k for k in tensors if ".to_k_ip." in k or ".to_v_ip." in k]:
        tensors[k] = torch.zeros(tensors[k].shape[0], 1024)
    path = write(tmp_path, "ip-adapter_sd2.safetensors", tensors)
    found = sniff(path)
    assert found.kind == "ip_adapter_other"
    assert found.what == "an IP-Adapter for another model (text context [1024]; SD-1.5's is 768)"
    with pytest.raises(ValueError, match=r"ip-adapter_sd2.safetensors is an IP-Adapter for another "
                                         r"model \(text context \[1024\]"):
        load_adapter(path)


def test_zip_archives_and_unreadable_paths_are_named(tmp_path):
    """A zip that torch.save did not write is named as a zip; one that is cut short too; a path
    that cannot be read says why."""
    import zipfile

    path = tmp_path / "weights.safetensors"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not weights")
    assert sniff(str(path)).what == "a zip archive, not a safetensors file"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 40)  # a zip's magic, no archive after it
    assert sniff(str(path)).what == "a zip archive, not a safetensors file"
    with pytest.raises(ValueError, match=r"weights.safetensors is a zip archive, not a "
                                         r"safetensors file"):
        load_adapter(str(path))
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"folder.safetensors cannot be read \(Is a directory\)"):
        load_adapter(str(folder))
    with pytest.raises(ValueError, match=r"folder.safetensors cannot be read"):
        load_factor(str(folder))


def test_sdxl_ip_adapters_say_which_they_are_and_what_is_supported(tmp_path):
    path = write(tmp_path, "ip-adapter_sdxl.safetensors", sdxl_ip_adapter_tensors())
    assert sniff(path).kind == "ip_adapter_other"
    with pytest.raises(ValueError, match=r"ip-adapter_sdxl.safetensors is an IP-Adapter for SDXL "
                       r".*LocRef supports IP-Adapter SD-1.5 .*ip-adapter_sd15.safetensors"):
        load_adapter(path)
    plus = sdxl_ip_adapter_tensors()
    plus["image_proj.latents"] = torch.zeros(1, 16, 2048)
    found = sniff(write(tmp_path, "plus.safetensors", plus))
    assert found.what.startswith("IP-Adapter Plus for SDXL")


def test_files_in_the_wrong_folder_say_where_they_belong(tmp_path):
    locref = str(tmp_path / "mine.safetensors")
    save_adapter(LocRefAdapter(AdapterConfig(tokens=2, hidden_dim=None, embed_dim=8)), locref)
    factor = str(tmp_path / "seg.safetensors")
    save_factor(FactorAdapter(SMALL_FACTOR), factor)
    ip = write(tmp_path, "ip-adapter_sd15.safetensors", ip_adapter_tensors(embed=8))
    ckpt = write(tmp_path, "v1-5.safetensors",
                 {"model.diffusion_model.out.0.weight": torch.zeros(2)})
    assert [sniff(p).kind for p in (locref, factor, ip, ckpt)] == [
        "locref", "fgdm_factor", "ip_adapter_sd15", "sd_checkpoint"]
    with pytest.raises(ValueError, match=r"mine.safetensors is a LocRef adapter\. It belongs in "
                       "models/locref, loaded by LocRef Adapter Loader"):
        load_factor(locref)
    with pytest.raises(ValueError, match=r"is an IP-Adapter SD-1.5 file\. It belongs in "
                       "models/ipadapter"):
        load_factor(ip)
    with pytest.raises(ValueError, match=r"seg.safetensors is an FG-DM factor adapter\. It belongs "
                       "in models/fgdm, loaded by FGDM Factor Loader"):
        load_adapter(factor)
    with pytest.raises(ValueError, match="Stable Diffusion checkpoint.*models/checkpoints"):
        load_adapter(ckpt)
    assert load_factor(factor).cfg == SMALL_FACTOR and load_adapter(locref).cfg.embed_dim == 8


def test_explain_names_the_loader_and_what_it_reads(tmp_path):
    path = write(tmp_path, "random.safetensors", {"foo": torch.zeros(2)})
    text = explain("random.safetensors", sniff(path), "adapter", "LocRef files")
    assert text.startswith("random.safetensors is a safetensors file of 1 tensor(s) (e.g. "
                           "['foo']) that is no LocRef, IP-Adapter or FG-DM file.")
    assert text.endswith("This loader reads LocRef files.")


def test_convert_pickle_makes_a_loadable_file(tmp_path):
    tensors = ip_adapter_tensors(embed=8)
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in tensors.items()
                             if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in tensors.items()
                             if k.startswith("ip_adapter.")}}
    src, dst = str(tmp_path / "ip-adapter_sd15.bin"), str(tmp_path / "ip-adapter_sd15.safetensors")
    torch.save(nested, src)
    assert convert(src, dst) == len(tensors)
    adapter = load_adapter(dst)
    assert torch.equal(adapter.appearance.proj.weight, tensors["image_proj.proj.weight"])
    alarm = Alarm()
    alarm.marker = str(tmp_path / "unpickled")
    torch.save({"a": alarm}, str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match="refused"):
        convert(str(tmp_path / "evil.pt"), str(tmp_path / "evil.safetensors"))
    assert not (tmp_path / "unpickled").exists()


def test_convert_pickle_from_the_command_line_and_a_pickle_with_no_tensors(tmp_path, caplog):
    from locref_core.convert_pickle import main

    src, dst = tmp_path / "proj.pt", tmp_path / "proj.safetensors"
    torch.save({"proj": {"weight": torch.ones(2, 3)}, "step": 7}, str(src))
    with caplog.at_level("INFO", logger="locref_core.convert_pickle"):
        main([str(src), str(dst)])
    assert f"wrote {dst}: 1 tensors" in caplog.text
    assert sniff(str(dst)).shapes == {"proj.weight": (2, 3)}
    torch.save({"step": 7, "lr": 1e-4}, str(src))
    with pytest.raises(ValueError, match=r"proj.pt: holds no tensors; nothing to convert"):
        convert(str(src), str(dst))

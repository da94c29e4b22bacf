"""What a weight file is, from its bytes: the one place every loader asks before loading.

Reads at most the first bytes, the safetensors header (8-byte length + JSON) and, for a zip
archive, its member names. Nothing is unpickled and no tensor data is read, so sniffing a
hostile file is as safe as reading its name. `explain` turns a wrong kind into the message a
loader raises: what the file is, and what to do with it.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field

# diffusers attention-processor numbers of SD-1.5's attn2 layers (IP-Adapter key layout), in
# the order of grid.SD15_SITES: down blocks 1..11, mid 31, up blocks 13..29.
IP_ADAPTER_IDS = (1, 3, 5, 7, 9, 11, 31, 13, 15, 17, 19, 21, 23, 25, 27, 29)
MAX_HEADER = 100_000_000  # the safetensors library's own bound on the JSON header
LOCREF_FORMAT, FGDM_FORMAT = "locref", "fgdm-factor"
IP_SUPPORTED = ("IP-Adapter SD-1.5 files with a linear projection: ip-adapter_sd15.safetensors, "
                "ip-adapter_sd15_light.safetensors")

#: Kinds that `sniff` returns.
KINDS = ("empty", "pickle", "truncated", "not_safetensors", "locref", "fgdm_factor",
         "ip_adapter_sd15", "ip_adapter_other", "sd_checkpoint", "safetensors")


@dataclass(frozen=True)
class FileKind:
    """A file's kind (one of KINDS), a phrase saying what it is, and its safetensors header."""

    kind: str
    what: str
    size: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor name -> shape


def sniff(path: str) -> FileKind:
    """The kind of the file at `path`; OSError if it cannot be read at all."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if size == 0:
            return FileKind("empty", "an empty file (0 bytes)")
        if head.startswith(b"PK\x03\x04"):
            return FileKind("pickle", _zip_what(path), size)
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            return FileKind("pickle", "a pickle (PyTorch's legacy torch.save format)", size)
        if size < 8:
            return FileKind("truncated", f"cut short: {size} bytes, less than the 8-byte "
                            "header length of a safetensors file", size)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            return FileKind("not_safetensors", "not a safetensors file (its first 8 bytes are "
                            "no header length)", size)
        if 8 + n > size:
            return FileKind("truncated", f"cut short: its header says the header alone is "
                            f"{8 + n} bytes, but the file has {size}", size)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("not an object")
        metadata = header.pop("__metadata__", None) or {}
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError):
        return FileKind("not_safetensors", "not a safetensors file (its header is not the JSON "
                        "a safetensors file starts with)", size)
    if 8 + n + end > size:
        return FileKind("truncated", f"cut short: its header says the file holds {8 + n + end} "
                        f"bytes, but it has {size}", size, metadata, shapes)
    kind, what = _classify(metadata, shapes)
    return FileKind(kind, what, size, metadata, shapes)


def _zip_what(path: str) -> str:
    """A zip archive: PyTorch's torch.save format when it holds a data.pkl (names only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "a zip archive, not a safetensors file"
    if any(n.endswith("data.pkl") for n in names):
        return "a PyTorch pickle (the zip archive torch.save writes)"
    return "a zip archive, not a safetensors file"


def _classify(metadata: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    fmt = metadata.get("format")
    if fmt == LOCREF_FORMAT:
        return "locref", "a LocRef adapter"
    if fmt == FGDM_FORMAT:
        return "fgdm_factor", "an FG-DM factor adapter"
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in shapes):
        variant = ip_adapter_variant(shapes)
        return ("ip_adapter_sd15", "an IP-Adapter SD-1.5 file") if variant is None \
            else ("ip_adapter_other", variant)
    if any(k.startswith("model.diffusion_model.") for k in shapes):
        return "sd_checkpoint", "a Stable Diffusion checkpoint (a whole model)"
    return "safetensors", (f"a safetensors file of {len(shapes)} tensor(s) (e.g. "
                           f"{sorted(shapes)[:3]}) that is no LocRef, IP-Adapter or FG-DM file")


def ip_adapter_variant(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """None for a supported IP-Adapter SD-1.5 layout, else which IP-Adapter the keys show."""
    keys = set(shapes)
    widths = {shapes[k][-1] for k in keys if re.match(r"ip_adapter\.\d+\.to_k_ip\.weight$", k)}
    sdxl = 2048 in widths or shapes.get("image_proj.norm.weight", (0,))[0] == 2048
    model = " for SDXL" if sdxl else ""
    if any(k.startswith("image_proj.latents") or ".layers." in k for k in keys):
        return f"IP-Adapter Plus{model} (Resampler projection)"
    if "image_proj.proj.0.weight" in keys or "image_proj.proj.2.weight" in keys:
        return f"IP-Adapter Full Face / FaceID{model} (MLP projection)"
    if any("lora" in k for k in keys):
        return f"IP-Adapter FaceID{model} (LoRA)"
    if sdxl:
        return "an IP-Adapter for SDXL (2048-wide text context; SD-1.5's is 768)"
    ids = {int(m.group(1)) for k in keys if (m := re.match(r"ip_adapter\.(\d+)\.to_k_ip", k))}
    if ids != set(IP_ADAPTER_IDS):
        return f"an IP-Adapter for another model ({len(ids)} attention layers; SD-1.5 has 16)"
    if "image_proj.proj.weight" not in keys or "image_proj.norm.weight" not in keys:
        return "an incomplete IP-Adapter file (no image_proj.proj / image_proj.norm)"
    if widths != {768}:
        return f"an IP-Adapter for another model (text context {sorted(widths)}; SD-1.5's is 768)"
    return None


_CONVERT = ("convert it once, in a Python you trust, with `python -m locref_core.convert_pickle "
            "IN OUT.safetensors` (it reads tensors only, torch.load(weights_only=True))")
_HOME = {
    "locref": "models/locref, loaded by LocRef Adapter Loader",
    "ip_adapter_sd15": "models/ipadapter (its name containing 'sd15'), loaded by LocRef Adapter "
                       "Loader",
    "fgdm_factor": "models/fgdm, loaded by FGDM Factor Loader",
    "sd_checkpoint": "models/checkpoints, loaded by Load Checkpoint",
}


def explain(name: str, found: FileKind, wanted: str, supported: str) -> str:
    """The error for a file of kind `found` given to a loader of `wanted` ("adapter": LocRef /
    IP-Adapter, "factor": FG-DM) that reads `supported`: what the file is and what to do."""
    kind = found.kind
    if kind == "empty":
        fix = "The download or copy did not finish; get the file again"
    elif kind == "truncated":
        fix = "An interrupted download or copy? Get the file again"
    elif kind == "pickle":
        official = (" (the official FG-DM checkpoint: "
                    "`python -m locref_core.fgdm.convert_official`)" if wanted == "factor" else "")
        fix = (f"The pack never loads pickles (unpickling can run code): {_CONVERT}{official}, "
               "or download the .safetensors release")
    elif kind == "ip_adapter_other":
        fix = f"LocRef supports {IP_SUPPORTED} only"
    elif kind in _HOME:
        fix = f"It belongs in {_HOME[kind]}"
    else:
        fix = "Check that it is the file you meant"
    what = found.what
    if kind == "pickle":
        what += f", renamed to {os.path.splitext(name)[1] or 'a weights name'}"
    return f"{name} is {what}. {fix}. This loader reads {supported}."


def require(path: str, kinds: tuple[str, ...], wanted: str, supported: str) -> FileKind:
    """Sniff `path` and return its kind if it is one of `kinds`; else ValueError (`explain`)."""
    name = os.path.basename(path)
    try:
        found = sniff(path)
    except OSError as err:
        raise ValueError(f"{name} cannot be read ({err.strerror or err})") from None
    if found.kind not in kinds:
        raise ValueError(explain(name, found, wanted, supported))
    return found

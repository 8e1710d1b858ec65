"""Loading a model directory into transformers, with bonsai-lite's own per-layer exports recognised.

A per-layer export ships `modeling_bonsai.py` and an `auto_map` to it. When that file is
byte-identical to the one this version of bonsai-lite writes, or to one an earlier version wrote
(`EARLIER_MODELING_SHA256`: the same config and weights, read by today's classes), and the auto_map
names only it, the classes are taken from bonsai-lite itself: no remote code runs, so no
--trust-remote-code is needed. Any other shipped modeling file is foreign code and still needs the
user's consent.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from bonsai_lite.errors import CheckpointError
from bonsai_lite.structure import read_config

MODELING_FILE = "modeling_bonsai.py"  # must equal bonsai_lite.export.MODELING_FILE (export imports io, not back)
# The modeling files earlier versions shipped (SHA-256 -> the last commit that wrote it). Add the
# outgoing file's hash here whenever export_assets/modeling_bonsai.py changes in a way that keeps its
# config and weights, so the exports it wrote still load as bonsai-lite's own.
EARLIER_MODELING_SHA256 = {
    "8f0500288c33d26561d8a5a7508d93ac8524ae9726b4ca425d9670fdc422560a": "d1264f6",
    "d135e167a40f6aa6aacb0bbd1dd7084fea125eb98dd635e84114b099ae76ca22": "9a5fc71",
}


def own_model_class(model_dir: str | Path):
    """The CausalLM class of a bonsai-lite per-layer export whose shipped modeling file is ours, else None."""
    root = Path(model_dir)
    auto = read_config(root).get("auto_map") or {}
    stem = MODELING_FILE.removesuffix(".py")
    names = {k: v for k, v in auto.items() if isinstance(v, str)}
    if set(names) != {"AutoConfig", "AutoModelForCausalLM"} or len(names) != len(auto):
        return None
    if not all(v.startswith(f"{stem}.") for v in names.values()):
        return None
    shipped = root / MODELING_FILE
    ours = resources.files("bonsai_lite.export_assets").joinpath(MODELING_FILE).read_bytes()
    if not shipped.is_file():
        return None
    data = shipped.read_bytes()
    if data != ours and hashlib.sha256(data).hexdigest() not in EARLIER_MODELING_SHA256:
        return None
    from bonsai_lite.export_assets import modeling_bonsai

    config_cls = getattr(modeling_bonsai, names["AutoConfig"].split(".", 1)[1], None)
    model_cls = getattr(modeling_bonsai, names["AutoModelForCausalLM"].split(".", 1)[1], None)
    if config_cls is None or model_cls is None or model_cls.config_class is not config_cls:
        return None
    return model_cls


def needs_remote_code(model_dir: str | Path, *, trusted: bool) -> bool:
    """True when the directory ships its own modeling file (per-layer-width exports) and the user allowed it.

    Only files inside the directory are ever run: an `auto_map` naming another repository is refused.
    """
    root = Path(model_dir).resolve()
    auto = read_config(root).get("auto_map")
    if not auto:
        return False
    refs = [r for v in auto.values() for r in (v if isinstance(v, (list, tuple)) else [v]) if r]
    files = set()
    for ref in refs:
        if "--" in ref:
            raise CheckpointError(f"{root}: config.json auto_map points at another repository ({ref!r}); refusing")
        path = (root / (ref.rsplit(".", 1)[0].replace(".", "/") + ".py")).resolve()
        if root not in path.parents or not path.is_file():
            raise CheckpointError(f"{root}: config.json auto_map names {ref!r}, which is not a file in the directory")
        files.add(path.name)
    if not trusted:
        raise CheckpointError(f"{root} ships modeling code ({', '.join(sorted(files))}) that is not the one this "
                              "version of bonsai-lite writes; read it, then pass --trust-remote-code to load it")
    return True


def load_causal_lm(model_dir: str | Path, *, trust_remote_code: bool = False, **kwargs):
    """`from_pretrained` for a model directory: our own per-layer exports through bonsai-lite's classes,
    anything else through AutoModelForCausalLM (remote code only with trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    cls = own_model_class(model_dir)
    if cls is not None:
        return cls.from_pretrained(str(model_dir), **kwargs)
    remote = needs_remote_code(model_dir, trusted=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=remote, **kwargs)

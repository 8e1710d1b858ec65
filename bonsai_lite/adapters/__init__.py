"""Registry of supported architectures, keyed on `config.json`'s `architectures`."""
from __future__ import annotations

from bonsai_lite.adapters.base import SLICE_RULES, Adapter
from bonsai_lite.adapters.llama import LLAMA
from bonsai_lite.adapters.mistral import MISTRAL
from bonsai_lite.adapters.qwen2 import QWEN2
from bonsai_lite.errors import CheckpointError

_REGISTRY: dict[str, Adapter] = {arch: a for a in (LLAMA, MISTRAL, QWEN2) for arch in a.architectures}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def adapter_for(architectures: list[str] | tuple[str, ...] | None) -> Adapter:
    for arch in architectures or ():
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise CheckpointError(
        f"unsupported architecture {list(architectures or [])}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


__all__ = ["Adapter", "SLICE_RULES", "SUPPORTED_ARCHITECTURES", "adapter_for"]

"""Writers for a pruned structure, side by side over one slicing plan (`plan.py`).

- `safetensors.py`: a Hugging Face directory (per-layer with a shipped modeling file, or uniform).
"""
from bonsai_lite.export.safetensors import EXPORT_INFO, MODELING_FILE, ExportResult, export_pruned

__all__ = ["EXPORT_INFO", "MODELING_FILE", "ExportResult", "export_pruned"]

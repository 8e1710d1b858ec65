"""Files copied into exported checkpoints (`modeling_bonsai.py`); the library itself never imports them."""

"""Post-pruning adaptation (paper section 4): LoRA or full fine-tuning with distillation from a cached teacher."""

"""Training-time components: TsqLoRA's quality-aware sampling and dynamic ranks for the Hugging Face Trainer."""

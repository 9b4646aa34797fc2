"""Training: the YAML config, the trainer, evaluation metrics, checkpoints and continual fine-tuning."""

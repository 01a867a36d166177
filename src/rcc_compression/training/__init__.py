"""Training and distillation for recovery after compression."""

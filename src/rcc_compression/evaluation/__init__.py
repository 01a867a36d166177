"""Evaluation: zero-shot, retrieval, captioning, VQA and efficiency metrics."""

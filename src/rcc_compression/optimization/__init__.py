"""Hyper-parameter search with Optuna: the search file (``space``) and the study workers (``search``)."""

"""Ablation runners: each computes its table from runs it trains or reads (distill ablate ...)."""

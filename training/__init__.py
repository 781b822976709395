"""Training utilities for MmAP (data generation, prompt tuning loops)."""

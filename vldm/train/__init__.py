"""Training: `python -m vldm.train` (see vldm/train/trainer.py for the loop)."""

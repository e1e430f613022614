"""Training: settings, length-bucketed batches, the LightningModule and DataModule, fit/export.

Only `settings` is light; the rest imports torch and Lightning.
"""

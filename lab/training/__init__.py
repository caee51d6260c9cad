"""Training: the Lightning module and data module, and the loss-spike detector its callbacks use."""

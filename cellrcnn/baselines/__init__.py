"""Classical (non-learned) segmentation baselines."""

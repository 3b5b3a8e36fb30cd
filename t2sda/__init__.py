"""T2S-DA: pulling target to source for domain-adaptive semantic segmentation."""

"""Everything that talks to Ray (Train workers, the TorchTrainer driver, Tune search).

The only package allowed to import ``ray``; the rest of t2sda stays plain PyTorch.
"""

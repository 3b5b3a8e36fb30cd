"""Command modules of ``python -m t2sda``: each holds its argparse arguments and its logic."""

#!/usr/bin/env python
"""Search T2S-DA hyperparameters with Ray Tune + Optuna; each trial is a Ray Train run.

    python tune.py --space pull_loss                  # embedded digits data, local Ray
    python tune.py --space pull_loss --preset gta2cs_daformer --gpu --storage s3://bucket/t2sda
    python tune.py --list-spaces

See ``python tune.py --help`` and the README.
"""

import sys

from t2sda.ray_glue.search import main

if __name__ == "__main__":
    sys.exit(main())

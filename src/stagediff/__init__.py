"""stagediff: stage-wise model diffing with sparse autoencoders.

Importing the package sets the offline/telemetry environment first, so nothing the
pipeline imports afterwards (Hugging Face, MLflow, DVC, great_expectations) tries the
network.
"""

from stagediff.env import apply_offline_env

apply_offline_env()

__version__ = "0.1.0"

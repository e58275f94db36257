"""The harness's Hydra sweeper (``hydra/sweeper=harness``, the project's default)."""

"""Where runs go: MLflow, embedded (SQLite under ``mlruns/``) or a tracking server."""

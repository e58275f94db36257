"""harness: explainable-AI experiments on image classifiers, tracked in MLflow.

Importing the package registers the ``project_root`` OmegaConf resolver used by ``conf/``.
"""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

OmegaConf.register_new_resolver(
    "project_root", lambda: str(Path(__file__).resolve().parents[2]), replace=True
)

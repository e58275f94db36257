"""harness: explainable-AI experiments on image classifiers, tracked in MLflow.

Importing the package registers the OmegaConf resolvers used by ``conf/``: ``project_root`` and
``join`` (a list as ``a+b``, ``none`` when empty, for run names).
"""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

OmegaConf.register_new_resolver(
    "project_root", lambda: str(Path(__file__).resolve().parents[2]), replace=True
)
OmegaConf.register_new_resolver(
    "join", lambda items: "+".join(str(i) for i in items) if items else "none", replace=True
)

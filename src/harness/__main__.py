"""``python -m harness``: the Hydra entry point; the job itself is :func:`harness.pipeline.run`."""

import sys

import hydra
from omegaconf import DictConfig

from harness import CONF_DIR
from harness.types import HarnessError


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from harness.pipeline import run

    try:
        run(cfg)
    except HarnessError as e:
        print(f"harness: error: {e}", file=sys.stderr)  # the run itself records it as FAILED
        if str(HydraConfig.get().mode) != "RunMode.MULTIRUN":
            sys.exit(1)  # single run: a clean message and a non-zero exit, no traceback


if __name__ == "__main__":
    main()

"""``python -m harness.benchmark``: the Hydra entry point; the work is :func:`harness.benchmark.core.run`."""

import sys

import hydra
from omegaconf import DictConfig

from harness import CONF_DIR
from harness.types import exit_cleanly


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from harness.benchmark.core import run

    rows = exit_cleanly("harness.benchmark", run, cfg)
    failed = [r["method"] for r in rows if r["status"] == "error"]
    if failed:
        print(f"harness.benchmark: error: method(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from harness.validate import open_keys

    sys.argv[1:] = open_keys(sys.argv[1:])  # model.kwargs.img_size=32 without a `+`
    main()

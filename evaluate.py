"""Score a checkpoint on a dataset split: python evaluate.py ckpt_path=CKPT data=synthetic (conf/evaluate.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from cellrcnn.evaluate import run

    run(cfg)


if __name__ == "__main__":
    main()

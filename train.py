"""Train a model, then evaluate it on the test split: python train.py experiment=quickstart (conf/train.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from cellrcnn.train import run

    run(cfg)


if __name__ == "__main__":
    main()

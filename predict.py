"""Segment images: python predict.py ckpt_path=CKPT input=FILE_OR_DIR output=DIR (conf/predict.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from cellrcnn.predict import run

    run(cfg)


if __name__ == "__main__":
    main()

"""Where the Hydra configs live (inside the package, so a wheel runs from any folder) and how
to compose them without the command line, for notebooks, tests and benchmarks.

Users add their own config folder on the command line, as Hydra allows everywhere:
``cellrcnn train --config-dir my_conf experiment=my_experiment`` (or ``hydra.searchpath``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"
# prediction's config stands alone: training's ``model`` group would capture ``model=nuclei``
PREDICT_CONF_DIR = Path(__file__).resolve().parent / "conf_predict"


def config_dir(config_name: str) -> Path:
    """The folder that holds ``<config_name>.yaml``."""
    return PREDICT_CONF_DIR if config_name == "predict" else CONF_DIR


def compose_config(
    config_name: str = "train", overrides: list[str] | tuple[str, ...] = (), output_dir: str | Path | None = None
) -> DictConfig:
    """The config ``cellrcnn <config_name> <overrides>`` would run with.

    ``output_dir`` stands in for Hydra's run folder (``${hydra:runtime.output_dir}``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir(config_name)), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(output_dir or Path.cwd()).resolve())
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg

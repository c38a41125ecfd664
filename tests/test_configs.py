"""Every config composes, and every experiment instantiates its model and datamodule."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from cellrcnn.data.datamodule import CellDataModule
from cellrcnn.modules.base import InstanceSegModule
from cellrcnn.train import CONF_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_experiments_found():
    assert {"quickstart", "synthetic_maskrcnn"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.name == experiment  # experiments name their run folder
    model = instantiate(cfg.model)
    assert isinstance(model, InstanceSegModule)
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, CellDataModule)
    assert int(model.hparams["net"]["in_channels"]) == datamodule.channels
    assert cfg.callbacks.model_checkpoint.monitor == "val/dsb_score"
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))
    assert Path(trainer.default_root_dir) == tmp_path.resolve()


@pytest.mark.parametrize("group", ["data", "model", "trainer", "logger"])
def test_every_group_option_composes(group, tmp_path):
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose_config("train", [f"{group}={option}"], tmp_path)
        assert group in cfg


def test_quickstart_is_bounded(tmp_path):
    cfg = compose_config("train", ["experiment=quickstart"], tmp_path)
    assert cfg.trainer.max_time is not None and cfg.trainer.max_epochs is not None
    assert cfg.data.synthetic is not None  # generated on first use, nothing downloaded
    assert cfg.model.net.preset == "cell"


def test_ddp_config_runs_on_cpu(tmp_path):
    cfg = compose_config("train", ["trainer=ddp"], tmp_path)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("cpu", 2, "ddp")


def test_evaluate_and_predict_configs_compose(tmp_path):
    cfg = compose_config("evaluate", ["ckpt_path=x.ckpt", "data=bbbc038"], tmp_path)
    assert cfg.data.root == "datasets/coco/bbbc038" and cfg.split == "test"
    cfg = compose_config("predict", ["input=a.png", f"output={tmp_path}"], tmp_path)
    assert cfg.ckpt_path is None and cfg.tile_size is None and cfg.precision == "auto"  # the model's own tiles

"""Every train / evaluate / predict command of the README composes as Hydra would compose it, so
a command that a config change broke fails here instead of for the reader. Also the SLURM
launcher and the Optuna search, which need their plugins but no cluster."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cellrcnn.config import compose_config

README = Path(__file__).resolve().parents[1] / "README.md"
ENTRY = re.compile(r"^(?:python (train|evaluate|predict)\.py|cellrcnn (train|evaluate|predict))(?:\s|$)")


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(config name, overrides)`` of every such command in the README's bash blocks (continued
    lines joined, comments dropped, ``-m``/``--multirun`` removed: composition is per job)."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            match = ENTRY.match(line)
            if not match or "--help" in line:
                continue
            words = shlex.split(line)[2:]
            if "-m" in words or "--multirun" in words:  # a sweep: its first job
                words = [w if "[" in w else re.sub(r"=([^,]*),.*", r"=\1", w) for w in words
                         if w not in ("-m", "--multirun")]
            commands.append((match.group(1) or match.group(2), words))
    return commands


def same_value(node, text: str) -> bool:
    """The composed value is what the command line said (numbers compared as numbers)."""
    try:
        return float(node) == float(text)
    except (TypeError, ValueError):
        return str(node).lower() == text.lower()


COMMANDS = readme_commands()


def test_readme_has_commands_of_every_entry_point():
    assert {name for name, _ in COMMANDS} == {"train", "evaluate", "predict"}
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize(("name", "overrides"), COMMANDS, ids=[" ".join([n, *o])[:80] for n, o in COMMANDS])
def test_readme_command_composes(name, overrides, tmp_path):
    cfg = compose_config(name, overrides, tmp_path)
    for override in overrides:
        key, _, value = override.partition("=")
        if "/" in key or key.startswith(("+", "~", "hydra")) or key in ("experiment", "hparams_search", "budget"):
            continue  # a group choice, not a value
        if key in ("data", "model", "trainer", "logger", "callbacks"):
            continue
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert same_value(node, value.strip("'\"")) or value.startswith("["), override


def test_multi_node_command_composes_onto_the_slurm_launcher(tmp_path):
    cfg = compose_config("train", ["hydra/launcher=slurm", "experiment=bbbc038_unet", "trainer=ddp",
                                   "trainer.accelerator=gpu", "trainer.devices=4", "trainer.num_nodes=2"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes) == ("ddp", 2)


def test_optuna_search_composes(tmp_path):
    cfg = compose_config("train", ["experiment=quickstart", "hparams_search=optuna"], tmp_path)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == cfg.callbacks.model_checkpoint.monitor == "val/dsb_score"
    assert set(cfg.hydra.sweeper.params) == {"model.optim.lr", "model.optim.warmup_steps"}


def test_experiments_override_only_what_they_change(tmp_path):
    """An experiment's group choices differ from train.yaml's defaults (an override that changes
    nothing hides which choices matter)."""
    import yaml

    from cellrcnn.config import CONF_DIR

    defaults = {k: v for d in yaml.safe_load((CONF_DIR / "train.yaml").read_text())["defaults"]
                if isinstance(d, dict) for k, v in d.items()}
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        for entry in yaml.safe_load(path.read_text()).get("defaults", []):
            for key, option in (entry.items() if isinstance(entry, dict) else ()):
                group = key.removeprefix("override /")
                assert defaults.get(group) != option, f"{path.name}: {key}: {option} is already the default"

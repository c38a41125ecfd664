"""The ``cellrcnn`` command as a user meets it: help texts, and mistakes answered with a message,
a hint and a non-zero exit status, before any output is written or a model is loaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cellrcnn.config import config_dir


def cellrcnn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``cellrcnn ARGS`` in ``cwd`` (as the console script, through ``python -m cellrcnn.cli``)."""
    return subprocess.run([sys.executable, "-m", "cellrcnn.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def top_level_keys(config: str) -> set[str]:
    return {k for k in yaml.safe_load((config_dir(config) / f"{config}.yaml").read_text()) if k not in ("defaults", "hydra")}


@pytest.mark.parametrize("command", ["predict", "evaluate", "train"])
def test_help_lists_every_option_with_an_example(command, tmp_path):
    proc = cellrcnn(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"Usage: cellrcnn {command}" in text and "Examples:" in text
    for key in top_level_keys(command):
        assert f"  {key}=" in text, f"{key} missing from cellrcnn {command} --help"
    if command == "predict":  # training's config groups are no options of prediction
        assert "experiment" not in text and "trainer" not in text
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("command", ["convert", "score", "calibrate"])
def test_help_of_the_other_commands_has_an_example(command, tmp_path):
    proc = cellrcnn(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: cellrcnn {command}" in proc.stdout and f"cellrcnn {command} " in proc.stdout.split("usage:")[1][20:]


def test_predict_chooses_a_shipped_model_by_name(tmp_path):
    """``model=nuclei`` is prediction's own option, not training's ``model`` config group."""
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "ok.png")
    proc = cellrcnn("predict", "input=ok.png", "output=o", "model=nuclei", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o" / "predictions.json").read_text())["images"][0]["model"] == "nuclei"
    # the run's log keeps the report the console showed, each line once on the console
    report = "ok.png: 0 objects -> o/ok.tif"
    assert report in (tmp_path / "run" / "predict.log").read_text() and proc.stdout.count(report) == 1


def test_predict_script_ends_with_every_output_and_log_line_written(tmp_path):
    """``python predict.py`` leaves without Python's finalisation (cellrcnn.cli.predict_and_exit):
    the outputs, the run's log and the console report are complete all the same."""
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "ok.png")
    script = Path(__file__).resolve().parents[1] / "predict.py"
    proc = subprocess.run([sys.executable, str(script), "input=ok.png", "output=o", "hydra.run.dir=run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {"ok.tif", "ok_overlay.png", "predictions.json", "coco_results.json"} <= {p.name for p in (tmp_path / "o").iterdir()}
    report = "ok.png: 0 objects by nuclei -> o/ok.tif"  # model=auto names the model it chose
    assert report in proc.stdout and report in (tmp_path / "run" / "predict.log").read_text()


def test_predict_mistakes_end_with_a_hint_and_write_nothing(tmp_path):
    (tmp_path / "keep.log").write_text("a file of the user's")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_text("not a png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "ok.png")
    cases = {
        ("input=missing", "output=o"): "no such file or folder",
        ("input=notes.txt", "output=o"): "not an image file",
        ("input=empty", "output=o"): "no images in this folder",
        ("input=ok.png",): "missing output=",
        ("input=ok.png", "output=o", "anomaly=true"): "add measure=true",
        ("input=ok.png", "output=o", "ckpt_path=nothere.ckpt"): "no such checkpoint",
        ("input=ok.png", "output=o", "diameter=-3"): "diameter is the objects' typical diameter",
        ("input=ok.png", "output=o", "exports=[svg]"): "unknown format",
        ("input=ok.png", "output=o", "model=nuclei_xl"): "no such shipped model",
        ("input=ok.png", "output=o", "precision=half"): "auto, float32 or bfloat16",
        ("input=ok.png", "output=o", "polarity=white"): "use polarity=auto",
        ("input=ok.png", "output=notes.txt/o"): "notes.txt is a file",  # not an error after predicting
    }
    for args, message in cases.items():
        proc = cellrcnn("predict", *args, "hydra.run.dir=run", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "hint:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "o").exists()  # checked before the output folder is made
        assert not (tmp_path / "run").exists()  # nor is Hydra's record of a run that did nothing kept
    proc = cellrcnn("predict", "input=missing", "output=o", cwd=tmp_path)  # Hydra's default run folder
    assert proc.returncode == 2 and not (tmp_path / "outputs").exists()
    assert (tmp_path / "keep.log").exists() and (tmp_path / "notes.txt").read_text() == "not an image"


def test_predict_refuses_an_output_folder_it_cannot_write_to(tmp_path, monkeypatch):
    """Tried by creating a file there, as os.access lets root write on a read-only file system; the
    read-only folder is simulated (root may write to any folder mode bits would close)."""
    import errno
    import tempfile

    from cellrcnn.config import compose_config
    from cellrcnn.errors import UsageError
    from cellrcnn.preflight import check_predict

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "ro").mkdir()
    tried = []

    def read_only(*args, dir=None, **kwargs):
        tried.append(Path(dir))
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / ".cellrcnn-write-test-x"))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    for output in (tmp_path / "ro", tmp_path / "ro" / "new" / "o"):  # the folder, or the nearest one above
        overrides = [f"input={tmp_path / 'ok.png'}", f"output={output}", "model=nuclei"]
        cfg = compose_config("predict", overrides, tmp_path)
        with pytest.raises(UsageError, match="Read-only file system") as raised:
            check_predict(cfg)
        assert f"cannot write in {tmp_path / 'ro'} " in str(raised.value), raised.value
        assert "output folder you can write to" in raised.value.hint and tried[-1] == tmp_path / "ro"
    assert not (tmp_path / "ro" / "new").exists()


@pytest.mark.parametrize("name", ["DAPI, 40x (2).png", "it's [1].png", "ядро=核.png"])
def test_predict_takes_file_names_as_typed(name, tmp_path):
    """Commas, brackets, quotes, ``=`` and non-ASCII letters, which Hydra's override grammar rejects
    unquoted, in the input's and the output's names."""
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / name)
    proc = cellrcnn("predict", f"input={name}", "output=résultats 核", "model=nuclei", "hydra.run.dir=run",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    images = json.loads((tmp_path / "résultats 核" / "predictions.json").read_text())["images"]
    assert name in json.dumps(images, ensure_ascii=False)


def test_literal_paths_quotes_what_hydra_would_misread():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cellrcnn.cli import literal_paths

    untouched = ["input=images/", "output=out/run_1", "input=/data/a b.png", "input='ядро 核.png'",
                 'output="x, y"', "input=a\\,b", "ckpt_path=null", "output=${hydra:runtime.output_dir}/pred",
                 "output=${x}/ядро", "exports=[geojson,imagej]", "diameter=30", "model=nuclei",
                 "hydra.run.dir=résultats", "--help"]
    assert literal_paths(untouched) == untouched
    assert literal_paths(["-m", "data.root=a,b"]) == ["-m", "data.root=a,b"]  # a sweep under --multirun
    parser = OverridesParser.create()
    names = ["DAPI, 40x (2).png", "it's [1].png", "ядро=核.png", "resü", "x{1}.png", "a=b.png", "2024.10",
             "a,b", "q\\'x", "ядро\\", "it's\\", "C:\\data\\ядро.png", "\\'", "'", 'say "hi".png']
    for key in ("input", "output", "ckpt_path", "init_weights", "data.root", "+init_weights"):
        for name in names:  # each read back by Hydra as the name typed
            (rewritten,) = literal_paths([f"{key}={name}"])
            assert rewritten.startswith(f"{key}='"), rewritten
            assert parser.parse_override(rewritten).value() == name, rewritten


@pytest.mark.slow
def test_predict_exits_non_zero_when_no_image_could_be_read(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_text("not a png")
    (tmp_path / "broken" / "b.tif").write_text("not a tiff")
    proc = cellrcnn("predict", "input=broken", "output=o", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode != 0
    assert "a.png" in proc.stdout + proc.stderr and "b.tif" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_requires_the_dataset(tmp_path):
    proc = cellrcnn("evaluate", "ckpt_path=model.ckpt", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode != 0
    assert "You must specify 'data'" in proc.stderr and "bbbc038" in proc.stderr


def test_evaluate_missing_checkpoint(tmp_path):
    proc = cellrcnn("evaluate", "ckpt_path=model.ckpt", "data=synthetic", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_a_misspelt_option_is_given_its_spelling(tmp_path):
    proc = cellrcnn("predict", "input=x.png", "output=o", "diamter=20", cwd=tmp_path)
    assert proc.returncode != 0
    assert "hint: no option 'diamter'; did you mean diameter?" in proc.stderr
    proc = cellrcnn("train", "trainr.max_time=1", cwd=tmp_path)
    assert "did you mean trainer?" in proc.stderr
    from cellrcnn.cli import misspelt_options

    assert misspelt_options(["input=a", "+extra=1", "zzz=2", "data.root=x"]) == []  # known, added, unlike any


def test_evaluate_before_any_conversion_names_the_convert_command(tmp_path):
    """Scoring a dataset that was never converted: the missing file and the command that writes it,
    no traceback, and no run folder left behind."""
    proc = cellrcnn("evaluate", "ckpt_path=nuclei", "data=bbbc038", "data.root=nowhere", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nowhere/annotations/test.json: no such annotation file" in proc.stderr
    assert "cellrcnn convert bbbc038 --src DOWNLOAD --out nowhere" in proc.stderr
    proc = cellrcnn("evaluate", "ckpt_path=nuclei", "data=nuclei_mix", "data.sources.bbbc038.root=a",
                    "data.sources.sbsst265.root=b", "data.sources.monuseg=null", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no source has a test split: a/annotations/test.json, b/annotations/test.json" in proc.stderr
    assert "cellrcnn convert sbsst265 --src DOWNLOAD --out b" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "outputs").exists()


def test_train_missing_dataset_names_the_convert_command(tmp_path):
    proc = cellrcnn("train", "data=bbbc038", "data.root=nowhere", "logger=none", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nowhere/annotations/train.json: no such annotation file" in proc.stderr
    assert "cellrcnn convert bbbc038 --src DOWNLOAD --out nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_command_and_version(tmp_path):
    proc = cellrcnn("frobnicate", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown command" in proc.stderr and "predict" in proc.stderr
    proc = cellrcnn("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("cellrcnn ")


TINY = ["data.synthetic.n_train=4", "data.synthetic.n_val=4", "data.synthetic.n_test=2", "data.synthetic.size=96",
        "data.crop_size=96", "data.batch_size=2", "model.net.fpn_channels=32", "model.net.returned_layers=[1,2,3]",
        "model.coco_metrics=false", "logger=none", "threads=1"]


@pytest.mark.slow
def test_console_script_trains_under_ddp_within_its_budget(tmp_path):
    """`cellrcnn train` (the console script) under two DDP processes: the ranks start, Lightning's
    lines are printed once per process and reach the run's log, calibration runs once, inside
    trainer.max_time."""
    script = Path(sys.executable).parent / "cellrcnn"
    if not script.is_file():
        pytest.skip("the cellrcnn console script is not installed in this environment")
    budget = 50
    proc = subprocess.run([str(script), "train", "trainer=ddp", f"trainer.max_time=00:00:00:{budget}",
                           "trainer.max_epochs=-1", "calibrate_share=0.3", f"data.root={tmp_path / 'data'}", *TINY,
                           "hydra.run.dir=run"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("Seed set to 0") == 2  # rank 0, and "[rank: 1] Seed set to 0"
    assert out.count("GPU available") == 1 and "INFO: " not in out
    assert "GPU available" in (tmp_path / "run" / "train.log").read_text()
    assert out.count("calibrated on") == 1
    report = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert 1 <= report["n_images"] <= 4
    wall = float(re.search(r"wall time (\d+) s since start of run", out).group(1))
    assert wall <= budget + 30  # training 70 % of the budget, calibration the rest, then the 2 test images


def test_empty_validation_split_is_said_out_loud(tmp_path, capsys):
    from hydra.utils import instantiate

    from cellrcnn.config import compose_config
    from cellrcnn.preflight import check_training

    cfg = compose_config("train", [f"data.root={tmp_path / 'data'}", "data.synthetic.n_train=2", "data.synthetic.n_val=0",
                                   "data.synthetic.n_test=1", "data.synthetic.size=64", "logger=none"], tmp_path)
    check_training(cfg, instantiate(cfg.data))
    out = capsys.readouterr().out
    assert "the val split" in out and "holds no images" in out and "no threshold calibration" in out
    assert "--splits" in out and "the test split" not in out


def test_users_config_dir_adds_to_the_shipped_configs(tmp_path):
    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nname: mine\ntrainer:\n  max_epochs: 3\n")
    proc = cellrcnn("train", "--config-dir", "my_conf", "experiment=mine", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert config["name"] == "mine" and config["trainer"]["max_epochs"] == 3
    assert config["model"]["_target_"] == "cellrcnn.modules.MaskRCNNModule"  # the shipped defaults still apply

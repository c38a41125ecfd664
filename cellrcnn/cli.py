"""The ``cellrcnn`` command and the ``python -m cellrcnn.<x>`` / ``python <x>.py`` entry points.

    cellrcnn train experiment=quickstart            # Hydra overrides, as python train.py
    cellrcnn evaluate ckpt_path=... data=bbbc038
    cellrcnn predict input=images/ output=out/
    cellrcnn convert bbbc038 --src stage1_train.zip --out datasets/coco/bbbc038
    cellrcnn calibrate last.ckpt val.json           # decision thresholds chosen on annotated images
    cellrcnn score predictions/ ground_truth/       # any tool's label images against ground truth
    cellrcnn serve --port 8000                      # HTTP API and web page

Each Hydra entry point imports its work only inside the function, so ``cellrcnn predict`` does
not pay for Lightning and the training stack before reading the first image.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import runpy
import sys

import hydra
from omegaconf import DictConfig

# configs live in the package (cellrcnn/conf); --config-dir adds a user's own folder
_HYDRA = {"version_base": "1.3", "config_path": "conf"}
PATH_KEYS = ("input", "output", "ckpt_path", "init_weights", "data.root")  # overrides whose value is a path


def literal_paths(argv: list[str]) -> list[str]:
    """``argv`` with the value of each path override (``PATH_KEYS``) single-quoted where Hydra would
    not read it as the name typed, so file and folder names are passed as they are.

    Hydra's override grammar rejects commas with spaces, brackets, braces, ``=``, quotes and any
    non-ASCII letter in an unquoted value (``input=ядро.png``: ``LexerNoViableAltException``), reads
    ``a,b`` as a sweep and ``2024.10`` as the number 2024.1. ``${...}`` interpolations are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    multirun = "-m" in argv or "--multirun" in argv
    rewritten = []
    for arg in argv:
        key, equals, value = arg.partition("=")
        is_path = equals and key.lstrip("+") in PATH_KEYS and "${" not in value
        if is_path and not read_as_typed(parser, arg, multirun):
            arg = f"{key}={hydra_quoted(value)}"
        rewritten.append(arg)
    return rewritten


def read_as_typed(parser, override: str, multirun: bool) -> bool:
    """Hydra reads the override's value as the text typed, or as the user meant it: ``null``, a value
    quoted or escaped by hand (``'a b'``, ``a\\,b``), a sweep under ``--multirun`` (a comma means one
    there). A backslash may be such an escape, so Hydra's reading wins (``\\\\server`` stays ``\\server``)."""
    from hydra.errors import HydraException

    value = override.partition("=")[2]
    try:
        parsed = parser.parse_override(override)
    except HydraException:
        return False
    if parsed.is_sweep_override():
        return multirun
    read = parsed.value()
    hand_made = value.startswith(("'", '"')) or "\\" in value
    return read is None or (isinstance(read, str) and (read == value or hand_made))


def hydra_quoted(value: str) -> str:
    """``value`` in single quotes as Hydra's grammar reads it back: inside quotes a backslash is
    itself, except a run of them before a quote (an escaped one or the closing one), which is halved."""
    escaped = re.sub(r"(\\*)'", lambda run: run.group(1) * 2 + "\\'", value)
    trailing = len(escaped) - len(escaped.rstrip("\\"))
    return "'" + escaped + "\\" * trailing + "'"


def with_literal_paths(entry):
    """A Hydra entry point that reads ``sys.argv`` after ``literal_paths``; sys.argv itself is
    rewritten, so the command Lightning's DDP launcher starts the other ranks with has it too."""

    @functools.wraps(entry)
    def run(*args, **kwargs):
        sys.argv[1:] = literal_paths(sys.argv[1:])
        try:
            return entry(*args, **kwargs)
        except SystemExit as exc:  # Hydra said what failed; a misspelt option also gets its spelling
            if exc.code not in (0, None):
                for line in misspelt_options(sys.argv[1:]):
                    print(line, file=sys.stderr)
            raise

    return run


def known_options() -> set[str]:
    """Every top-level option and config group of the commands' configs (train, evaluate, predict)."""
    from pathlib import Path

    import yaml

    here = Path(__file__).parent
    names = set()
    for folder in (here / "conf", here / "conf_predict"):
        names |= {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_")}
        for path in folder.glob("*.yaml"):
            names |= set(yaml.safe_load(path.read_text()) or {})
    return names - {"defaults"}


def misspelt_options(argv: list[str]) -> list[str]:
    """A hint per ``key=value`` argument whose key no config knows but resembles one that does
    (``diamter=20``: did you mean diameter?); Hydra's own message suggests ``+diamter=20``."""
    import difflib

    known, hints = known_options(), []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" not in arg or key[:1] in "+~-" or key.split(".")[0] in known:
            continue
        close = difflib.get_close_matches(key.split(".")[0], sorted(known), n=1, cutoff=0.75)
        if close:
            hints.append(f"hint: no option {key.split('.')[0]!r}; did you mean {close[0]}? (--help lists the options)")
    return hints


def yielding_threads() -> None:
    """Let waiting OpenMP threads sleep instead of spinning, for prediction and evaluation.

    With spinning threads (the OpenMP default) and torch's default of one thread per core, any
    other process on one of the cores stalls every parallel step: the thread sharing that core
    waits its turn while its partner spins (bench/predict_speed.py measures it under load). It
    takes effect only before torch loads OpenMP; a user's own ``OMP_WAIT_POLICY`` wins.
    """
    import os

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextlib.contextmanager
def user_errors(command: str):
    """Mistakes the user can fix from the message (a wrong option, a missing file or dataset, an
    unreadable image) end the command with that message and status 2, without a traceback."""
    from cellrcnn.errors import UsageError
    from cellrcnn.io import ImageReadError

    try:
        yield
    except (UsageError, ImageReadError, FileNotFoundError) as exc:
        print(f"cellrcnn {command}: error: {exc}", file=sys.stderr)
        remove_empty_run_record()
        sys.exit(2)


def remove_empty_run_record() -> None:
    """Delete the run folder Hydra made for a command that stopped before doing anything (only its
    ``.hydra`` record and log are there), and the empty folders above it up to the working
    directory, so a mistyped option leaves no ``outputs/<command>/<time>/`` behind."""
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    run, cwd = Path(hydra_cfg.runtime.output_dir).resolve(), Path.cwd().resolve()
    record = {".hydra", f"{hydra_cfg.job.name}.log"}
    # only a folder of Hydra's own, inside the working directory and not the directory itself
    if cwd not in run.parents or not (run / ".hydra").is_dir() or {p.name for p in run.iterdir()} - record:
        return
    shutil.rmtree(run, ignore_errors=True)
    for parent in run.parents:
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def one_console_for_lightning() -> None:
    """Lightning's messages through Hydra's job logging only (console and the run's log file),
    once each. Lightning adds console handlers of its own on import (``lightning``: ``INFO: ...``;
    ``lightning.pytorch`` / ``lightning.fabric`` when imported before Hydra set up logging, as under
    ``python -m cellrcnn.train``), which printed every line twice or kept it out of the log file."""
    import logging

    import lightning  # noqa: F401  (adds the handlers on import)

    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


@with_literal_paths
@hydra.main(config_name="train", **_HYDRA)
def train(cfg: DictConfig) -> float:
    """Returns the monitored validation metric (``optimized_metric``), the value sweepers optimise."""
    with user_errors("train"):
        one_console_for_lightning()
        from cellrcnn.train import run

        metrics = run(cfg)
    return float(metrics.get(cfg.get("optimized_metric") or "val/dsb_score", math.nan))


@with_literal_paths
@hydra.main(config_name="evaluate", **_HYDRA)
def _evaluate(cfg: DictConfig) -> float:
    """Returns the dsb_score of the evaluated split."""
    yielding_threads()
    with user_errors("evaluate"):
        from cellrcnn.preflight import check_evaluate

        check_evaluate(cfg)
        one_console_for_lightning()
        from cellrcnn.evaluate import run

        metrics = run(cfg)
    return float(metrics.get("dsb_score", math.nan))


def evaluate() -> None:
    """``cellrcnn evaluate``; ``data`` has no default (a default would silently score another dataset),
    so ``--help``, which composes the config, gets one that its text does not depend on."""
    if {"-h", "--help"} & set(sys.argv[1:]) and not any(a.startswith("data=") for a in sys.argv[1:]):
        sys.argv.append("data=synthetic")
    _evaluate()


@with_literal_paths
@hydra.main(config_name="predict", version_base="1.3", config_path="conf_predict")
def predict(cfg: DictConfig) -> int:
    """Returns the number of images segmented."""
    yielding_threads()
    with user_errors("predict"):
        from cellrcnn.preflight import check_predict

        check_predict(cfg)  # before the output folder is created or the model loaded
        from cellrcnn.predict import run

        summary = run(cfg)  # raises when no image of the input could be read
    return len(summary["images"])


def predict_and_exit() -> None:
    """``python predict.py`` / ``cellrcnn predict`` as a command: :func:`predict`, then the process
    ends without tearing down the interpreter.

    Python's finalisation frees every module's objects one by one; once torch is loaded that takes
    about 0.9 s here, a sixth of a cold ``predict.py`` on one image (bench/predict_speed.py). Every
    output is written and closed by then; the log handlers and stdio are flushed before leaving. An
    error still ends the usual way (status 2 and the message, or the traceback).
    """
    import logging
    import os

    predict()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _convert(argv: list[str]) -> int:
    from cellrcnn.data.convert import main

    return main(argv)


def _calibrate(argv: list[str]) -> int:
    from cellrcnn.calibrate import main

    return main(argv)


def _score(argv: list[str]) -> int:
    from cellrcnn.evaluation.__main__ import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from cellrcnn.serve import main

    return main(argv)


def _hydra(module: str):
    def call(argv: list[str]) -> int:
        # run as ``python -m cellrcnn.<module>``: Lightning's DDP launcher starts the other ranks
        # with that command; it would re-run sys.argv[0] as a script otherwise, and the
        # ``cellrcnn`` console script does not know which command it was running
        sys.argv = [sys.argv[0], *argv]
        runpy.run_module(f"cellrcnn.{module}", run_name="__main__", alter_sys=True)
        return 0

    return call


COMMANDS = {
    "train": (_hydra("train"), "train a model, then test it (Hydra overrides, e.g. experiment=quickstart)"),
    "evaluate": (_hydra("evaluate"), "score a checkpoint on a dataset split"),
    "predict": (_hydra("predict"), "segment images: label images, overlays, measurements, exports"),
    "convert": (_convert, "convert a public dataset or your own folder to COCO; validate, merge, stats"),
    "calibrate": (_calibrate, "choose a trained model's decision thresholds on annotated images"),
    "score": (_score, "score label images of any tool against ground-truth label images"),
    "serve": (_serve, "HTTP API and web page for a model"),
}


def usage() -> str:
    lines = ["usage: cellrcnn COMMAND [ARGS...]   (cellrcnn COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:9s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "example: cellrcnn predict input=images/ output=out/"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from cellrcnn import __version__

        print(f"cellrcnn {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"cellrcnn: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return int(COMMANDS[argv[0]][0](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

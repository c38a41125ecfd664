"""The ``cellrcnn`` command and the ``python -m cellrcnn.<x>`` / ``python <x>.py`` entry points.

    cellrcnn train experiment=quickstart            # Hydra overrides, as python train.py
    cellrcnn evaluate ckpt_path=... data=bbbc038
    cellrcnn predict input=images/ output=out/
    cellrcnn convert bbbc038 --src stage1_train.zip --out datasets/coco/bbbc038
    cellrcnn score predictions/ ground_truth/       # any tool's label images against ground truth
    cellrcnn serve --port 8000                      # HTTP API and web page

Each Hydra entry point imports its work only inside the function, so ``cellrcnn predict`` does
not pay for Lightning and the training stack before reading the first image.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

# configs live in the package (cellrcnn/conf); --config-dir adds a user's own folder
_HYDRA = {"version_base": "1.3", "config_path": "conf"}


@hydra.main(config_name="train", **_HYDRA)
def train(cfg: DictConfig):
    from cellrcnn.train import run

    return run(cfg)


@hydra.main(config_name="evaluate", **_HYDRA)
def evaluate(cfg: DictConfig):
    from cellrcnn.evaluate import run

    return run(cfg)


@hydra.main(config_name="predict", **_HYDRA)
def predict(cfg: DictConfig):
    from cellrcnn.predict import run

    return run(cfg)


def _convert(argv: list[str]) -> int:
    from cellrcnn.data.convert import main

    return main(argv)


def _score(argv: list[str]) -> int:
    from cellrcnn.evaluation.__main__ import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from cellrcnn.serve import main

    return main(argv)


def _hydra(entry):
    def call(argv: list[str]) -> int:
        sys.argv = [f"cellrcnn {entry.__name__}", *argv]
        entry()
        return 0

    return call


COMMANDS = {
    "train": (_hydra(train), "train a model, then test it (Hydra overrides, e.g. experiment=quickstart)"),
    "evaluate": (_hydra(evaluate), "score a checkpoint on a dataset split"),
    "predict": (_hydra(predict), "segment images: label images, overlays, measurements, exports"),
    "convert": (_convert, "convert a public dataset or your own folder to COCO; validate, merge, stats"),
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

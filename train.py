"""Train a model, then evaluate it on the test split: python train.py experiment=quickstart (cellrcnn/conf/train.yaml)."""

from cellrcnn.cli import train as main

if __name__ == "__main__":
    main()

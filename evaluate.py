"""Score a checkpoint on a dataset split: python evaluate.py ckpt_path=CKPT data=synthetic (cellrcnn/conf/evaluate.yaml)."""

from cellrcnn.cli import evaluate as main

if __name__ == "__main__":
    main()

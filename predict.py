"""Segment images: python predict.py ckpt_path=CKPT input=FILE_OR_DIR output=DIR (cellrcnn/conf_predict/predict.yaml)."""

from cellrcnn.cli import predict_and_exit as main

if __name__ == "__main__":
    main()

"""Small single-purpose tools of the YOLO11 -> TensorRT recipe book; run each as `python -m tools.<name> --help`."""

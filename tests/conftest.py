import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = REPO / "models" / "yolo11" / "yolo11n.onnx"
MINI = REPO / "data" / "coco-mini"
CALIB = REPO / "calib" / "images"


def _gpu_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0


requires_gpu = pytest.mark.skipif(not _gpu_tensorrt(), reason="needs TensorRT and an NVIDIA GPU")


def run_tool(*args, cwd=REPO, env=None):
    """Run a tool as a user would: python -m tools.X ...; returns CompletedProcess with text output."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env=env)

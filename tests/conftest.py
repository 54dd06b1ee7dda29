import os
import shutil
import signal
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


def tool_env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **extra}


def run_tool(*args, cwd=REPO, **env):
    """Run a tool as a user would: python -m tools.X ...; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env=tool_env(**env))


def start_tool(*args, cwd=REPO):
    """Start a tool in a process group of its own, as a shell starts a foreground job: os.killpg(p.pid, ...) then
    signals it the way Ctrl-C or `timeout` do (the tool and every process it forked). Ctrl-C gets its default action
    back first: a test run started in the background (`cmd &` in a script) inherits SIGINT ignored, and Python then
    leaves it ignored, so the tool would never see the Ctrl-C the test sends."""
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=tool_env(), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

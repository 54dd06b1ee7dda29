"""What the tools need to know about a YOLO11 detection ONNX, read from its graph instead of assumed from yolo11n.

Ultralytics names every ONNX node after the PyTorch module that made it (`/model.K/...` for top-level block K), and
the names survive ModelOpt's Q/DQ insertion and become TensorRT's layer names, so recipes' regexes, the sensitivity
groups and these checks all work on node names. From them: the blocks, the Detect head (the block with the DFL,
`/dfl/`), C2PSA's attention (`/attn/`) and the head's branches (cv2 box, cv3 class, one pair per stride level).
From the input and output: the input name, a static image size, the class count and the anchor count.

Exports from a model .yaml (random weights) carry the metadata entry `weights: random (...)`; `is_random_weights`
reads it so results can be labelled speed only: their mAP means nothing.
`python -m tools.yolo_graph MODEL.onnx` prints what is derived.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from tools.core.errors import UserError

STRIDES = (8, 16, 32)  # YOLO11 Detect's levels P3/P4/P5: one cv2/cv3 branch pair and a grid of anchors each
WEIGHTS_KEY = "weights"  # metadata_props entry written by tools.export; "random ..." marks a random-weight model
BLOCK = re.compile(r"^/model\.(\d+)/")
HEAD_BRANCHES = {"box": "cv2.", "cls": "cv3.", "dfl": "dfl/"}  # node-name prefixes inside the Detect block
MODEL_NAME = re.compile(r"yolo\d+[nslmx]")  # ultralytics' detector names (yolo11n ... yolo11x): each has a .yaml


def random_weights_note(source: str, seed: int) -> str:
    """The WEIGHTS_KEY value of a model built from `source` (an ultralytics .yaml) with torch seed `seed`."""
    return f"random (ultralytics {source}, seed {seed}) - speed only, no accuracy"


def anchor_count(height: int, width: int | None = None, strides=STRIDES) -> int:
    """Anchors of a height x width input: one per cell of each stride's grid (8400 at 640x640)."""
    width = height if width is None else width
    return sum((height // s) * (width // s) for s in strides)


def block_of(name: str) -> int | None:
    m = BLOCK.match(name)
    return int(m.group(1)) if m else None


def blocks(node_names) -> list[int]:
    """The top-level block indices K found in `/model.K/` node names, sorted."""
    return sorted({k for n in node_names if (k := block_of(n)) is not None})


def blocks_with(node_names, part: str) -> list[int]:
    """Blocks holding a node whose name contains `part` (e.g. "/dfl/", "/attn/")."""
    return sorted({k for n in node_names if part in n and (k := block_of(n)) is not None})


def head_block(node_names) -> int | None:
    """The Detect head: the one block with DFL nodes (None when there is no such single block)."""
    found = blocks_with(node_names, "/dfl/")
    return found[0] if len(found) == 1 else None


def head_branches(head: int) -> dict[str, str]:
    """{branch: node-name regex} of the head's box (cv2), class (cv3) and DFL branches."""
    return {branch: rf"^/model\.{head}/" + re.escape(prefix) for branch, prefix in HEAD_BRANCHES.items()}


def branch_levels(node_names, head: int, branch: str) -> set[str]:
    """The levels i of the head's `branch`.i modules (cv2.0, cv2.1, ...)."""
    rx = re.compile(rf"^/model\.{head}/{branch}\.(\d+)/")
    return {m.group(1) for n in node_names if (m := rx.match(n))}


def head_levels(node_names, head: int) -> int:
    """Stride levels of the head: how many cv2.i (box) branches also have their cv3.i (class) twin."""
    return len(branch_levels(node_names, head, "cv2") & branch_levels(node_names, head, "cv3"))


def dims(value_info) -> list:
    """A tensor's dims: ints where static, the symbolic name (or "?") where not."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


@dataclass(frozen=True)
class YoloGraph:
    input_name: str
    input: list  # [N, 3, H, W] as dims() gives them
    output: list  # [N, 4 + classes, anchors]
    classes: int
    imgsz: int | None  # static square input size, None when dynamic (engines are built with explicit shapes)
    anchors: int | None  # static anchor count, None when dynamic
    blocks: tuple[int, ...]
    head: int
    attention: tuple[int, ...]  # blocks with C2PSA attention
    branches: dict  # {"box" | "cls" | "dfl": node-name regex}
    metadata: dict

    @property
    def random_weights(self) -> bool:
        return self.metadata.get(WEIGHTS_KEY, "").startswith("random")


def io_layout(model, where) -> tuple:
    """(input value_info, input dims, output dims) of a one-input one-output [N,3,H,W] -> [N,4+classes,anchors]."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise UserError(f"{where}: a YOLO detector has one input and one output, this has {len(inputs)} and "
                        f"{len(model.graph.output)}; pass a YOLO11 detection model exported without NMS")
    i, o = dims(inputs[0]), dims(model.graph.output[0])
    if not (len(i) == 4 and i[1] == 3 and len(o) == 3 and isinstance(o[1], int) and o[1] > 4):
        raise UserError(f"{where}: input {i} / output {o} is not a YOLO detector's [N,3,H,W] -> [N,4+classes,anchors]; "
                        f"pass a YOLO11 detection ONNX (no NMS, no classify/pose/segment head)")
    return inputs[0], i, o


def static_size(i: list, o: list, where) -> tuple[int | None, int | None]:
    """(imgsz, anchors) where the model is static; a static pair must agree with strides 8/16/32."""
    imgsz = i[2] if isinstance(i[2], int) and i[2] == i[3] else None
    anchors = o[2] if isinstance(o[2], int) else None
    if imgsz and anchors and anchors != anchor_count(imgsz):
        raise UserError(f"{where}: {anchors} anchors for a {imgsz}x{imgsz} input, YOLO11 has {anchor_count(imgsz)} "
                        f"(strides {'/'.join(map(str, STRIDES))}); pass a YOLO11 detection ONNX")
    return imgsz, anchors


def detect_head(names: list[str], where) -> int:
    """The Detect block, checked to hold a box and a class branch per stride level."""
    head = head_block(names)
    if head is None or head_levels(names, head) != len(STRIDES):
        raise UserError(f"{where}: not a YOLO11 detector (no Detect head: no /model.K/dfl/ block with cv2/cv3 "
                        f"branches for strides {'/'.join(map(str, STRIDES))}); pass an ultralytics YOLO11 detection "
                        f"export (make export PT=...)")
    return head


def describe(model, where) -> YoloGraph:
    """Everything derived from an onnx.ModelProto; `where` names it in errors (one line, with the fix)."""
    value_info, i, o = io_layout(model, where)
    imgsz, anchors = static_size(i, o, where)
    names = [n.name for n in model.graph.node]
    head = detect_head(names, where)
    return YoloGraph(input_name=value_info.name, input=i, output=o, classes=o[1] - 4, imgsz=imgsz, anchors=anchors,
                     blocks=tuple(blocks(names)), head=head, attention=tuple(blocks_with(names, "/attn/")),
                     branches=head_branches(head), metadata={p.key: p.value for p in model.metadata_props})


def load(onnx_path):
    """onnx.ModelProto of `onnx_path`, or a one-line UserError."""
    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX model; {export_hint(path)}")
    try:
        return onnx.load(str(path))
    except Exception as e:  # DecodeError and friends
        raise UserError(f"{path}: not a valid ONNX model ({type(e).__name__}); re-export it") from None


def export_hint(path: Path) -> str:
    """How to make the missing model `path`: `make export` with the matching model name."""
    model = path.stem
    random = f", or PT={model}.yaml for random weights: speed only" if MODEL_NAME.fullmatch(model) else ""
    return f"export it (make export MODEL={model} PT={model}.pt{random}) or copy it there"


def is_random_weights(onnx_path) -> bool:
    """Whether `onnx_path` was exported from a model .yaml (random weights): its speed is real, its mAP is not."""
    model = load(onnx_path)
    return any(p.key == WEIGHTS_KEY and p.value.startswith("random") for p in model.metadata_props)

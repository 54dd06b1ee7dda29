"""What is YOLO11's own (preprocessing, decoding, graph facts, Q/DQ rules, calibrators, per-layer analysis); imports
tools.core only, never a verb (tests/test_layers.py)."""

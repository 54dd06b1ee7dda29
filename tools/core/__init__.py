"""The library every verb shares; it imports nothing above it (not tools.yolo, not a verb): tests/test_layers.py."""

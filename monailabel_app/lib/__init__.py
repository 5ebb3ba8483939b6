"""MaskSAM MONAI Label app: task classes (imported as ``lib`` by the app's main.py, like MONAI Label's
sample apps)."""

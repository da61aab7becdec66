"""Image decoding and dataset layouts (class folders, ImageNet-C trees)."""

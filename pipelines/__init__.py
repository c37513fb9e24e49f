"""vlm-embed: embed texts, images and text+image pairs with Qwen3-VL, in batch on Ray and online with Serve.

Importing this package is cheap: torch, transformers and Ray are imported by the modules that need them.
"""

__version__ = "0.1.0"

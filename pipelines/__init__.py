"""vlm-embed: embed texts, images and text+image pairs with Qwen3-VL, in batch on Ray and online with Serve.

Importing this package is cheap: torch, transformers and Ray are imported by the modules that need them.
"""

__version__ = "0.1.0"

# The Python API, imported on first use (PEP 562) so that `import pipelines` stays cheap. (`search` is not
# here: `pipelines.search` is the module; import the function from it.)
_LAZY = {
    "retrieve_context": "pipelines.search",
    "reduce_table": "pipelines.reduce",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")

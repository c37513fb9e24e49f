"""The Ray Serve app: the same `pipelines.embedder.Embedder` behind HTTP."""

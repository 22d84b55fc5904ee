"""Data: tokenizers, dataset preparation, prepared datasets and batch loaders."""

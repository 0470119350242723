"""Live widgets for KDEformer (ipywidgets + plotly FigureWidget), importable as ``kdeformer.widgets``.

    from kdeformer.widgets import AttentionExplorer
    AttentionExplorer()                     # MiniLM on the bundled text, layer 0, head 0
    AttentionExplorer((q, k, v))            # your own tensors: (N, D), (H, N, D) or (L, H, N, D)
"""
from .explorer import AttentionExplorer
from .state import Engine, Settings, kde_call_code, source_from_tensors, toy_source

__all__ = ["AttentionExplorer", "Engine", "Settings", "kde_call_code", "source_from_tensors", "toy_source"]

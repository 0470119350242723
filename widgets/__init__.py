"""Live widgets for KDEformer (ipywidgets + plotly), importable as ``kdeformer.widgets``.

    from kdeformer.widgets import AttentionExplorer
    AttentionExplorer()                     # MiniLM on the bundled text, layer 0, head 0
    AttentionExplorer((q, k, v))            # your own tensors: (N, D), (H, N, D) or (L, H, N, D)

`PlotBoard` draws any plotly figures in one widget (plotly.js loaded once, clicks reported back).
"""
from .board import PlotBoard
from .explorer import AttentionExplorer
from .state import Engine, Settings, call_code, kde_call_code, source_from_tensors, toy_source

__all__ = ["AttentionExplorer", "Engine", "PlotBoard", "Settings", "call_code", "kde_call_code", "source_from_tensors",
           "toy_source"]

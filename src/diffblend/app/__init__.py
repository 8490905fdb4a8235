"""The ``diffblend app`` web page: live preference sliders over a BlendPipeline (gradio).

``callbacks`` and ``fronts`` are plain functions over the library (testable without a browser);
``ui`` builds the gradio Blocks from them. Importing this package does not import gradio.
"""

from .callbacks import Session, make_session

__all__ = ["Session", "make_session"]

"""DREAM Studio: the Gradio app over dream_core.DreamPipeline.

    from app.ui import build_app, launch_app
    launch_app(build_app("assets/dream-shapes"))
"""

__all__ = ["build_app", "launch_app", "main"]


def __getattr__(name: str):  # keep `import app` light: gradio loads only when the UI is asked for
    if name in ("build_app", "launch_app"):
        from . import ui

        return getattr(ui, name)
    if name == "main":
        from .main import main

        return main
    raise AttributeError(name)

"""The Edit tab and the `inpaint` / `variations` API: a source image with a painted (or uploaded)
mask, or a strength, turned into what `generation.generate_stream` edits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dream_core.request import has_visible_text

from .images import load_mask, load_rgb
from .session import AppContext, SessionState, fail


@dataclass
class EditInput:
    """What an edit adds to the generation settings: the source image and either a pixel mask
    (inpainting, True = regenerate, the size of the image) or a strength (variations)."""

    image: Any  # PIL image
    mask: Any = None
    strength: Any = None
    paste_back: bool = True

    @property
    def kind(self) -> str:
        return "inpaint" if self.mask is not None else "variations"


EDIT_INPAINT, EDIT_VARIATIONS = "inpaint", "variations"
EDIT_MODES = (EDIT_INPAINT, EDIT_VARIATIONS)
EDIT_MODE_LABELS = {EDIT_INPAINT: "Inpaint the painted region", EDIT_VARIATIONS: "Variations (strength)"}


def editor_mask(layers: list | None, size: tuple[int, int]) -> Any:
    """The painted mask of an image editor: every pixel any brush layer covers (alpha > 0)."""
    import numpy as np

    mask = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers or []:
        if layer is None:
            continue
        rgba = layer.convert("RGBA")
        if rgba.size != size:
            raise fail(f"the painted layer is {rgba.width}x{rgba.height} pixels but the image is "
                       f"{size[0]}x{size[1]}; paint on the image again")
        mask |= np.asarray(rgba.getchannel("A")) > 0
    return mask


def edit_input(editor: Any, mode: Any, strength: Any, paste_back: Any) -> EditInput:
    """The Edit tab's image editor value (background + brush layers) as an edit: the painted
    layers are the mask (inpainting), or `strength` makes variations."""
    if mode not in EDIT_MODES:
        raise fail(f"edit mode must be one of {', '.join(EDIT_MODES)}, got {mode!r}")
    image = editor.get("background") if isinstance(editor, dict) else None
    if image is None:
        raise fail("upload, paste or send an image to edit first")
    image = image.convert("RGB")
    if mode == EDIT_INPAINT:
        return EditInput(image, mask=editor_mask(editor.get("layers"), image.size), paste_back=paste_back)
    return EditInput(image, strength=strength, paste_back=paste_back)


def edit_input_from_files(image_path: Any, mask_path: Any, strength: Any, paste_back: Any,
                          kind: str | None = None) -> EditInput:
    """The `inpaint` / `variations` API's files: the source image, and for inpainting a mask image
    the size of the source (white, i.e. nonzero, = regenerate; transparent pixels are not masked).
    `kind`: the endpoint asked (inpaint or variations; by default: variations when a strength is
    given), so what is missing is named as that endpoint's."""
    kind = kind or (EDIT_INPAINT if strength is None else EDIT_VARIATIONS)
    try:
        image = load_rgb(image_path)
        mask = None if mask_path is None else load_mask(mask_path)
    except ValueError as err:
        raise fail(str(err)) from None
    if kind == EDIT_INPAINT and mask is None:
        raise fail("inpaint needs a mask image: the size of the image, white where it is regenerated")
    if kind == EDIT_VARIATIONS and strength is None:
        raise fail("variations need a strength: the share of the tokens regenerated, greater than 0 and at most 1")
    return EditInput(image, mask=mask, strength=strength, paste_back=paste_back)


def edit_prompt(ctx: AppContext, prompt: Any, edit: EditInput) -> Any:
    """The prompt of an edit; variations without one use the model's own best caption of the image."""
    if edit.kind == EDIT_INPAINT or not (prompt is None or isinstance(prompt, str) and not has_visible_text(prompt)):
        return prompt  # checked by the request (a number or a list is refused there, not replaced)
    try:
        pipe = ctx.manager.require()
        if not pipe.captions:
            raise ValueError("this model has no caption bank to describe the image")
        return pipe.search(edit.image, top_k=1)[0][0]
    except ValueError as err:
        raise fail(f"type a prompt for the variations ({err})") from None


def edit_source(ctx: AppContext, session: SessionState, which: str) -> dict:
    """An image editor value holding a picture from History (the selected one) or the last result."""
    path = session.selected if which == "history" else (session.paths[0] if session.paths else None)
    if not path:
        raise fail("pick an image in the history first" if which == "history" else
                   "generate an image first: there is no result to edit yet")
    if not Path(path).is_file():
        raise fail("this image no longer exists; press Refresh in History")
    return {"background": path, "layers": [], "composite": path}

"""Pictures for the app: PNGs carrying their parameters, checked uploads, display upscaling, and
the live candidate grid (undecided tokens hatched, pruned candidates crossed out).

Gradio re-encodes PIL images as WebP, which drops PNG text chunks, so every image that must keep
its parameters is written here with PngInfo and handed to Gradio as a file path.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

from .params import INFOTEXT_KEY, PARAMS_KEY, ImageRecord, parse_infotext

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_SIDE = 4096
DISPLAY_SIZE = 512
TILE_SIZE = 128
CAPTION_HEIGHT = 38
GAP = 6

COLORS = {
    "decoding": (156, 163, 175),  # grey: still decoding, not scored yet
    "kept": (37, 99, 235),  # blue: survived a decision that kept several
    "chosen": (22, 163, 74),  # green: the winner, continuing to the end
    "final": (22, 163, 74),
    "pruned": (220, 38, 38),  # red: lost at the decision
    "stopped": (107, 114, 128),
}


# ----- PNG with parameters -----
def png_info(record: ImageRecord) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMS_KEY, json.dumps(record.to_dict(), ensure_ascii=False))
    info.add_text(INFOTEXT_KEY, record.infotext())
    return info


TMP_SUFFIX = ".png.tmp"


def save_png(image: Image.Image, path: str | Path, record: ImageRecord, exclusive: bool = False) -> Path:
    """Write atomically (temp file, then rename) so a half-written PNG never shows up under its
    name; a kill leaves at most a `*.png.tmp` (see remove_leftovers). `exclusive`: never replace
    an existing file, even one another process wrote a moment ago (FileExistsError instead)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=png_info(record))
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and create-exclusive: fails if the name is taken
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: reserve the name, then fill it
                with open(path, "xb"):
                    pass
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_leftovers(folder: str | Path, older_than: float = 60.0) -> list[Path]:
    """Delete `*.png.tmp` files an interrupted save left in `folder` and its subfolders. Only
    those older than `older_than` seconds: another process may be saving right now."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for tmp in folder.rglob(f"*{TMP_SUFFIX}"):
        try:
            if now - tmp.stat().st_mtime >= older_than:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass
    return removed


def check_image_size(width: int, height: int, max_side: int = MAX_UPLOAD_SIDE) -> None:
    """Refuse an image by the size its header declares, before any pixel is decoded."""
    if max(width, height) > max_side:
        raise ValueError(f"the image is too large ({width}x{height} pixels); at most {max_side} pixels per side "
                         f"({max_side * max_side:,} pixels)")


def header_size(source) -> tuple[int, int]:
    """(width, height) from an image file's header (PIL opens lazily: nothing is decoded).
    Raises ValueError for files PIL cannot identify, or declaring a decompression bomb."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller checks the size
            with Image.open(source) as image:
                return image.size
    except Image.DecompressionBombError:  # more than twice PIL's MAX_IMAGE_PIXELS, refused at open
        raise ValueError(f"the image is too large (more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels); "
                         f"at most {MAX_UPLOAD_SIDE} pixels per side") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError):
        raise ValueError("the file is not an image this app can read (PNG, JPEG, WebP, GIF, BMP)") from None


def open_checked(path: str | Path, max_bytes: int = MAX_UPLOAD_BYTES, max_side: int = MAX_UPLOAD_SIDE) -> Image.Image:
    """Open an uploaded file as an image, refusing non-images and oversized files with a clear
    ValueError (never a PIL traceback). The pixels are loaded only after the size checks."""
    if path is None:
        raise ValueError("no image given: upload, paste or pick one first")
    path = Path(path)
    if not path.is_file():
        raise ValueError("the uploaded file could not be found on the server; please upload it again")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"the file is too large ({size / 2**20:.1f} MB); the limit is {max_bytes / 2**20:.0f} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is stricter
            image = Image.open(path)  # lazy: reads the header only
        check_image_size(*image.size, max_side=max_side)  # before any pixel is decoded
        image.load()
    except ValueError:
        raise
    except Image.DecompressionBombError:
        raise ValueError(f"the image is too large (more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels); "
                         f"at most {max_side} pixels per side") from None
    except UnidentifiedImageError:
        raise ValueError(f"'{path.name}' is not an image this app can read (PNG, JPEG, WebP, GIF, BMP)") from None
    except (OSError, SyntaxError, EOFError) as err:
        raise ValueError(f"'{path.name}' is not a readable image ({err})") from None
    return image


# ----- reading uploads as they look -----
WHITE = (255, 255, 255)


def as_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale scaled to 8 bits (PIL's own conversion clips everything above
    255 to white): 16-bit data by 1/257, so a 16-bit copy of an 8-bit picture reads as the same
    pixels; integer data above 65535 and float data by their own range."""
    if image.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if image.mode == "F":
        top = 1.0 if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1) else max(float(finite.max()), 1.0)
    else:
        top = 65535.0 if finite.size == 0 or finite.max() <= 65535 else float(finite.max())
    scaled = np.nan_to_num(np.clip(values / top * 255.0, 0, 255)).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (phones store photos sideways
    with a rotation tag), in 8 bits per channel, a palette's transparency kept as alpha."""
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, TypeError, KeyError, SyntaxError):  # a damaged tag: shown as stored
        pass
    image = as_8bit(image)
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    elif image.mode not in ("1", "L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image


def load_rgb(path: str | Path | None) -> Image.Image:
    """An uploaded picture as the model reads it: upright, 8-bit RGB, transparent parts on white
    (as the emoji training images are). Refusals as open_checked's."""
    image = upright(open_checked(path))
    if image.mode in ("LA", "RGBA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_mask(path: str | Path | None) -> Image.Image:
    """An uploaded mask, upright and 8-bit like the image it masks, alpha kept: the engine masks a
    pixel only where it is nonzero and not transparent."""
    return upright(open_checked(path))


# ----- parameters stored in a PNG -----
MAX_RECORD_DEPTH = 16  # a record is a flat object with a few lists; deeper JSON is not one of ours


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a parameter can hold")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 overflows to infinity
        raise ValueError(f"{text} is out of range")
    return value


def _plain(value, depth: int = 0) -> bool:
    """True for JSON of at most MAX_RECORD_DEPTH levels whose numbers are all finite."""
    if depth > MAX_RECORD_DEPTH:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_plain(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    return True


def _record_from(parse, text: str) -> ImageRecord | None:
    """The record `parse(text)` describes, or None when the text is not a sane record (bad JSON,
    Infinity, NaN, numbers out of range, nesting deep enough to exhaust the parser's stack)."""
    try:
        data = parse(text)
        if not _plain(data):
            return None
        record = ImageRecord.from_dict(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    return record if _plain(record.to_dict()) else None


def read_record(path: str | Path) -> ImageRecord | None:
    """The parameters stored in a PNG made by this app (or an A1111-style 'parameters' text);
    None when the image carries none, or none that make sense. Raises ValueError for files that
    are not images."""
    image = open_checked(path)
    text = getattr(image, "text", None) or dict(image.info)
    raw = text.get(PARAMS_KEY)
    if isinstance(raw, str):
        record = _record_from(lambda t: json.loads(t, parse_constant=_refuse_constant, parse_float=_finite_float), raw)
        if record is not None:
            return record
    infotext = text.get(INFOTEXT_KEY)
    if isinstance(infotext, str) and infotext.strip():
        return _record_from(parse_infotext, infotext)
    return None


# ----- display -----
def upscale(image: Image.Image, target: int = DISPLAY_SIZE) -> Image.Image:
    """Integer NEAREST upscaling (crisp pixels) to at most `target`; larger images are left alone."""
    factor = max(1, target // max(image.size))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def fit(image: Image.Image, size: int) -> Image.Image:
    """Square image to `size` px: NEAREST when enlarging by an integer factor, BOX when shrinking."""
    if image.size == (size, size):
        return image
    if image.width < size and size % image.width == 0:
        return image.resize((size, size), Image.NEAREST)
    return image.resize((size, size), Image.BOX if image.width > size else Image.NEAREST)


def mark_undecided(image: Image.Image, undecided: np.ndarray | list[bool], tokens_per_side: int) -> Image.Image:
    """Dim and hatch every token patch that is still undecided (raster token order)."""
    undecided = np.asarray(undecided, dtype=bool).reshape(-1)
    if undecided.size != tokens_per_side**2:
        raise ValueError(f"mask has {undecided.size} tokens, expected {tokens_per_side}^2")
    if not undecided.any():
        return image
    base = image.convert("RGB")
    w, h = base.size
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    pw, ph = w / tokens_per_side, h / tokens_per_side
    spacing = max(4, int(min(pw, ph) // 4))
    for idx in np.flatnonzero(undecided):
        r, c = divmod(int(idx), tokens_per_side)
        x0, y0 = round(c * pw), round(r * ph)
        x1, y1 = round((c + 1) * pw), round((r + 1) * ph)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(40, 44, 52, 150))
        for off in range(-(y1 - y0), x1 - x0, spacing):  # diagonal hatching clipped to the patch
            xa, ya = x0 + off, y0
            xb, yb = x0 + off + (y1 - y0), y1
            if xa < x0:
                ya, xa = y0 + (x0 - xa), x0
            if xb > x1:
                yb, xb = yb - (xb - x1), x1
            if ya < yb:
                draw.line([xa, ya, xb - 1, yb - 1], fill=(255, 255, 255, 90), width=1)
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")


def explanation_overlay(image: Image.Image, contributions: np.ndarray | list[float], tokens_per_side: int) -> Image.Image:
    """Why a candidate scored what it did: every visible token tinted by its leave-one-out
    contribution to the SAD score (green = pulls towards the prompt, red = away; opacity
    proportional to |contribution| / the largest of the tile); hidden tokens (NaN) untouched."""
    values = np.asarray(contributions, dtype=np.float64).reshape(-1)
    if values.size != tokens_per_side**2:
        raise ValueError(f"explanation has {values.size} tokens, expected {tokens_per_side}^2")
    finite = np.isfinite(values)
    top = float(np.abs(values[finite]).max()) if finite.any() else 0.0
    base = image.convert("RGBA")
    if top <= 0:
        return base.convert("RGB")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    pw, ph = base.width / tokens_per_side, base.height / tokens_per_side
    for idx in np.flatnonzero(finite):
        r, c = divmod(int(idx), tokens_per_side)
        v = values[idx] / top
        color = (22, 163, 74) if v > 0 else (220, 38, 38)
        box = [round(c * pw), round(r * ph), round((c + 1) * pw) - 1, round((r + 1) * ph) - 1]
        draw.rectangle(box, fill=(*color, int(30 + 150 * abs(v))), outline=(*color, 220))
    return Image.alpha_composite(base, overlay).convert("RGB")


def image_sha256(image: Image.Image) -> str:
    """SHA-256 of an image's pixels as RGB bytes (row-major, 8 bit) after its size as "WxH;": the
    same for the same picture whatever file format or metadata carried it."""
    import hashlib

    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height};".encode() + rgb.tobytes()).hexdigest()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


@dataclass
class Tile:
    """One candidate in the live grid."""

    image: Image.Image  # already marked (undecided hatched) if wanted
    candidate: int
    state: str = "decoding"  # decoding | kept | chosen | final | pruned | stopped
    score: float | None = None
    rank: int | None = None
    num_ranked: int | None = None
    _rendered: tuple | None = field(default=None, repr=False, compare=False)  # (key, image, canvas)


def render_tile(tile: Tile, size: int = TILE_SIZE) -> Image.Image:
    """The tile with its coloured frame, caption and (pruned) cross. Cached on the tile: pruned
    candidates stay frozen after the decision and are redrawn in every later grid."""
    key = (size, tile.state, tile.score, tile.rank, tile.num_ranked)
    cached = tile._rendered
    if cached is not None and cached[0] == key and cached[1] is tile.image:
        return cached[2]
    canvas = _render_tile(tile, size)
    tile._rendered = (key, tile.image, canvas)
    return canvas


def _render_tile(tile: Tile, size: int) -> Image.Image:
    if tile.state not in COLORS:
        raise ValueError(f"unknown tile state {tile.state!r}")
    color = COLORS[tile.state]
    canvas = Image.new("RGB", (size + 6, size + 6 + CAPTION_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, size + 5, size + 5], fill=color)
    img = fit(tile.image.convert("RGB"), size)
    if tile.state == "pruned":
        grey = img.convert("L").convert("RGB")
        img = Image.blend(grey, Image.new("RGB", img.size, (255, 255, 255)), 0.45)
    canvas.paste(img, (3, 3))
    if tile.state == "pruned":
        draw.line([8, 8, size - 3, size - 3], fill=COLORS["pruned"], width=4)
        draw.line([size - 3, 8, 8, size - 3], fill=COLORS["pruned"], width=4)
        font = _font(14)
        text = "PRUNED"
        bx = draw.textbbox((0, 0), text, font=font)
        tw, th = bx[2] - bx[0], bx[3] - bx[1]
        cx, cy = 3 + (size - tw) // 2, 3 + (size - th) // 2
        draw.rounded_rectangle([cx - 6, cy - 5, cx + tw + 6, cy + th + 7], radius=4, fill=COLORS["pruned"])
        draw.text((cx - bx[0], cy - bx[1] + 1), text, font=font, fill=(255, 255, 255))
    line1 = f"#{tile.candidate}"
    label = {"decoding": "decoding", "kept": "kept", "chosen": "chosen", "final": "final",
             "pruned": "pruned", "stopped": "stopped"}[tile.state]
    line1 += f"  {label}"
    line2 = ""
    if tile.score is not None:
        line2 = f"score {tile.score:+.3f}"
        if tile.rank is not None:
            line2 += f"  rank {tile.rank}/{tile.num_ranked}" if tile.num_ranked else f"  rank {tile.rank}"
    font = _font(13)
    text_color = color if tile.state != "decoding" else (75, 85, 99)
    draw.text((4, size + 8), line1, font=font, fill=text_color)
    if line2:
        draw.text((4, size + 8 + 15), line2, font=font, fill=(55, 65, 81))
    return canvas


def grid_columns(n: int) -> int:
    """Square-ish grids fit the square preview box best: 2x2 for 4, 3x3 for 9, 4x4 for 16."""
    return max(1, math.ceil(math.sqrt(n)))


def candidate_grid(tiles: list[Tile], tile_size: int = TILE_SIZE) -> Image.Image:
    """Tiles in candidate order, in a square-ish grid."""
    if not tiles:
        raise ValueError("no tiles to draw")
    cols = grid_columns(len(tiles))
    rows = math.ceil(len(tiles) / cols)
    tw, th = tile_size + 6, tile_size + 6 + CAPTION_HEIGHT
    grid = Image.new("RGB", (cols * tw + (cols - 1) * GAP, rows * th + (rows - 1) * GAP), (255, 255, 255))
    for i, tile in enumerate(sorted(tiles, key=lambda t: t.candidate)):
        r, c = divmod(i, cols)
        grid.paste(render_tile(tile, tile_size), (c * (tw + GAP), r * (th + GAP)))
    return grid


def tile_size_for(num_candidates: int, grid_width: int = 420) -> int:
    """Preview tile edge so the whole grid is about `grid_width` px wide: big tiles for a few
    candidates, small ones for 16 (previews stay small so the browser keeps up)."""
    cols = grid_columns(num_candidates)
    return max(48, min(256, (grid_width - (cols - 1) * GAP) // cols - 6))


def score_chart(scores: list[float | None], states: list[str], width: int = 440) -> Image.Image:
    """Horizontal bars of the candidates' SAD scores, coloured by fate (chosen/kept/pruned).
    The axis spans the scores (labelled at both ends), so small gaps between candidates show."""
    rows = [(cid, s, states[cid]) for cid, s in enumerate(scores) if s is not None]
    if not rows:
        raise ValueError("no scores to draw")
    row_h, top, bottom, left, right = 20, 8, 26, 40, 70
    height = top + bottom + row_h * len(rows)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font, small = _font(12), _font(11)
    vals = [s for _, s, _ in rows]
    lo, hi = min(vals), max(vals)
    span = hi - lo if hi > lo else max(abs(hi), 0.05)
    lo, hi = lo - 0.25 * span, hi + 0.05 * span
    x0, x1 = left, width - right

    def x(v: float) -> float:
        return x0 + (v - lo) / (hi - lo) * (x1 - x0)

    if lo < 0 < hi:
        draw.line([x(0), top - 2, x(0), height - bottom + 2], fill=(156, 163, 175), width=1)
    for i, (cid, s, state) in enumerate(rows):
        y = top + i * row_h
        draw.text((4, y + 3), f"#{cid}", font=font, fill=(55, 65, 81))
        end = max(x0 + 2, x(s))
        draw.rectangle([x0, y + 3, end, y + row_h - 3], fill=COLORS.get(state, COLORS["kept"]))
        draw.text((end + 5, y + 3), f"{s:+.3f}", font=font, fill=(55, 65, 81))
    axis_y = height - bottom + 4
    grey = (107, 114, 128)
    draw.line([x0, axis_y, x1, axis_y], fill=(156, 163, 175))
    draw.text((x0, axis_y + 4), f"{lo:+.3f}", font=small, fill=grey)
    label = f"{hi:+.3f}"
    draw.text((x1 - draw.textlength(label, font=small), axis_y + 4), label, font=small, fill=grey)
    mid = "cosine(candidate, prompt)"
    draw.text(((x0 + x1 - draw.textlength(mid, font=small)) / 2, axis_y + 4), mid, font=small, fill=grey)
    return img

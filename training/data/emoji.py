"""Three open emoji sets as training data: Noto, Twemoji and OpenMoji, fetched from npm at build time.

The images are never committed (OpenMoji's share-alike licence applies to arrays derived from it):
`fetch_packages` runs `npm pack NAME@VERSION` into a cache folder and `build_emoji_set` decodes the
emoji present in all three sets to 64 x 64 RGB on white, each cropped to its alpha extent and padded
evenly to a square (OpenMoji's art fills ~78 % of its box, the others ~100 %: without this the size
alone would give the style away). The result is one `emoji-64.npz` (uint8 images, no pickle) and an
`emoji-64.json` with each emoji's key, name, keywords, group and skin tone.

Keys: the codepoints with FE0F dropped and each padded to 4 hex digits (this matches 3,786 emoji
across the three packages). The split is fixed and reproducible: the OpenMoji images (base and skin
tones) of every base emoji with int(sha256(base_key), 16) % 10 == 0 are held out of training.

    python -m training.data.emoji --cache runs/emoji-data        # fetch + build (idempotent)

`build_extra_art` adds the older Noto art of two earlier emoji-datasource-google releases (Android 7
and 8, the same licence) as extra training pictures of the set's emoji, kept where Google redrew
them (recipe.extra_art; `--extra-art` below).

    python -m training.data.emoji --cache runs/emoji-data --extra-art   # also the older Noto art

`EmojiSource` is a map-style source like the others in `training.data.sources`: sample i is
(image i % P, caption template i // P) of the split's P images, so a pass visits every image with
every template, and the stream resumes exactly. Its caption bank (reverse search's) is every
emoji's name, each with a detail shown beside it and never embedded: the emoji and its keywords.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
MARGIN = 2  # pixels of white left around the art on each side after normalising its scale
STYLES = ("noto", "twemoji", "openmoji")  # the style words of the captions, in the arrays' style order
SKIN_TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
              "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}
HELDOUT_MODULUS = 10  # a base emoji whose key hashes to 0 mod this has its OpenMoji images held out


@dataclass(frozen=True)
class EmojiPackage:
    style: str
    name: str
    version: str
    images: str  # folder of the images inside the package
    suffix: str
    licence: str
    attribution: str


PACKAGES = (
    EmojiPackage("noto", "emoji-datasource-google", "16.0.0", "img/google/64", ".png", "Apache-2.0",
                 "Noto Emoji by Google Inc., Apache License 2.0 (via emoji-datasource-google); images "
                 "cropped, padded and resized to 64 x 64"),
    EmojiPackage("twemoji", "emoji-datasource-twitter", "16.0.0", "img/twitter/64", ".png", "CC-BY-4.0",
                 "Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0 (via emoji-datasource-twitter); "
                 "images cropped, padded and resized to 64 x 64"),
    EmojiPackage("openmoji", "openmoji", "17.0.0", "color/svg", ".svg", "CC-BY-SA-4.0",
                 "All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0; "
                 "images rendered, cropped, padded and resized to 64 x 64"),
)
PACKAGE_OF_STYLE = {p.style: p for p in PACKAGES}
# Older Noto art that emoji-datasource-google shipped before Google redesigned it: Android 7's
# (2017, the "blob" faces) and Android 8's. The same set and licence as the noto style, drawn
# differently: extra pictures of an emoji for training (`build_extra_art`, recipe.extra_art),
# captioned without a style word so that "noto style" keeps meaning the current art.
EXTRA_PACKAGES = tuple(
    EmojiPackage("noto", "emoji-datasource-google", version, "img/google/64", ".png", "Apache-2.0",
                 f"Noto Emoji of Android {android} by Google Inc. (The Android Open Source Project), Apache License "
                 f"2.0 (via emoji-datasource-google@{version}); images cropped, padded and resized to 64 x 64")
    for version, android in (("3.0.0", 7), ("4.0.4", 8))
)
# An extra picture is kept only if it differs from its emoji's current Noto picture and from the
# extra pictures kept before it by more than this mean absolute difference (pixels in [0, 1]): a
# redrawing, not the same art again.
EXTRA_DISTINCT = 0.05
EXTRA_SET = "emoji-extra-64"  # .npz (images, emoji index, package index) + .json beside the set
OPENMOJI_DATA = "data/openmoji.json"  # names (CLDR short names), keywords, groups, skin tones
# The style whose files are named by emoji-datasource's `unified` sequence: FE0F kept where the
# emoji needs it to be shown as an emoji (a record's key drops it).
QUALIFIED_STYLE = "noto"


def emoji_key(codepoints: str) -> str:
    """'1f44b-fe0f' or '1F44B' -> '1F44B': FE0F dropped, each codepoint upper case, 4+ hex digits."""
    parts = [c.upper().zfill(4) for c in codepoints.replace("_", "-").split("-") if c and c.upper() != "FE0F"]
    return "-".join(parts)


def base_key(key: str) -> str:
    """The key without skin-tone modifiers: every skin variant shares its base's split."""
    return "-".join(c for c in key.split("-") if c not in SKIN_TONES)


def is_heldout(base: str) -> bool:
    return int(hashlib.sha256(base.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def package_dir(cache: Path, pkg: EmojiPackage) -> Path:
    return cache / f"{pkg.name}-{pkg.version}"


def fetch_packages(cache: Path, packages: tuple[EmojiPackage, ...] = PACKAGES) -> None:
    """`npm pack` each package into `cache` and unpack it; a package already unpacked is kept."""
    cache.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        dest = package_dir(cache, pkg)
        if (dest / "package" / "package.json").is_file():
            continue
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("the emoji data is fetched with npm, which is not installed: install Node.js "
                               "and npm (Debian: apt-get install npm)")
        spec = f"{pkg.name}@{pkg.version}"
        proc = subprocess.run([npm, "pack", spec, "--pack-destination", str(cache), "--silent"],
                              capture_output=True, text=True)
        tgz = cache / f"{pkg.name}-{pkg.version}.tgz"
        if proc.returncode or not tgz.is_file():
            raise RuntimeError(f"npm pack {spec} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(tgz) as tar:
            tar.extractall(partial, filter="data")
        partial.rename(dest)  # only a complete unpack gets the final name
        tgz.unlink()


def svg_renderer():
    """cairosvg, or a RuntimeError that names what to install."""
    try:
        import cairosvg
    except (ImportError, OSError) as err:  # cairocffi raises OSError when libcairo2 is missing
        raise RuntimeError("OpenMoji's SVGs are rendered with cairosvg, which needs the cairo library: "
                           "pip install cairosvg and apt-get install libcairo2") from err
    return cairosvg


def normalise(rgba: Image.Image, size: int = IMAGE_SIZE, margin: int = MARGIN) -> np.ndarray:
    """Crop to the alpha extent, pad evenly to a square, resize to `size` - 2 * margin, put on white:
    [size, size, 3] uint8. Every style then fills its box alike."""
    rgba = rgba.convert("RGBA")
    box = rgba.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is not None:
        rgba = rgba.crop(box)
    side = max(rgba.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    inner = size - 2 * margin
    square = square.resize((inner, inner), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(square, (margin, margin))
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def render_svg(path: Path) -> np.ndarray:
    """An SVG rendered at 4x the set's size, then normalised like every image of the set."""
    png = svg_renderer().svg2png(url=str(path), output_width=4 * IMAGE_SIZE, output_height=4 * IMAGE_SIZE)
    return normalise(Image.open(io.BytesIO(png)))


def read_package_image(cache: Path, pkg: EmojiPackage, filename: str) -> np.ndarray:
    path = package_dir(cache, pkg) / "package" / pkg.images / filename
    if pkg.suffix == ".svg":
        return render_svg(path)
    with Image.open(path) as im:
        return normalise(im)


def _files(cache: Path, pkg: EmojiPackage) -> dict[str, str]:
    folder = package_dir(cache, pkg) / "package" / pkg.images
    return {emoji_key(f[: -len(pkg.suffix)]): f for f in sorted(os.listdir(folder)) if f.endswith(pkg.suffix)}


def emoji_records(cache: Path) -> list[dict]:
    """One record per emoji present in all three packages, in OpenMoji's order: key, base, name,
    keywords (CLDR; a skin-tone variant inherits its base's), group, subgroup, skin tone, files."""
    files = {pkg.style: _files(cache, pkg) for pkg in PACKAGES}
    meta = json.loads((package_dir(cache, PACKAGE_OF_STYLE["openmoji"]) / "package" / OPENMOJI_DATA).read_text())
    by_key = {emoji_key(r["hexcode"]): r for r in meta}
    records = []
    for r in meta:
        key = emoji_key(r["hexcode"])
        if not all(key in files[s] for s in STYLES):
            continue
        base = base_key(key)
        tags = r["tags"] or (by_key.get(base) or {}).get("tags", "")
        tones = [SKIN_TONES[c] for c in key.split("-") if c in SKIN_TONES]
        records.append({
            "key": key, "base": base, "name": r["annotation"], "keywords": [t.strip() for t in tags.split(",") if t.strip()],
            "group": r["group"], "subgroup": r["subgroups"], "skin_tone": tones[0] if len(set(tones)) == 1 else
            ("mixed" if tones else "none"), "files": {s: files[s][key] for s in STYLES},
        })
    return records


def build_emoji_set(cache: Path) -> Path:
    """Fetch the packages and write cache/emoji-64.npz + emoji-64.json (skipped when both exist).
    Both are written under temporary names and renamed at the end: never half-written."""
    cache = Path(cache)
    built = built_file(cache, "emoji-64")
    if built is not None:
        return built
    fetch_packages(cache)
    svg_renderer()  # fail before the long loop, not in the middle of it
    records = emoji_records(cache)
    if len(records) != len({r["name"] for r in records}):
        raise RuntimeError("two emoji share a name: the captions would not tell them apart")
    images = np.zeros((len(records), len(STYLES), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, r in enumerate(records):
        for s, style in enumerate(STYLES):
            images[i, s] = read_package_image(cache, PACKAGE_OF_STYLE[style], r["files"][style])
    return write_built_file(cache, "emoji-64", {"images": images}, {
        "styles": list(STYLES), "image_size": IMAGE_SIZE, "margin": MARGIN,
        "packages": [f"{p.name}@{p.version}" for p in PACKAGES], "records": records})


def built_file(cache: Path, stem: str) -> Path | None:
    """cache/STEM.npz when it and its STEM.json both exist (a finished build), else None."""
    out = cache / f"{stem}.npz"
    return out if out.is_file() and out.with_suffix(".json").is_file() else None


def write_built_file(cache: Path, stem: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write cache/STEM.npz (no pickle) + STEM.json under temporary names and rename them at the
    end, so that a build is never found half-written."""
    tmp = cache / f"{stem}.partial.npz"
    np.savez_compressed(tmp, **arrays)
    tmp_meta = cache / f"{stem}.partial.json"
    tmp_meta.write_text(json.dumps(meta, indent=0))
    out = cache / f"{stem}.npz"
    tmp.rename(out)
    tmp_meta.rename(out.with_suffix(".json"))
    return out


def build_extra_art(cache: Path) -> Path:
    """Build the set if needed, fetch EXTRA_PACKAGES and write cache/emoji-extra-64.npz + .json:
    every extra picture of an emoji of the set that differs from its current Noto picture and from
    the extra pictures kept before it (EXTRA_DISTINCT). Skipped when both exist; written under
    temporary names and renamed at the end, like the set."""
    cache = Path(cache)
    done = built_file(cache, EXTRA_SET)
    if done is not None:
        return done
    built = build_emoji_set(cache)
    records = json.loads(built.with_suffix(".json").read_text())["records"]
    with np.load(built, allow_pickle=False) as z:
        images = z["images"]
    fetch_packages(cache, EXTRA_PACKAGES)
    files = [_files(cache, pkg) for pkg in EXTRA_PACKAGES]
    kept, emoji, package = [], [], []
    for e, r in enumerate(records):
        pictures = [images[e, STYLES.index(QUALIFIED_STYLE)].astype(np.float32) / 255]  # the current Noto art
        for j, pkg in enumerate(EXTRA_PACKAGES):
            if r["key"] not in files[j]:
                continue
            art = read_package_image(cache, pkg, files[j][r["key"]])
            pixels = art.astype(np.float32) / 255
            if min(float(np.abs(pixels - p).mean()) for p in pictures) > EXTRA_DISTINCT:
                pictures.append(pixels)
                kept.append(art)
                emoji.append(e)
                package.append(j)
    arrays = {"images": np.asarray(kept, np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3),
              "emoji": np.asarray(emoji, np.int64), "package": np.asarray(package, np.int64)}
    return write_built_file(cache, EXTRA_SET, arrays, {
        "packages": [f"{p.name}@{p.version}" for p in EXTRA_PACKAGES], "distinct": EXTRA_DISTINCT,
        "images": len(kept), "per_package": [package.count(j) for j in range(len(EXTRA_PACKAGES))]})


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

# What a person would type: the name alone (any style), the name with a style word, the name with a
# few keywords. Sample i of a pass uses template i // P, so every image meets every template.
CAPTION_TEMPLATES = (
    "{name}",
    "{name}, {style} style",
    "a {name} emoji in {style} style",
    "{name}, {keywords}",
    "{name} emoji, {keywords}, {style} style",
)
MAX_KEYWORDS = 3


def parse_templates(text: str) -> tuple[int, ...]:
    """recipe.caption_templates ("0,3") as template indices; "" = every template."""
    if not text.strip():
        return tuple(range(len(CAPTION_TEMPLATES)))
    try:
        ids = tuple(int(t) for t in text.split(","))
    except ValueError:
        ids = ()
    if not ids or len(set(ids)) != len(ids) or not all(0 <= t < len(CAPTION_TEMPLATES) for t in ids):
        raise ValueError(f"caption_templates must list distinct indices 0-{len(CAPTION_TEMPLATES) - 1} of "
                         f"{list(CAPTION_TEMPLATES)}, got {text!r}")
    return ids


def caption(record: dict, style: str, template: int, salt: int = 0) -> str:
    """Caption `template` of (record, style); the keywords are a few of the emoji's CLDR keywords,
    chosen by a hash of (key, style, template, salt) so a caption is a pure function of its sample."""
    words = keywords_to_add(record)
    text = CAPTION_TEMPLATES[template]
    if "{keywords}" in text and not words:
        text = CAPTION_TEMPLATES[1]  # no keyword to add: the name and the style
    h = int(hashlib.sha256(f"{record['key']}|{style}|{template}|{salt}".encode()).hexdigest(), 16)
    rng = np.random.default_rng(h % (1 << 63))
    picked = [words[j] for j in sorted(rng.permutation(len(words))[:MAX_KEYWORDS])] if words else []
    return text.format(name=record["name"], style=style, keywords=", ".join(picked))


def keywords_to_add(record: dict) -> list[str]:
    """The emoji's CLDR keywords that its name does not already say."""
    return [w for w in record["keywords"] if w.lower() not in record["name"].lower()]


def style_free(templates: tuple[int, ...]) -> tuple[int, ...]:
    """The templates among `templates` whose captions name no style (an extra picture's)."""
    return tuple(t for t in templates if "{style}" not in CAPTION_TEMPLATES[t])


def unstyled_caption(record: dict, template: int, salt: int = 0) -> str:
    """Style-free `template`'s caption of an extra picture: the name alone where a keyword template
    has no keyword to add (`caption` would fall back to naming a style)."""
    if "{keywords}" in CAPTION_TEMPLATES[template] and not keywords_to_add(record):
        return record["name"]
    return caption(record, "extra", template, salt)


def bank_entry(record: dict) -> str:
    """The caption bank line of an emoji (reverse search answers with these): its name alone, the
    prompt a person would type, with every style's image matching it."""
    return record["name"]


def emoji_text(record: dict) -> str:
    """The emoji itself, as text that renders as an emoji: the codepoints of its emoji-datasource
    file name (FE0F kept where needed), or of its key for a record without that file."""
    file = record.get("files", {}).get(QUALIFIED_STYLE)
    codepoints = file.rsplit(".", 1)[0] if file else record["key"]
    return "".join(chr(int(c, 16)) for c in codepoints.split("-"))


def bank_detail(record: dict) -> str:
    """What reverse search shows beside an emoji's name, never embedded: the emoji and all its CLDR
    keywords (a skin-tone variant's are its base's), e.g. "😀  face, grin, grinning"."""
    keywords = ", ".join(" ".join(w.split()) for w in record["keywords"])
    return f"{emoji_text(record)}  {keywords}" if keywords else emoji_text(record)


def caption_bank_with_details(records: list[dict]) -> list[tuple[str, str]]:
    """(caption, detail) of every bank line, in the set's order: what a model's captions.txt holds
    (dream_core.retrieval.write_caption_bank)."""
    return [(bank_entry(r), bank_detail(r)) for r in records]


# ---------------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------------

SPLITS = ("train", "heldout", "all")


class EmojiSource:
    """Map-style source over the built emoji set (see the module doc): `read(i)` -> (PIL RGB 64 x 64,
    caption). `split` train: every image but the held-out OpenMoji ones; heldout: those only; all.
    With `extra_art` (train split only) the older Noto pictures of `build_extra_art` follow the set's,
    each as often as a set image, under the style-free templates in turn."""

    def __init__(self, root: str | Path, split: str = "train", templates: str = "", views: bool = False,
                 extra_art: bool = False) -> None:
        root = Path(root)
        path = root / "emoji-64.npz" if root.is_dir() else root
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise ValueError(f"{root} holds no built emoji set (emoji-64.npz + emoji-64.json): build it with "
                             f"python -m training.data.emoji --cache {root}")
        if split not in SPLITS:
            raise ValueError(f"emoji split must be one of {', '.join(SPLITS)}, got {split!r}")
        meta = json.loads(path.with_suffix(".json").read_text())
        self.root, self.split = root, split
        self.styles: list[str] = meta["styles"]
        self.records: list[dict] = meta["records"]
        with np.load(path, allow_pickle=False) as z:
            self.images = z["images"]
        om = self.styles.index("openmoji")
        pairs = []
        for e, r in enumerate(self.records):
            held = is_heldout(r["base"])
            for s in range(len(self.styles)):
                in_heldout = held and s == om
                if split == "all" or (split == "heldout") == in_heldout:
                    pairs.append((e, s))
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        # With views, `read_view(i)` gives sample i's emoji in another style of this split.
        self.views = views
        self.styles_of: dict[int, list[int]] = {}
        for e, s in self.pairs.tolist():
            self.styles_of.setdefault(e, []).append(s)
        # The caption templates of the samples, in order (held-out images: the name alone).
        self.template_ids = (0,) if split == "heldout" else parse_templates(templates)
        self.extra_template_ids = style_free(self.template_ids)  # an extra picture's, in turn
        self.extra_images = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        self.extra_emoji = np.zeros(0, np.int64)
        if extra_art:
            self._load_extra_art(path.parent, split)

    def _load_extra_art(self, root: Path, split: str) -> None:
        if split != "train":
            raise ValueError(f"extra art is training data: the {split} split has none")
        if not self.extra_template_ids:
            raise ValueError(f"extra art is captioned without a style word, so the caption templates must include "
                             f"a style-free one ({', '.join(map(str, style_free(tuple(range(len(CAPTION_TEMPLATES))))))}), "
                             f"got {', '.join(map(str, self.template_ids))}")
        path = built_file(root, EXTRA_SET)
        if path is None:
            raise ValueError(f"{root} holds no extra art ({EXTRA_SET}.npz + .json): build it with "
                             f"python -m training.data.emoji --cache {root} --extra-art")
        with np.load(path, allow_pickle=False) as z:
            self.extra_images, self.extra_emoji = z["images"], z["emoji"]

    @property
    def images_per_pass(self) -> int:
        """The split's set images and extra pictures: each appears once per caption template."""
        return len(self.pairs) + len(self.extra_emoji)

    def __len__(self) -> int:
        return self.images_per_pass * len(self.template_ids)

    def pair(self, i: int) -> tuple[int, int, int]:
        """(emoji index, style index, template) of sample i; an extra picture's style index is -1 - its
        index in the extra art."""
        item, rep = i % self.images_per_pass, i // self.images_per_pass
        if item < len(self.pairs):
            e, s = self.pairs[item]
            return int(e), int(s), self.template_ids[rep]
        x = item - len(self.pairs)
        free = self.extra_template_ids
        return int(self.extra_emoji[x]), -1 - x, free[rep % len(free)]

    def describe(self, i: int) -> str:
        e, s, t = self.pair(i)
        style = self.styles[s] if s >= 0 else f"extra picture {-1 - s}"
        return f"emoji {self.records[e]['key']} ({style}, template {t})"

    def sample_caption(self, i: int) -> str:
        return self._caption(i, *self.pair(i))

    def _caption(self, i: int, e: int, s: int, t: int) -> str:
        """Sample i's caption, given its pair(i)."""
        if s >= 0:
            return caption(self.records[e], self.styles[s], t)
        return unstyled_caption(self.records[e], t, salt=i // self.images_per_pass)

    def captions(self) -> list[str]:
        """Every sample's caption (a text vocabulary's corpus)."""
        return [self.sample_caption(i) for i in range(len(self))]

    def caption_bank(self) -> list[str]:
        """Reverse search's bank: every emoji's name, in the set's order (all splits: a held-out image
        is searched among all 3,786 names)."""
        return [bank_entry(r) for r in self.records]

    def caption_bank_with_details(self) -> list[tuple[str, str]]:
        """The bank's (caption, detail) pairs: caption_bank() with the emoji and its keywords beside each."""
        return caption_bank_with_details(self.records)

    def read(self, i: int) -> tuple[Image.Image, str]:
        e, s, t = self.pair(i)
        image = self.images[e, s] if s >= 0 else self.extra_images[-1 - s]
        return Image.fromarray(image), self._caption(i, e, s, t)

    def read_view(self, i: int) -> Image.Image:
        """Sample i's emoji in another style of this split (the held-out OpenMoji images never, in
        the train split): which one turns with the caption template, so that the samples of one
        image see each other style in turn. An emoji with one style in the split is its own view;
        an extra picture's views are its emoji's set images."""
        e, s, t = self.pair(i)
        others = [o for o in self.styles_of[e] if o != s] or [s]
        return Image.fromarray(self.images[e, others[t % len(others)]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="folder for the npm packages and the built set")
    ap.add_argument("--extra-art", action="store_true", help="also fetch and build the older Noto art "
                    "(EXTRA_PACKAGES) that recipe.extra_art trains on")
    args = ap.parse_args()
    try:
        path = build_emoji_set(args.cache)
        extra = build_extra_art(args.cache) if args.extra_art else None
    except RuntimeError as err:
        ap.exit(2, f"error: {err}\n")
    counts = {split: len(EmojiSource(args.cache, split).pairs) for split in SPLITS}
    report = {"set": str(path), "images": counts, "emoji": len(EmojiSource(args.cache, "all").records)}
    if extra is not None:
        report["extra_art"] = json.loads(extra.with_suffix(".json").read_text())
    print(json.dumps(report))


if __name__ == "__main__":
    main()

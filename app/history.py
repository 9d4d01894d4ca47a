"""History of generations: PNG files in the user's data folder, each carrying its own parameters.

The folder is the database: a file is one entry, its text chunk the record, so history survives
restarts, can be browsed with any image viewer, and Gradio's cache (wiped at every restart) is
never relied on. Layout: <root>/<YYYY-MM-DD>/<NNNNN>-<seed>.png.

Several processes may share the folder (two app instances, scripts): a name is taken
create-exclusively, so no save ever replaces another's image, and each PNG appears whole (written
to a temp file, then linked under its name); a kill mid-save leaves only a `*.png.tmp`, which the
next start-up removes.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image
from platformdirs import user_data_dir

from .images import read_record, remove_leftovers, save_png
from .params import ImageRecord

APP_NAME = "dream-studio"
_NUMBERED = re.compile(r"^(\d{5,})-")
MAX_NAME_ATTEMPTS = 1000


def _dated(paths) -> list[tuple[tuple[int, str], Path]]:
    """((mtime, name), path) of every path that still exists when it is looked at: another
    process (a second app instance, a user's file manager) may delete any of them meanwhile."""
    out = []
    for path in paths:
        try:
            out.append(((path.stat().st_mtime_ns, path.name), path))
        except OSError:
            continue
    return out


def prune_oldest(folder: Path, keep: int, pattern: str = "*.png") -> None:
    """Delete all but the `keep` newest files of `folder` matching `pattern`. Safe beside another
    process pruning the same folder: a file that is already gone is simply skipped."""
    files = [path for _, path in sorted(_dated(folder.glob(pattern)))]
    for path in files[: max(0, len(files) - keep)]:
        try:
            path.unlink()
        except OSError:
            pass


def data_dir() -> Path:
    """platformdirs user_data_dir("dream-studio"); honours XDG_DATA_HOME on Linux."""
    return Path(user_data_dir(APP_NAME, appauthor=False))


def default_outputs_dir() -> Path:
    return data_dir() / "outputs"


@dataclass(frozen=True)
class HistoryEntry:
    path: Path
    record: ImageRecord

    def caption(self, width: int = 48) -> str:
        prompt = self.record.prompt if len(self.record.prompt) <= width else self.record.prompt[: width - 1] + "…"
        return f"{prompt} · seed {self.record.seed}"


class History:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_outputs_dir()
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[int, ImageRecord | None]] = {}

    def save(self, image: Image.Image, record: ImageRecord, now: datetime | None = None) -> Path:
        """Number the file after the highest number of the day; if another process took that name
        meanwhile, take the next one (never overwrite)."""
        now = now or datetime.now()
        folder = self.root / now.strftime("%Y-%m-%d")
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
            number = max(numbers, default=0) + 1
            for _ in range(MAX_NAME_ATTEMPTS):
                path = folder / f"{number:05d}-{record.seed}.png"
                try:
                    return save_png(image, path, record, exclusive=True)
                except FileExistsError:
                    number += 1
        raise OSError(f"could not find a free file name in {folder} after {MAX_NAME_ATTEMPTS} attempts")

    def remove_leftovers(self, older_than: float = 60.0) -> list[Path]:
        """Delete the `*.png.tmp` files interrupted saves left behind (run at start-up)."""
        return remove_leftovers(self.root, older_than)

    def entries(self, limit: int = 200) -> list[HistoryEntry]:
        """Newest first; files without parameters (or unreadable ones) are skipped, and so are
        files another process deletes while they are listed."""
        if not self.root.is_dir():
            return []
        files = [path for _, path in sorted(_dated(self.root.glob("*/*.png")), reverse=True)]
        out = []
        for path in files:
            record = self.record(path)
            if record is not None:
                out.append(HistoryEntry(path, record))
                if len(out) >= limit:
                    break
        return out

    def record(self, path: Path) -> ImageRecord | None:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        hit = self._cache.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        try:
            record = read_record(path)
        except ValueError:
            record = None
        self._cache[path] = (mtime, record)
        return record

    def contains(self, path: str | Path) -> bool:
        try:
            Path(path).resolve().relative_to(self.root.resolve())
            return True
        except (ValueError, OSError):
            return False

"""Model discovery and the one loaded DreamPipeline.

Web users switch only between model directories found in the models folders (the repo's assets/
and the user's data folder) or the one the operator named on the command line: a path typed in
the browser is never opened.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from dream_core.pipeline import DEFAULT_MODEL_DIR, DreamPipeline, default_model_dir

from .history import data_dir

REPO_ASSETS = DEFAULT_MODEL_DIR.parent


def default_models_dirs() -> list[Path]:
    return [REPO_ASSETS, data_dir() / "models"]


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def discover_models(dirs: list[Path]) -> dict[str, Path]:
    """name -> directory for every model directory that is one of `dirs` or directly inside one."""
    found: dict[str, Path] = {}

    def add(path: Path) -> None:
        path = path.resolve()
        if path in found.values():
            return
        name = path.name
        if name in found:
            name = f"{path.name} ({path.parent.name})"
        found[name] = path

    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        if is_model_dir(d):
            add(d)
            continue
        for child in sorted(d.iterdir()):
            if child.is_dir() and is_model_dir(child):
                add(child)
    return found


EXAMPLES_FILE = "examples.txt"
MAX_EXAMPLES = 50


def model_examples(path: Path | None) -> list[str]:
    """Example prompts of a model directory: its optional examples.txt, one prompt per line
    (blank lines skipped), so each model offers prompts in its own vocabulary."""
    if path is None:
        return []
    try:
        text = (Path(path) / EXAMPLES_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()][:MAX_EXAMPLES]


def card_body(card: str) -> str:
    """A model card without its metadata header (the YAML between the first two `---` lines
    that model hubs read), which is for machines, not for the Model tab."""
    lines = card.lstrip("\ufeff").splitlines()
    if lines and lines[0].strip() == "---":
        for i, line in enumerate(lines[1:], start=1):
            if line.strip() in ("---", "..."):
                return "\n".join(lines[i + 1:]).strip()
    return card.strip()


def missing_model_message(path: Path) -> str:
    return (f"No model is loaded: the model directory {path} does not exist yet. The bundled model "
            f"is trained with 'make model'; meanwhile start the app with 'python launch.py --model DIR', "
            f"or put a model directory into one of the models folders and pick it in the Model tab.")


class ModelManager:
    """Holds the current pipeline; switching loads the new one first, so a failure keeps the old."""

    def __init__(self, model: str | Path | None = None, models_dirs: list[Path] | None = None,
                 device: str = "auto", loader: Callable[..., DreamPipeline] | None = None) -> None:
        self.models_dirs = [Path(d) for d in (models_dirs if models_dirs is not None else default_models_dirs())]
        self.device = device
        self.loader = loader or DreamPipeline.from_pretrained
        self.explicit = Path(model).resolve() if model is not None else None
        self.pipe: DreamPipeline | None = None
        self.path: Path | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "(none)"

    def choices(self) -> dict[str, Path]:
        found = discover_models(self.models_dirs)
        if self.explicit is not None and self.explicit not in found.values():
            name = self.explicit.name if self.explicit.name not in found else f"{self.explicit.name} (--model)"
            found = {name: self.explicit, **found}
        return found

    def load_initial(self) -> "ModelManager":
        """Load --model, else the default model (assets/dream-shapes or $DREAM_MODEL); never raises."""
        path = self.explicit or default_model_dir()
        if not path.is_dir():
            self.error = missing_model_message(path)
            return self
        try:
            self._load(path)
        except (ValueError, OSError, RuntimeError) as err:
            self.error = f"Could not load the model in {path}: {err}"
        return self

    def _load(self, path: Path) -> None:
        pipe = self.loader(path, device=self.device)
        with self._lock:
            self.pipe, self.path, self.error = pipe, Path(path).resolve(), None

    def switch(self, name: str) -> DreamPipeline:
        """Load a model by its listed name (only names from choices() are accepted)."""
        choices = self.choices()
        if name not in choices:
            raise ValueError(f"unknown model {name!r}; available: {', '.join(choices) or 'none'}")
        if self.path is not None and choices[name] == self.path and self.pipe is not None:
            return self.pipe
        try:
            self._load(choices[name])
        except (ValueError, OSError, RuntimeError) as err:
            raise ValueError(f"could not load model {name!r}: {err}") from None
        return self.pipe

    def examples(self) -> list[str]:
        """Example prompts of the loaded model (see model_examples)."""
        return model_examples(self.path)

    def require(self) -> DreamPipeline:
        pipe = self.pipe
        if pipe is None:
            raise ValueError(self.error or "no model is loaded; pick one in the Model tab")
        return pipe

    def info_markdown(self) -> str:
        """Parameter counts, device and shapes of the loaded model (the card is shown separately)."""
        if self.pipe is None:
            return f"**No model loaded.** {self.error or ''}"
        pipe, c = self.pipe, self.pipe.config
        m = pipe.model

        def count(module) -> int:
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        parts = [("MAR encoder", m.encoder), ("FLUID decoder", m.decoder), ("diffusion head", m.head),
                 ("text aligner", m.aligner), ("contrastive text tower", m.text_tower),
                 ("image projector", m.projector)]
        rows = "\n".join(f"| {name} | {count(mod):,} |" for name, mod in parts)
        total = count(m)
        vae = count(pipe.image_tokenizer.vae)
        t5 = count(getattr(pipe.text_encoder, "model", None))
        return (
            f"**{self.name}** on **{pipe.device}** · `{self.path}`\n\n"
            f"{c.image_size}×{c.image_size} px images · {c.seq_len} tokens ({c.tokens_per_side}×{c.tokens_per_side}) "
            f"· {len(pipe.captions)} captions in the bank\n\n"
            f"| part | parameters |\n|---|--:|\n{rows}\n| **DREAM total** | **{total:,}** |\n"
            f"| VAE (frozen) | {vae:,} |\n| T5 conditioning encoder (frozen) | {t5:,} |"
        )

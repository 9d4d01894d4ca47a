"""What every evaluation command does around its measurement: flags, model loading, a one-line
error for bad input, and the results written as strict JSON with the run's metadata."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dream_core.fingerprint import model_fingerprint
from dream_core.pipeline import DreamPipeline
from dream_core.request import (GUIDANCE_SCHEDULES, HEAD_SAMPLERS, MAX_GUIDANCE_SCALE, MAX_TEMPERATURE, GenerationRequest,
                                SamplerSettings, decision_step_for_share)
from dream_core.semantic_decoding import Setting

from .sets import EVAL_SEED


def add_model_args(ap: argparse.ArgumentParser, out_default: Path | None = None) -> None:
    """--model, --out (required unless `out_default`), --device, --threads."""
    ap.add_argument("--model", default=None, help="model directory (default: $DREAM_MODEL or assets/dream-shapes)")
    ap.add_argument("--out", type=Path, required=out_default is None, default=out_default,
                    help="output directory (results.json + plots)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")


def add_sampler_args(ap: argparse.ArgumentParser, steps_default: int | None = None) -> None:
    ap.add_argument("--steps", type=int, default=steps_default,
                    help="decoding steps (default: the model's token count, i.e. one token per step)")
    ap.add_argument("--cfg", type=float, default=GenerationRequest.guidance_scale,
                    help=f"classifier-free guidance scale (0 .. {MAX_GUIDANCE_SCALE}; default: the model's)")
    ap.add_argument("--cfg-schedule", default=GenerationRequest.guidance_schedule, choices=GUIDANCE_SCHEDULES)
    ap.add_argument("--temperature", type=float, default=GenerationRequest.temperature,
                    help=f"0 .. {MAX_TEMPERATURE} (default: the model's default_temperature)")
    ap.add_argument("--head-steps", type=int, default=GenerationRequest.head_steps,
                    help="diffusion-head sampling steps (default: the model's default_head_steps)")
    ap.add_argument("--head-sampler", default=GenerationRequest.head_sampler, choices=HEAD_SAMPLERS,
                    help="diffusion-head sampler (default: the model's default_head_sampler)")
    ap.add_argument("--batch-size", type=int, default=0, help="prompts decoded together (0 = automatic)")
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help="generation seed base (prompt i: seed + 64 i)")


def run_cli(main: Callable[[list[str] | None], Any]) -> None:
    """Run a command's main(); a ValueError (bad input) becomes a one-line error, exit status 2."""
    try:
        main(None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


def parse_int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from err
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values


def argparse_type(parse: Callable[[str, str], Any], name: str) -> Callable[[str], Any]:
    """An argparse `type=` from one of the `parse_*(text, name)` parsers here: argparse shows an
    ArgumentTypeError's own message (a ValueError's would read only "invalid value")."""
    def convert(text: str) -> Any:
        try:
            return parse(text, name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def parse_head_samplers(text: str, name: str) -> list[str]:
    """A comma-separated list of the head's samplers, each one of `request.HEAD_SAMPLERS`."""
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in values if v not in HEAD_SAMPLERS]
    if not values or bad:
        raise ValueError(f"{name} takes comma-separated head samplers of {', '.join(HEAD_SAMPLERS)}, got {text!r}")
    return values


def parse_fractions(text: str, name: str, allow_zero: bool) -> list[float]:
    """A comma-separated list of shares below 1 (mask ratios: [0, 1); shares decided: (0, 1))."""
    where = "[0, 1)" if allow_zero else "(0, 1)"
    message = f"{name} must be comma-separated numbers in {where}, got {text!r}"
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(message) from err
    if not values or any(not (0.0 <= v < 1.0 if allow_zero else 0.0 < v < 1.0) for v in values):
        raise ValueError(message)
    return values


def parse_staged(text: str, num_steps: int, seq_len: int, name: str = "--staged") -> Setting:
    """SAD in stages from `K:share/kept,share/kept,...`: K candidates; at the first step with each
    share of the tokens decided (`request.decision_step_for_share`), keep that many, the last
    count 1. `9:0.25/3,0.75/1` = K = 9, keep 3 at 25 % decided, the best one at 75 %. The counts
    are checked as a request's `num_kept` when the setting is generated."""
    message = (f"{name} looks like K:share/kept,share/kept (e.g. 9:0.25/3,0.75/1: shares in (0, 1), "
               f"kept counts decreasing to 1), got {text!r}")
    head, sep, body = str(text).partition(":")
    try:
        k = int(head)
        stages = [(float(share), int(kept)) for share, kept in (item.split("/") for item in body.split(","))]
    except ValueError as err:
        raise ValueError(message) from err
    if not sep or not stages or any(not 0.0 < share < 1.0 for share, _ in stages):
        raise ValueError(message)
    steps = [decision_step_for_share(share, num_steps, seq_len) for share, _ in stages]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{name} {text}: the shares must fall on increasing decision steps of {num_steps} "
                         f"({', '.join(f'{share:g} -> step {d}' for (share, _), d in zip(stages, steps))})")
    return Setting(k, tuple(steps), num_kept=tuple(kept for _, kept in stages))


def sampler_from_args(args: argparse.Namespace, pipe: DreamPipeline) -> SamplerSettings:
    """The sampler of `add_sampler_args` flags (steps default: one token per step)."""
    steps = args.steps if args.steps is not None else pipe.config.seq_len
    return SamplerSettings(steps, args.cfg, args.cfg_schedule, args.temperature, args.head_steps, args.head_sampler)


def setting_from_args(args: argparse.Namespace, pipe: DreamPipeline, sampler: SamplerSettings) -> Setting:
    """The decoding setting of `--k` and `--decision-step`: K = 1, or SAD at the given step, the
    request resolving the model's default decision step (and checking a given one)."""
    if args.k <= 1:
        return Setting(1)
    return Setting(args.k, sampler.request("x", args.k, args.decision_step).validate(pipe.config).decision_step)


def load_pipeline(model: str | Path | None = None, device: str = "auto", threads: int = 0) -> DreamPipeline:
    if threads:
        torch.set_num_threads(threads)
    return DreamPipeline.from_pretrained(model, device=device)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Atomic JSON write (non-finite numbers become null, so the file is always valid JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def model_record(model: DreamPipeline | str | Path) -> dict[str, str | None]:
    """What a results file records of a model it measured: its directory and weights fingerprint, so
    tests/test_results_fresh.py can tell a table measured on other weights from the bundled model."""
    if isinstance(model, DreamPipeline):
        return {"path": str(model.path) if model.path else None, "fingerprint": model.weights_fingerprint()}
    return {"path": str(model), "fingerprint": model_fingerprint(model)}


def run_metadata(pipe: DreamPipeline | None, args: argparse.Namespace | dict | None = None,
                 models: Sequence[DreamPipeline | str | Path] | None = None) -> dict[str, Any]:
    """Date, torch, command, `pipe`'s settings and weights, the arguments, and a `model_record` of
    every model the run measured (`models`; default: `pipe`)."""
    if models is None:
        models = [pipe] if pipe is not None else []
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "",
    }
    if pipe is not None:
        meta.update(model=str(pipe.path) if pipe.path else None, preset=pipe.config.name,
                    image_size=pipe.config.image_size, tokens=pipe.config.seq_len, device=str(pipe.device),
                    weights=pipe.weights_fingerprint())
    meta["models"] = [model_record(m) for m in models]
    if args is not None:
        meta["args"] = {k: v for k, v in (vars(args) if isinstance(args, argparse.Namespace) else args).items()}
    return meta

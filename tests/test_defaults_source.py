"""Every sampling default has one source, dream_core.request: the sampler's signatures leave a
setting None (resolved from the request and the model), and no caller (the app, evaluation,
the benches) writes the request's default value again as a literal. The check reads the source
(function defaults, keyword arguments, dataclass fields, dict entries and argparse flags named
after a setting), so a copy is caught wherever it is typed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dream_core import request as rq

REPO = Path(__file__).resolve().parents[1]
# setting -> the request's default (what a literal copy would repeat)
DEFAULTS = {"guidance_scale": rq.DEFAULT_GUIDANCE_SCALE, "temperature": rq.DEFAULT_TEMPERATURE,
            "head_steps": rq.DEFAULT_HEAD_STEPS, "guidance_schedule": rq.DEFAULT_GUIDANCE_SCHEDULE,
            "num_inference_steps": rq.DEFAULT_STEPS, "head_sampler": rq.DEFAULT_HEAD_SAMPLER}
# command-line flags of those settings, as the evaluation commands and the benches spell them
FLAGS = {"--cfg": "guidance_scale", "--temperature": "temperature", "--head-steps": "head_steps",
         "--candidate-head-steps": "head_steps", "--app-head-steps": "head_steps", "--sad-head-steps": "head_steps",
         "--head-sampler": "head_sampler", "--sad-head-sampler": "head_sampler", "--head-samplers": "head_sampler",
         "--cfg-schedule": "guidance_schedule", "--steps": "num_inference_steps",
         "--app-steps": "num_inference_steps", "--decode-steps": "num_inference_steps"}
SAMPLER_MODULES = ["dream_core/sampling.py", "dream_core/semantic_decoding.py"]
# The diffusion head's own arithmetic is not a request default (its temperature=1.0 means "leave
# the noise as drawn"), and the request is the source itself.
NOT_READERS = {"dream_core/request.py", "dream_core/diffusion.py", "dream_core/diffusion_sampler.py",
               "dream_core/noise_schedule.py"}
READERS = sorted(str(p) for pattern in ("app/*.py", "bench/*.py", "training/evaluate/*.py", "dream_core/*.py")
                 for p in REPO.glob(pattern) if str(p.relative_to(REPO)) not in NOT_READERS)


def _is_copy(setting: str | None, node: ast.AST | None) -> bool:
    if setting not in DEFAULTS or not isinstance(node, ast.Constant) or isinstance(node.value, bool):
        return False
    return type(node.value) in (int, float, str) and node.value == DEFAULTS[setting]


def literal_copies(source: str) -> list[tuple[int, str]]:
    """(line, setting) of every literal that repeats a request default under the setting's name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            found += [(d.lineno, a.arg) for a, d in pairs if _is_copy(a.arg, d)]
        elif isinstance(node, ast.Call):
            flag = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            for kw in node.keywords:
                if _is_copy(kw.arg, kw.value):
                    found.append((kw.value.lineno, kw.arg))
                elif kw.arg == "default" and isinstance(flag, str) and _is_copy(FLAGS.get(flag), kw.value):
                    found.append((kw.value.lineno, flag))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if _is_copy(node.target.id, node.value):
                found.append((node.lineno, node.target.id))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and _is_copy(key.value, value):
                    found.append((value.lineno, key.value))
    return sorted(found)


@pytest.mark.parametrize("path", READERS, ids=lambda p: str(Path(p).relative_to(REPO)))
def test_no_literal_copy_of_a_request_default(path):
    copies = literal_copies(Path(path).read_text())
    assert not copies, f"{path}: literal copies of dream_core.request defaults at (line, setting) {copies}"


@pytest.mark.parametrize("path", SAMPLER_MODULES)
def test_the_samplers_leave_settings_to_the_request(path):
    """A sampler setting's default is None (the request's rule resolves it), never a number."""
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        if isinstance(node, ast.FunctionDef):
            args = node.args.posonlyargs + node.args.args
            for arg, default in zip(args[len(args) - len(node.args.defaults):], node.args.defaults):
                if arg.arg in DEFAULTS:
                    assert isinstance(default, ast.Constant) and default.value is None, \
                        f"{path}: {node.name}({arg.arg}=...) must default to None"


def test_the_copy_finder_sees_every_form():
    source = '''
def f(head_steps=100, temperature=0.5, *, guidance_scale=3.0): ...
g(guidance_schedule="constant", head_steps=8)
ap.add_argument("--cfg", type=float, default=3.0)
ap.add_argument("--seed", type=int, default=100)
class S:
    temperature: float = 1.0
d = {"head_steps": 100, "seed": 3.0}
'''
    assert literal_copies(source) == [(2, "guidance_scale"), (2, "head_steps"), (3, "guidance_schedule"),
                                      (4, "--cfg"), (7, "temperature"), (8, "head_steps")]

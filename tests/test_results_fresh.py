"""The results files that the README, the model cards and docs/ cite measured the weights bundled in
assets/: a retrain that leaves behind a table measured on older weights fails here, naming the
command that regenerates it, instead of misleading a reader about the model they can run.

A results file records the weights of each model it measured as a (path, fingerprint) pair:
`training.evaluate.cli.model_record` ({"path", "fingerprint"}), `run_metadata` ({"model",
"weights"}), or a markdown header line `- weights: FINGERPRINT (PATH)` (`bench.common.weights_line`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from dream_core.fingerprint import model_fingerprint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ASSETS = ROOT / "assets"
EXPERIMENTS = ROOT / "docs" / "experiments"
BUNDLED = sorted(p.name for p in ASSETS.iterdir() if (p / "model.safetensors").is_file())

CITATION = re.compile(r"bench/results/[\w./-]*")
FINGERPRINT = re.compile(r"[0-9a-f]{16}")
RECORD_KEYS = (("path", "fingerprint"), ("model", "weights"))  # model_record, run_metadata
MD_WEIGHTS = re.compile(r"^- weights: ([0-9a-f]{16}) \((.+)\)$", re.M)
MD_MODEL = re.compile(r"^- model: (\S+?),?(?:\s|$)", re.M)
MD_COMMAND = re.compile(r"^- command: (.+)$", re.M)


@functools.cache
def current_fingerprint(name: str) -> str:
    """The fingerprint of the bundled model assets/<name> (hashed once per test session)."""
    return model_fingerprint(ASSETS / name)


def citing_documents() -> list[Path]:
    """What a reader trusts: the README, the model cards, the guides and the experiments."""
    return [ROOT / "README.md", *sorted(ASSETS.glob("*/README.md")), *sorted((ROOT / "docs").rglob("*.md"))]


def results_files(cited: Path) -> list[Path]:
    """The results files a citation means: a JSON or markdown file itself, a directory's JSON files,
    a plot's JSON beside it. The bare bench/results/ and paths that are only a command's output
    destination (not there) cite nothing."""
    if cited == RESULTS or not cited.exists():
        return []
    if cited.is_dir():
        return sorted(cited.glob("*.json"))
    if cited.suffix in (".json", ".md"):
        return [cited]
    return sorted(cited.parent.glob("*.json")) if cited.parent != RESULTS else []


def cited_results() -> dict[Path, list[Path]]:
    """Every cited results file, with the documents that cite it."""
    cited: dict[Path, list[Path]] = {}
    for doc in citing_documents():
        for match in CITATION.finditer(doc.read_text()):
            for path in results_files(ROOT / match.group(0).rstrip(".")):
                if doc not in cited.setdefault(path, []):
                    cited[path].append(doc)
    return dict(sorted(cited.items()))


def shown(path: Path) -> str:
    """A path as a message names it: relative to the checkout when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def bundled_name(text: str) -> str | None:
    """The bundled model a recorded path names (assets/<name>, relative or absolute on any checkout)."""
    parts = Path(text).parts
    if len(parts) >= 2 and parts[-2] == "assets" and parts[-1] in BUNDLED:
        return parts[-1]
    return None


def read_record(path: Path) -> tuple[list[tuple[str, str]], set[str], str]:
    """A results file's (model path, fingerprint) pairs, the bundled models it names, and the
    command that regenerates it."""
    pairs: list[tuple[str, str]] = []
    named: set[str] = set()
    if path.suffix == ".md":
        text = path.read_text()
        pairs = [(p, fp) for fp, p in MD_WEIGHTS.findall(text)]
        named = {n for p in MD_MODEL.findall(text) + [p for p, _ in pairs] if (n := bundled_name(p))}
        command = MD_COMMAND.search(text)
        return pairs, named, f"{command.group(1).strip()} > {shown(path)}" if command else "(no command recorded)"

    data = json.loads(path.read_text())

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for path_key, fp_key in RECORD_KEYS:
                p, fp = node.get(path_key), node.get(fp_key)
                if isinstance(p, str) and isinstance(fp, str) and FINGERPRINT.fullmatch(fp):
                    pairs.append((p, fp))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and (name := bundled_name(node)):
            named.add(name)

    walk(data)
    command = data.get("command") or data.get("meta", {}).get("command") or "(no command recorded)"
    return pairs, named, command


def pins(doc: Path, fingerprints: list[str]) -> bool:
    """An experiment record (docs/experiments/) that names the weights it measured is history, not a
    claim about today's model: a decision measured on earlier weights stays valid as the record of
    that decision. The README, the model cards and the guides always speak of the bundled weights."""
    return doc.is_relative_to(EXPERIMENTS) and all(fp in doc.read_text() for fp in fingerprints)


def staleness(path: Path, citers: list[Path]) -> list[str]:
    """Why a cited results file does not show it measured today's bundled weights (empty: it does)."""
    rel = shown(path)
    pairs, named, command = read_record(path)
    by = ", ".join(shown(d) for d in citers)
    problems = []
    for name in sorted(named):
        current = current_fingerprint(name)
        recorded = sorted({fp for p, fp in pairs if bundled_name(p) == name})
        if not recorded:
            problems.append(f"{rel} (cited by {by}) measured assets/{name} but records no fingerprint of it, so "
                            f"nothing shows it measured the bundled weights {current}; re-run: {command}")
        elif recorded != [current] and (unpinned := [d for d in citers if not pins(d, recorded)]):
            by = ", ".join(shown(d) for d in unpinned)
            problems.append(f"{rel} (cited by {by}) measured assets/{name} on weights {', '.join(recorded)}, but "
                            f"assets/{name} is now {current}; re-run: {command}")
    # A model card citing a file presents it as a measurement of the card's own model, even where the
    # file names the training run's directory (runs/...) that the bundled copy came from.
    for card in citers:
        name = card.parent.name
        if card.parent.parent != ASSETS or name not in BUNDLED or name in named:
            continue
        current = current_fingerprint(name)
        if current not in {fp for _, fp in pairs}:
            recorded = ", ".join(f"{p} {fp}" for p, fp in pairs) or "no fingerprint"
            problems.append(f"{rel} is cited by {shown(card)} as a measurement of assets/{name} "
                            f"({current}) but records {recorded}; re-run: {command}")
    return problems


CITED = cited_results()


def test_the_documents_cite_results_files():
    """The citations are found (a broken pattern would make every check below pass vacuously)."""
    assert BUNDLED, "no bundled model under assets/"
    assert any(p.suffix == ".json" for p in CITED) and any(p.suffix == ".md" for p in CITED), sorted(CITED)


@pytest.mark.parametrize("path", list(CITED), ids=[str(p.relative_to(RESULTS)) for p in CITED])
def test_a_cited_results_file_measured_the_bundled_weights(path):
    problems = staleness(path, CITED[path])
    assert not problems, "\n".join(problems)


def test_what_the_writers_record_is_what_this_check_reads(tiny_pipe, tiny_model_dir, tmp_path):
    """run_metadata (JSON) and weights_line (markdown) record pairs the parser above reads back."""
    from bench.common import weights_line
    from training.evaluate.cli import run_metadata, write_json

    fingerprint = tiny_pipe.weights_fingerprint()
    assert model_fingerprint(tiny_model_dir) == fingerprint  # no pipeline needed to fingerprint a directory
    meta = run_metadata(None, {"out": "x"}, models=[tiny_pipe, tiny_model_dir])
    assert meta["models"] == [{"path": str(tiny_model_dir), "fingerprint": fingerprint}] * 2
    write_json(tmp_path / "r.json", {"command": "python -m bench.x", "meta": meta})
    (tmp_path / "r.md").write_text(f"# x\n\n- model: {tiny_model_dir} (tiny)\n{weights_line(tiny_model_dir)}\n"
                                   "- command: python -m bench.decode\n")
    assert read_record(tmp_path / "r.json") == ([(str(tiny_model_dir), fingerprint)] * 2, set(), "python -m bench.x")
    assert read_record(tmp_path / "r.md") == ([(str(tiny_model_dir), fingerprint)], set(),
                                               f"python -m bench.decode > {tmp_path / 'r.md'}")


def test_a_stale_or_unfingerprinted_table_of_a_bundled_model_fails(tmp_path):
    """The check itself: a bundled model recorded with another fingerprint, or with none, is reported
    with the command to re-run; the current one, or a model outside assets/, passes; a file a model
    card cites must record the card's model."""
    name = BUNDLED[0]
    current = current_fingerprint(name)
    doc, card = tmp_path / "doc.md", ASSETS / name / "README.md"
    cases = [
        ({"command": "python -m bench.t", "meta": {"model": f"assets/{name}", "weights": "0" * 16}}, doc,
         f"on weights {'0' * 16}, but assets/{name} is now {current}; re-run: python -m bench.t"),
        ({"command": "python -m bench.f", "models": {"a": f"assets/{name}"}}, doc, "records no fingerprint of it"),
        ({"command": "c", "meta": {"models": [{"path": f"/elsewhere/assets/{name}", "fingerprint": current}]}},
         doc, None),
        ({"command": "c", "models": {"a": "runs/x/export"}}, doc, None),
        ({"command": "c", "model": "runs/x/export", "weights": current}, card, None),
        ({"command": "python -m bench.e", "model": "runs/x/export", "weights": "1" * 16}, card,
         f"as a measurement of assets/{name} ({current}) but records runs/x/export {'1' * 16}"),
    ]
    for i, (data, citer, expected) in enumerate(cases):
        (tmp_path / f"{i}.json").write_text(json.dumps(data))
        problems = staleness(tmp_path / f"{i}.json", [citer])
        if expected is None:
            assert problems == [], (data, problems)
        else:
            assert len(problems) == 1 and expected in problems[0], (data, problems)


def test_an_experiment_record_naming_the_weights_it_measured_may_cite_older_weights(tmp_path, monkeypatch):
    """A docs/experiments/ record that names the fingerprint it measured keeps its results file; the
    same file cited by a record that does not name it, or by any other document, is stale."""
    name = BUNDLED[0]
    current = current_fingerprint(name)
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    monkeypatch.setitem(globals(), "EXPERIMENTS", experiments)  # what pins() reads
    old = "2" * 16
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"command": "python -m bench.t", "meta": {"model": f"assets/{name}", "weights": old}}))
    naming, silent, guide = experiments / "naming.md", experiments / "silent.md", tmp_path / "guide.md"
    naming.write_text(f"Measured on weights `{old}`, before the default changed.")
    silent.write_text("Measured on the bundled model.")
    guide.write_text(f"Weights `{old}`.")
    assert staleness(result, [naming]) == []
    for citers, blamed in (([naming, silent], "silent.md"), ([guide], "guide.md")):
        problems = staleness(result, citers)
        assert len(problems) == 1 and blamed in problems[0] and "naming.md" not in problems[0], problems
        assert f"now {current}; re-run: python -m bench.t" in problems[0]

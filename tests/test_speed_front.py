"""bench.speed_front on the tiny random model: every asked-for setting is generated, judged with
intervals and paired against the baseline, timed, and the Pareto front is marked; and the
decoding bench's grid times every head sampler it is given."""

from __future__ import annotations

import json

import pytest

from bench import speed_front


def test_pareto_front_keeps_the_points_nothing_beats():
    seconds = [1.0, 0.5, 0.5, 2.0, 0.2]
    faithful = [0.8, 0.8, 0.7, 0.9, 0.1]
    assert speed_front.pareto_front(seconds, faithful) == [False, True, False, True, True]


def test_speed_front_quick_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "front"
    res = speed_front.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--quick",
                            "--objects", "1,2", "--steps", "4", "--cfg", "2.0", "--head-samplers", "ddim,dpm-solver++",
                            "--head-steps", "2", "--sad-k", "3", "--sad-shares", "0.5", "--staged", "3:0.1/2,0.6/1",
                            "--sad-head-sampler", "ddim", "--sad-head-steps", "2"])
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["weights"] and data["meta"]["args"]["staged"] == ["3:0.1/2,0.6/1"]
    points = data["points"]
    assert [(p["setting"].split(" steps=")[0], p["head_sampler"], p["head_steps"]) for p in points] == [
        ("K=1", "ancestral", 100), ("K=1", "ddim", 2), ("K=1", "dpm-solver++", 2),
        (points[3]["setting"], "ddim", 2), ("SAD K=3", "ddim", 2)]  # K = 1 with SAD's head is already there
    assert points[3]["setting"].startswith("SAD K=3 step=") and points[4]["num_kept"] == [2, 1]
    assert [p["pooled_gain_over_k1"] is None for p in points] == [True, True, True, False, False]
    assert points[3]["pooled_gain_over_k1"]["n"] == 16 and points[1]["pooled_gain_over_baseline"]["n"] == 16
    for p in points:
        assert set(p["sets"]) == {"1-object", "2-object"} and p["seconds_per_image"] > 0
        for entry in p["sets"].values():
            lo, hi = entry["ci95"]
            assert entry["n"] == 8 and 0 <= lo <= entry["rate"] <= hi <= 1
            assert (entry["gain_over_baseline"] is None) == (p is points[0])
        assert isinstance(p["pareto"], bool)
    assert any(p["pareto"] for p in points) and res["baseline"] == data["baseline"] == "K=1, head ancestral x 100"
    printed = capsys.readouterr().out
    assert "| setting | head |" in printed and "**front**" in printed


def test_speed_front_refuses_a_bad_setting_before_generating(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="num_kept must be strictly decreasing"):
        speed_front.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--device", "cpu", "--quick",
                          "--steps", "4", "--staged", "3:0.1/2,0.6/2"])
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        speed_front.parse_args(["--head-samplers", "euler"])


def test_interleaved_timing_runs_every_setting_once_a_round_and_pairs_the_rounds():
    from bench.common import paired_ratio, time_interleaved

    calls = []
    runs = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # the warm-up round, then three timed rounds
    assert [len(r) for r in runs] == [3, 3]
    # each round's quotient first, then the median: a slow round slows both settings alike
    assert paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    with pytest.raises(ValueError, match="paired_ratio needs two equally long, non-empty timings, got 2 and 3"):
        paired_ratio([1.0, 2.0], [1.0, 2.0, 3.0])


def test_decode_bench_grid_times_every_head_sampler(tiny_pipe):
    from bench import decode

    args = decode.parse_args(["--head-samplers", "ddim,dpm-solver++", "--steps", "2", "--head-steps", "2",
                              "--repeats", "1", "--no-flops"])
    target = decode.Target("tiny", tiny_pipe.model, tiny_pipe.device, pipe=tiny_pipe)
    table = decode.grid_section(target, args, peak=1e9)
    assert "| head sampler | steps | head steps |" in table
    assert "| ddim | 2 | 2 |" in table and "| dpm-solver++ | 2 | 2 |" in table
    default = decode.parse_args([])
    assert default.head_samplers is None  # the grid then times the model's own sampler only
    with pytest.raises(SystemExit):
        decode.parse_args(["--head-samplers", "euler"])


@pytest.mark.parametrize("argv, message", [
    (["--ks", "1,x"], "--ks must be a comma-separated list of integers, got '1,x'"),
    (["--head-steps", ","], "--head-steps must not be empty"),
    (["--latency-ks", "1,0"], "--latency-ks takes positive integers, got '1,0'"),
    (["--head-samplers", "euler"], "--head-samplers takes comma-separated head samplers of "),
])
def test_decode_bench_names_the_flag_of_a_bad_list(argv, message, capsys):
    """The lists are parsed by the project's own parsers; argparse prints their message, which names the flag."""
    from bench import decode

    with pytest.raises(SystemExit):
        decode.parse_args(argv)
    assert message in capsys.readouterr().err
    assert decode.parse_args(["--steps", "4, 8", "--ks", "1"]).steps == [4, 8]


def test_decode_bench_times_the_app_path_at_the_models_own_head_steps(tiny_model_dir, tmp_path, capsys):
    """The latency section times what the app runs: the model's default_head_steps, not the
    request's global default, unless --app-head-steps says otherwise."""
    import json
    import shutil

    from bench import decode

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["default_head_steps"] = 3
    (model / "config.json").write_text(json.dumps(config))
    common = ["--model", str(model), "--sections", "latency", "--latency-ks", "1", "--repeats", "1",
              "--no-flops", "--threads", "1", "--app-steps", "2"]
    decode.main(common)
    assert "| 1 | - | 2 | 3 |" in capsys.readouterr().out
    decode.main(common + ["--app-head-steps", "4"])
    assert "| 1 | - | 2 | 4 |" in capsys.readouterr().out
    decode.main(["--model", str(model), "--sections", "latency", "--latency-ks", "1,2", "--repeats", "2",
                 "--no-flops", "--threads", "1", "--app-steps", "2"])
    out = capsys.readouterr().out
    assert "| final vs K=1 |" in out and " | 1.00x |" in out  # K = 1 against itself, round by round
    assert "| 2 | 1/2 | 2 | 3 |" in out

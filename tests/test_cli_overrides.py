"""Recipe overrides (key=value) may stand anywhere on a command line: before, between and after the options.

argparse's plain parse_args takes one run of positionals, so `--recipe emoji a=1 --out X b=2` was refused
with "unrecognized arguments: b=2"; every command that takes overrides parses them intermixed.
"""
import pytest

from bench import paper_table4, step_cost
from training import cache, finetune, make_emoji_model, make_shapes_model, plan, train

CASES = {
    "training.train": (train.parse_args, ["--recipe", "emoji", "a=1", "--out", "runs/x", "b=2", "--threads", "2", "c=3"]),
    "training.plan": (plan.parse_args, ["--recipe", "emoji", "a=1", "--gpus", "8", "b=2", "--gpu-memory", "80", "c=3"]),
    "training.cache": (cache.parse_args, ["--recipe", "emoji", "a=1", "--out", "runs/c", "b=2", "--threads", "1", "c=3"]),
    "training.finetune": (finetune.parse_args, ["--model", "m", "a=1", "--data", "d", "b=2", "--out", "o", "c=3"]),
    "training.make_emoji_model": (make_emoji_model.parse_args, ["a=1", "--work", "runs/w", "b=2", "--steps", "9", "c=3"]),
    "training.make_shapes_model": (make_shapes_model.parse_args, ["a=1", "--work", "runs/w", "b=2", "--steps", "9", "c=3"]),
    "bench.step_cost": (step_cost.parse_args, ["--recipe", "emoji", "a=1", "--arm", "A=", "b=2", "--arm", "B=x=1", "c=3"]),
    "bench.paper_table4": (paper_table4.parse_args, ["--steps", "10", "a=1", "--out", "runs/t", "b=2", "--seeds", "1", "c=3"]),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_overrides_may_stand_between_and_after_options(command):
    parse, argv = CASES[command]
    args = parse(argv)
    assert args.overrides == ["a=1", "b=2", "c=3"], command


def test_options_between_overrides_keep_their_values():
    args = train.parse_args(["--recipe", "emoji", "lr=1e-3", "--out", "runs/x", "seed=4", "--max-steps", "50"])
    assert (args.recipe, str(args.out), args.max_steps) == ("emoji", "runs/x", 50)
    assert step_cost.parse_args(["--recipe", "emoji", "--arm", "A=", "x=1", "--arm", "B=seed=2"]).arms == [
        ("A", []), ("B", ["seed=2"])]
    assert make_emoji_model.parse_args(["seed=4", "--steps", "7"]).steps == 7


def test_a_bad_value_between_overrides_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        make_emoji_model.parse_args(["seed=4", "--steps", "0", "lr=1"])
    assert "--steps and --heads-steps must be >= 1" in capsys.readouterr().err

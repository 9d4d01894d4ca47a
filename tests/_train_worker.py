"""Test helper: runs `python -m training.train` in this process with instrumentation for the
multi-process and kill-and-resume tests (never imported by the library).

    python tests/_train_worker.py --report DIR [--pause-in-save-at N] [--snapshot-at N --snapshot-to DIR] -- <train args>

Records, per rank, in DIR/rank<r>.json: the number of rows the contrastive loss gathered at each
call (the logits are rows x rows), the captions of each local batch, a digest of the final
parameters and EMA, and (on ranks > 0) every attempt to write inside the run directory, caught
with an audit hook. --pause-in-save-at N blocks forever in the middle of writing step N's
checkpoint (after the log row of step N), so the test can SIGKILL it there. --snapshot-at copies
rank 0's checkpoint of step N to another run directory (to resume from it later). --nan-at-step N
--nan-rank R makes rank R's loss NaN at optimizer step N (the others stay finite); --inf-grad-at-step N
--inf-grad-rank R puts an inf into one of rank R's (already synchronised) gradients at step N.
--chdir DIR runs rank r in DIR/rank<r>, so a relative --out names a different folder on each rank
(a node-local run folder). Digests of sharded (FSDP) parameters are taken over the gathered full
tensors; `finite` says whether every parameter and EMA value is finite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.unlink",
                "os.truncate", "shutil.copyfile", "shutil.move"}


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--pause-in-save-at", type=int, default=0)
    ap.add_argument("--snapshot-at", type=int, default=0)
    ap.add_argument("--snapshot-to", type=Path, default=None)
    ap.add_argument("--nan-at-step", type=int, default=0)
    ap.add_argument("--nan-rank", type=int, default=0)
    ap.add_argument("--inf-grad-at-step", type=int, default=0)
    ap.add_argument("--inf-grad-rank", type=int, default=0)
    ap.add_argument("--chdir", type=Path, default=None)
    args = ap.parse_args(argv[:split])
    args.report = args.report.resolve()
    train_args = argv[split + 1:]
    out_dir = Path(train_args[train_args.index("--out") + 1]).resolve()
    rank = int(os.environ.get("RANK", 0))
    args.report.mkdir(parents=True, exist_ok=True)
    if args.chdir is not None:
        (args.chdir / f"rank{rank}").mkdir(parents=True, exist_ok=True)
        os.chdir(args.chdir / f"rank{rank}")
    report = {"rank": rank, "gathered_rows": [], "local_captions": [], "writes": [], "steps": []}

    if rank > 0:
        def audit(event, event_args):
            if event == "open" and event_args and isinstance(event_args[0], (str, bytes, os.PathLike)):
                mode = event_args[1] if len(event_args) > 1 and isinstance(event_args[1], str) else "r"
                flags = event_args[2] if len(event_args) > 2 and isinstance(event_args[2], int) else 0
                writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                paths = [event_args[0]] if writing else []
            elif event in WRITE_EVENTS:
                paths = [a for a in event_args if isinstance(a, (str, bytes, os.PathLike))]
            else:
                return
            for p in paths:
                try:
                    p = os.fsdecode(p)
                    a = os.path.abspath(p)
                    if a == str(out_dir) or a.startswith(str(out_dir) + os.sep):
                        report["writes"].append([event, p])
                except Exception:
                    pass

        sys.addaudithook(audit)

    import torch

    torch.set_num_threads(1)
    import dream_core.losses as losses
    import training.checkpoint as checkpoint
    import training.train as train

    original_gather = losses.gather_with_grad

    def recording_gather(x):
        y = original_gather(x)
        report["gathered_rows"].append([int(x.shape[0]), int(y.shape[0])])
        return y

    losses.gather_with_grad = recording_gather  # masked_contrastive_loss looks it up at call time

    original_step = train.Trainer.train_step

    def recording_step(self, batch):
        report["local_captions"].append(list(batch["caption"]))
        return original_step(self, batch)

    train.Trainer.train_step = recording_step

    if args.nan_at_step:
        import dream_core.model as dream_model

        original_forward = dream_model.DreamModel.forward_train
        nan_state = {"calls": 0}

        def nan_forward(self, *a, **kw):
            out = original_forward(self, *a, **kw)
            nan_state["calls"] += 1  # one call per micro-batch (grad_accum 1 in the tests: per step)
            if rank == args.nan_rank and nan_state["calls"] == args.nan_at_step:
                out["loss"] = out["loss"] * float("nan")
            return out

        dream_model.DreamModel.forward_train = nan_forward

    if args.inf_grad_at_step:
        from accelerate import Accelerator

        original_clip = Accelerator.clip_grad_norm_
        clip_calls = {"n": 0}

        def inf_clip(self, parameters, *a, **kw):
            params = list(parameters)
            clip_calls["n"] += 1  # one call per optimizer step
            if rank == args.inf_grad_rank and clip_calls["n"] == args.inf_grad_at_step:
                next(p.grad for p in params if p.grad is not None).view(-1)[0] = float("inf")
            return original_clip(self, params, *a, **kw)

        Accelerator.clip_grad_norm_ = inf_clip

    saving = {"step": -1}
    original_save = train.Trainer.save

    def instrumented_save(self):
        saving["step"] = self.step
        original_save(self)
        if args.snapshot_at and self.step == args.snapshot_at and self.acc.is_main_process:
            dst = args.snapshot_to / "checkpoint-last"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(out_dir / "checkpoint-last", dst)

    train.Trainer.save = instrumented_save

    original_write = checkpoint.state_dict_to_safetensors

    def pausing_write(path, state):
        original_write(path, state)
        if args.pause_in_save_at and saving["step"] == args.pause_in_save_at:
            (args.report / "paused").write_text(str(saving["step"]))
            while True:  # half a checkpoint is on disk: wait for SIGKILL
                time.sleep(1)

    checkpoint.state_dict_to_safetensors = pausing_write

    original_fit = train.Trainer.fit

    def recording_fit(self):
        out = original_fit(self)
        from training.distributed import full

        core = self.acc.unwrap_model(self.model)
        h = hashlib.sha256()
        for name, p in sorted(core.named_parameters()):
            h.update(name.encode())
            h.update(full(p.detach()).float().cpu().numpy().tobytes())
        for name in sorted(self.ema.shadow):
            h.update(full(self.ema.shadow[name]).cpu().numpy().tobytes())
        report["sharded"] = [name for name, p in core.named_parameters() if type(p).__name__ == "DTensor"]
        report["param_digest"] = h.hexdigest()
        report["finite"] = all(bool(torch.isfinite(full(t.detach())).all())
                               for t in [*core.parameters(), *self.ema.shadow.values()])
        report["final_step"] = self.step
        report["world"] = self.world
        return out

    train.Trainer.fit = recording_fit
    try:
        train.main(train_args)
    finally:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()

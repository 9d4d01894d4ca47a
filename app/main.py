"""Command line: `python launch.py [--model DIR] [--host 127.0.0.1] [--port 7860] [--share]
[--device auto|cpu|cuda] [--inbrowser] [--models-dir DIR] [--threads N]`. Binds to 127.0.0.1 unless told
otherwise and prints the address once the server is up."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch.py", description="DREAM Studio: text-to-image with Semantically "
                                "Aligned Decoding, and reverse caption search.")
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (default: assets/dream-shapes, or $DREAM_MODEL)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--inbrowser", action="store_true", help="open the app in the default browser")
    p.add_argument("--models-dir", type=Path, action="append", default=None,
                   help="extra folder to look for model directories in (repeatable)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice; 1 is fastest beside another busy job)")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be >= 1 (or 0 = torch's choice), got {args.threads}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.model is not None and not args.model.is_dir():
        p.error(f"--model {args.model} is not a directory")
    return args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address(host: str, port: int) -> str:
    """The URL to open: a wildcard bind is reached through 127.0.0.1; IPv6 hosts get brackets."""
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .models import default_models_dirs
    from .ui import build_app, launch_app

    dirs = default_models_dirs() + list(args.models_dir or [])
    # The on-disk history is everyone's only when the app is private to this machine.
    private = is_loopback(args.host) and not args.share
    demo = build_app(args.model, models_dirs=dirs, device=args.device, shared_history=private)
    ctx = demo.dream_context
    if ctx.manager.pipe is None:
        print(f"warning: {ctx.manager.error}", file=sys.stderr, flush=True)
    else:
        print(f"model: {ctx.manager.name} ({ctx.manager.path}) on {ctx.manager.pipe.device}", flush=True)
    print(f"images are saved in {ctx.history.root}", flush=True)
    port = args.port or free_port()
    _, _, share_url = launch_app(demo, host=args.host, port=port, share=args.share, inbrowser=args.inbrowser,
                                 prevent_thread_lock=True, quiet=True)
    print(f"DREAM Studio running at {address(args.host, port)}"
          + ("" if args.host not in ("0.0.0.0", "::") else f" (listening on all interfaces, {args.host})"),
          flush=True)
    if share_url:
        print(f"public share link: {share_url}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()


if __name__ == "__main__":
    main()

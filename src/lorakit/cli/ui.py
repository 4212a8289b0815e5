"""`lorakit ui`: the local web dashboard (lorakit.ui), served by uvicorn; prints its address, opens nothing."""

from __future__ import annotations

import argparse
import os
import secrets

from ..errors import ConfigError


def add_parser(sub) -> None:
    ui = sub.add_parser("ui", help="a local web dashboard: runs and live curves, a new-run form, the data view, a "
                                   "side-by-side playground, exports (pip install 'lorakit[serve]')")
    ui.add_argument("--root", default=".", help="the runs directory: runs under it are listed, new runs start in it "
                                                "(default: the current directory)")
    ui.add_argument("--read-root", action="append", default=[], metavar="DIR",
                    help="another directory models and data may be read from (repeatable); the runs root and the "
                         "quickstart's assets always may")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--token", default=os.environ.get("LORAKIT_UI_TOKEN"),
                    help="required from every client (default: $LORAKIT_UI_TOKEN); bound to an address other than "
                         "loopback without one, a random token is made and printed")
    ui.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..ui.access import LOOPBACK, loopback_hosts
        from ..ui.app import create_ui_app
        from ..ui.paths import Roots
    except ImportError as err:
        raise ConfigError(f"lorakit ui needs FastAPI and uvicorn ({err.name} is missing): pip install "
                          "'lorakit[serve]'", where="lorakit ui") from None
    token = args.token
    if args.host not in LOOPBACK and not token:
        token = secrets.token_urlsafe(24)  # never an open dashboard that starts processes on a reachable address
    roots = Roots(args.root, args.read_root)
    hosts = loopback_hosts(args.host, args.port) if args.host in LOOPBACK else None
    app = create_ui_app(roots, token=token, hosts=hosts)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"lorakit ui: runs under {roots.runs}")
    print(f"open http://{shown}:{args.port}/" + (f"?token={token}" if token else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", server_header=False)
    return 0

"""``brainlesionsam web``: start the page's server.

The page has no authentication: whoever reaches the port can read the cases under ``--data``, run
segmentations and write files where the server process may. So it binds to 127.0.0.1 unless
``--allow-remote`` is given with another ``--host`` (then a warning is printed); for a remote GPU
server an SSH tunnel keeps it private: ``ssh -L 8080:127.0.0.1:8080 gpu-server``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from BrainLesionSAMLib.errors import BrainLesionSAMError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
READY_LINE = "BrainLesionSAM web: serving"


def check_host(host: str, allow_remote: bool) -> str:
    """'' for a loopback host; the warning to print for another one with ``allow_remote``; else raises."""
    if host in LOCAL_HOSTS:
        return ""
    if not allow_remote:
        raise BrainLesionSAMError(
            f"--host {host} would make the page reachable from other machines, and it has no authentication "
            "(anyone who reaches the port can read the cases, run segmentations and write files as this user). "
            "Add --allow-remote to do it anyway on a trusted network, or keep 127.0.0.1 and use an SSH tunnel: "
            "ssh -L 8080:127.0.0.1:8080 <server>")
    return (f"WARNING: serving on {host} with NO authentication: anyone who can reach this port can read the cases, "
            "run segmentations and write files as this user")


def _require_web_dependencies() -> None:
    missing = [name for name in ("trame", "trame_slicer", "slicer", "slicer_layer_dm")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise BrainLesionSAMError(
            f"the web front end needs {', '.join(missing)}; install the 'web' extra: pip install -e \".[web]\" "
            "(trame-slicer with slicer-layer-dm and the slicer-core it is built for)")


def serve(args: argparse.Namespace) -> int:
    warning = check_host(args.host, args.allow_remote)
    if args.data is not None and not Path(args.data).expanduser().is_dir():
        raise BrainLesionSAMError(f"--data {args.data} is not a folder; give the folder that holds the case folders")
    if not 0 <= args.port <= 65535:
        raise BrainLesionSAMError(f"--port {args.port} is not a port number (0-65535)")
    if args.idle_exit < 0:
        raise BrainLesionSAMError("--idle-exit must be 0 (never) or a number of seconds")
    _require_web_dependencies()
    if warning:
        print(warning, file=sys.stderr, flush=True)
    started = time.perf_counter()
    # trame parses sys.argv on its own unless TRAME_ARGS is set: give it only what we decide.
    os.environ["TRAME_ARGS"] = "--server"
    from .app import WebApp  # the package's import configures headless rendering first

    app = WebApp(data_dir=args.data, output_dir=args.out)

    def ready(**_):
        port = app.server.port
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"{READY_LINE} http://{shown}:{port}/ (started in {time.perf_counter() - started:.1f} s; "
              f"pid {os.getpid()})", flush=True)

    app.server.controller.on_server_ready.add(ready)
    app.start(host=args.host, port=args.port, idle_exit_s=args.idle_exit)
    return 0


"""``brainlesionsam-web``: start the page's server (the package's own console script; the library
knows no front end).

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainlesionsam-web", description="BrainLesionSAM's Segment panel in a "
                                     "browser, on trame-slicer (needs the 'web' extra).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1); another one needs --allow-remote")
    parser.add_argument("--allow-remote", action="store_true", help="serve on a non-loopback --host: NO authentication")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--data", type=Path, help="folder of case folders for the case picker")
    parser.add_argument("--out", type=Path, help="default folder for Save (default ./brainlesionsam-web-output)")
    parser.add_argument("--idle-exit", type=float, default=0, metavar="SECONDS",
                        help="stop when no page has been connected for this long (default 0: never)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from BrainLesionSAMLib.cli import run_command

    return run_command(serve, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


"""`kn-ray explore OUT`: browse a run in the browser (fact -> neurons -> edits, neuron -> facts).

Serves pages over OUT's committed Parquet parts: overview, relations, facts, neurons, edit
outcomes. Binds to 127.0.0.1 on a free port and prints the URL."""

from __future__ import annotations

import socket
import sys

from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import RunDir, add_command
from kn_ray.stages.explore.options import ExploreOptions


def register(sub) -> None:
    p = add_command(sub, "explore", run, help="browse a run in a local web app (read-only)", description=__doc__)
    declared.add_flags(p, RunDir)
    declared.add_flags(p, ExploreOptions)


def bind(options: ExploreOptions) -> socket.socket:
    """The listening socket (port 0: a free one), so the URL printed is the one served."""
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot bind {options.host}:{options.port}: {error.strerror or error}") from None
    sock.listen(128)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run(args) -> int:
    import uvicorn

    from kn_ray.pipeline.rundir import RunDirectory
    from kn_ray.stages.explore.app import MAX_REQUEST, create_app, inspect

    options = declared.from_args(ExploreOptions, args).check()
    state = inspect(RunDirectory(args.out))
    if state.kind in ("missing", "not_run"):
        raise FileNotFoundError(state.message)
    if not options.loopback:
        print(f"kn-ray explore: warning: binding {options.host} serves this run to anyone who can reach the "
              "address; there is no authentication", file=sys.stderr)
    sock = bind(options)
    app = create_app(args.out, options.memory_limit, options.refresh, host=options.host)
    note = (f" (run in progress: {state.committed} of {state.planned} shard{'s' * (state.planned != 1)} committed)"
            if state.in_progress else "")
    print(f"kn-ray explore: {state.location}{note}\n{url(sock)}", flush=True)
    # h11 reads request heads up to MAX_REQUEST bytes, so a long URL is answered (414 from the app)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, http="h11",
                                           h11_max_incomplete_event_size=MAX_REQUEST))
    server.run(sockets=[sock])
    return 0

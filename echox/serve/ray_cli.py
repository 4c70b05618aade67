"""The `echox serve-ray` subcommand: `echox serve` replicas behind Ray Serve (ray_deployment.py).

Registered by echox/cli.py with argparse only; Ray is imported when the command runs, so
`echox --help` stays fast and works where Ray is not installed. Every option is checked before
Ray starts: a mistake costs a line on stderr, not a cluster start.
"""

import argparse
import signal
import time
from pathlib import Path

from ..config import require_folder
from ..errors import EchoXError
from .cli import check_demo_device, session_defaults
from .ports import check_listenable, check_reachable
from .stopping import FINDS_CHILDREN, on_stop_signals

APP_NAME = "echox"
# serve-ray sets these on every replica's `echox serve` itself (a replica's child listens on a
# loopback port of its own); after `--` they would override that.
OWN_OPTIONS = ("--host", "--port", "--model", "--demo", "--device", "--threads")
# What a second SIGINT/SIGTERM during the cleanup leaves: nothing of a local Ray (every process this
# command started is killed); on a cluster, the application's removal goes on without us.
FORCED_NOTE_LOCAL = ", with the local Ray instance and its replicas" if FINDS_CHILDREN else \
    "; the local Ray instance may still run (`ray stop` ends it)"
FORCED_NOTE_CLUSTER = "; Ray Serve on the cluster goes on removing the echox application (`serve status` shows it)"


def add_serve_ray_command(sub: argparse._SubParsersAction):
    from ..cli import add_threads_argument, positive_number, whole_number  # as `echox serve` takes them
    command = sub.add_parser(
        "serve-ray", help="`echox serve` replicas (one per GPU) behind Ray Serve's HTTP/WebSocket proxy",
        epilog="Options after `--` go to every replica's `echox serve`, e.g. `-- --max-new-tokens 256`.")
    command.add_argument("--replicas", type=whole_number("replicas"), required=True,
                         help="replicas, each one `echox serve` (and GPU)")
    model = command.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="EchoX model folder (the same path on every Ray node)")
    model.add_argument("--demo", action="store_true", help="serve the built-in tiny random model (CPU)")
    command.add_argument("--host", default="127.0.0.1", help="where Ray Serve's proxy listens")
    command.add_argument("--port", type=fixed_port, default=8000,
                         help="the proxy's port on every node (default 8000; 0 is refused: it is not chosen once)")
    command.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per replica")
    command.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    command.add_argument("--start-timeout", type=positive_number("start-timeout"), default=600.0,
                         help="seconds a replica's `echox serve` may take to load its model and listen (default 600)")
    add_threads_argument(command)
    command.add_argument("serve_args", nargs="*", metavar="-- ECHOX_SERVE_OPTION",
                         help="more `echox serve` options for every replica")
    command.set_defaults(run=cmd_serve_ray)


def fixed_port(value: str) -> int:
    """`echox serve`'s port type without 0: Ray Serve starts a proxy on each node with the port it is
    given, and reports 0 back, so a free port picked by each would be found by nobody."""
    from ..cli import port_number
    port = port_number(value)
    if port == 0:
        raise argparse.ArgumentTypeError("Ray Serve's proxy needs a fixed port, 1..65535 (0, any free one, cannot "
                                         "be found again)")
    return port


def check_options(args):
    """Refuse what cannot work before Ray starts; `echox serve`'s own parser checks the extra options."""
    from ..cli import build_parser
    check_demo_device(args)
    if args.model is not None:
        require_folder(Path(args.model), "model folder")
    if args.address is None:  # a local Ray instance, on this machine's CPUs, GPUs and ports
        if args.device == "cuda":
            check_local_gpus(args.replicas)
        check_local_cpus(args.replicas, args.threads)
        check_listenable(args.host, args.port)
    elif args.address != "auto":
        check_reachable(args.address, "--address")
    owned = [arg for arg in args.serve_args if arg.split("=")[0] in OWN_OPTIONS]
    if owned:
        raise EchoXError(f"{', '.join(owned)}: give it to serve-ray itself, before `--` "
                         f"(serve-ray sets {', '.join(OWN_OPTIONS)} on every replica)")
    serve_args, unknown = build_parser().parse_known_args(["serve", "--demo", *args.serve_args])  # bad values: exits
    if unknown:
        raise EchoXError(f"{' '.join(unknown)}: not `echox serve` options (see `echox serve --help`)")
    session_defaults(serve_args)


def check_local_cpus(replicas: int, threads: int):
    """Each replica reserves --threads CPUs: Ray would otherwise wait for the missing ones forever,
    saying only every 30 s that the replicas cannot be scheduled."""
    from ..cpu_threads import usable_cores
    cores = usable_cores()
    if replicas * threads > cores:
        raise EchoXError(f"--replicas {replicas} with --threads {threads} needs {replicas * threads} CPUs "
                         f"(each replica reserves its threads); this process may use {cores} "
                         "(its CPU affinity and quota)")


def check_local_gpus(replicas: int):
    """One GPU per replica: Ray would otherwise wait for the missing GPUs forever, in silence."""
    import torch
    gpus = torch.cuda.device_count()  # what Ray finds too: both honour CUDA_VISIBLE_DEVICES
    if gpus < replicas:
        raise EchoXError(f"--replicas {replicas} with --device cuda needs {replicas} GPUs (one each); "
                         f"this machine has {gpus}")


def import_ray_serve():
    """Ray and Serve, or one clear line: they are an optional extra."""
    try:
        import fastapi  # noqa: F401 - the deployment's ingress; `ray[serve]` brings it, bare `ray` does not
        import ray
        from ray import serve
    except ImportError as e:
        raise EchoXError(f"echox serve-ray needs Ray Serve ({e.name or e} is not installed): "
                         "pip install 'echox[ray]'") from None
    return ray, serve


def interrupt():
    raise KeyboardInterrupt


def wait_for_stop_signal():
    """Until the first SIGINT/SIGTERM, whose handler raises KeyboardInterrupt here: a clean stop."""
    # Windows has no signal.pause; a sleep there is cut short by Ctrl-C all the same.
    wait = getattr(signal, "pause", lambda: time.sleep(3600))
    try:
        while True:
            wait()
    except KeyboardInterrupt:
        pass


def connect_ray(ray, address: str | None):
    """A new local Ray instance, or the cluster at `address`."""
    try:
        ray.init(address=address or "local", include_dashboard=False)
    except ConnectionError as e:  # after Ray's own retries
        raise EchoXError(f"--address {address}: no Ray cluster answered ({e})") from None
    except Exception as e:  # Ray's own error types, or an OSError from its temporary folder
        raise EchoXError(f"Ray did not start: {last_line(e)}") from None


def start_serve(serve, host: str, port: int, on_existing_cluster: bool) -> tuple[str, int]:
    """Ray Serve's proxy on host:port, and where it listens: on a cluster whose Serve ran already,
    the host and port that Serve started with (Ray keeps them, saying only that it ignores ours)."""
    try:
        serve.start(http_options={"host": host, "port": port})
    except Exception as e:  # a RayTaskError from the proxy actor, say
        raise EchoXError(f"Ray Serve could not listen on {host}:{port}: {last_line(e)}") from None
    if on_existing_cluster and APP_NAME in serve.status().applications:
        raise EchoXError(f"an application named {APP_NAME!r} runs on this Ray cluster already (another "
                         "serve-ray?); stop it first, or use another cluster")
    # Ray has no public call for the proxy's options; ray[serve] is pinned to a version that has this one.
    options = serve.context._get_global_client().http_config
    return options.host, options.port


def last_line(error: BaseException) -> str:
    """An error's last non-empty line: where Ray's own errors put their message, after a traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def deploy(serve, app):
    """Run the application; wait until every replica's `echox serve` listens."""
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # Serve's "Deploying application ... failed", after its retries
        raise EchoXError(f"the replicas did not start: {str(e).rstrip('.')} (what their `echox serve` said "
                         "is in the log above)") from None


def cmd_serve_ray(args):
    check_options(args)
    ray, serve = import_ray_serve()
    from .ray_deployment import build_app
    connect_ray(ray, args.address)
    # After ray.init, which sets a SIGTERM handler of its own. The first signal interrupts what runs
    # (a replica's start, or the wait), and the cleanup below stops what this command started.
    on_stop_signals(interrupt, "echox serve-ray", FORCED_NOTE_LOCAL if args.address is None else FORCED_NOTE_CLUSTER)
    ours = False  # an application of ours is on the cluster (to delete at the end)
    try:
        host, port = start_serve(serve, args.host, args.port, on_existing_cluster=args.address is not None)
        ours = True
        deploy(serve, build_app(args.replicas, args.model, args.demo, args.device, args.threads, args.serve_args,
                                args.start_timeout))
        print(f"echox serve-ray: listening on http://{host}:{port}/ (page) and ws://{host}:{port}/v1/realtime, "
              f"{args.replicas} replica(s)", flush=True)
        if (host, port) != (args.host, args.port):
            print(f"echox serve-ray: Ray Serve ran on this cluster already, and its proxy keeps the host and port "
                  f"it started with, not --host {args.host} --port {args.port}", flush=True)
        wait_for_stop_signal()
    finally:
        if args.address is None:  # a cluster we started goes away whole
            serve.shutdown()
        elif ours:  # on someone else's we remove only our application
            serve.delete(APP_NAME)
        ray.shutdown()

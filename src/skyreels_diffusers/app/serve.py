"""`skyreels-v3 serve`: the video API (`app/api.py`) on Ray Serve, one deployment per task.

    skyreels-v3 serve --model tiny                                  # one machine, loopback only, every task
    skyreels-v3 serve --task reference_to_video=./skyreels-v3-r2v --task talking_avatar=./skyreels-v3-a2v \\
        --min-replicas 1 --max-replicas 8 --low-vram --store /shared/skyreels-jobs
    skyreels-v3 serve --address auto --host 0.0.0.0 --api-key-file keys.txt ...   # an existing Ray cluster

Each task is a deployment whose replicas hold one loaded pipeline (one GPU each by default) and run one job at a
time; the `api` deployment serves HTTP and dispatches. Jobs live in the job store (a folder, shared storage on a
cluster), never only in a replica: the ingress hands every queued job to its task's deployment and watches the
leases, so a job whose replica dies runs again on another (the talking avatar continues from its resume folder on
the store), and a restarted server picks up every unfinished job and keeps every result.

Without `--address` a local Ray instance is started on 127.0.0.1 only (no dashboard): nothing listens on the
machine's network address.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from .api import SERVER_OPTIONS, ServeSettings, build_api
from .jobs import JobStore, JobWorker
from .tasks import TASKS


logger = logging.getLogger("skyreels_diffusers.serve")
APP_NAME = "skyreels-v3"
#: the longest wait of the dispatcher between two looks at the store
POLL_S = 2.0


def bind_replica_grpc_to_node_address() -> None:
    """Ray Serve (2.60) opens each replica's inter-deployment gRPC server on every interface (`[::]:0`, fixed in
    its code) right after the deployment's constructor returns. Called from the constructors, this binds it to the
    node's Ray address instead (127.0.0.1 on the local instance, the address Ray itself uses on a cluster, which is
    where Serve reaches replicas), so that nothing listens on an address Ray was not given. A Ray without that
    hook is left as it is (tests/app/test_serve_ray.py checks the sockets)."""
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "bound_to_node", False):
        return
    node = ray.util.get_node_ip_address()
    host = f"[{node}]" if ":" in node else node

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port.bound_to_node = True
    replica.add_port_to_grpc_server = add_port


class TaskReplica:
    """A replica of one task's deployment: a `JobWorker` with the pipeline loaded at start."""

    def __init__(self, task: str, settings: ServeSettings):
        bind_replica_grpc_to_node_address()
        store = JobStore(settings.store, settings.lease_seconds, settings.max_attempts)
        self.worker = JobWorker(task, store, model=settings.deployments[task], **settings.options)
        self.worker.preload()

    def run_job(self, job_id: str) -> str:
        return self.worker.run_job(job_id)


class ApiReplica:
    """The ingress: the HTTP API, and the dispatcher that hands the store's queued jobs (and those whose replica
    was lost) to the task deployments."""

    def __init__(self, settings: ServeSettings, handles: dict):
        bind_replica_grpc_to_node_address()
        self.settings = settings
        self.store = JobStore(settings.store, settings.lease_seconds, settings.max_attempts)
        self.handles = handles
        self.inflight: set[str] = set()
        self.suspects: dict[str, tuple[str, float]] = {}  # job -> (lease token, when its replica call failed)
        self.grace = settings.lease_seconds / 2  # three missed heartbeats (a worker beats every lease / 6)
        self.loop = asyncio.get_running_loop()
        self.wakeup = asyncio.Event()
        self.supervisor = self.loop.create_task(self.supervise())

    def __serve_build_asgi_app__(self):
        return build_api(self.settings, self.store, self.wake)

    def wake(self) -> None:
        self.loop.call_soon_threadsafe(self.wakeup.set)

    async def supervise(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.expire_lost)
                for record in await asyncio.to_thread(self.store.dispatchable):
                    if record["id"] not in self.inflight and record["model"] in self.handles:
                        self.inflight.add(record["id"])
                        self.loop.create_task(self.dispatch(record["id"], record["model"]))
                if self.settings.result_ttl_hours:
                    await asyncio.to_thread(self.store.sweep, self.settings.result_ttl_hours * 3600)
            except Exception:  # noqa: BLE001 (the dispatcher must outlive any one bad record)
                logger.exception("dispatcher pass failed")
            try:
                await asyncio.wait_for(self.wakeup.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
            self.wakeup.clear()

    async def dispatch(self, job_id: str, task: str) -> None:
        try:
            outcome = await self.handles[task].run_job.remote(job_id)
            logger.info("job %s: %s", job_id, outcome)
        except Exception as error:  # noqa: BLE001 (the replica died or was stopped: the lease decides)
            record = self.store.get(job_id)
            logger.warning("job %s: its replica call failed (%s)", job_id, type(error).__name__)
            if record is not None and record["status"] == "in_progress" and record["lease"]:
                self.suspects[job_id] = (record["lease"]["token"], time.time())
        finally:
            self.inflight.discard(job_id)
            self.wake()

    def expire_lost(self) -> None:
        """Jobs whose replica call failed and whose lease has not been renewed since: queued again now, without
        waiting for the whole lease to lapse."""
        now = time.time()
        for job_id, (token, failed_at) in list(self.suspects.items()):
            record = self.store.get(job_id)
            lease = (record or {}).get("lease") or {}
            if lease.get("token") != token or lease["heartbeat"] > failed_at:
                del self.suspects[job_id]  # finished, taken over, or still alive
            elif now - failed_at >= self.grace:
                self.store.expire(job_id, token, "replica lost")
                del self.suspects[job_id]


def build_application(settings: ServeSettings):
    """The Serve application: one deployment per task (replicas or autoscaling bounds, GPUs per replica) and the
    `api` ingress."""
    import ray
    from ray import serve

    gpus = settings.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    handles = {}
    for task in settings.deployments:
        if settings.min_replicas is not None or settings.max_replicas is not None:
            low = settings.min_replicas if settings.min_replicas is not None else 1
            high = settings.max_replicas if settings.max_replicas is not None else max(low, settings.replicas)
            config = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 1}
            scaling = {"autoscaling_config": config}
        else:
            scaling = {"num_replicas": settings.task_replicas.get(task, settings.replicas)}
        deployment = serve.deployment(
            TaskReplica,
            name=task,
            max_ongoing_requests=1,  # one job per replica; the others wait in the ingress's handle
            graceful_shutdown_timeout_s=settings.graceful_shutdown_s,
            ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": gpus},
            **scaling,
        )
        handles[task] = deployment.bind(task, settings)
    ingress = serve.deployment(
        serve.ingress()(ApiReplica),
        name="api",
        num_replicas=1,
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(settings, handles)


def app_builder(args: dict):
    """The application from a Serve config (`import_path: skyreels_diffusers.app.serve:app_builder`, e.g. a
    KubeRay RayService): `args` are `ServeSettings` fields; API keys come from `SKYREELS_API_KEYS` (a Kubernetes
    secret) unless given, and are required unless `host` is a loopback address (Serve's own `http_options` bind
    the port)."""
    values = dict(args)
    keys = values.pop("api_keys", None) or os.environ.get("SKYREELS_API_KEYS", "").split(",")
    values["api_keys"] = tuple(k.strip() for k in keys if k.strip())
    values["input_dirs"] = tuple(values.get("input_dirs", ()))
    values.setdefault("host", "0.0.0.0")
    return build_application(ServeSettings(**values))


def init_ray(address: str | None = None, **kwargs) -> None:
    """Connect to the Ray cluster at `address`, or start a local instance bound to 127.0.0.1 with no dashboard.

    Ray picks the machine's network address as a local node's address unless its cluster switch is off; with it
    off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read when Ray is imported) the node address is 127.0.0.1 and every
    Ray server listens there only."""
    if address is None:
        if "ray" in sys.modules:
            from ray._private import ray_constants

            if ray_constants.ENABLE_RAY_CLUSTER:
                raise RuntimeError("Ray was imported before init_ray: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 first")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if address is None:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **kwargs)
    else:
        ray.init(address=address, **kwargs)


def start(settings: ServeSettings, blocking: bool = False):
    """Start Serve's HTTP proxy on `settings.host:port` and deploy the application (Ray already initialised)."""
    from ray import serve

    Path(settings.store).mkdir(parents=True, exist_ok=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=blocking)


# ------------------------------------------------------------------------------------------------ command line
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="'tiny' (default) or a pipeline folder, for every --task")
    parser.add_argument(
        "--task",
        action="append",
        default=None,
        metavar="TASK[=MODEL]",
        help=f"a task to serve (repeatable; default: all of {list(TASKS)}), with its own folder after '='",
    )
    parser.add_argument("--store", default="result/serve", help="job store folder (shared storage on a cluster)")
    parser.add_argument("--address", default=None, help="an existing Ray cluster ('auto', HOST:PORT, ray://...)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (beyond loopback, API keys are required)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-file", default=None, help="API keys, one per line (also: SKYREELS_API_KEYS=a,b)")
    parser.add_argument("--input-dir", action="append", default=[], help="folder whose files requests may name")
    parser.add_argument(
        "--replicas",
        action="append",
        default=None,
        metavar="[TASK=]N",
        help="fixed replicas per task (default 1); TASK=N for one task (repeatable)",
    )
    parser.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas per task")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas per task")
    parser.add_argument("--gpus-per-replica", type=float, default=None, help="default 1 on a cluster with GPUs")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--max-queued", type=int, default=16, help="unfinished jobs per task before 429")
    parser.add_argument("--max-upload-mb", type=float, default=512.0)
    parser.add_argument("--lease-seconds", type=float, default=60.0, help="a silent replica's job runs again after")
    parser.add_argument(
        "--result-ttl-hours", type=float, default=None, help="delete finished jobs after (default never)"
    )
    for flag in ("offload", "low-vram", "group-offload", "sequential-offload", "compile", "fast"):
        parser.add_argument(f"--{flag}", action="store_true", help="memory / speed preset of every replica")
    parser.add_argument("--quantize", choices=["fp8_weight_only", "fp8_dynamic", "fp8_storage"], default=None)
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--device", default=None)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    deployments = {}
    for item in args.task or list(TASKS):
        task, _, model = item.partition("=")
        deployments[task] = model or args.model
    keys = [k.strip() for k in os.environ.get("SKYREELS_API_KEYS", "").split(",") if k.strip()]
    if args.api_key_file:
        lines = Path(args.api_key_file).read_text().splitlines()
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    options = {name: getattr(args, name) for name in SERVER_OPTIONS if getattr(args, name, None) not in (None, False)}
    replicas, task_replicas = 1, {}
    for item in args.replicas or []:
        task, _, count = item.rpartition("=")
        if not count.isdigit() or (task and task not in deployments):
            raise ValueError(f"--replicas: N or TASK=N with a served task, got {item!r}")
        if task:
            task_replicas[task] = int(count)
        else:
            replicas = int(count)
    return ServeSettings(
        deployments=deployments,
        store=str(Path(args.store).resolve()),
        api_keys=tuple(keys),
        input_dirs=tuple(str(Path(d).resolve()) for d in args.input_dir),
        max_queued=args.max_queued,
        max_upload_mb=args.max_upload_mb,
        options=options,
        lease_seconds=args.lease_seconds,
        result_ttl_hours=args.result_ttl_hours,
        host=args.host,
        port=args.port,
        replicas=replicas,
        task_replicas=task_replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
    )


def serve_main(args: argparse.Namespace) -> int:
    """`skyreels-v3 serve`: validate the settings, start (or join) Ray, deploy, and serve until interrupted."""
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
        print("error: serving needs Ray Serve: pip install 'skyreels-diffusers[serve]'", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        from .request import GenerationRequest, check_run_options, with_task_defaults

        for task, model in settings.deployments.items():  # model folders and presets, before Ray starts
            check_run_options(with_task_defaults(GenerationRequest(task=task, model=model, **settings.options)))
        if args.address is None:  # a local instance: its HTTP proxy will listen there (a cluster's may already)
            from .web import check_port

            check_port(settings.host, settings.port)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    init_ray(args.address)
    start(settings)
    print(f"serving {sorted(settings.deployments)} on http://{settings.host}:{settings.port}/v1/videos", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.delete(APP_NAME)
    return 0

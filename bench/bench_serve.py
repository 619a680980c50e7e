#!/usr/bin/env python
"""Load on `skyreels-v3 serve`: jobs per minute and p50 / p95 latency (submit -> completed) for N concurrent
clients, with 1 and then 2 replicas of one task, on a local Ray instance (loopback only) with the tiny model.

    PYTHONPATH=src python bench/bench_serve.py --clients 4 --jobs-per-client 3 --json serve_load.json

Each client submits a job, polls it until it completes, and submits the next (`--jobs-per-client` in all); every
job has its own seed. The replicas run on this machine's CPU cores, so the figure is a ratio (2 replicas against 1
in the same run), not a GPU number: a GPU replica's job takes seconds to minutes and the serving overhead measured
here (HTTP, the job store, dispatch) is what remains. The load average before and after each phase is recorded:
other processes on the machine change the numbers. Every wait is bounded (`--timeout` per job).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(latencies: list[float], wall_s: float, failed: int = 0) -> dict:
    """Jobs per minute over the phase's wall time, and latency percentiles."""
    return {
        "jobs": len(latencies),
        "failed": failed,
        "wall_s": round(wall_s, 2),
        "jobs_per_min": round(60 * len(latencies) / wall_s, 2) if wall_s > 0 else float("nan"),
        "p50_s": round(percentile(latencies, 50), 3),
        "p95_s": round(percentile(latencies, 95), 3),
        "mean_s": round(statistics.fmean(latencies), 3) if latencies else float("nan"),
    }


def client_loop(base_url: str, job: dict, count: int, first_seed: int, timeout: float) -> tuple[list[float], int]:
    import httpx

    latencies, failed = [], 0
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for index in range(count):
            started = time.monotonic()
            answer = client.post("/v1/videos", json={**job, "seed": first_seed + index})
            answer.raise_for_status()
            job_id = answer.json()["id"]
            deadline = started + timeout
            while time.monotonic() < deadline:
                status = client.get(f"/v1/videos/{job_id}").json()["status"]
                if status in ("completed", "failed"):
                    break
                time.sleep(0.05)
            else:
                status = "timeout"
            if status == "completed":
                latencies.append(time.monotonic() - started)
            else:
                failed += 1
    return latencies, failed


def run_phase(base_url: str, args, job: dict, phase: int) -> dict:
    load_before = os.getloadavg()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        futures = [
            pool.submit(client_loop, base_url, job, args.jobs_per_client, 1000 * phase + 100 * c, args.timeout)
            for c in range(args.clients)
        ]
        results = [f.result() for f in futures]
    wall = time.monotonic() - started
    latencies = [latency for result in results for latency in result[0]]
    summary = summarize(latencies, wall, sum(result[1] for result in results))
    summary["load_before"] = [round(x, 2) for x in load_before]
    summary["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return summary


def wait_ready(base_url: str, replicas: int, task: str, timeout: float) -> None:
    """Until the application answers and `replicas` replicas of `task` are running."""
    import httpx
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = serve.status().applications["skyreels-v3"]
            running = status.deployments[task].replica_states.get("RUNNING", 0)
            if status.status == "RUNNING" and running == replicas and httpx.get(f"{base_url}/healthz").is_success:
                return
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{replicas} replicas of {task} not running after {timeout} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="reference_to_video")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--jobs-per-client", type=int, default=3)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a job may take before it counts failed")
    parser.add_argument("--json", default=None, help="write the results here (default $OUT/bench_serve.json if $OUT)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from skyreels_diffusers.app.api import ServeSettings
    from skyreels_diffusers.app.serve import init_ray, start

    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    init_ray(None, log_to_driver=False, _system_config={"worker_register_timeout_seconds": 300})
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    job = {"model": args.task, "size": args.size, "steps": args.steps, "crf": 0}
    if args.task != "talking_avatar":
        job["seconds"] = args.seconds
    settings = ServeSettings(
        deployments={args.task: "tiny"},
        store=tempfile.mkdtemp(prefix="bench-serve-"),
        port=port,
        cpus_per_replica=0.5,
        max_queued=4 * args.clients,
    )
    results = {"cpu_count": os.cpu_count(), "task": args.task, "clients": args.clients, "job": job, "phases": {}}
    for phase, replicas in enumerate(args.replicas):
        start(dataclasses.replace(settings, replicas=replicas))
        wait_ready(base_url, replicas, args.task, timeout=600)
        run_phase(base_url, argparse.Namespace(**{**vars(args), "jobs_per_client": 1}), job, 100 + phase)  # warm-up
        results["phases"][replicas] = run_phase(base_url, args, job, phase)
        print(f"{replicas} replica(s): {json.dumps(results['phases'][replicas])}", flush=True)
    if 1 in results["phases"] and 2 in results["phases"]:
        one, two = results["phases"][1], results["phases"][2]
        results["ratio_2_vs_1"] = {
            "jobs_per_min": round(two["jobs_per_min"] / one["jobs_per_min"], 2),
            "p50": round(two["p50_s"] / one["p50_s"], 2),
            "p95": round(two["p95_s"] / one["p95_s"], 2),
        }
    print("| replicas | jobs/min | p50 s | p95 s | failed | load before -> after |")
    print("|---|---|---|---|---|---|")
    for replicas, phase in results["phases"].items():
        print(
            f"| {replicas} | {phase['jobs_per_min']} | {phase['p50_s']} | {phase['p95_s']} | {phase['failed']} | "
            f"{phase['load_before'][0]} -> {phase['load_after'][0]} |"
        )
    if "ratio_2_vs_1" in results:
        print(f"2 vs 1 replicas: {results['ratio_2_vs_1']}")
    target = args.json or (os.path.join(os.environ["OUT"], "bench_serve.json") if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(json.dumps(results, indent=2))
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

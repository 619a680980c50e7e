"""`skyreels-v3 serve` on a local Ray instance (loopback only, no dashboard) with the tiny model: replicas and
concurrent jobs over several tasks (each video equal to the CLI's), keys and owners over real HTTP, a replica
killed mid-job (the avatar continues from its resume folder, the job completes once), a full queue, and a server
restart (finished results kept, unfinished jobs run again).

Ray starts once for the module; every loop is bounded in count and time. Videos are lossless (`crf` 0) so that
frames compare exactly (libx264's lookahead varies at other CRFs)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import os
import signal
import time

import numpy as np
import pytest


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the serve extra (Ray Serve) is not installed"),
]

import httpx  # noqa: E402
import psutil  # noqa: E402

from skyreels_diffusers.app.api import ServeSettings  # noqa: E402
from tests.app.serve_helpers import assert_same_video, cli_error, run_cli  # noqa: E402
from tests.helpers import free_port, random_image, random_video  # noqa: E402


#: CPU threads of each replica below (Ray sets OMP_NUM_THREADS to an actor's num_cpus, at least 1): the CLI's
#: reference videos are computed with as many
REPLICA_THREADS = 1
KEY_A, KEY_B = "serve-test-key-a", "serve-test-key-b"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
#: wall-clock bound of any wait (the machine may be shared); counts are bounded by it and the poll period
DEADLINE_S = 420
POLL_S = 0.5


def auth(key: str = KEY_A) -> dict:
    return {"Authorization": f"Bearer {key}"}


def body(model: str, **fields) -> dict:
    sizes = {"talking_avatar": {}, "single_shot_extension": {"seconds": 1}}
    base = {"model": model, "size": "64x64", "steps": 1, "crf": 0, "seed": 1, **sizes.get(model, {"seconds": 1})}
    return {**base, **fields}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Ray on 127.0.0.1 and the application: reference_to_video x2, single_shot_extension x1, talking_avatar x1."""
    from skyreels_diffusers.app.serve import APP_NAME, init_ray, start

    # Ray reads these when its processes start; the machine may be busy (CI runs two test workers on two cores),
    # so Serve's controller waits longer for its HTTP proxy before calling it unhealthy and killing it (Ray's 5-s
    # ready check once killed the proxy before its worker process had started: every test here then errored)
    environment = {
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",  # Serve's controller polls less often: less CPU
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # what init_ray sets: here so that the end of the module undoes it
    }
    patch = pytest.MonkeyPatch()
    for name, value in environment.items():
        patch.setenv(name, value)
    init_ray(None, num_cpus=4, log_to_driver=False, _system_config={"worker_register_timeout_seconds": 300})
    port = free_port()
    settings = ServeSettings(
        deployments={"reference_to_video": "tiny", "single_shot_extension": "tiny", "talking_avatar": "tiny"},
        store=str(tmp_path_factory.mktemp("store")),
        api_keys=(KEY_A, KEY_B),
        port=port,
        task_replicas={"reference_to_video": 2},
        cpus_per_replica=0.5,  # Ray gives such a replica OMP_NUM_THREADS=1: REPLICA_THREADS
        max_queued=4,
        lease_seconds=6,
        graceful_shutdown_s=1,
    )
    start(settings)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    yield {"client": client, "settings": settings, "app": APP_NAME, "completed": {}}
    client.close()
    if os.environ.get("SERVE_CPU_REPORT"):
        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        print(f"\nCPU of the process tree: {total:.1f} s", flush=True)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    patch.undo()


def wait_for(client, job: str, done=lambda v: v["status"] in ("completed", "failed"), poll: float = POLL_S) -> dict:
    """The job's video object once `done(video)` (or when the deadline passes)."""
    deadline = time.monotonic() + DEADLINE_S
    for _ in range(int(DEADLINE_S / poll)):
        video = client.get(f"/v1/videos/{job}", headers=auth()).json()
        if done(video) or time.monotonic() > deadline:
            return video
        time.sleep(poll)
    return video


def content(client, job: str, key: str = KEY_A) -> bytes:
    answer = client.get(f"/v1/videos/{job}/content", headers=auth(key))
    assert answer.status_code == 200 and answer.headers["content-type"] == "video/mp4"
    return answer.content


def test_ray_listens_on_loopback_only(server):
    client = server["client"]
    assert client.get("/healthz").json()["status"] == "ok"
    me = psutil.Process()
    listening, remote = [], []
    for process in [me, *me.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN or not connection.raddr:
                listening.append((process.name(), connection.laddr.ip, connection.laddr.port))
            else:
                remote.append((process.name(), connection.raddr.ip))
    assert len(listening) >= 5  # GCS, raylet, workers, the HTTP proxy...
    assert ("127.0.0.1", server["settings"].port) in {(ip, port) for _, ip, port in listening}
    assert all(ip in LOOPBACK for _, ip, _ in listening), [entry for entry in listening if entry[1] not in LOOPBACK]
    assert remote and all(ip in LOOPBACK for _, ip in remote), [entry for entry in remote if entry[1] not in LOOPBACK]


def test_keys_owners_and_bad_inputs_over_http(server, capsys, tmp_path):
    client = server["client"]
    assert client.post("/v1/videos", json=body("reference_to_video")).status_code == 401
    assert client.post("/v1/videos", json=body("reference_to_video"), headers=auth("wrong-key")).status_code == 401
    bad = body("reference_to_video", seconds=31)
    answer = client.post("/v1/videos", json=bad, headers=auth())
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "seconds"
    assert answer.json()["error"]["message"] == cli_error(bad, capsys, tmp_path / "never.mp4")
    models = client.get("/v1/models", headers=auth()).json()
    assert sorted(m["id"] for m in models["data"]) == sorted(server["settings"].deployments)


def _upload(image_sizes=(), video=False, portrait=False, speech=False) -> tuple[list, list[str]]:
    """(multipart files, the CLI's flags for the same files) of one job; the files lie in `_upload.folder`."""
    import soundfile

    from skyreels_diffusers.pipelines.video_io import write_video

    files, flags, folder = [], [], _upload.folder
    for index, (height, width) in enumerate(image_sizes):
        path = folder / f"ref{index}_{height}.png"
        random_image(height, width, seed=index).save(path)
        files.append(("input_reference", (path.name, path.read_bytes(), "image/png")))
        flags += ["--ref-imgs", str(path)] if index == 0 else [str(path)]
    if video:
        path = write_video(random_video(frames=32, height=64, width=96, seed=3), folder / "clip.mp4", fps=24, crf=0)
        files.append(("input_reference", (path.name, path.read_bytes(), "video/mp4")))
        flags += ["--input-video", str(path)]
    if portrait:
        path = folder / "face.png"
        random_image(96, 80, seed=5).save(path)
        files.append(("input_reference", (path.name, path.read_bytes(), "image/png")))
        flags += ["--input-image", str(path)]
    if speech:
        path = folder / "speech.wav"
        t = np.arange(16000) / 16000
        soundfile.write(path, (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(5 * t))).astype(np.float32), 16000)
        files.append(("input_audio", (path.name, path.read_bytes(), "audio/wav")))
        flags += ["--input-audio", str(path)]
    return files, flags


def test_eight_concurrent_jobs_over_three_tasks_equal_the_cli(server, tmp_path):
    client = server["client"]
    _upload.folder = tmp_path
    jobs = [
        (body("reference_to_video", seed=1), None),
        (body("reference_to_video", seed=2, prompt="two discs"), None),
        (body("reference_to_video", seed=3), _upload(image_sizes=[(80, 64), (64, 96)])),
        (body("reference_to_video", seed=4, steps=2), None),
        (body("single_shot_extension", seed=5), None),
        (body("single_shot_extension", seed=6), _upload(video=True)),
        (body("talking_avatar", seed=7), None),
        (body("talking_avatar", seed=8), _upload(portrait=True, speech=True)),
    ]

    def submit(job):
        fields, upload = job
        if upload is None:
            return client.post("/v1/videos", json=fields, headers=auth())
        return client.post("/v1/videos", data={k: str(v) for k, v in fields.items()}, files=upload[0], headers=auth())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(submit, jobs))
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers if a.status_code != 200]
    ids = [a.json()["id"] for a in answers]
    references = [
        run_cli(fields, tmp_path / f"cli{i}.mp4", tuple(upload[1]) if upload else (), threads=REPLICA_THREADS)
        for i, (fields, upload) in enumerate(jobs)
    ]
    for job, reference in zip(ids, references):
        video = wait_for(client, job)
        assert video["status"] == "completed", video
        assert video["progress"] == 100 and video["attempts"] == 1
        assert_same_video(content(client, job), reference)
        server["completed"][job] = content(client, job)
    from skyreels_diffusers.app.jobs import JobStore

    store = JobStore(server["settings"].store)
    claims = {e["pid"] for job in ids[:4] for e in store.get(job)["history"] if e["event"] == "claimed"}
    assert len(claims) == 2  # both replicas of reference_to_video ran jobs
    listed = client.get("/v1/videos", params={"limit": 100}, headers=auth()).json()
    assert set(ids) <= {v["id"] for v in listed["data"]}
    assert client.get(f"/v1/videos/{ids[0]}", headers=auth(KEY_B)).status_code == 404  # another key's job


def test_a_replica_killed_mid_job_and_a_full_queue(server, tmp_path):
    """The avatar's replica dies after the first window: the job runs again (on the restarted replica), continues
    from the resume folder on the store (no window of the first run is redone) and completes once, equal to the
    CLI's video. Meanwhile the avatar queue (4) fills up: the fifth job gets 429 with Retry-After."""
    client = server["client"]
    from skyreels_diffusers.app.jobs import JobStore

    store = JobStore(server["settings"].store)
    long_job = body("talking_avatar", seed=21, steps=5)
    job = client.post("/v1/videos", json=long_job, headers=auth()).json()["id"]
    wait_for(client, job, lambda v: v["status"] != "queued", poll=0.1)
    queued = [client.post("/v1/videos", json=body("talking_avatar", seed=30 + i), headers=auth()) for i in range(3)]
    assert [q.status_code for q in queued] == [200] * 3
    full = client.post("/v1/videos", json=body("talking_avatar", seed=40), headers=auth(KEY_B))
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1, full.text
    for answer in queued:  # cancel the queued ones
        assert client.delete(f"/v1/videos/{answer.json()['id']}", headers=auth()).json()["deleted"] is True
    video = wait_for(
        client, job, lambda v: (v["progress_detail"] or {}).get("window", 0) >= 1 or v["status"] != "in_progress", 0.1
    )
    assert video["status"] == "in_progress", video
    first = store.get(job)
    os.kill(first["lease"]["pid"], signal.SIGKILL)
    reference = run_cli(long_job, tmp_path / "cli.mp4", threads=REPLICA_THREADS)
    video = wait_for(client, job)
    history = store.get(job)["history"]
    assert video["status"] == "completed" and video["attempts"] == 2, f"{store.get(job)['error']} {history}"
    assert [e["event"] for e in history].count("completed") == 1
    claims = [e for e in history if e["event"] == "claimed"]
    assert len(claims) == 2 and claims[0]["pid"] != claims[1]["pid"]
    windows = {
        attempt: [e["window"] for e in history if e["event"] == "window" and e["attempt"] == attempt]
        for attempt in (1, 2)
    }
    assert windows[1] and windows[2] and min(windows[2]) > max(windows[1]), windows  # resumed, nothing redone
    assert_same_video(content(client, job), reference)
    assert not store.resume_dir(job).exists() and not store.work_dir(job).exists()


def test_a_restarted_server_keeps_results_and_reruns_unfinished_jobs(server, tmp_path):
    """The server goes down hard with a job running and one queued, and comes back (a new application, its
    ingress and replicas new) on the same store: every finished video is served as before, and both unfinished
    jobs complete once, the running one in a second attempt with the CLI's video."""
    from ray import serve

    from skyreels_diffusers.app.jobs import JobStore
    from skyreels_diffusers.app.serve import start

    client, settings = server["client"], server["settings"]
    store = JobStore(settings.store)
    if not server["completed"]:  # run alone: one finished job first
        job = client.post("/v1/videos", json=body("talking_avatar", seed=50), headers=auth()).json()["id"]
        assert wait_for(client, job)["status"] == "completed"
        server["completed"][job] = content(client, job)
    running_body, queued_body = body("talking_avatar", seed=51, steps=5), body("talking_avatar", seed=52)
    running = client.post("/v1/videos", json=running_body, headers=auth()).json()["id"]
    queued = client.post("/v1/videos", json=queued_body, headers=auth()).json()["id"]
    assert wait_for(client, running, lambda v: v["status"] != "queued", poll=0.1)["status"] == "in_progress"
    os.kill(store.get(running)["lease"]["pid"], signal.SIGKILL)  # the server goes down hard: the busy replica...
    serve.delete(server["app"])  # ...and then the rest of the application
    assert (store.get(running)["status"], store.get(queued)["status"]) == ("in_progress", "queued")
    restarted = dataclasses.replace(settings, deployments={"talking_avatar": "tiny"}, task_replicas={})
    start(restarted)
    for job, expected in server["completed"].items():
        assert client.get(f"/v1/videos/{job}", headers=auth()).json()["status"] == "completed"
        assert content(client, job) == expected
    reference = run_cli(running_body, tmp_path / "r.mp4", threads=REPLICA_THREADS)
    for job in (running, queued):
        video = wait_for(client, job)
        assert video["status"] == "completed", video
        assert [e["event"] for e in store.get(job)["history"]].count("completed") == 1
    assert store.get(running)["attempts"] == 2
    assert_same_video(content(client, running), reference)

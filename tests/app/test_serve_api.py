"""The served videos API without Ray: the job store (leases, one completion, cleanup), the HTTP layer (keys,
owners, 422 with the CLI's message, paths, upload limit, full queue) and one job run by the worker in-process,
whose video equals the CLI's. The same API on Ray Serve with replicas: tests/app/test_serve_ray.py."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import pytest

from skyreels_diffusers.app.request import RequestError


pytest.importorskip("fastapi", reason="the serve extra is not installed")

from fastapi.testclient import TestClient

from skyreels_diffusers.app.api import ServeSettings, build_api, invalid_request
from skyreels_diffusers.app.jobs import JobStore, JobWorker, new_job_id, public_message
from tests.app.serve_helpers import assert_same_video, cli_error, run_cli
from tests.helpers import random_image


KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"


def settings(tmp_path: Path, **overrides) -> ServeSettings:
    values = dict(
        deployments={"reference_to_video": "tiny", "shot_switching_extension": "tiny", "talking_avatar": "tiny"},
        store=str(tmp_path / "store"),
        api_keys=(KEY_A, KEY_B),
        max_queued=4,
    )
    return ServeSettings(**{**values, **overrides})


@pytest.fixture
def served(tmp_path):
    """(TestClient, JobStore, woken jobs) of an API whose dispatcher only records that it was woken."""
    config = settings(tmp_path)
    store = JobStore(config.store, lease_seconds=5)
    woken = []
    client = TestClient(build_api(config, store, wake=lambda: woken.append(1)))
    return client, store, woken


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def small(**fields) -> dict:
    return {"model": "reference_to_video", "seconds": 1, "size": "64x64", "steps": 2, "seed": 7, "crf": 0, **fields}


# ------------------------------------------------------------------------------------------------ job store
def test_store_leases_finish_a_job_once(tmp_path):
    """A lapsed lease is claimed again; the first run's late completion is refused and only its own file goes;
    the second run publishes the result and the job's uploads / resume / work files are removed."""
    store = JobStore(tmp_path, lease_seconds=30)
    job_id = new_job_id()
    store.create(job_id, "local", "talking_avatar", {"seed": 1}, limit=4)
    assert [r["id"] for r in store.unfinished()] == [job_id] and store.unfinished("reference_to_video") == []
    (store.upload_dir(job_id) / "0").mkdir(parents=True)
    (store.upload_dir(job_id) / "0" / "face.png").write_bytes(b"x")
    store.resume_dir(job_id).mkdir(parents=True)
    first = store.claim(job_id, {"pid": 1})
    assert first["status"] == "in_progress" and first["attempts"] == 1
    assert store.claim(job_id, {"pid": 2}) is None  # the lease is alive
    assert store.dispatchable() == []

    def lapse(record):
        record["lease"]["heartbeat"] -= 31

    store.update(job_id, lapse)
    assert [r["id"] for r in store.dispatchable()] == [job_id]
    second = store.claim(job_id, {"pid": 2})
    assert second["attempts"] == 2 and second["lease"]["token"] != first["lease"]["token"]
    assert not store.heartbeat(job_id, first["lease"]["token"])  # the first run learns it lost the job
    store.work_dir(job_id).mkdir(parents=True)
    late, final = store.work_dir(job_id) / "attempt-1.mp4", store.work_dir(job_id) / "attempt-2.mp4"
    late.write_bytes(b"first")
    final.write_bytes(b"second")
    assert not store.complete(job_id, first["lease"]["token"], late)
    assert not late.exists() and final.exists() and store.resume_dir(job_id).exists()  # the live run's files stay
    assert store.complete(job_id, second["lease"]["token"], final)
    record = store.get(job_id)
    assert record["status"] == "completed" and record["progress"] == 100
    assert store.result_path(job_id).read_bytes() == b"second"
    assert [e["event"] for e in record["history"]].count("completed") == 1
    assert not store.upload_dir(job_id).exists() and not store.resume_dir(job_id).exists()
    assert store.claim(job_id, {"pid": 3}) is None  # a finished job never runs again
    assert store.unfinished() == [] and store.dispatchable() == []


def test_store_fails_a_job_whose_replicas_keep_dying(tmp_path):
    store = JobStore(tmp_path, lease_seconds=30, max_attempts=2)
    job_id = new_job_id()
    store.create(job_id, "local", "reference_to_video", {}, limit=4)
    for attempt in (1, 2):
        assert store.claim(job_id, {"pid": attempt})["attempts"] == attempt
        store.update(job_id, lambda r: r["lease"].update(heartbeat=0))
    assert store.claim(job_id, {"pid": 3}) is None
    record = store.get(job_id)
    assert record["status"] == "failed" and record["error"]["code"] == "replica_lost"


def test_store_refuses_ids_that_are_not_job_ids(tmp_path):
    store = JobStore(tmp_path)
    assert store.get("../../etc/passwd") is None and store.get("video_" + "0" * 31 + "/") is None
    assert not store.delete("../jobs")


# ------------------------------------------------------------------------------------------------ HTTP layer
def test_keys_and_owners(served):
    client, store, woken = served
    assert client.post("/v1/videos", json=small()).status_code == 401
    wrong = client.post("/v1/videos", json=small(), headers=auth("key-a-0123456788"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/videos", headers={"Authorization": KEY_A}).status_code == 401  # no Bearer scheme
    created = client.post("/v1/videos", json=small(), headers=auth(KEY_A))
    assert created.status_code == 200, created.text
    video = created.json()
    assert video["object"] == "video" and video["status"] == "queued" and video["model"] == "reference_to_video"
    assert video["size"] == "64x64" and video["seconds"] == "1" and woken == [1]
    job = video["id"]
    assert client.get(f"/v1/videos/{job}", headers=auth(KEY_A)).json()["id"] == job
    for method, path in (("get", ""), ("get", "/content"), ("delete", "")):
        other = getattr(client, method)(f"/v1/videos/{job}{path}", headers=auth(KEY_B))
        assert other.status_code == 404, (method, path)
    assert client.get("/v1/videos", headers=auth(KEY_B)).json()["data"] == []
    listed = client.get("/v1/videos", headers=auth(KEY_A)).json()
    assert [v["id"] for v in listed["data"]] == [job] and listed["has_more"] is False
    assert KEY_A not in json.dumps(store.get(job))  # the key itself is never stored
    assert client.get(f"/v1/videos/{job}/content", headers=auth(KEY_A)).status_code == 409  # not finished
    deleted = client.delete(f"/v1/videos/{job}", headers=auth(KEY_A)).json()
    assert deleted == {"id": job, "object": "video.deleted", "deleted": True} and store.get(job) is None


@pytest.mark.parametrize(
    "body, param",
    [
        (small(seconds=31), "seconds"),  # reference_to_video: at most 30 s
        (small(model="shot_switching_extension", seconds=9), "seconds"),
        (small(size="60x64"), "size"),  # not a multiple of 16
        (small(steps=0), "steps"),
        (small(guidance_scale=-1.0), "guidance_scale"),
        (small(window_prompt="hi"), "window_prompt"),  # a field of another task (before: ignored)
        (small(model="talking_avatar", seconds=3), "seconds"),  # the avatar's length is its audio's
    ],
)
def test_bad_inputs_get_422_with_the_cli_message(served, capsys, tmp_path, body, param):
    client, store, woken = served
    answer = client.post("/v1/videos", json=body, headers=auth(KEY_A))
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"] == cli_error(body, capsys, tmp_path / "never.mp4")
    assert store.jobs() == [] and woken == []


def test_request_fields_are_checked(served):
    client, _, _ = served
    cases = {
        "model": (small(model="text_to_video"), "--task: must be one of"),
        "size": (small(size="big"), "size: must be WIDTHxHEIGHT"),
        "steps": (small(steps="many"), "--steps: invalid int value: 'many'"),
        "seconds": (small(seconds="1.5"), "--duration: invalid int value: '1.5'"),
        "device": (small(device="cpu"), "device: set by the server"),
        "output": (small(output="/tmp/x.mp4"), "output: set by the server"),
        "colour": (small(colour="red"), "colour: unknown field"),
    }
    for param, (body, message) in cases.items():
        error = client.post("/v1/videos", json=body, headers=auth(KEY_A)).json()["error"]
        assert error["param"] == param and error["message"].startswith(message), (param, error)


def test_paths_stay_inside_the_input_folders(tmp_path):
    inputs, outside = tmp_path / "inputs", tmp_path / "private"
    inputs.mkdir()
    outside.mkdir()
    random_image(64, 64).save(inputs / "a.png")
    random_image(64, 64).save(outside / "secret.png")
    (inputs / "link.png").symlink_to(outside / "secret.png")
    config = settings(tmp_path, input_dirs=(str(inputs),))
    client = TestClient(build_api(config, JobStore(config.store)))
    for given in ("../private/secret.png", str(outside / "secret.png"), "link.png", "missing.png"):
        answer = client.post("/v1/videos", json=small(ref_imgs=[given]), headers=auth(KEY_A))
        assert answer.status_code == 422 and answer.json()["error"]["param"] == "ref_imgs", given
        assert str(tmp_path) not in answer.text
    ok = client.post("/v1/videos", json=small(ref_imgs=["a.png", str(inputs / "a.png")]), headers=auth(KEY_A))
    assert ok.status_code == 200, ok.text
    refused = TestClient(build_api(settings(tmp_path / "b"), JobStore(tmp_path / "b")))
    answer = refused.post("/v1/videos", json=small(input_reference="a.png"), headers=auth(KEY_A))
    assert answer.status_code == 422 and "upload the file" in answer.json()["error"]["message"]


def test_uploads_are_limited_named_without_paths_and_deleted_with_their_job(tmp_path):
    config = settings(tmp_path, max_upload_mb=0.05)
    store = JobStore(config.store)
    client = TestClient(build_api(config, store))
    image = io.BytesIO()
    random_image(64, 64).save(image, format="PNG")
    form = {k: str(v) for k, v in small().items()}
    big = {"input_reference": ("big.png", b"0" * 60_000, "image/png")}
    answer = client.post("/v1/videos", data=form, files=big, headers=auth(KEY_A))
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "upload_too_large"
    broken = client.post(
        "/v1/videos",
        data=form,
        files={"input_reference": ("broken.png", b"not an image", "image/png")},
        headers=auth(KEY_A),
    )
    assert broken.status_code == 422 and broken.json()["error"]["param"] == "input_reference"
    assert "broken.png" in broken.json()["error"]["message"] and str(tmp_path) not in broken.text
    assert list((store.root / "uploads").iterdir()) == []  # a refused request leaves no upload behind
    files = [("input_reference", ("a.png", image.getvalue(), "image/png"))] * 2
    created = client.post("/v1/videos", data=form, files=files, headers=auth(KEY_A))
    assert created.status_code == 200, created.text
    job = created.json()["id"]
    assert len(list(store.upload_dir(job).rglob("*.png"))) == 2
    assert len(store.get(job)["request"]["ref_imgs"]) == 2
    client.delete(f"/v1/videos/{job}", headers=auth(KEY_A))
    assert not store.upload_dir(job).exists() and store.get(job) is None
    data_url = "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()
    json_body = small(input_reference={"image_url": data_url})
    assert client.post("/v1/videos", json=json_body, headers=auth(KEY_A)).status_code == 200
    fetched = client.post(
        "/v1/videos", json=small(input_reference={"image_url": "https://example.com/a.png"}), headers=auth(KEY_A)
    )
    assert fetched.status_code == 422 and "not fetched" in fetched.json()["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    config = settings(tmp_path, max_queued=2)
    client = TestClient(build_api(config, JobStore(config.store)))
    for seed in (1, 2):
        assert client.post("/v1/videos", json=small(seed=seed), headers=auth(KEY_A)).status_code == 200
    full = client.post("/v1/videos", json=small(seed=3), headers=auth(KEY_B))
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert full.json()["error"]["code"] == "queue_full"
    other_task = client.post("/v1/videos", json=small(model="talking_avatar", seconds=None), headers=auth(KEY_A))
    assert other_task.status_code in (200, 422)  # another task's queue is its own


def test_loopback_only_without_keys():
    with pytest.raises(ValueError, match="API keys"):
        ServeSettings(deployments={"reference_to_video": "tiny"}, host="0.0.0.0")
    ServeSettings(deployments={"reference_to_video": "tiny"}, host="127.0.0.1")


def test_error_mapping_and_path_scrubbing():
    error = invalid_request(RequestError("input_image", "/srv/jobs/uploads/video_1/0/face.png is not an image"), {})
    assert error.param == "input_image" and error.status == 422
    renamed = invalid_request(RequestError("input_video", "bad"), {"input_video": "input_reference"})
    assert renamed.param == "input_reference"
    assert invalid_request(RequestError("height", "must be a multiple of 16"), {}).param == "size"
    assert invalid_request(ValueError("not a request error"), {}).param is None
    scrubbed = public_message("--input-image: /srv/jobs/uploads/video_1/0/face.png is not an image", [Path("/srv")])
    assert scrubbed == "--input-image: face.png is not an image"
    assert public_message("cannot open /home/me/x.mp4 (step 1/8)", []) == "cannot open x.mp4 (step 1/8)"


# ------------------------------------------------------------------------------------------------ one real job
def test_a_job_run_by_the_worker_equals_the_cli(served, tmp_path):
    client, store, _ = served
    body = small(seed=11, prompt="a red disc")
    job = client.post("/v1/videos", json=body, headers=auth(KEY_A)).json()["id"]
    worker = JobWorker("reference_to_video", store, model="tiny")
    started = time.monotonic()
    assert worker.run_job(job) == "completed"
    assert time.monotonic() - started < 120
    video = client.get(f"/v1/videos/{job}", headers=auth(KEY_A)).json()
    assert video["status"] == "completed" and video["progress"] == 100 and video["completed_at"] >= video["created_at"]
    assert video["progress_detail"] == {"step": 2, "steps": 2, "window": 0, "windows": None}
    content = client.get(f"/v1/videos/{job}/content", headers=auth(KEY_A))
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert_same_video(content.content, run_cli(body, tmp_path / "cli.mp4"))
    assert worker.run_job(job) == "skipped"  # done once


def test_a_failed_job_tells_why_without_server_paths(served):
    """An input that vanished before the run: the job fails with the request layer's message, file name only."""
    client, store, _ = served
    image = io.BytesIO()
    random_image(64, 64).save(image, format="PNG")
    form = {k: str(v) for k, v in small().items()}
    files = {"input_reference": ("face.png", image.getvalue(), "image/png")}
    job = client.post("/v1/videos", data=form, files=files, headers=auth(KEY_A)).json()["id"]
    next(store.upload_dir(job).rglob("face.png")).unlink()
    assert JobWorker("reference_to_video", store, model="tiny").run_job(job) == "failed"
    video = client.get(f"/v1/videos/{job}", headers=auth(KEY_A)).json()
    assert video["status"] == "failed" and video["error"]["code"] == "invalid_request"
    assert "face.png" in video["error"]["message"] and str(store.root) not in json.dumps(video)
    assert "/" not in video["error"]["message"].split(":", 1)[1], video["error"]["message"]


def test_the_serve_command_refuses_bad_settings_before_starting_ray(tmp_path, capsys, monkeypatch):
    import sys

    from skyreels_diffusers.app.cli import main

    monkeypatch.delenv("SKYREELS_API_KEYS", raising=False)
    ray_before = "ray" in sys.modules
    store = ["--store", str(tmp_path / "store")]
    assert main(["serve", "--host", "0.0.0.0", *store]) == 2
    assert "API keys" in capsys.readouterr().err
    assert main(["serve", "--task", "text_to_video", *store]) == 2
    assert "--task: must be among" in capsys.readouterr().err
    assert main(["serve", "--task", "reference_to_video=" + str(tmp_path / "missing"), *store]) == 2
    assert "--model:" in capsys.readouterr().err
    assert main(["serve", "--replicas", "talking_avatar=2", "--task", "reference_to_video", *store]) == 2
    assert "--replicas" in capsys.readouterr().err
    assert ("ray" in sys.modules) == ray_before  # refused before Ray is imported


def test_serve_settings_from_the_command_line(tmp_path, monkeypatch):
    from skyreels_diffusers.app.cli import build_parser
    from skyreels_diffusers.app.serve import settings_from_args

    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nkey-one\n\nkey-two\n")
    monkeypatch.setenv("SKYREELS_API_KEYS", "key-three")
    args = build_parser().parse_args(
        ["serve", "--task", "reference_to_video", "--task", "talking_avatar=tiny", "--api-key-file", str(keys)]
        + ["--replicas", "2", "--replicas", "talking_avatar=3", "--low-vram", "--input-dir", str(tmp_path)]
    )
    settings = settings_from_args(args)
    assert settings.deployments == {"reference_to_video": "tiny", "talking_avatar": "tiny"}
    assert settings.api_keys == ("key-three", "key-one", "key-two")
    assert settings.replicas == 2 and settings.task_replicas == {"talking_avatar": 3}
    assert settings.options == {"low_vram": True} and settings.input_dirs == (str(tmp_path.resolve()),)
    assert settings.host == "127.0.0.1"


def test_the_serve_config_builder_requires_keys_beyond_loopback(monkeypatch):
    from skyreels_diffusers.app import serve

    built = []
    monkeypatch.setattr(serve, "build_application", built.append)
    monkeypatch.delenv("SKYREELS_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="API keys"):
        serve.app_builder({"deployments": {"talking_avatar": "tiny"}})
    monkeypatch.setenv("SKYREELS_API_KEYS", "k1, k2")
    serve.app_builder({"deployments": {"talking_avatar": "tiny"}, "store": "/shared/jobs", "task_replicas": {}})
    assert built[0].api_keys == ("k1", "k2") and built[0].store == "/shared/jobs"

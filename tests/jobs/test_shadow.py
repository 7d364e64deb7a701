"""Shadow traffic (service/jobs/shadow.py) over real HTTP on both backends: a real uvicorn serving SFace
and the tiny model, run in this process so that the test can start a pair as the migrate job does
(``state.shadow.start``); the counters are read from /metrics."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from harness.fixtures import ENROLLED, b64, face_files
from harness.models import tiny_model
from harness.server import MODEL_CACHE, serving_in_process
from service.config import Settings
from service.jobs.shadow import ShadowMap
from service.ops.metrics import Metrics
from tests.conftest import metric

P1, P2, P3 = ENROLLED[:3]
PAIR = 'source="people",target="people-tiny"'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx", dim=64)


@pytest.fixture(params=["embedded", "postgres"])
def service(request, tmp_path, default_model, tiny):
    pg = {}
    if request.param == "postgres":
        env = request.getfixturevalue("postgres").gallery_env()
        pg = {"database_url": env["FACE_DATABASE_URL"], "database_schema": env["FACE_DATABASE_SCHEMA"]}
    settings = Settings(data_dir=tmp_path / "data", models=[f"sface={default_model}", f"tiny={tiny}"],
                        model_cache_dir=MODEL_CACHE, intra_op_threads=2, enroll_hub_alpha=0, **pg)
    with serving_in_process(settings) as (url, app), httpx.Client(base_url=url, timeout=60) as client:
        client.shadow = app.state.service.shadow  # type: ignore[attr-defined]
        yield client


def crop(person: str, k: int = 0) -> str:
    return b64(face_files(person)[k])


def enroll(client: httpx.Client, collection: str, identity: str, person: str) -> None:
    r = client.post(f"/collections/{collection}/enroll", json={"identity_id": identity,
                                                               "images": [crop(person, 0), crop(person, 1)]})
    assert r.status_code == 200, r.text


def identify(client: httpx.Client, collection: str, people: list[str]) -> dict:
    r = client.post(f"/collections/{collection}/identify", json={"images": [crop(p) for p in people]})
    assert r.status_code == 200, r.text
    return r.json()


def counts(client: httpx.Client) -> dict[str, float]:
    return {"identify": metric(client, f"face_shadow_identify_total{{{PAIR}}}"),
            "agree": metric(client, f'face_shadow_top1_agreement_total{{agree="true",{PAIR}}}'),
            "disagree": metric(client, f'face_shadow_top1_agreement_total{{agree="false",{PAIR}}}'),
            "shifts": metric(client, f"face_shadow_score_shift_count{{{PAIR}}}"),
            "dropped": metric(client, "face_shadow_dropped_total")}


def wait_for(client: httpx.Client, identify: float, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (now := counts(client))["identify"] < identify and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def test_identify_on_a_shadowed_collection_is_rerun_on_its_target_and_counted(service):
    assert service.post("/collections", json={"name": "people"}).status_code == 201
    assert service.post("/collections", json={"name": "people-tiny", "model": "tiny"}).status_code == 201
    for person in (P1, P2, P3):
        enroll(service, "people", person, person)
    # the target names P2's faces P3 and P3's P2: its top-1 differs from the source's for those two
    for identity, person in ((P1, P1), (P3, P2), (P2, P3)):
        enroll(service, "people-tiny", identity, person)

    assert identify(service, "people", [P1, P2, P3])["results"][0]["identity_id"] == P1
    time.sleep(0.5)
    assert counts(service)["identify"] == 0  # no pair: nothing shadowed

    service.shadow.start("people", "people-tiny")
    answer = identify(service, "people", [P1, P2, P3])
    assert [r["identity_id"] for r in answer["results"]] == [P1, P2, P3]  # the request is A's answer
    seen = wait_for(service, 3)
    assert seen == {"identify": 3, "agree": 1, "disagree": 2, "shifts": 3, "dropped": 0}
    # the probes are the enrolled crops: the top score is ~1 on both sides, so the shift is ~0
    assert metric(service, f'face_shadow_score_shift_bucket{{le="0.02",{PAIR}}}') == 3
    assert metric(service, f'face_shadow_score_shift_bucket{{le="-0.02",{PAIR}}}') == 0

    # identify on the target, and with embeddings instead of images, is not shadowed
    identify(service, "people-tiny", [P1])
    vector = service.post("/embed", json={"images": [crop(P1)]}).json()["embeddings"][0]
    r = service.post("/collections/people/identify", json={"embeddings": [vector], "model_id": answer["model_id"]})
    assert r.status_code == 200, r.text
    time.sleep(0.5)
    assert counts(service)["identify"] == 3


def test_the_shadow_ends_when_an_alias_moves_to_the_target_or_a_collection_is_deleted(service):
    for name, model in (("people", "sface"), ("people-tiny", "tiny")):
        assert service.post("/collections", json={"name": name, "model": model}).status_code == 201
        enroll(service, name, P1, P1)
    assert service.put("/aliases/everyone", json={"collection": "people"}).status_code == 200
    service.shadow.start("people", "people-tiny", aliases=["everyone"])
    identify(service, "everyone", [P1])  # through the alias: the request is answered by A
    assert wait_for(service, 1)["agree"] == 1

    assert service.put("/aliases/everyone", json={"collection": "people-tiny"}).status_code == 200
    identify(service, "people", [P1])  # still on A, but the alias moved: the pair ends, nothing counted
    deadline = time.monotonic() + 30
    while service.shadow.pairs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.shadow.pairs() == {}
    assert counts(service)["identify"] == 1

    service.shadow.start("people", "people-tiny")
    assert service.delete("/aliases/everyone").status_code == 200
    assert service.delete("/collections/people-tiny").status_code == 200
    identify(service, "people", [P1])
    deadline = time.monotonic() + 30
    while service.shadow.pairs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.shadow.pairs() == {} and counts(service) == {"identify": 1, "agree": 1, "disagree": 0,
                                                                "shifts": 1, "dropped": 0}


def test_a_full_queue_drops_and_counts_without_waiting():
    async def offer_many() -> float:
        shadow = ShadowMap(metrics, queue_size=2)
        shadow.start("a", "b")
        crops = [np.zeros((112, 112, 3), np.uint8)]
        for _ in range(5):  # no await in between: the background task cannot take any
            shadow.offer(None, "a", crops, [None])  # type: ignore[arg-type]  # the task never runs
        shadow.offer(None, "not-shadowed", crops, [None])  # type: ignore[arg-type]
        await shadow.close()
        return metrics.shadow_dropped._value.get()

    metrics = Metrics()
    assert asyncio.run(offer_many()) == 3
    with pytest.raises(ValueError):
        ShadowMap(metrics, 1).start("a", "a")

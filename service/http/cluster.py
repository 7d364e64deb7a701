"""POST /cluster: group the faces of a set of photos (or embeddings) by person. No gallery is read or
written, so it needs only the `embed` permission and is mounted once, unprefixed. The method and its
default threshold: ``service.gallery.hygiene.cluster`` (chosen on LFW by bench/cluster_lfw.py)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..faces.pipeline import FaceBatch, decode_faces, embed_raw
from ..gallery.hygiene.cluster import cluster_faces, tail_threshold
from ..gallery.openset import choose_tail
from ..model.preprocess import l2_normalise
from ..model.registry import ServedModel
from ..state import ServiceState
from .deps import StateDep, allow
from .faces import requested_model
from .payload import StrictRoute, body_docs, json_response, read_payload
from .schemas import Cluster, ClusterFace, ClusterRequest, ClusterResponse, ErrorResponse
from .vectors import check_model, exactly_one, normalise

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422)}
log = logging.getLogger(__name__)
router = APIRouter(route_class=StrictRoute, tags=["faces"], dependencies=[allow(Permission.embed)], responses=ERRORS)


@router.post("/cluster", response_model=ClusterResponse, openapi_extra=body_docs(ClusterRequest, ("images",)),
             summary="Group faces by person")
async def cluster(request: Request, state: StateDep) -> Response:
    """Group unlabelled faces by person: every face of the photos (`multi_face: all`, the default), or
    aligned crops, or `embeddings` with the served `model_id`; at most FACE_CLUSTER_MAX_FACES faces
    (`too_many_faces`, 413, past it).

    Average linkage over the faces' kNN graph: clusters merge while the mean cosine over all their
    cross pairs is at least the threshold. The default threshold follows the number of faces: the
    cosine at which, by the model's impostor tail, each face has a 1% chance that some stranger among
    the others scores that high. Clusters come biggest first; a face alone is a singleton (last)."""
    limit = state.settings.cluster_max_faces
    # the body is checked as it is parsed against the largest served dimension; normalise() then holds
    # the embeddings to the chosen model's own
    payload, images = await read_payload(request, ClusterRequest, ("images",), max_images=limit,
                                         vector_fields=("embeddings",), dimension=max(m.dim for m in state.models))
    exactly_one(payload.images is not None, payload.embeddings is not None, "images", "embeddings")
    served = requested_model(request, state, payload.model)
    if payload.embeddings is not None:
        check_model(state, payload.model_id, served)
        vectors = normalise(payload.embeddings, served.dim)
        faces = FaceBatch(image_index=list(range(len(vectors))), located=[None] * len(vectors))
    else:
        if payload.model_id is not None:
            check_model(state, payload.model_id, served)
        faces = await run_in_threadpool(_decode_all, state, images["images"], payload, limit, served)
        vectors = l2_normalise(await embed_raw(state, np.stack(faces.crops), served))
    threshold = payload.threshold if payload.threshold is not None else default_threshold(state, served)
    started = time.perf_counter()
    result = await run_in_threadpool(cluster_faces, vectors, threshold)
    log.info("faces clustered", extra={"faces": len(vectors), "clusters": result.count, "threshold": round(threshold, 4),
                                       "model": served.name,
                                       "cluster_ms": round((time.perf_counter() - started) * 1000, 1)})
    locations = faces.locations() or [None] * len(vectors)
    clusters = [Cluster(cluster_id=cid, size=len(members),
                        faces=[ClusterFace(image_index=faces.image_index[i], face=locations[i], face_index=i)
                               for i in members])
                for cid, members in enumerate(result.members())]
    return json_response(ClusterResponse(clusters=clusters, threshold=round(threshold, 4), method=result.method,
                                         faces=len(vectors), model_id=served.model_id, model=served.name))


def default_threshold(state: ServiceState, served: ServedModel | None = None) -> float:
    """From the data dir's calibration of the model (``served``; None: the default model), else that
    model's impostor tail; its 1:1 threshold without either."""
    served = served or state.models.default
    tail, _ = choose_tail(served.gallery_tail.current(), served.contract.impostor_tail)
    return tail_threshold(tail, floor=served.verify_threshold)


def _decode_all(state: ServiceState, blobs: list[bytes], payload: ClusterRequest, limit: int,
                served: ServedModel | None = None) -> FaceBatch:
    """Every face of every image as ``served``'s input crops, one image at a time (the per-request face
    limit here is the cluster limit)."""
    batch = FaceBatch()
    for index, blob in enumerate(blobs):
        found = decode_faces(state, [blob], payload.image_type, payload.multi_face, first_index=index,
                             served=served)
        if len(batch.crops) + len(found.crops) > limit:
            raise ServiceError(ErrorCode.too_many_faces, f"the photos hold more than {limit} faces; the limit is "
                               f"{limit} (FACE_CLUSTER_MAX_FACES)", limit=limit)
        batch.crops += found.crops
        batch.image_index += found.image_index
        batch.located += found.located
        batch.blockiness += found.blockiness
    return batch

"""The Dockerfile and compose files agree with the settings, the package and the app's routes.

No Docker engine on CI: these parse the files and check every name, path, port and route they
mention against the code that will read them.
"""

from __future__ import annotations

import fnmatch
import re

import pytest
import tomllib

from service.config import Settings
from service.model.prepare import PREPARED_NAME
from tests.deploy.dockerfile import (
    COMPOSE,
    COMPOSE_CPU,
    DOCKERIGNORE,
    REPO,
    interpolate,
    load_compose,
    merge_compose,
    parse_dockerfile,
    run_mounts,
)

SETTINGS = Settings.model_fields
ENV_NAME = re.compile(r"\bFACE_[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile()


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu(compose) -> dict:
    return merge_compose(compose, load_compose(COMPOSE_CPU))


def _setting(env_name: str) -> str:
    return env_name.removeprefix("FACE_").lower()


def _parsed(name: str, value: str):
    """The value as the service would read it from the environment (validation included)."""
    return getattr(Settings(**{name: value}), name)


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _readyz_route() -> str:
    return "/readyz"


# --- every FACE_* name is a setting --------------------------------------------------------------
@pytest.mark.parametrize("path", ["Dockerfile", "docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.scale.yml",
                                  ".env.example"])
def test_every_face_variable_is_a_setting(path):
    names = set(ENV_NAME.findall((REPO / path).read_text()))
    unknown = sorted(n for n in names if _setting(n) not in SETTINGS)
    assert not unknown, f"{path} uses {unknown}, which service.config.Settings does not define"


def test_env_example_lists_every_setting():
    listed = {_setting(n) for n in re.findall(r"^(?:# )?(FACE_[A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.M)}
    assert listed == set(SETTINGS)


def test_dockerfile_and_compose_values_are_valid_settings(dockerfile, compose, compose_cpu):
    runtime_env = dockerfile.stage("runtime").env()
    for source in (runtime_env, compose["services"]["face"]["environment"],
                   compose_cpu["services"]["face"]["environment"]):
        for key, value in source.items():
            if key.startswith("FACE_"):
                _parsed(_setting(key), interpolate(str(value), {}))  # raises if the service would refuse it


# --- the image ----------------------------------------------------------------------------------
def test_runtime_image_is_the_default_target_small_and_unprivileged(dockerfile):
    runtime = dockerfile.last_stage
    assert runtime.name == "runtime"
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim", runtime.base)
    assert re.fullmatch(r"3\.\d+", dockerfile.global_args["PYTHON_VERSION"])
    runs = " ".join(i.text for i in runtime.all("RUN"))
    assert "apt-get" not in runs and "build-essential" not in runs  # no compiler in the runtime image
    assert "tensorflow" not in runs.lower() and "export" not in runs
    users = runtime.all("USER")
    assert users and users[-1].text not in ("root", "0")
    assert runtime.all("ENTRYPOINT")[-1].exec_form() == ["python", "-m", "service"]
    # everything arrives as wheels through a bind mount; the one COPY is their checksums (the cache key)
    assert [i.text for i in runtime.all("COPY")] == ["--from=build /wheels.sha256 /opt/face/wheels.sha256"]


def test_build_stage_compiles_hnswlib_portably_and_extra_is_a_build_arg(dockerfile):
    build = dockerfile.stage("build")
    assert build.env()["HNSWLIB_NO_NATIVE"] == "1"
    assert "build-essential" in " ".join(i.text for i in build.all("RUN"))
    assert dockerfile.global_args["EXTRA"] == "gpu"
    assert {"gpu", "cpu"} <= set(_extras())
    wheel = [i.text for i in build.all("RUN") if "pip wheel" in i.text]
    install = [run_mounts(i.text)[1] for i in dockerfile.stage("runtime").all("RUN") if "pip install" in i.text]
    # the postgres extra always: one image serves the embedded gallery or many replicas on PostgreSQL
    assert wheel == ['python -m pip wheel --wheel-dir "${WHEELS}" ".[${EXTRA},postgres]"']
    assert install == ['python -m pip install --no-index --find-links "${WHEELS}" "face-embedding-service[${EXTRA},postgres]"']
    assert "postgres" in _extras()
    name = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    assert f'"{name}[' in install[0]
    for stage in ("build", "runtime"):
        assert any(i.text == "EXTRA" for i in dockerfile.stage(stage).all("ARG"))


def test_onnxruntime_comes_only_from_the_chosen_extra():
    extras = _extras()
    assert any(d.startswith("onnxruntime-gpu[cuda,cudnn]") for d in extras["gpu"])
    assert any(d.startswith("onnxruntime>") for d in extras["cpu"])
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith("onnxruntime") for d in base)
    assert not any("tensorflow" in d for d in base)


def test_exporter_target_has_the_export_extra(dockerfile):
    assert "exporter" in dockerfile.stages
    text = " ".join(i.text for name in ("exporter-build", "exporter") for i in dockerfile.stage(name).all("RUN"))
    assert "[cpu,export]" in text
    assert "export" in _extras()
    assert dockerfile.stage("exporter").all("ENTRYPOINT")[-1].exec_form() == ["python", "-m", "exporter"]


def test_model_is_prepared_at_build_time_where_the_service_looks(dockerfile):
    runtime = dockerfile.stage("runtime")
    env = runtime.env()
    cache = env["FACE_MODEL_CACHE_DIR"]
    runs = [run_mounts(i.text)[1] for i in runtime.all("RUN")]
    prepare = [r for r in runs if r.startswith("python -m service.model.prepare")]
    assert prepare == ['python -m service.model.prepare --cache-dir "${FACE_MODEL_CACHE_DIR}"']
    assert interpolate(prepare[0], env).endswith(f'"{cache}"')
    fp16 = [r for r in runs if r.startswith("python -m service.model.fp16")]
    assert fp16 and f"${{FACE_MODEL_CACHE_DIR}}/{PREPARED_NAME}/model.onnx" in fp16[0]
    # ... and the variant lies where FACE_PRECISION=fp16 looks for it, so the container never converts
    from pathlib import Path

    from service.model.serving import serving_variant_path

    src, dst = interpolate(fp16[0], env).split()[3:5]
    assert Path(src.strip('"')) == Path(cache) / PREPARED_NAME / "model.onnx"
    assert Path(dst.strip('"')) == serving_variant_path(Path(src.strip('"')), Path(cache))
    # the prepare step writes here; the default model path the service resolves lies under it
    assert "FACE_MODEL" not in env  # empty = the default model, found in the cache dir


def test_data_dir_is_a_volume_the_user_owns(dockerfile):
    runtime = dockerfile.stage("runtime")
    data_dir = runtime.env()["FACE_DATA_DIR"]
    volumes = [v for i in runtime.all("VOLUME") for v in (i.exec_form() or i.text.split())]
    assert data_dir in volumes
    assert any("chown" in i.text and "FACE_DATA_DIR" in i.text for i in runtime.all("RUN"))


def test_port_and_healthcheck(dockerfile):
    runtime = dockerfile.stage("runtime")
    port = runtime.env()["FACE_PORT"]
    assert [i.text for i in runtime.all("EXPOSE")] == [port]
    assert runtime.env()["FACE_HOST"] == "0.0.0.0"  # reachable through the published port
    from service.ops import probe

    assert runtime.all("HEALTHCHECK")[-1].exec_form() == ["python", "-m", "service.ops.probe"]
    assert probe.ROUTE == _readyz_route()
    assert probe.url().endswith(f":{Settings().port}{_readyz_route()}")  # FACE_PORT, else the default


def test_probes_and_clients_send_a_host_the_service_answers_to(dockerfile, compose, compose_cpu):
    """FACE_ALLOWED_HOSTS (default: loopback) must name the Host the image's HEALTHCHECK, compose's local
    clients, other containers and nginx send, or they get 421 host_not_allowed; an operator's own list
    (in .env) replaces compose's."""
    from service.http.middleware import host_allowed

    runtime_env = dockerfile.stage("runtime").env()
    from service.ops.probe import HOST as probe_host

    assert dockerfile.stage("runtime").all("HEALTHCHECK")[-1].exec_form()[-1] == "service.ops.probe"
    image_hosts = _parsed("allowed_hosts", runtime_env.get("FACE_ALLOWED_HOSTS", ",".join(Settings().allowed_hosts)))
    assert host_allowed(probe_host, image_hosts)
    scale = merge_compose(compose_cpu, load_compose(REPO / "docker-compose.scale.yml"))
    for merged in (compose, compose_cpu, scale):
        listed = merged["services"]["face"]["environment"]["FACE_ALLOWED_HOSTS"]
        hosts = _parsed("allowed_hosts", interpolate(listed, {}))
        for host in (probe_host, "localhost", "face"):
            assert host_allowed(host, hosts), host
        assert not host_allowed("attacker.example", hosts)
        assert interpolate(listed, {"FACE_ALLOWED_HOSTS": "face.example.com"}) == "face.example.com"
    # nginx passes the client's Host with its port: checked by the replicas, compared with a page's Origin
    conf = (REPO / "deploy" / "nginx-scale.conf").read_text()
    assert re.findall(r"proxy_set_header Host (\S+);", conf) == ["$http_host"]


def test_healthcheck_route_is_an_app_route_that_skips_the_api_key():
    """The container's HEALTHCHECK sends no key: its route must be one that needs none (the OpenAPI
    document says which permission each route needs; tests/access checks the document against
    behaviour over HTTP)."""
    from service.app import create_app

    spec = create_app(Settings(api_key="secret")).openapi()
    assert spec["paths"]["/embed"]["post"]["x-required-permission"] == "embed"  # the check can see a requirement
    probe = spec["paths"][_readyz_route()]["get"]
    assert "x-required-permission" not in probe and "security" not in probe


def test_dockerignore_keeps_what_the_build_needs(dockerfile):
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or fnmatch.fnmatch(path, pat + "/*"):
                keep = negate
        return keep

    needed = []
    for stage in dockerfile.stages.values():
        for inst in stage.all("COPY"):
            if "--from" not in inst.text:
                needed += inst.text.split()[:-1]
        for inst in stage.all("RUN"):
            needed += [m.source for m in run_mounts(inst.text)[0] if m.from_stage is None]
    assert needed
    for path in needed:
        assert included(path), f"{path} is used by the Dockerfile but excluded by .dockerignore"
    for secret_or_bulky in (".env", ".venv/bin/python", "data/gallery.sqlite", "runs/x", ".git/HEAD", "models/x"):
        assert not included(secret_or_bulky)


# --- compose ------------------------------------------------------------------------------------
def test_compose_gpu_service(compose, dockerfile):
    service = compose["services"]["face"]
    runtime_env = dockerfile.stage("runtime").env()
    assert service["build"]["target"] == "runtime"
    assert service["build"]["args"]["EXTRA"] == "gpu"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    env = service["environment"]
    assert env["FACE_PROVIDERS"] == "cuda" and _parsed("require_gpu", env["FACE_REQUIRE_GPU"]) is True
    for key in ("FACE_PORT", "FACE_DATA_DIR", "FACE_MODEL_CACHE_DIR", "FACE_HOST"):
        assert str(env[key]) == runtime_env[key], key  # compose must not move what the image set up
    assert service["restart"] in ("always", "unless-stopped", "on-failure")


def test_compose_volume_port_env_file_healthcheck(compose, dockerfile):
    service = compose["services"]["face"]
    runtime = dockerfile.stage("runtime")
    data_dir = runtime.env()["FACE_DATA_DIR"]
    volume, _, mount = service["volumes"][0].partition(":")
    assert mount == data_dir and volume in compose["volumes"]  # a named volume, not a host path
    published = interpolate(service["ports"][0], {})
    assert published.split(":")[-1] == runtime.env()["FACE_PORT"]
    assert int(published.split(":")[0]) > 0
    env_files = service["env_file"]
    assert any((e["path"] if isinstance(e, dict) else e) == ".env" for e in env_files)
    assert all(isinstance(e, dict) and e.get("required") is False for e in env_files)  # .env is optional
    assert (REPO / ".env.example").exists()
    assert service["healthcheck"]["test"] == ["CMD", *runtime.all("HEALTHCHECK")[-1].exec_form()]


def test_compose_cpu_override(compose_cpu):
    service = compose_cpu["services"]["face"]
    assert "deploy" not in service  # the GPU reservation is reset
    assert service["build"]["args"]["EXTRA"] == "cpu" and service["build"]["target"] == "runtime"
    assert service["environment"]["FACE_PROVIDERS"] == "cpu"
    assert _parsed("require_gpu", service["environment"]["FACE_REQUIRE_GPU"]) is False
    assert service["image"] != load_compose(COMPOSE)["services"]["face"]["image"]
    assert service["volumes"] and service["healthcheck"]
    assert "!reset" in COMPOSE_CPU.read_text()


def test_compose_scale_override_puts_replicas_on_postgres_behind_nginx(compose_cpu):
    import re as _re

    scale = load_compose(REPO / "docker-compose.scale.yml")
    merged = merge_compose(compose_cpu, scale)
    face, db, lb = (merged["services"][name] for name in ("face", "db", "lb"))
    url = interpolate(face["environment"]["FACE_DATABASE_URL"], {})
    assert _parsed("database_url", url).get_secret_value().startswith("postgresql://face:face@db:5432/face")
    assert "ports" not in face and "volumes" not in face  # reached through lb; no gallery in the container
    assert face["depends_on"]["db"]["condition"] == "service_healthy" and face["healthcheck"]
    assert db["image"].startswith("pgvector/pgvector:") and "pgdata" in scale["volumes"]
    assert db["environment"]["POSTGRES_USER"] == "face" and db["healthcheck"]
    # a parallel HNSW build's segment (the replicas' maintenance_work_mem) fits in the container's /dev/shm
    from service.gallery.postgres.backend import PostgresOptions

    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    shm = _re.fullmatch(r"(\d+)([kmg])b?", str(db["shm_size"]).lower())
    work = _re.fullmatch(r"(\d+)([kmg])b", PostgresOptions(url="").maintenance_work_mem.lower())
    assert int(shm[1]) * units[shm[2]] >= 1.5 * int(work[1]) * units[work[2]]
    published = interpolate(lb["ports"][0], {})
    conf = (REPO / "deploy" / "nginx-scale.conf").read_text()
    mount = lb["volumes"][0].split(":")
    assert (REPO / mount[0]).resolve() == (REPO / "deploy" / "nginx-scale.conf").resolve()
    assert f"listen {published.split(':')[-1]};" in conf
    assert f"server face:{face['environment']['FACE_PORT']};" in conf
    body_mb = int(_re.search(r"client_max_body_size (\d+)m;", conf).group(1))
    assert body_mb * 1024 * 1024 >= Settings().max_request_bytes  # the service, not nginx, answers 413
    # the replicas believe lb's X-Forwarded-For (the audit trail's client), so lb must write it whole: an
    # appended one ($proxy_add_x_forwarded_for) would carry the client's own claim, believed when it names
    # an address of the trusted ranges
    assert _re.findall(r"proxy_set_header X-Forwarded-For (\S+);", conf) == ["$remote_addr"]
    import ipaddress

    trusted = _parsed("trusted_proxies", interpolate(face["environment"]["FACE_TRUSTED_PROXIES"], {}))
    for lb_address in ("172.18.0.3", "192.168.16.2", "10.0.1.5"):  # Docker's address pools, the default ones first
        assert any(ipaddress.ip_address(lb_address) in ipaddress.ip_network(net) for net in trusted)

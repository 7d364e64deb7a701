"""Our Dockerfile and compose files as the deploy tests read them, shared by those tests.

The Dockerfile is parsed by ``dockerfile-parse``; on top of it: stages by name, ENV values, JSON exec
forms and BuildKit ``--mount`` options of RUN, enough to check the files against the settings and to
replay the install steps outside Docker.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass
class Instruction:
    keyword: str
    text: str  # everything after the keyword, continuation lines joined

    def exec_form(self) -> list[str] | None:
        """The JSON argument list (after options such as HEALTHCHECK's --interval and its CMD), if any."""
        body = re.sub(r"^(--\S+\s+)*", "", self.text.strip())
        body = re.sub(r"^CMD\s+", "", body)
        return json.loads(body) if body.startswith("[") else None


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for inst in self.all("ENV"):
            for token in shlex.split(inst.text):
                key, _, value = token.partition("=")
                values[key] = value
        return values


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def stage(self, name: str) -> Stage:
        return self.stages[name]

    @property
    def last_stage(self) -> Stage:
        return list(self.stages.values())[-1]


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    """The Dockerfile's stages, read with ``dockerfile-parse`` (comments dropped, continuation lines
    joined); ARGs before the first FROM are the global ones."""
    parser = DockerfileParser(path=str(path))
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for item in parser.structure:
        keyword, rest = item["instruction"].upper(), item["value"].strip()
        if keyword == "COMMENT":
            continue
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            stage = stages[name] = Stage(name=name, base=parts[0])
        elif stage is None:
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                global_args[key.strip()] = value.strip()
        else:
            stage.instructions.append(Instruction(keyword, rest))
    return Dockerfile(global_args, stages)


@dataclass
class Mount:
    type: str
    source: str
    target: str
    from_stage: str | None


def run_mounts(command: str) -> tuple[list[Mount], str]:
    """(BuildKit --mount options, the shell command without them)."""
    mounts = []
    while True:
        match = re.match(r"\s*--mount=(\S+)\s+", command)
        if not match:
            return mounts, command.strip()
        options = dict(part.split("=", 1) for part in match.group(1).split(","))
        mounts.append(Mount(options.get("type", "bind"), options.get("source", "/"), options["target"],
                            options.get("from")))
        command = command[match.end():]


class _ComposeLoader(yaml.SafeLoader):
    """Compose's `!reset` / `!override` merge tags, read as plain values."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def _override(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_sequence(node, deep=True)


_ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def merge_compose(base: dict, override: dict) -> dict:
    """Compose's merge for the keys we use: mappings merge, sequences/scalars replace, None resets."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge_compose(base[key], value)
        else:
            merged[key] = value
    return merged


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose/shell `${NAME}` and `${NAME:-default}`."""
    def sub(match):
        name, default = match.group(1), match.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, text)

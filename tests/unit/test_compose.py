"""docker-compose.yml and the Dockerfile agree with each other, with the settings rehydrate reads and with Temporal."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices, AliasPath

from rehydrate.core import search_attributes
from rehydrate.core.settings import Settings
from rehydrate.devstack import DEV_SERVER_TUNING

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

POSTGRES, SCHEMA, TEMPORAL, NAMESPACE, UI, WORKER = (
    "postgres",
    "temporal-schema",
    "temporal",
    "temporal-namespace",
    "temporal-ui",
    "worker",
)
ONE_SHOTS = {SCHEMA, NAMESPACE}
LONG_RUNNING = {POSTGRES, TEMPORAL, UI, WORKER}
TEMPORAL_DEFAULT_GRPC_PORT = 7233  # the server image's FRONTEND_GRPC_PORT default
SCHEMA_DIRS = {
    "temporal": "/etc/temporal/schema/postgresql/v12/temporal/versioned",
    "temporal_visibility": "/etc/temporal/schema/postgresql/v12/visibility/versioned",
}


# -- reading the files, as Compose would ----------------------------------------------------------------------

# $$, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt}, $NAME
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def _interpolate_text(text: str, environ: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        value = environ.get(name)
        missing = not value if op and op.startswith(":") else value is None
        if op in (":-", "-"):
            return arg if missing else str(value)
        if op in (":?", "?"):
            if missing:
                raise ValueError(f"required variable {name} is not set: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if missing else arg
        return value or ""

    return _VARIABLE.sub(substitute, text)


def interpolate(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return _interpolate_text(node, environ)
    if isinstance(node, list):
        return [interpolate(item, environ) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, environ) for key, value in node.items()}
    return node


def raw_compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def compose(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as `docker compose config` would see it, with only the given variables set."""
    result = interpolate(raw_compose(), environ or {})
    assert isinstance(result, dict)
    return result


def service(name: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    spec = compose(environ)["services"][name]
    assert isinstance(spec, dict)
    return spec


def environment(spec: Mapping[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in env)
        return {key: value for key, value in pairs}
    return {key: "" if value is None else str(value) for key, value in env.items()}


def depends_on(spec: Mapping[str, Any]) -> dict[str, str]:
    deps = spec.get("depends_on") or {}
    assert isinstance(deps, dict), "use the long depends_on syntax, with a condition for each dependency"
    return {name: options.get("condition", "service_started") for name, options in deps.items()}


def container_ports(spec: Mapping[str, Any]) -> dict[int, int | None]:
    """Container port -> published host port (None: exposed only)."""
    found: dict[int, int | None] = {}
    for entry in spec.get("ports") or []:
        if isinstance(entry, dict):
            found[int(entry["target"])] = int(entry["published"]) if entry.get("published") else None
            continue
        parts = str(entry).split("/")[0].split(":")
        found[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else None
    for entry in spec.get("expose") or []:
        found.setdefault(int(str(entry).split("/")[0]), None)
    return found


def script(spec: Mapping[str, Any]) -> list[str]:
    """A one-shot service's entrypoint followed by its command, as the argv the container runs."""

    def argv(value: Any) -> list[str]:
        if value is None:
            return []
        return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]

    return argv(spec.get("entrypoint")) + argv(spec.get("command"))


def healthcheck_command(spec: Mapping[str, Any]) -> str:
    test = spec["healthcheck"]["test"]
    if isinstance(test, str):
        return test
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


def config_content(name: str, environ: Mapping[str, str] | None = None) -> str:
    content = compose(environ)["configs"][name]["content"]
    assert isinstance(content, str)
    return content


def config_targets(spec: Mapping[str, Any]) -> dict[str, str]:
    """Mount path in the container -> top-level config name."""
    targets = {}
    for entry in spec.get("configs") or []:
        source = entry if isinstance(entry, str) else entry["source"]
        target = f"/{source}" if isinstance(entry, str) else entry.get("target", f"/{source}")
        targets[target] = source
    return targets


def image_name(spec: Mapping[str, Any]) -> tuple[str, str]:
    repository, _, tag = str(spec["image"]).partition(":")
    return repository.removeprefix("docker.io/"), tag


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), f"use the exec (JSON) form: {arguments}"
    return [str(part) for part in parsed]


# -- rehydrate's settings ----------------------------------------------------------------------------------------


def settings_env_names() -> set[str]:
    """Every environment variable `Settings` reads, from its fields, their aliases and its env_prefix."""
    config = Settings.model_config
    prefix = config.get("env_prefix", "")
    case_sensitive = config.get("case_sensitive", False)
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        if alias is None:
            choices: list[Any] = [prefix + field_name]
        elif isinstance(alias, AliasChoices):
            choices = list(alias.choices)
        else:
            choices = [alias]
        for choice in choices:
            if isinstance(choice, AliasPath):
                choice = choice.path[0]
            if isinstance(choice, str):
                names.add(choice if case_sensitive else choice.upper())
    return names


def normalise(name: str) -> str:
    return name if Settings.model_config.get("case_sensitive", False) else name.upper()


def worker_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: Mapping[str, str]) -> Settings:
    """Settings built from exactly this environment, as in the worker's container (no stray variables or .env)."""
    read = settings_env_names()
    for key in list(os.environ):
        if normalise(key) in read or normalise(key).startswith(normalise(Settings.model_config["env_prefix"])):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


# -- the services ---------------------------------------------------------------------------------------------------


def test_every_service_of_the_stack_is_defined() -> None:
    services = compose()["services"]
    assert set(services) >= ONE_SHOTS | LONG_RUNNING


def test_images_are_the_current_official_ones() -> None:
    services = compose()["services"]
    for name, spec in services.items():
        if "image" in spec:
            assert "auto-setup" not in spec["image"], f"{name}: temporalio/auto-setup is deprecated"
    repository, tag = image_name(services[POSTGRES])
    assert repository == "postgres"
    assert int(re.split(r"[.-]", tag)[0]) >= 16, "a current Postgres major version"
    assert image_name(services[TEMPORAL])[0] == "temporalio/server"
    assert image_name(services[UI])[0] == "temporalio/ui"
    server_tag = image_name(services[TEMPORAL])[1]
    for one_shot in ONE_SHOTS:
        assert image_name(services[one_shot]) == ("temporalio/admin-tools", server_tag), (
            f"{one_shot}: admin-tools must match the server's version (its schema and CLI)"
        )


def test_no_variable_is_required() -> None:
    compose({})  # raises on ${VAR:?...} without a value

    def strings(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
        return [text for child in children for text in strings(child)]

    bare = [
        match.group(0)
        for text in strings(raw_compose())
        for match in _VARIABLE.finditer(text)
        if not match["escaped"] and match["op"] not in (":-", "-")
    ]
    assert bare == [], "every variable needs a default, so that `docker compose up` works without a .env"


def test_passwords_are_dev_defaults_that_can_be_overridden() -> None:
    raw = raw_compose()["services"]
    assert "${" in raw[POSTGRES]["environment"]["POSTGRES_PASSWORD"]
    assert "${" in raw[SCHEMA]["environment"]["SQL_PASSWORD"]
    assert "${" in raw[TEMPORAL]["environment"]["POSTGRES_PWD"]
    assert "${" in raw[WORKER]["environment"]["REHYDRATE_DATABASE_URL"]

    overrides = {"POSTGRES_PASSWORD": "su-pw", "PG_TEMPORAL_PASSWORD": "t-pw", "PG_REHYDRATE_PASSWORD": "r-pw"}
    assert environment(service(POSTGRES, overrides))["POSTGRES_PASSWORD"] == "su-pw"
    assert environment(service(SCHEMA, overrides))["SQL_PASSWORD"] == "t-pw"
    assert environment(service(TEMPORAL, overrides))["POSTGRES_PWD"] == "t-pw"
    assert urlsplit(environment(service(WORKER, overrides))["REHYDRATE_DATABASE_URL"]).password == "r-pw"
    init = config_content("postgres-init", overrides)
    assert "'t-pw'" in init and "'r-pw'" in init


def test_postgres_keeps_its_data_in_a_named_volume() -> None:
    document = compose()
    mounts = document["services"][POSTGRES]["volumes"]
    named = {str(m).split(":")[0] for m in mounts if str(m).split(":")[1] == "/var/lib/postgresql/data"}
    assert named and named <= set(document.get("volumes") or {})


def test_postgres_creates_the_roles_and_database_the_services_use() -> None:
    init = config_content("postgres-init")
    assert "/docker-entrypoint-initdb.d/" in next(iter(config_targets(service(POSTGRES))))
    temporal = environment(service(TEMPORAL))
    assert re.search(
        rf"CREATE ROLE {temporal['POSTGRES_USER']} LOGIN CREATEDB PASSWORD '{re.escape(temporal['POSTGRES_PWD'])}'",
        init,
    ), "Temporal's role must be able to create its databases"
    url = urlsplit(environment(service(WORKER))["REHYDRATE_DATABASE_URL"])
    assert url.password is not None
    assert re.search(rf"CREATE ROLE {url.username} LOGIN PASSWORD '{re.escape(url.password)}'", init)
    assert re.search(rf"CREATE DATABASE {url.path.lstrip('/')} OWNER {url.username}", init)


def test_temporal_runs_on_the_postgres_service() -> None:
    temporal, schema = environment(service(TEMPORAL)), environment(service(SCHEMA))
    assert temporal["DB"] == "postgres12"
    assert temporal["POSTGRES_SEEDS"] == POSTGRES
    assert int(temporal["DB_PORT"]) in container_ports(service(POSTGRES))
    # The schema job prepares exactly the databases the server then opens.
    assert schema["SQL_PLUGIN"] == "postgres12"
    assert schema["SQL_HOST"] == temporal["POSTGRES_SEEDS"]
    assert schema["SQL_PORT"] == temporal["DB_PORT"]
    assert schema["SQL_USER"] == temporal["POSTGRES_USER"]
    assert schema["SQL_PASSWORD"] == temporal["POSTGRES_PWD"]
    assert temporal.get("DBNAME", "temporal") in SCHEMA_DIRS
    assert temporal.get("VISIBILITY_DBNAME", "temporal_visibility") in SCHEMA_DIRS


def test_temporal_gets_its_dynamic_config_file() -> None:
    spec = service(TEMPORAL)
    path = environment(spec)["DYNAMIC_CONFIG_FILE_PATH"]
    targets = config_targets(spec)
    assert path in targets, "the server image ships no dynamic config: mount one where the variable points"
    dynamic = yaml.safe_load(config_content(targets[path]))
    assert isinstance(dynamic, dict)
    for key, values in dynamic.items():
        assert isinstance(values, list) and all("value" in v for v in values), key
    # The dispatch tuning `rehydrate dev` gives its dev server holds for the compose cluster too.
    flag, setting = DEV_SERVER_TUNING
    assert flag == "--dynamic-config-value"
    key, value = setting.split("=")
    assert [v["value"] for v in dynamic[key]] == [int(value)]


def test_schema_job_creates_and_migrates_both_databases() -> None:
    command = " ".join(script(service(SCHEMA)))
    for database, directory in SCHEMA_DIRS.items():
        assert re.search(rf"\b{database}\s+{re.escape(directory)}", command), database
    assert "temporal-sql-tool --db" in command
    for step in ("create", "setup-schema -v 0.0", "update-schema -d"):
        assert step in command


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="needs a POSIX shell")
def test_schema_job_sets_up_once_then_only_migrates(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "calls"
    # A stand-in for temporal-sql-tool: update-schema fails until setup-schema has run on that database.
    _stub(
        tmp_path,
        "temporal-sql-tool",
        f"""echo "$*" >> {log}
db=$2; shift 2
case "$1" in
  create) [ -e {state}/db-$db ] && exit 1; touch {state}/db-$db ;;
  setup-schema) [ -e {state}/db-$db ] || exit 1; touch {state}/schema-$db ;;
  update-schema) [ -e {state}/schema-$db ] || exit 1; echo "$3" > {state}/dir-$db ;;
  *) exit 2 ;;
esac
""",
    )
    spec = service(SCHEMA)
    env = {**environment(spec), "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    first = subprocess.run(script(spec), env=env, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stdout + first.stderr
    for database, directory in SCHEMA_DIRS.items():
        assert (state / f"dir-{database}").read_text().strip() == directory
    first_calls = log.read_text().splitlines()
    assert [c.split()[2] for c in first_calls if c.split()[1] == "temporal"] == [
        "update-schema",
        "create",
        "setup-schema",
        "update-schema",
    ]

    log.unlink()
    again = subprocess.run(script(spec), env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {c.split()[2] for c in log.read_text().splitlines()} == {"update-schema"}, "a re-run only migrates"


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="needs a POSIX shell")
def test_namespace_job_creates_the_workers_namespace_once(tmp_path: Path) -> None:
    namespace_spec = service(NAMESPACE)
    env = environment(namespace_spec)
    worker_env = environment(service(WORKER))
    assert env["NAMESPACE"] == worker_env["REHYDRATE_TEMPORAL_NAMESPACE"]
    assert env["TEMPORAL_ADDRESS"] == worker_env["REHYDRATE_TEMPORAL_ADDRESS"]
    assert "temporal operator namespace create" in " ".join(script(namespace_spec))

    log = tmp_path / "calls"
    _stub(
        tmp_path,
        "temporal",
        f"""echo "$*" >> {log}
case "$1 $2 $3" in
  "operator cluster health") echo SERVING ;;
  "operator namespace describe") [ -e {tmp_path}/ns-$5 ] ;;
  "operator namespace create") touch {tmp_path}/ns-$5 ;;
  "operator search-attribute list") cat {tmp_path}/sa-* 2>/dev/null || true ;;
  "operator search-attribute create") echo "$7 $9" > {tmp_path}/sa-$7 ;;
  *) exit 2 ;;
esac
""",
    )
    env["PATH"] = f"{tmp_path}:{os.environ['PATH']}"
    for _ in range(2):
        done = subprocess.run(script(namespace_spec), env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
    creates = [line for line in log.read_text().splitlines() if line.startswith("operator namespace create")]
    assert len(creates) == 1
    assert f"--namespace {env['NAMESPACE']}" in creates[0]
    assert f"--address {env['TEMPORAL_ADDRESS']}" in creates[0]
    assert "--retention 72h" in creates[0]
    # The search attributes the replay upserts, with their types, registered once in the workers' namespace.
    registered = [line.split() for line in log.read_text().splitlines() if "search-attribute create" in line]
    assert sorted((line[6], line[8], line[4]) for line in registered) == sorted(
        (name, kind, env["NAMESPACE"]) for name, kind in search_attributes.TYPES.items()
    )


# -- the worker and rehydrate's settings --------------------------------------------------------------------------


def test_worker_sets_only_variables_that_settings_reads() -> None:
    prefix = normalise(Settings.model_config["env_prefix"])
    read = settings_env_names()
    assert {"REHYDRATE_DATABASE_URL", "REHYDRATE_TEMPORAL_ADDRESS", "REHYDRATE_PROJECTIONS"} <= read
    ours = [key for key in environment(service(WORKER)) if normalise(key).startswith(prefix)]
    assert ours
    unknown = [key for key in ours if normalise(key) not in read]
    assert unknown == [], f"Settings does not read {unknown}; it reads {sorted(read)}"


def test_worker_environment_gives_the_expected_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = worker_settings(monkeypatch, tmp_path, environment(service(WORKER)))
    assert settings.database_url == "postgresql://rehydrate:rehydrate@postgres:5432/rehydrate"
    assert settings.temporal_address == "temporal:7233"
    assert settings.temporal_namespace == "default"
    assert settings.temporal_task_queue == "rehydrate"
    assert settings.projections == ["rehydrate.examples.orders"]
    assert settings.ui_url == "http://localhost:8080"
    assert (settings.metrics_port, settings.log_format) == (9464, "json")
    assert str(settings.metrics_port) in [str(port) for port in service(WORKER).get("expose", [])]


def test_worker_tracing_is_off_by_default_and_configured_by_variables_opentelemetry_reads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from opentelemetry.sdk import environment_variables

    assert worker_settings(monkeypatch, tmp_path, environment(service(WORKER))).tracing == "off"
    traced = environment(service(WORKER, {"REHYDRATE_TRACING": "otlp"}))
    assert worker_settings(monkeypatch, tmp_path, traced).tracing == "otlp"
    otel = {key for key in traced if key.startswith("OTEL_")}
    known = {value for name, value in vars(environment_variables).items() if name.startswith("OTEL_")}
    assert otel and otel <= known, f"OpenTelemetry does not read {otel - known}"
    assert urlsplit(traced["OTEL_EXPORTER_OTLP_ENDPOINT"]).port == 4318  # OTLP/HTTP, the exporter rehydrate[otel] has
    # The image has the packages that tracing needs.
    runs = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN"]
    assert any(re.search(r"pip install '?\.\[[^]]*\botel\b", arguments) for arguments in runs)


def test_worker_reaches_temporal_on_its_grpc_port() -> None:
    host, _, port = environment(service(WORKER))["REHYDRATE_TEMPORAL_ADDRESS"].rpartition(":")
    assert host == TEMPORAL
    temporal = service(TEMPORAL)
    grpc_port = int(environment(temporal).get("FRONTEND_GRPC_PORT", TEMPORAL_DEFAULT_GRPC_PORT))
    assert int(port) == grpc_port
    assert grpc_port in container_ports(temporal)
    assert str(grpc_port) in healthcheck_command(temporal)


def test_worker_reaches_the_postgres_service() -> None:
    url = urlsplit(environment(service(WORKER))["REHYDRATE_DATABASE_URL"])
    assert url.scheme in ("postgresql", "postgres")
    assert url.hostname == POSTGRES
    assert (url.port or 5432) in container_ports(service(POSTGRES))


def test_worker_is_built_here_and_runs_twice() -> None:
    spec = service(WORKER)
    build = spec["build"] if isinstance(spec["build"], dict) else {"context": spec["build"]}
    assert (ROOT / build.get("context", ".")).resolve() == ROOT
    assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert spec["deploy"]["replicas"] == 2
    assert "container_name" not in spec, "replicas need Compose-generated names"
    assert "entrypoint" not in spec and "command" not in spec, "the image's `rehydrate worker` runs"


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="needs a POSIX shell")
def test_worker_healthcheck_looks_for_this_containers_poller(tmp_path: Path) -> None:
    spec = service(WORKER)
    env = environment(spec)
    _stub(
        tmp_path,
        "temporal",
        f"""echo "$*" > {tmp_path}/args
printf '{{"pollers": [{{"taskQueueType": "workflow", "identity": "%s"}}]}}\\n' "$POLLER"
""",
    )
    hostname = Path("/etc/hostname").read_text().strip() if Path("/etc/hostname").exists() else ""
    if not hostname:
        pytest.skip("no /etc/hostname to compare with")
    command = healthcheck_command(spec)
    base = {**env, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    ours = subprocess.run(["/bin/sh", "-c", command], env={**base, "POLLER": f"1@{hostname}"}, timeout=30)
    other = subprocess.run(["/bin/sh", "-c", command], env={**base, "POLLER": f"1@{hostname}x"}, timeout=30)
    assert ours.returncode == 0 and other.returncode != 0
    args = (tmp_path / "args").read_text().split()
    for flag, variable in (
        ("--address", "REHYDRATE_TEMPORAL_ADDRESS"),
        ("--namespace", "REHYDRATE_TEMPORAL_NAMESPACE"),
        ("--task-queue", "REHYDRATE_TEMPORAL_TASK_QUEUE"),
    ):
        assert args[args.index(flag) + 1] == env[variable]


def test_example_projections_are_importable() -> None:
    from rehydrate.engine.projections import Registry

    modules = environment(service(WORKER))["REHYDRATE_PROJECTIONS"].split(",")
    for module in modules:
        importlib.import_module(module.strip())
    assert len(Registry.from_modules(modules)) > 0, "`rehydrate worker` refuses to start with no projections"


# -- the Web UI, healthchecks and start-up order -------------------------------------------------------------------


def test_ui_talks_to_the_same_temporal_and_is_published_on_8080() -> None:
    spec = service(UI)
    assert environment(spec)["TEMPORAL_ADDRESS"] == environment(service(WORKER))["REHYDRATE_TEMPORAL_ADDRESS"]
    assert container_ports(spec).get(8080) == 8080


def test_long_running_services_have_healthchecks() -> None:
    services = compose()["services"]
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    assert "pg_isready" in healthcheck_command(services[POSTGRES])
    for name in ONE_SHOTS:
        assert str(services[name].get("restart", "no")) == "no", f"{name} runs once"


def test_start_up_order() -> None:
    services = compose()["services"]
    assert depends_on(services[SCHEMA]) == {POSTGRES: "service_healthy"}
    assert depends_on(services[TEMPORAL]) == {
        POSTGRES: "service_healthy",
        SCHEMA: "service_completed_successfully",
    }
    assert depends_on(services[NAMESPACE]) == {TEMPORAL: "service_healthy"}
    assert depends_on(services[UI]) == {TEMPORAL: "service_healthy"}
    assert depends_on(services[WORKER]) == {
        POSTGRES: "service_healthy",
        TEMPORAL: "service_healthy",
        NAMESPACE: "service_completed_successfully",
    }
    for name, spec in services.items():
        for dependency, condition in depends_on(spec).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
            assert condition == expected, f"{name} -> {dependency}"
            if condition == "service_healthy":
                assert services[dependency].get("healthcheck"), f"{dependency} needs a healthcheck"


# -- the image ------------------------------------------------------------------------------------------------------


def test_dockerfile_installs_the_package_and_runs_its_console_script() -> None:
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    base = next(arguments for keyword, arguments in instructions if keyword == "FROM")
    match = re.fullmatch(r"python:3\.(\d+)(?:\.\d+)?-slim(?:-\w+)?", base.split()[0])
    assert match, f"a slim Python base image, not {base}"
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    minimum = re.search(r">=\s*3\.(\d+)", project["requires-python"])
    assert minimum and int(match.group(1)) >= int(minimum.group(1))

    runs = [(index, arguments) for index, (keyword, arguments) in enumerate(instructions) if keyword == "RUN"]
    installs = [index for index, arguments in runs if re.search(r"pip install (--[\w-]+ )*\.(\s|$|&)", arguments)]
    assert installs, "the image must `pip install .`"
    assert not any(re.search(r"pip install[^&]* -e\b", arguments) for _, arguments in runs)

    user = [arguments for keyword, arguments in instructions[installs[-1] :] if keyword == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the worker runs as a non-root user"
    assert keywords.index("USER") > installs[-1]

    entrypoint = exec_form(next(arguments for keyword, arguments in reversed(instructions) if keyword == "ENTRYPOINT"))
    assert len(entrypoint) == 1 and entrypoint[0] in project["scripts"]
    module, _, function = project["scripts"][entrypoint[0]].partition(":")
    assert callable(getattr(importlib.import_module(module), function))

    command = exec_form(next(arguments for keyword, arguments in reversed(instructions) if keyword == "CMD"))
    from typer.main import get_command

    from rehydrate.cli import app

    group = get_command(app)
    assert command == ["worker"] and command[0] in group.commands  # type: ignore[attr-defined]


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".env", ".rehydrate"} <= patterns
    assert "pyproject.toml" not in patterns and "rehydrate" not in patterns

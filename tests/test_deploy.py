"""deploy/ checked without a Docker daemon or a cluster (issue 23's acceptance): every PromQL expression of the
dashboard and the autoscaling rule parses and names only series a live server exports, with labels it carries; the
Kubernetes manifests validate against the API's schemas; the Dockerfiles pass hadolint; the flags the recipes give
exist in `dsv3 serve --help`; and the package installed the way the Dockerfile installs it serves with the
Dockerfile's command."""

from __future__ import annotations

import json
import os
from argparse import Namespace
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dsv3.cli import build_parser
from dsv3.server import build_app
from dsv3.server.cli import resolve_options
from server_utils import KEY, MODEL_NAME, ServerThread, free_port, model_dir, server_options  # noqa: F401 (a fixture)
from test_deploy_server import wait_ready

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
SCRAPE_LABELS = {"instance", "job", "namespace", "pod"}  # added by Prometheus when it scrapes, not by the server


def manifests() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest(kind: str, name: str) -> dict:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def instruction(dockerfile: Path, name: str) -> list[str]:
    """The exec-form (JSON array) arguments of the last `name` instruction: the one in the final stage."""
    lines = re.findall(rf"^{name} (\[.*\])$", dockerfile.read_text(), re.M)
    return json.loads(lines[-1])


def adapter_rules() -> list[dict]:
    return yaml.safe_load(manifest("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])["rules"]


def promql_expressions() -> list[str]:
    """The dashboard's queries and the adapter rule's, its Go-template fields filled in as the adapter fills them."""
    dashboard = json.loads((DEPLOY / "grafana" / "dsv3.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for rule in adapter_rules():
        exprs.append(rule["seriesQuery"])
        series = promql_parser.parse(rule["seriesQuery"]).name
        exprs.append(rule["metricsQuery"].replace("<<.Series>>", series).replace(
            "<<.LabelMatchers>>", 'namespace="default",pod=~"dsv3-.*"').replace("<<.GroupBy>>", "pod"))
    return exprs


def selectors_and_groupings(expr: str) -> tuple[list, set[str]]:
    """(the vector selectors, the labels aggregated `by`) of one PromQL expression."""
    selectors, by = [], set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            by.update(node.modifier.labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return selectors, by


@pytest.fixture(scope="module")
def exported(model_dir):
    """{sample name: its label names} from a live server's /metrics after a completion, a streamed chat and a 404."""
    server = ServerThread(build_app(server_options(model_dir)))
    try:
        auth = {"authorization": f"Bearer {KEY}"}
        httpx.post(server.base_url + "/completions", headers=auth,
                   json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4}).raise_for_status()
        with httpx.stream("POST", server.base_url + "/chat/completions", headers=auth,
                          json={"model": MODEL_NAME, "max_tokens": 4, "stream": True,
                                "messages": [{"role": "user", "content": "Hi"}]}) as r:
            assert r.status_code == 200 and list(r.iter_lines())[-2] == "data: [DONE]"
        assert httpx.post(server.base_url + "/completions", headers=auth,
                          json={"model": "absent", "prompt": "x"}).status_code == 404
        text = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def test_every_promql_expression_parses_and_uses_exported_series_and_labels(exported):
    exprs = promql_expressions()
    assert len(exprs) >= 12
    used = set()
    for expr in exprs:
        selectors, by = selectors_and_groupings(expr)
        available = set(SCRAPE_LABELS)
        for selector in selectors:
            assert selector.name in exported, f"{expr}: {selector.name} is not in /metrics"
            names = {m.name for m in selector.matchers.matchers}
            assert names <= exported[selector.name] | SCRAPE_LABELS, f"{expr}: labels {names}"
            available |= exported[selector.name]
            used.add(selector.name)
        assert by <= available, f"{expr}: grouped by {by - available}, which its series do not carry"
    # the histograms are read through their buckets, the counters through _total
    assert {"dsv3:e2e_request_latency_seconds_bucket", "dsv3:time_to_first_token_seconds_bucket",
            "dsv3:http_requests_total", "dsv3:generation_tokens_total"} <= used


def test_histograms_export_buckets_sum_and_count(exported):
    for name in ("dsv3:e2e_request_latency_seconds", "dsv3:time_to_first_token_seconds",
                 "dsv3:http_request_duration_seconds"):
        assert {name + suffix for suffix in ("_bucket", "_sum", "_count")} <= set(exported)
        assert "le" in exported[name + "_bucket"]


def test_metrics_page_lists_every_series_and_every_dashboard_query(exported):
    page = (DEPLOY.parent / "docs" / "metrics.md").read_text()
    for name in (n for n in exported if not n.endswith("_created")):
        assert f"`{re.sub(r'_(bucket|sum|count)$', '', name)}`" in page, name
    for rule in adapter_rules():
        assert f"`{rule['seriesQuery']}`" in page and f"`{rule['metricsQuery']}`" in page
    dashboard = json.loads((DEPLOY / "grafana" / "dsv3.json").read_text())
    for target in (t for panel in dashboard["panels"] for t in panel["targets"]):
        assert f"`{target['expr']}`" in page, target["expr"]


def test_hpa_pods_metric_is_what_the_adapter_rule_serves():
    hpa = manifest("HorizontalPodAutoscaler", "dsv3")
    assert hpa["apiVersion"] == "autoscaling/v2"
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    [rule] = adapter_rules()
    series = promql_parser.parse(rule["seriesQuery"]).name
    served = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert kinds["Pods"]["pods"]["metric"]["name"] == served == "dsv3_num_requests_waiting"
    target = hpa["spec"]["scaleTargetRef"]
    assert manifest(target["kind"], target["name"])["apiVersion"] == target["apiVersion"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def configured(path: Path) -> dict:
    """`dsv3 serve --config path`'s options (an unknown key is a SystemExit naming it)."""
    return resolve_options(Namespace(config=str(path)))


def configmap_options(tmp_path: Path) -> dict:
    (tmp_path / "configmap.toml").write_text(manifest("ConfigMap", "dsv3-config")["data"]["config.toml"])
    return configured(tmp_path / "configmap.toml")


def test_deployments_probe_ready_and_health_and_cover_the_drain(tmp_path):
    drain = configmap_options(tmp_path)["drain_timeout"]
    for path in ("deployment.yaml", "deployment-gpu.yaml"):
        [deployment] = yaml.safe_load_all((DEPLOY / "k8s" / path).read_text())
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
        assert pod["securityContext"]["runAsUser"] != 0
    gpu = yaml.safe_load((DEPLOY / "k8s" / "deployment-gpu.yaml").read_text())
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_config_files_hold_only_known_options_and_no_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("DSV3_API_KEY", raising=False)
    monkeypatch.delenv("DSV3_API_KEY_FILE", raising=False)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["dsv3"]
    assert configured(DEPLOY / "config.toml")["drain_timeout"] < int(compose["stop_grace_period"].rstrip("s"))
    for options in (configured(DEPLOY / "config.toml"), configmap_options(tmp_path)):
        assert options["api_key"] == [] and options["log_format"] == "json"


def test_dockerfiles_pass_hadolint():
    run = subprocess.run([shutil.which("hadolint") or "hadolint", *map(str, DOCKERFILES)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_recipe_flags_exist_in_serve_help():
    """The Dockerfiles' ENTRYPOINT + CMD, compose's command and the Deployments' args are valid `dsv3 serve`
    command lines whose every flag `dsv3 serve --help` lists."""
    parser = build_parser()
    serve_help = parser._subparsers._group_actions[0].choices["serve"].format_help()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    lines = [instruction(f, "ENTRYPOINT") + instruction(f, "CMD") for f in DOCKERFILES]
    entrypoint = instruction(DOCKERFILES[0], "ENTRYPOINT")
    lines.append(entrypoint + compose["services"]["dsv3"]["command"])
    for path in ("deployment.yaml", "deployment-gpu.yaml"):
        [container] = yaml.safe_load((DEPLOY / "k8s" / path).read_text())["spec"]["template"]["spec"]["containers"]
        lines.append(entrypoint + container["args"])
    for line in lines:
        assert line[:2] == ["dsv3", "serve"], line
        for flag in (a for a in line if a.startswith("--")):
            assert re.search(rf"\s{re.escape(flag)}\b", serve_help), f"{flag} is not in `dsv3 serve --help`"
        parser.parse_args(line[1:])  # values of the right type: argparse exits on a bad one


def test_compose_mounts_files_that_exist_and_provisions_the_dashboard():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume
    build = compose["services"]["dsv3"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES[0]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"] == ["dsv3:8000"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = json.loads((DEPLOY / "grafana" / "dsv3.json").read_text())["templating"]["list"][0]["current"]["value"]
    assert datasource["datasources"][0]["uid"] == uid


def test_installed_as_the_dockerfile_does_it_serves_with_the_dockerfiles_command(tmp_path):
    """The Dockerfile's COPY lines and `pip install .` into a fresh venv (the image's other dependencies come from
    this environment: --system-site-packages, --no-deps), then its ENTRYPOINT + CMD and HEALTHCHECK, with the port
    moved to a free one (a later flag wins)."""
    dockerfile = DOCKERFILES[0]
    src = tmp_path / "src"
    src.mkdir()
    root = DEPLOY.parent
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.M):
        for name in sources.split():
            copy = shutil.copytree if (root / name).is_dir() else shutil.copy
            copy(root / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DSV3_API_KEY")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-build-isolation", "--no-cache-dir", str(src)], check=True, env=env,
                   timeout=300)
    where = subprocess.run(["python", "-c", "import dsv3; print(dsv3.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where
    port = free_port()
    command = instruction(dockerfile, "ENTRYPOINT") + instruction(dockerfile, "CMD") + ["--port", str(port)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        healthcheck = re.search(r"^\s+CMD (\[.*\])$", dockerfile.read_text(), re.M).group(1)
        check = [arg.replace(":8000/", f":{port}/") for arg in json.loads(healthcheck)]
        assert subprocess.run(check, env=env, timeout=30).returncode == 0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0

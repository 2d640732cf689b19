"""Environment files: typed, checked before any side effect; errors name file, key and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from twincd.config import DEFAULT_ENV, UnknownApp, load_environment
from twincd.errors import ConfigError
from twincd.release import BadTag, check_tag


def write(tmp_path: Path, **changes: object) -> Path:
    data = yaml.safe_load(DEFAULT_ENV.read_text())
    data.update(changes)
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_embedded_default_loads() -> None:
    env = load_environment()
    assert env.app_overlay("hello", "eks") == "overlays/eks/hello"
    assert env.pull_registry("hello", "aks") == "127.0.0.1:5000"
    assert env.rollout_stages() == [("eks", "aks")]
    # The local stack's repos are remote, behind its authenticated git server.
    assert env.manifests.repo == "http://127.0.0.1:8929/manifests.git"
    cred = env.git_credential(env.manifests.repo)
    assert cred is not None and cred.token == "env:TWINCD_GIT_TOKEN"


@pytest.mark.parametrize(
    "value,expected",
    [
        ("https://gitlab.example.com/infra/manifests.git", "https://gitlab.example.com/infra/manifests.git"),
        (
            "ssh://git@gitlab.example.com/infra/manifests.git",
            "ssh://git@gitlab.example.com/infra/manifests.git",
        ),
        ("git@gitlab.example.com:infra/manifests.git", "git@gitlab.example.com:infra/manifests.git"),
        ("file:///srv/git/manifests.git", "file:///srv/git/manifests.git"),
        ("/srv/git/manifests.git", "/srv/git/manifests.git"),
        (".twincd/git/manifests.git", str(DEFAULT_ENV.parent.parent / ".twincd/git/manifests.git")),
    ],
)
def test_git_urls_stay_urls_and_relative_paths_resolve_against_the_repository(
    value: str, expected: str
) -> None:
    from twincd.wiring import repo_url

    assert repo_url(load_environment(), value) == expected


def test_git_credentials_match_the_longest_url_prefix_and_refuse_literals(tmp_path: Path) -> None:
    creds = [
        {"url": "https://gitlab.example.com/", "token": "env:GITLAB_TOKEN"},
        {"url": "https://gitlab.example.com/infra/", "username": "deploy", "token": "secret:infra-token"},
    ]
    env = load_environment(write(tmp_path, git={"credentials": creds}))
    found = env.git_credential("https://gitlab.example.com/infra/manifests.git")
    assert found is not None and found.username == "deploy"
    assert env.git_credential("https://github.com/x/y.git") is None
    # Matched at path segments, as git matches http.<url>.*: a sibling group or port is not covered.
    found = env.git_credential("https://gitlab.example.com/infra-secrets/x.git")
    assert found is not None and found.username != "deploy"
    assert env.git_credential("https://gitlab.example.com:8443/infra/x.git") is None
    scp = load_environment(
        write(tmp_path, git={"credentials": [{"url": "git@gitlab.example.com", "ssh_key": "k"}]})
    )
    assert scp.git_credential("git@gitlab.example.com:infra/x.git") is not None
    assert scp.git_credential("git@gitlab.example.com.evil:infra/x.git") is None
    literal = [{"url": "https://gitlab.example.com/", "token": "glpat-literal-token"}]
    with pytest.raises(ConfigError, match="secret reference") as e:
        load_environment(write(tmp_path, git={"credentials": literal}))
    assert "glpat-literal-token" not in str(e.value)
    with pytest.raises(ConfigError, match="either `token`"):
        load_environment(write(tmp_path, git={"credentials": [{"url": "https://x/"}]}))


def test_broken_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "env.yaml"
    path.write_text("manifests: {repo: x\nforge: [\n")
    with pytest.raises(ConfigError, match=rf"{path}: line \d+, column \d+ is not valid YAML"):
        load_environment(path)


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, timeouts={"rollout_seconds": "soon"})
    with pytest.raises(ConfigError, match=r"timeouts\.rollout_seconds: Input should be a valid number"):
        load_environment(path)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"clustres: Extra inputs are not permitted"):
        load_environment(write(tmp_path, clustres={}))


def test_a_literal_secret_is_refused_and_never_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, notifier={"type": "slack", "channel": "#deploys", "token": "xoxb-123-literal"})
    with pytest.raises(ConfigError) as error:
        load_environment(path)
    assert "notifier.slack.token" in str(error.value) and "secret reference" in str(error.value)
    assert "xoxb-123-literal" not in str(error.value)


def test_cross_references_are_checked(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_ENV.read_text())
    data["apps"]["hello"]["registries"] = ["ecr"]
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"apps.hello.registries names 'ecr'.*known: local"):
        load_environment(path)
    with pytest.raises(ConfigError, match="rollout.order must list every cluster"):
        load_environment(write(tmp_path, rollout={"strategy": "sequential", "order": ["eks"]}))


def test_unknown_app_lists_the_known_ones() -> None:
    with pytest.raises(UnknownApp, match=r"unknown app 'nope' .*known apps: hello"):
        load_environment().app("nope")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment file not found"):
        load_environment(tmp_path / "absent.yaml")


@pytest.mark.parametrize("tag", ["v1.2.3", "1.2.3", "v1.2.3-rc.1"])
def test_release_tags_that_pass(tag: str) -> None:
    assert check_tag(app="hello", tag=tag, pattern=load_environment().apps["hello"].tag_pattern) == tag


@pytest.mark.parametrize(
    "tag,why",
    [
        ("v1.2", "does not match"),
        ("latest", "does not match"),
        ("v1.2.3;id", "not a safe"),
        ("-x", "not a safe"),
        ("v1..2", "not a safe"),
        ("v1.2.3.lock", "not a safe"),
        ("$(id)", "not a safe"),
        ("v1 2", "not a safe"),
        ("x" * 129, "not a safe"),
    ],
)
def test_release_tags_refused(tag: str, why: str) -> None:
    with pytest.raises(BadTag, match=why):
        check_tag(app="hello", tag=tag, pattern=load_environment().apps["hello"].tag_pattern)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("manifests", {"repo": "https://deploy:glpat-s3cr3t-in-url@gitlab.example.com/infra/manifests.git"}),
        ("manifests", {"repo": "http://glpat-s3cr3t-in-url@127.0.0.1:8929/manifests.git"}),
        ("manifests", {"repo": "ssh://git:glpat-s3cr3t-in-url@gitlab.example.com/infra/manifests.git"}),
        ("prefect", {"api_url": "https://admin:glpat-s3cr3t-in-url@prefect.example.com/api"}),
    ],
)
def test_credentials_in_a_url_are_refused_without_echoing_them(
    tmp_path: Path, key: str, value: dict[str, str]
) -> None:
    with pytest.raises(ConfigError, match="must not carry credentials") as e:
        load_environment(write(tmp_path, **{key: value}))
    assert "glpat-s3cr3t-in-url" not in str(e.value)


def test_an_ssh_user_and_scp_style_remotes_are_not_credentials(tmp_path: Path) -> None:
    for repo in (
        "ssh://git@gitlab.example.com/infra/manifests.git",
        "git@gitlab.example.com:infra/manifests.git",
    ):
        assert load_environment(write(tmp_path, manifests={"repo": repo})).manifests.repo == repo


def _with_ledger(tmp_path: Path, **ledger: object) -> Path:
    data = yaml.safe_load(DEFAULT_ENV.read_text())
    data["apps"]["ledger"] = {**data["apps"]["hello"], "workload": {"namespace": "ledger", "name": "ledger"}}
    data["apps"]["ledger"].update(ledger)
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_each_app_has_its_own_topology_records_and_health_with_the_environments_as_defaults(
    tmp_path: Path,
) -> None:
    env = load_environment(
        _with_ledger(
            tmp_path,
            topology={
                "mode": "active-standby",
                "active": "aks",
                "only": "active-standby",
                "why": "DB latency",
            },
            dns={"records": ["ledger", "www.ledger"], "ttl": 30},
            health={"path": "/healthz", "ca_file": "certs/ca.pem"},
        )
    )
    assert env.app_topology("hello").mode == "active-active" and env.serving_clusters("hello") == {
        "eks",
        "aks",
    }
    assert env.app_topology("ledger").only == "active-standby" and env.serving_clusters("ledger") == {"aks"}
    assert [(r.name, r.fqdn, r.ttl) for r in env.app_records("hello")] == [("web", "web.example.test", 60)]
    assert [r.fqdn for r in env.app_records("ledger")] == ["ledger.example.test", "www.ledger.example.test"]
    health = env.apps["ledger"].health
    assert health is not None and health.effective_port == 443 and health.successes == 3
    # The cluster whose context both argocd entries name.
    assert env.argocd_host("eks") == "aks" and env.argocd_host("aks") == "aks"


def test_two_apps_on_one_record_or_a_broken_constraint_are_refused(tmp_path: Path) -> None:
    from twincd.failover import PlanError, topology_of

    # Without a record of its own, ledger shares hello's default `web`: deploys do not care, but a
    # failover would move both apps with one record, so it refuses to plan.
    shared = load_environment(_with_ledger(tmp_path))
    with pytest.raises(PlanError, match="apps hello and ledger both use the DNS record web.example.test"):
        topology_of(shared, (), {})
    with pytest.raises(ConfigError, match="a constraint .* needs `why`"):
        load_environment(
            _with_ledger(
                tmp_path,
                dns={"record": "ledger"},
                topology={"mode": "active-active", "only": "active-active"},
            )
        )
    with pytest.raises(ConfigError, match="mode active-active breaks the app's own constraint"):
        load_environment(
            _with_ledger(
                tmp_path,
                dns={"record": "ledger"},
                topology={"mode": "active-active", "only": "active-standby", "why": "x"},
            )
        )
    with pytest.raises(ConfigError, match=r"apps.ledger.topology.active names 'gke'"):
        load_environment(
            _with_ledger(
                tmp_path, dns={"record": "ledger"}, topology={"mode": "active-standby", "active": "gke"}
            )
        )
    none = yaml.safe_load(_with_ledger(tmp_path, dns={"record": "ledger"}).read_text())
    none["dns"] = {"type": "none"}
    none["apps"]["ledger"]["health"] = {"path": "/healthz"}
    (tmp_path / "none.yaml").write_text(yaml.safe_dump(none))
    with pytest.raises(ConfigError, match="apps.ledger.health needs `host`"):
        load_environment(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="health.path: .*must start with `/`"):
        load_environment(_with_ledger(tmp_path, dns={"record": "ledger"}, health={"path": "healthz"}))


def test_a_cluster_lists_every_ingress_ip(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_ENV.read_text())
    data["clusters"]["eks"].pop("ingress_ip")
    data["clusters"]["eks"]["ingress_ips"] = ["127.0.0.11", "127.0.0.21", "127.0.0.31"]
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(data))
    env = load_environment(path)
    assert env.clusters["eks"].ips == ("127.0.0.11", "127.0.0.21", "127.0.0.31")
    assert env.clusters["aks"].ips == ("127.0.0.12",)
    data["clusters"]["eks"]["ingress_ip"] = "127.0.0.11"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="give one of `ingress_ips` .*, `ingress_ip` or `ingress_service`"):
        load_environment(path)
    data["clusters"]["eks"].pop("ingress_ip")
    data["clusters"]["eks"].pop("ingress_ips")
    data["clusters"]["eks"]["ingress_service"] = {"namespace": "ingress-nginx"}
    path.write_text(yaml.safe_dump(data))
    read = load_environment(path).clusters["eks"]
    assert read.ips == () and read.ingress_service is not None
    assert read.ingress_service.name == "ingress-nginx-controller"
    data["clusters"]["eks"].pop("ingress_service")
    data["clusters"]["eks"]["ingress_ips"] = ["lb-1.elb.amazonaws.com"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="'lb-1.elb.amazonaws.com' is not an IPv4 address"):
        load_environment(path)

"""The deploy flow end to end on a local stack of its own: the main job and every bad input.

Tests run in file order and share one stack; each release after the first tags a new commit of
the sample app, so every test starts from the state the one before left (as a user's stack would).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    TWINCD,
    approve,
    final_run,
    flow_run,
    git_refs,
    registry_headers,
    release_app,
    run_id_of,
    twincd,
    wait_for,
)
from twincd.config import Environment
from twincd.sandbox import procs, stack
from twincd.sandbox.procs import flow_run_processes
from twincd.sandbox.stack import cluster_name_of, local_repo_path

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
RUN_URL = re.compile(r"Run in the Prefect UI: (\S+)")


def kubectl_json(env: Environment, context: str, *args: str, kubeconfig: Path | None = None) -> dict:
    out = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(kubeconfig or env.state_path / "kubeconfig"),
            "--context",
            context,
            "get",
            *args,
            "-o",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def main_file(env: Environment, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(local_repo_path(env, env.manifests.repo)), "show", f"main:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def main_head(env: Environment) -> str:
    return git_refs(local_repo_path(env, env.manifests.repo))["refs/heads/main"]


def registry_digest(env: Environment, tag: str) -> str:
    import httpx

    r = httpx.head(
        f"http://{env.registries['local'].url}/v2/hello/manifests/{tag}",
        headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json, "
            "application/vnd.docker.distribution.manifest.v2+json",
            **registry_headers(env),
        },
    )
    assert r.status_code == 200, r.text
    return r.headers["Docker-Content-Digest"]


def test_deploy_verifies_both_clusters_and_rerun_changes_nothing(stack_env: Environment) -> None:
    env = stack_env
    first = twincd(env, "deploy", "hello", "v1.0.0", "--auto-approve")
    assert first.returncode == 0, first.stdout + first.stderr
    digest = registry_digest(env, "v1.0.0")
    head = main_head(env)
    for cluster in ("eks", "aks"):
        overlay = main_file(env, f"overlays/{cluster}/hello/kustomization.yaml")
        assert f"digest: {digest}" in overlay
        app = kubectl_json(env, "sandbox-aks", "applications", "-n", "argocd", f"hello-{cluster}")
        assert app["status"]["sync"]["revision"] == head
        assert app["status"]["health"]["status"] == "Healthy"
        dep = kubectl_json(env, f"sandbox-{cluster}", "deployment", "-n", "hello", "hello")
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@" + digest)
        assert dep["status"]["availableReplicas"] == 2
    refs = git_refs(local_repo_path(env, env.manifests.repo))
    records = sorted((env.state_path / "forge").glob("*.json"))
    (ARTIFACTS / "run-url.txt").parent.mkdir(exist_ok=True)
    (ARTIFACTS / "run-url.txt").write_text(RUN_URL.search(first.stdout).group(1))  # type: ignore[union-attr]

    again = twincd(env, "deploy", "hello", "v1.0.0", "--auto-approve")
    assert again.returncode == 0, again.stdout + again.stderr
    assert git_refs(local_repo_path(env, env.manifests.repo)) == refs  # no second commit or branch
    assert sorted((env.state_path / "forge").glob("*.json")) == records  # no second MR
    assert registry_digest(env, "v1.0.0") == digest  # no second image


# Headless Chromium as docs/platform.md says it runs here (no background networking: closed network).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
]


def _chromium(url: str, *args: str) -> str:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is installed by scripts/setup.sh"
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout


def test_prefect_ui_shows_the_completed_run_with_its_tasks(stack_env: Environment) -> None:
    url = (ARTIFACTS / "run-url.txt").read_text()
    dom = _chromium(url, "--window-size=1400,1000", "--dump-dom")
    _chromium(url, "--window-size=1400,1000", f"--screenshot={ARTIFACTS / 'deploy-run.png'}")
    assert "deploy-hello-v1.0.0" in dom
    assert "Completed" in dom
    for task in ("build-image", "push-image", "set-image", "open-merge-request", "validate", "verify-eks"):
        assert task in dom, f"task {task} not shown on the run page"
    assert (ARTIFACTS / "deploy-run.png").stat().st_size > 10_000


def _task_graph(env: Environment, flow_run_id: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    """The run's task runs (id → name) and their dependency edges, as the Prefect API reports them."""
    import httpx

    body = {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    runs = httpx.post(f"{env.prefect.api_url}/task_runs/filter", json=body, timeout=30).json()
    names = {r["id"]: r["name"] for r in runs}
    edges = {
        (names[i["id"]], r["name"])
        for r in runs
        for inputs in r["task_inputs"].values()
        for i in inputs
        if i.get("input_type") == "task_run" and i["id"] in names
    }
    return names, edges


def _step(name: str) -> str:
    """``notify-08f`` → ``notify``, ``set-image-twincd/hello/v1.0.0`` → ``set-image``."""
    if name.startswith("set-image-"):
        return "set-image"
    return re.sub(r"-[0-9a-f]{3}$", "", name)


def test_run_graph_reads_as_the_eight_steps(stack_env: Environment) -> None:
    url = (ARTIFACTS / "run-url.txt").read_text()
    names, edges = _task_graph(stack_env, url.rsplit("/", 1)[-1])
    steps = {(_step(a), _step(b)) for a, b in edges}
    chain = [
        "check-release",
        "build-image",
        "push-image",
        "set-image",
        "open-merge-request",
        "validate",
        "post-validation",
        "merge",
    ]
    for upstream, downstream in zip(chain, chain[1:], strict=False):
        assert (upstream, downstream) in steps, f"no edge {upstream} → {downstream}: {sorted(steps)}"
    for cluster in ("verify-eks", "verify-aks"):
        assert ("merge", cluster) in steps
    assert ("verify-eks", "verify-aks") not in steps and ("verify-aks", "verify-eks") not in steps
    # No star: no task is upstream of every other task.
    for node in names.values():
        downstream = {b for a, b in edges if a == node}
        assert downstream != set(names.values()) - {node}, f"{node} has an edge to every other task"
    # Every notify reports a step and hangs off it.
    notifies = [n for n in names.values() if _step(n) == "notify"]
    assert notifies and all(any(b == n for _, b in edges) for n in notifies), sorted(edges)
    print("run graph edges:\n" + "\n".join(f"  {a} -> {b}" for a, b in sorted(edges)))
    (ARTIFACTS / "deploy-graph-edges.txt").write_text(
        "\n".join(f"{a} -> {b}" for a, b in sorted(edges)) + "\n"
    )

    # The graph as people see it: the top of the run page, where the Prefect UI draws it.
    _chromium(url, "--window-size=1600,560", f"--screenshot={ARTIFACTS / 'deploy-graph.png'}")
    assert (ARTIFACTS / "deploy-graph.png").stat().st_size > 10_000


def test_no_secret_reaches_a_log_an_artifact_or_a_record(stack_env: Environment) -> None:
    """The git token and the registry password of the deploy above appear nowhere people look."""
    import httpx

    from twincd.sandbox import githttp, registry_auth

    secrets = [
        githttp.token_path(stack_env.state_path).read_text().strip(),
        registry_auth.password_path(stack_env.state_path).read_text().strip(),
    ]
    run_id = (ARTIFACTS / "run-url.txt").read_text().rsplit("/", 1)[-1]
    api = stack_env.prefect.api_url
    logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    artifacts = httpx.post(f"{api}/artifacts/filter", json={"limit": 200})
    runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200})
    tasks = httpx.post(f"{api}/task_runs/filter", json={"limit": 200})
    assert logs.status_code == artifacts.status_code == runs.status_code == tasks.status_code == 200
    assert len(logs.json()) > 10  # the deploy's log records are there to be searched
    records = [p.read_text() for p in (stack_env.state_path / "forge").glob("*.json")]
    haystack = "\n".join([logs.text, artifacts.text, runs.text, tasks.text, *records])
    for secret in secrets:
        assert secret and secret not in haystack


def test_an_image_built_by_ci_is_deployed_without_a_build(stack_env: Environment) -> None:
    env = stack_env
    digest = registry_digest(env, "v1.0.0")
    refs = git_refs(local_repo_path(env, env.manifests.repo))
    image = f"{env.registries['local'].url}/hello@{digest}"
    result = twincd(env, "deploy", "hello", "v1.0.0", "--image", image, "--auto-approve")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "built by CI, found" in out and "build-image" not in out  # no build, no push
    assert git_refs(local_repo_path(env, env.manifests.repo)) == refs  # main pins it already


def test_an_image_digest_missing_from_a_registry_is_refused_before_any_change(stack_env: Environment) -> None:
    env = stack_env
    refs = git_refs(local_repo_path(env, env.manifests.repo))
    missing = f"{env.registries['local'].url}/hello@sha256:{'0' * 64}"
    result = twincd(env, "deploy", "hello", "v1.0.0", "--image", missing, "--auto-approve")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"hello@sha256:{'0' * 64} does not exist: push the image" in out, out
    assert git_refs(local_repo_path(env, env.manifests.repo)) == refs


@pytest.mark.parametrize(
    "tag,reason",
    [
        ("1.0", "does not match the app's tag_pattern"),
        ("v1.0.0;rm -rf /", "is not a safe release tag"),
        ("-v1.0.0", "is not a safe release tag"),
        ("v1.0.0..v2", "is not a safe release tag"),
    ],
)
def test_bad_tag_is_refused_before_any_change(stack_env: Environment, tag: str, reason: str) -> None:
    refs = git_refs(local_repo_path(stack_env, stack_env.manifests.repo))
    result = twincd(stack_env, "deploy", "--auto-approve", "hello", "--", tag)
    assert result.returncode != 0
    assert reason in result.stdout + result.stderr
    assert git_refs(local_repo_path(stack_env, stack_env.manifests.repo)) == refs


def test_missing_tag_names_the_repo(stack_env: Environment) -> None:
    result = twincd(stack_env, "deploy", "hello", "v9.9.9", "--auto-approve")
    assert result.returncode != 0
    assert "tag 'v9.9.9' does not exist in" in result.stdout + result.stderr


def test_unknown_app_lists_the_known_ones(stack_env: Environment) -> None:
    result = twincd(stack_env, "deploy", "nope", "v1.0.0")
    assert result.returncode == 2
    assert "unknown app 'nope'" in result.stderr and "known apps: hello" in result.stderr


def _push_to_main(env: Environment, path: str, text: str, message: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        git = ["git", "-C", tmp, "-c", "user.name=dev", "-c", "user.email=dev@example.test"]
        subprocess.run(["git", "clone", "-q", str(local_repo_path(env, env.manifests.repo)), tmp], check=True)
        Path(tmp, path).write_text(text)
        subprocess.run([*git, "commit", "-qam", message], check=True)
        subprocess.run([*git, "push", "-q", "origin", "main"], check=True)


def test_broken_overlay_fails_validation_and_merges_nothing(stack_env: Environment) -> None:
    env = stack_env
    path = "overlays/eks/hello/kustomization.yaml"
    good = main_file(env, path)
    broken = (
        good + "patches:\n  - target: {kind: Deployment}\n    patch: |-\n      - op: replace\n"
        "        path: /spec/replicas\n        value: two\n"
    )
    _push_to_main(env, path, broken, "break the eks overlay")
    try:
        release_app(env, "v1.1.0", page="<h1>hello 1.1.0</h1>\n")
        head = main_head(env)
        result = twincd(env, "deploy", "hello", "v1.1.0", "--auto-approve")
        out = result.stdout + result.stderr
        assert result.returncode != 0
        assert "validation of" in out and "nothing was merged" in out
        assert "overlays/eks/hello" in out and "spec.replicas" in out.replace("/", ".")
        assert main_head(env) == head
    finally:
        _push_to_main(env, path, good, "repair the eks overlay")


def test_refused_approval_cancels_and_keeps_the_branch(stack_env: Environment) -> None:
    env = stack_env
    release_app(env, "v1.2.0", page="<h1>hello 1.2.0</h1>\n")
    head = main_head(env)
    started = twincd(env, "deploy", "hello", "v1.2.0")
    assert started.returncode == 0 and "Suspended" in started.stdout, started.stdout + started.stderr
    run_id = run_id_of(started.stdout)
    assert flow_run_processes(run_id) == []  # nothing runs while it waits
    refused = approve(env, "hello", "v1.2.0", "--refuse", "--approver", "alice", "--comment", "not today")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Cancelled" in refused.stdout and "refused by alice" in refused.stdout
    refs = git_refs(local_repo_path(env, env.manifests.repo))
    assert refs["refs/heads/main"] == head  # nothing reached main
    assert "refs/heads/twincd/hello/v1.2.0" in refs  # kept for inspection
    assert twincd(env, "approve", "hello", "v1.2.0").returncode == 2  # nothing waits any more


def test_approval_in_the_cli_merges_and_verifies(stack_env: Environment) -> None:
    env = stack_env
    release_app(env, "v1.3.0", page="<h1>hello 1.3.0</h1>\n")
    started = twincd(env, "deploy", "hello", "v1.3.0")
    assert started.returncode == 0 and "Suspended" in started.stdout, started.stdout + started.stderr
    assert "twincd approve hello v1.3.0" in started.stdout
    run_id = run_id_of(started.stdout)
    assert flow_run_processes(run_id) == []
    approved = approve(env, "hello", "v1.3.0", "--approver", "bob")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert run_id_of(approved.stdout) == run_id  # the same run, resumed
    assert "Completed" in approved.stdout and "Release succeeded" in approved.stdout
    assert (
        "Approved-by: bob"
        in subprocess.run(
            ["git", "-C", str(local_repo_path(env, env.manifests.repo)), "log", "-1", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert registry_digest(env, "v1.3.0") in main_file(env, "overlays/aks/hello/kustomization.yaml")
    # The resumed run found the image, the branch and the MR it made before the wait.
    assert "already in the registry" in approved.stdout and "Finished in state Completed" in approved.stdout


def test_cluster_down_fails_that_cluster_and_verifies_the_other(stack_env: Environment) -> None:
    env = stack_env
    release_app(env, "v1.4.0", page="<h1>hello 1.4.0</h1>\n")
    assert procs.stop_daemon(cluster_name_of("eks"), state_dir=env.state_path)
    try:
        result = twincd(env, "deploy", "hello", "v1.4.0", "--auto-approve")
    finally:
        stack.up(env, say=lambda line: None)  # bring eks back for the tests after this one
    out = result.stdout + result.stderr
    assert result.returncode == 1
    assert "rollout failed on eks: cluster eks" in out and "unreachable" in out
    assert "verified on aks" in out


def test_an_approval_nobody_gives_times_out_closes_the_mr_and_says_so(stack_env: Environment) -> None:
    from tests.e2e.test_gitlab_and_staged import _variant

    env = _variant(stack_env, "short-approval", timeouts={"approval_seconds": 3, "rollout_seconds": 30})
    release_app(env, "v1.5.0", page="<h1>hello 1.5.0</h1>\n")
    head = main_head(env)
    started = twincd(env, "deploy", "hello", "v1.5.0")
    assert started.returncode == 0 and "Suspended" in started.stdout, started.stdout + started.stderr
    run_id = run_id_of(started.stdout)
    time.sleep(4)  # past the deadline: the reconciliation (every 10 minutes; here at once) ends the wait
    found = twincd(env, "watch-waits")
    assert found.returncode == 0 and "no answer by" in found.stdout + found.stderr, (
        found.stdout + found.stderr
    )
    run = final_run(env, run_id)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert (
        "not approved in time" in run["state"]["message"]
        and "nothing reached main" in run["state"]["message"]
    )
    assert main_head(env) == head
    records = list((env.state_path / "forge").glob("*v1.5.0.json"))
    assert records and json.loads(records[0].read_text())["state"] == "closed"  # the MR says why


_BILLING = {
    "base/billing/kustomization.yaml": "resources:\n  - deployment.yaml\n",
    "base/billing/deployment.yaml": (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: billing\n  namespace: billing\nspec:\n"
        "  selector:\n    matchLabels: {app: billing}\n"
        "  template:\n    metadata:\n      labels: {app: billing}\n"
        "    spec:\n      containers:\n        - name: billing\n          image: billing@sha256:"
        + "0" * 64
        + "\n          ports:\n            - containerPort: eighty\n"
    ),
    "overlays/eks/billing/kustomization.yaml": "resources:\n  - ../../../base/billing\n",
    "overlays/aks/billing/kustomization.yaml": "resources:\n  - ../../../base/billing\n",
}


def _commit_files(env: Environment, files: dict[str, str | None], message: str) -> str:
    """A colleague's commit on main (None: delete the file); its commit id."""
    with tempfile.TemporaryDirectory() as tmp:
        git = ["git", "-C", tmp, "-c", "user.name=colleague", "-c", "user.email=dev@example.test"]
        subprocess.run(["git", "clone", "-q", str(local_repo_path(env, env.manifests.repo)), tmp], check=True)
        for path, text in files.items():
            if text is None:
                subprocess.run([*git, "rm", "-q", path], check=True)
            else:
                Path(tmp, path).parent.mkdir(parents=True, exist_ok=True)
                Path(tmp, path).write_text(text)
                subprocess.run([*git, "add", path], check=True)
        subprocess.run([*git, "commit", "-qm", message], check=True)
        subprocess.run([*git, "push", "-q", "origin", "main"], check=True)
        return subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()


def test_main_broken_while_a_release_waits_is_not_merged_onto(stack_env: Environment) -> None:
    """Issue 16.1: a colleague breaks another app on main while a release waits; the approval does
    not merge onto it, and the run names the commit that broke main."""
    from tests.e2e.test_gitlab_and_staged import _variant

    hello = stack_env.apps["hello"].model_dump(exclude_none=True)
    env = _variant(stack_env, "two-apps", apps={"hello": hello, "billing": {**hello, "image": "billing"}})
    release_app(env, "v1.6.0", page="<h1>hello 1.6.0</h1>\n")
    started = twincd(env, "deploy", "hello", "v1.6.0")
    assert started.returncode == 0 and "Suspended" in started.stdout, started.stdout + started.stderr
    run_id = run_id_of(started.stdout)
    broke = _commit_files(env, dict(_BILLING), "add billing")
    try:
        approved = approve(env, "hello", "v1.6.0", "--approver", "bob")
        out = approved.stdout + approved.stderr
        assert approved.returncode == 1, out
        run = final_run(env, run_id)
        message = run["state"]["message"]
        assert run["state"]["type"] == "FAILED", run["state"]
        assert f"{broke[:12]} add billing (colleague)" in message and "break main itself" in message, message
        assert "overlays/eks/billing" in message and "containerPort" in message, message
        assert main_head(env) == broke  # nothing merged onto it
        assert "break main itself" in out  # the team's story says so (the console notifier's log)
        records = list((env.state_path / "forge").glob("*v1.6.0.json"))
        assert records and json.loads(records[0].read_text())["state"] == "opened"  # to merge once fixed
    finally:
        _commit_files(env, dict.fromkeys(_BILLING), "remove billing")


def test_a_prefect_server_restarted_during_a_wait_loses_nothing(stack_env: Environment) -> None:
    """Issue 16.3/16.8: the Prefect server goes away while a release waits, and `twincd approve`
    is given while it is down: the CLI waits for it, and the release completes once it is back."""
    env = stack_env
    release_app(env, "v1.7.0", page="<h1>hello 1.7.0</h1>\n")
    started = twincd(env, "deploy", "hello", "v1.7.0")
    assert started.returncode == 0 and "Suspended" in started.stdout, started.stdout + started.stderr
    run_id = run_id_of(started.stdout)
    assert procs.stop_daemon(stack.PREFECT, state_dir=env.state_path)
    approving = subprocess.Popen(
        [*TWINCD, "--env", env.source, "approve", "hello", "v1.7.0", "--approver", "carol"],
        env={**os.environ, "PREFECT_API_URL": env.prefect.api_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(8)  # an outage the CLI rides out
        assert approving.poll() is None, approving.communicate()
    finally:
        stack.up(env, say=lambda line: None)  # the server (and the runner, if it died) come back
    out, err = approving.communicate(timeout=300)
    assert approving.returncode == 0, out + err
    assert "does not answer (ConnectError); trying again" in err and "Traceback" not in err
    assert run_id_of(out) == run_id and "Release succeeded" in out
    assert final_run(env, run_id)["state"]["type"] == "COMPLETED"
    assert registry_digest(env, "v1.7.0") in main_file(env, "overlays/eks/hello/kustomization.yaml")


def _task_state(env: Environment, flow_run_id: str, name: str) -> str:
    import httpx

    body = {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    runs = httpx.post(f"{env.prefect.api_url}/task_runs/filter", json=body, timeout=30).json()
    return next((r["state"]["type"] for r in runs if r["name"] == name), "")


def test_a_run_killed_during_verification_is_marked_crashed_and_a_rerun_completes(
    stack_env: Environment,
) -> None:
    """Issue 16.4/16.8: the flow run's process is killed while it verifies; watch-waits marks it
    Crashed from its missing heartbeats (not Running forever), and a re-run completes the release
    without a second image, commit or MR."""
    import signal

    env = stack_env
    release_app(env, "v1.8.0", page="<h1>hello 1.8.0</h1>\n")
    started = twincd(env, "deploy", "hello", "v1.8.0")
    assert started.returncode == 0 and "Suspended" in started.stdout, started.stdout + started.stderr
    run_id = run_id_of(started.stdout)
    eks = procs.daemon_status(cluster_name_of("eks"), state_dir=env.state_path)
    assert eks is not None
    os.kill(eks, signal.SIGSTOP)  # eks answers nothing: the verification of eks goes on and on
    # `approve` resumes the run and follows it (a run that will never end: stopped below).
    following = subprocess.Popen(
        [*TWINCD, "--env", env.source, "approve", "hello", "v1.8.0", "--approver", "dave"],
        env={**os.environ, "PREFECT_API_URL": env.prefect.api_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: _task_state(env, run_id, "verify-eks") == "RUNNING", "verify-eks running", timeout=180
        )
        # The machine is lost: the runner and the run's process die together (a runner that
        # outlives its run's process marks the run Crashed itself).
        runner = procs.daemon_status(stack.RUNNER, state_dir=env.state_path)
        assert runner is not None
        for pid in [runner, *flow_run_processes(run_id)]:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(eks, signal.SIGCONT)
        following.kill()
        following.wait()
    wait_for(lambda: flow_run_processes(run_id) == [], "the flow run's process gone", timeout=30)
    stack.up(env, say=lambda line: None)  # another runner takes over
    assert flow_run(env, run_id)["state"]["type"] == "RUNNING"  # a zombie, until found
    time.sleep(95)  # three missed heartbeats (30 s each on the local stack)
    swept = twincd(env, "watch-waits")
    assert swept.returncode == 0 and "no heartbeat from its process" in swept.stdout + swept.stderr, (
        swept.stdout + swept.stderr
    )
    run = flow_run(env, run_id)
    assert run["state"]["type"] == "CRASHED" and "the process died" in run["state"]["message"], run["state"]
    assert twincd(env, "approve", "hello", "v1.8.0").returncode == 2  # nothing waits any more

    repo = local_repo_path(env, env.manifests.repo)
    merges_before = _merges_of(repo, "twincd/hello/v1.8.0")
    again = twincd(env, "deploy", "hello", "v1.8.0", "--auto-approve")
    out = again.stdout + again.stderr
    assert again.returncode == 0 and "Release succeeded" in out, out
    assert "already in the registry" in out  # no second image
    assert _merges_of(repo, "twincd/hello/v1.8.0") == merges_before == 1  # no second merge
    assert registry_digest(env, "v1.8.0") in main_file(env, "overlays/eks/hello/kustomization.yaml")


def _merges_of(repo: Path, branch: str) -> int:
    out = subprocess.run(
        ["git", "-C", str(repo), "log", "--merges", "--format=%s", "main"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(f"Merge branch '{branch}'" in line for line in out.splitlines())

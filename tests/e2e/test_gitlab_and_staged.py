"""The deploy flow with the GitLab forge (an HTTP fake backed by the stack's manifests repo), and
the sequential rollout that stops before the second cloud and reverts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import (
    TWINCD,
    approve,
    final_run,
    flow_run,
    git_refs,
    registry_headers,
    release_app,
    run_id_of,
    run_logs,
    start_twincd,
    stop_twincd,
    twincd,
    wait_for,
)
from tests.e2e.test_deploy import main_file, main_head, registry_digest
from tests.fakes.gitlab import DEFAULT_USER, FakeGitlab
from twincd.config import Environment, load_environment
from twincd.sandbox.procs import flow_run_processes, free_port
from twincd.sandbox.stack import local_repo_path

TOKEN = "glpat-e2e-secret-token"


def _variant(env: Environment, name: str, **changes: object) -> Environment:
    """Another environment file for the same running stack."""
    data = yaml.safe_load(Path(env.source).read_text())
    data.update(changes)
    path = Path(env.source).with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_environment(path)


def _endpoint(path: str) -> str:
    """``/api/v4/projects/infra%2Fmanifests/merge_requests/3/notes`` → ``.../merge_requests/:iid/notes``."""
    return re.sub(r"/merge_requests/\d+", "/merge_requests/:iid", path.replace("/api/v4/projects/", "", 1))


def git_parents(env: Environment, commit: str) -> list[str]:
    repo = local_repo_path(env, env.manifests.repo)
    out = subprocess.run(
        ["git", "--git-dir", str(repo), "rev-list", "--parents", "-n1", commit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[1:]


HOOK_TOKEN = "e2e-mr-hook-token"


@pytest.fixture
def gitlab(stack_env: Environment) -> Iterator[tuple[FakeGitlab, Environment]]:
    """The stack's manifests repo behind a GitLab fake, and an environment whose forge is GitLab.

    The token is a Prefect Secret block, as a worker would read it: runs are executed by the
    stack's runner, whose environment the test cannot extend. ``twincd webhook`` runs for this
    environment, and the fake's project hook sends it the Merge Request Hook events.
    """
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack_env.prefect.api_url}):
        Secret(value=TOKEN).save("e2e-gitlab-token", overwrite=True)
    port = free_port()
    with FakeGitlab(repo=local_repo_path(stack_env, stack_env.manifests.repo), token=TOKEN) as fake:
        env = _variant(
            stack_env,
            "gitlab",
            forge={
                "type": "gitlab",
                "url": fake.url,
                "project": "infra/manifests",
                "token": "secret:e2e-gitlab-token",
                "poll_seconds": 0.5,
            },
            webhook={"secret": "env:TWINCD_E2E_HOOK", "port": port},
        )
        fake.add_project_hook(f"http://127.0.0.1:{port}/hooks/gitlab", token=HOOK_TOKEN)
        hook = start_twincd(env, "webhook", TWINCD_E2E_HOOK=HOOK_TOKEN)
        try:
            wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), "the webhook")
            yield fake, env
        finally:
            stop_twincd(hook)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _suspended_deploy(env: Environment, tag: str) -> str:
    """``twincd deploy hello TAG`` until it waits for a person; the run's id."""
    started = twincd(env, "deploy", "hello", tag)
    assert started.returncode == 0 and "Suspended" in started.stdout, started.stdout + started.stderr
    run_id = run_id_of(started.stdout)
    assert flow_run_processes(run_id) == []  # nothing runs while it waits
    return run_id


def _release_mr(fake: FakeGitlab, tag: str) -> int:
    """The iid of the release MR of ``tag``, once the flow has opened it."""
    branch = f"twincd/hello/{tag}"
    wait_for(lambda: any(m.source_branch == branch for m in fake.mrs.values()), "the MR")
    return next(m.iid for m in fake.mrs.values() if m.source_branch == branch)


def _first_task_after(env: Environment, run_id: str, moment: float) -> float:
    """Seconds from ``moment`` (epoch) to the start of the run's first task run after it."""
    api = env.prefect.api_url.rstrip("/")
    tasks = httpx.post(
        f"{api}/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [run_id]}}}
    ).json()
    starts = sorted(datetime.fromisoformat(t["start_time"]).timestamp() for t in tasks if t.get("start_time"))
    return next(t for t in starts if t > moment) - moment


def test_a_merge_on_gitlab_resumes_the_suspended_release(gitlab: tuple[FakeGitlab, Environment]) -> None:
    fake, env = gitlab
    release_app(env, "v2.0.0", page="<h1>hello 2.0.0</h1>\n")
    run_id = _suspended_deploy(env, "v2.0.0")
    iid = _release_mr(fake, "v2.0.0")
    assert "valid" in fake.notes(iid)[0].lower()
    fake.approve(iid, "bob")
    merged_at = time.time()
    merge_commit = fake.merge(iid, user="alice")  # a person merges in GitLab: the hook resumes the run
    run = final_run(env, run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert main_head(env) == merge_commit
    out = run_logs(env, run_id)
    # The real merger (GitLab's merged_by) and approvers, not "GitLab".
    assert "approved by bob (by alice)" in out and "(by GitLab)" not in out, out
    assert registry_digest(env, "v2.0.0") in main_file(env, "overlays/eks/hello/kustomization.yaml")
    assert TOKEN not in out
    [(_, status)] = fake.hooks[0].deliveries
    assert status == 202
    print(f"merge event to the resumed run's first task: {_first_task_after(env, run_id, merged_at):.2f} s")


def test_a_close_whose_hook_was_lost_is_found_by_watch_waits(gitlab: tuple[FakeGitlab, Environment]) -> None:
    fake, env = gitlab
    release_app(env, "v2.1.0", page="<h1>hello 2.1.0</h1>\n")
    head = main_head(env)
    run_id = _suspended_deploy(env, "v2.1.0")
    fake.hooks[0].disabled = True  # the hook is lost: nothing tells twincd
    fake.close(_release_mr(fake, "v2.1.0"), user="dana")
    time.sleep(2)
    assert flow_run(env, run_id)["state"]["name"] == "Suspended"
    # Issue 16.4: a person's approval cannot overrule the forge: the CLI says the MR is closed.
    refused = twincd(env, "approve", "hello", "v2.1.0", "--approver", "erin")
    assert refused.returncode == 2 and "is already closed on GitLab: there is nothing to approve" in (
        refused.stderr
    ), refused.stdout + refused.stderr
    assert flow_run(env, run_id)["state"]["name"] == "Suspended"  # not resumed by the refusal
    found = twincd(env, "watch-waits")
    assert found.returncode == 0, found.stdout + found.stderr
    run = final_run(env, run_id)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert "was closed" in run["state"]["message"] and "nothing reached main" in run["state"]["message"]
    assert main_head(env) == head


def test_sequential_rollout_stops_before_the_second_cloud_and_reverts(stack_env: Environment) -> None:
    env = _variant(
        stack_env,
        "sequential",
        rollout={"strategy": "sequential", "order": ["eks", "aks"], "bake_seconds": 1},
    )
    # A short progress deadline, so the missing image fails the rollout in seconds.
    deployment = main_file(env, "base/hello/deployment.yaml").replace(
        "progressDeadlineSeconds: 60", "progressDeadlineSeconds: 3"
    )
    from tests.e2e.test_deploy import _push_to_main

    _push_to_main(env, "base/hello/deployment.yaml", deployment, "short progress deadline")
    before = {c: main_file(env, f"overlays/{c}/hello/kustomization.yaml") for c in ("eks", "aks")}
    old_digest = registry_digest(env, "v2.0.0")
    release_app(env, "v3.0.0", page="<h1>hello 3.0.0</h1>\n")
    run_id = _suspended_deploy(env, "v3.0.0")
    new_digest = registry_digest(env, "v3.0.0")
    # Approved: the resumed run merges the first stage; `approve` follows it until the revert waits.
    first = subprocess.Popen(
        [*TWINCD, "--env", env.source, "approve", "hello", "v3.0.0", "--approver", "carol"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PREFECT_API_URL": env.prefect.api_url},
    )
    # The image vanishes from the registry once merged, before eks pulls it: the rollout must fail.
    wait_for(
        lambda: new_digest in main_file(env, "overlays/eks/hello/kustomization.yaml"), "the merge", poll=0.05
    )
    deleted = httpx.delete(
        f"http://{env.registries['local'].url}/v2/hello/manifests/{new_digest}",
        headers=registry_headers(env, "delete"),
    )
    assert deleted.status_code == 202, deleted.text
    waited, _ = first.communicate(timeout=240)
    assert first.returncode == 0 and "Suspended" in waited, waited
    assert "refs/heads/twincd/hello/v3.0.0-revert" in git_refs(local_repo_path(env, env.manifests.repo))
    reverted = approve(env, "hello", "v3.0.0", "--approver", "carol")
    out = reverted.stdout
    assert reverted.returncode == 1, out + reverted.stderr
    assert run_id_of(out) == run_id
    assert (
        "rollout failed on eks" in out and "ProgressDeadlineExceeded" in out or "timed out progressing" in out
    )
    assert "aks: not rolled out: an earlier stage failed" in out
    assert "rollback verified on every cluster" in out, out
    refs = git_refs(local_repo_path(env, env.manifests.repo))
    assert "refs/heads/twincd/hello/v3.0.0-aks" not in refs  # the second cloud was never touched
    for cluster in ("eks", "aks"):
        assert main_file(env, f"overlays/{cluster}/hello/kustomization.yaml") == before[cluster]
        assert old_digest in before[cluster]


def test_slack_tells_the_release_in_one_thread(stack_env: Environment) -> None:
    from tests.fakes.slack import start_fake_slack

    running = start_fake_slack(token="xoxb-e2e-secret")
    try:
        env = _variant(
            stack_env,
            "slack",
            notifier={
                "type": "slack",
                "channel": "#deploys",
                "token": "env:TWINCD_E2E_SLACK",
                "api_url": running.fake.api_url,
            },
        )
        release_app(env, "v2.2.0", page="<h1>hello 2.2.0</h1>\n")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "twincd.cli",
                "--env",
                env.source,
                "deploy",
                "hello",
                "v2.2.0",
                "--auto-approve",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "TWINCD_E2E_SLACK": "xoxb-e2e-secret"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        calls = running.fake.calls
        posts = [c for c in calls if c.method == "chat.postMessage"]
        parents = [c for c in posts if not c.thread_ts]
        assert len(parents) == 1  # one thread per release
        assert all(c.thread_ts == parents[0].ts for c in posts[1:])
        assert any(c.method == "chat.update" and c.ts == parents[0].ts for c in calls)  # updated in place
        final = running.fake.messages[(running.fake.channels["#deploys"], parents[0].ts)].text
        assert "hello" in final and "2.2.0" in final and "eks" in final and "aks" in final
        assert "xoxb-e2e-secret" not in result.stdout + result.stderr
    finally:
        running.stop()


def test_a_failed_apply_fails_its_cluster_only_and_the_release_is_reverted(stack_env: Environment) -> None:
    """`sync: apply` (no Argo CD): twincd applies the overlay itself. When the apply fails on one
    cluster, that cluster's verdict says so, the other clusters are still verified, and the release
    is reverted: one cluster's failure never stops the others' verification."""
    clusters = {name: c.model_dump(exclude_none=True) for name, c in stack_env.clusters.items()}
    # A kubeconfig context that does not exist: every apply to eks is refused before any request.
    clusters["eks"] = {**clusters["eks"], "sync": "apply", "context": "sandbox-nowhere"}
    clusters["eks"].pop("argocd", None)
    env = _variant(stack_env, "apply", clusters=clusters)
    before = main_file(env, "overlays/aks/hello/kustomization.yaml")
    release_app(env, "v3.1.0", page="<h1>hello 3.1.0</h1>\n")
    result = twincd(env, "deploy", "hello", "v3.1.0", "--auto-approve")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "rollout failed on eks: apply failed:" in out and "sandbox-nowhere" in out, out
    assert "verified on aks" in out, out  # aks was verified although eks's apply failed first
    assert "reverted by" in out and "rollback NOT verified: eks: apply failed" in out, out
    assert main_file(env, "overlays/aks/hello/kustomization.yaml") == before  # the revert landed


def test_a_failed_revert_is_told_beside_the_failed_rollout(stack_env: Environment) -> None:
    """Issue 16.2: when the revert fails too, the message still gives every cluster's result, what
    was merged, that nothing was reverted, and how to revert by hand."""
    clusters = {name: c.model_dump(exclude_none=True) for name, c in stack_env.clusters.items()}
    clusters["eks"] = {**clusters["eks"], "sync": "apply", "context": "sandbox-nowhere"}
    clusters["eks"].pop("argocd", None)
    env = _variant(stack_env, "apply", clusters=clusters)
    repo = local_repo_path(env, env.manifests.repo)
    # A branch named like a directory of the revert branch: git cannot create the revert branch
    # ("refs/heads/…-revert/held' exists; cannot create 'refs/heads/…-revert'"), so the revert fails.
    main = main_head(env)
    subprocess.run(["git", "-C", str(repo), "branch", "twincd/hello/v3.2.0-revert/held", main], check=True)
    release_app(env, "v3.2.0", page="<h1>hello 3.2.0</h1>\n")
    result = twincd(env, "deploy", "hello", "v3.2.0", "--auto-approve")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "rollout failed on eks: apply failed:" in out and "verified on aks" in out, out
    merged = main_head(env)
    assert "merged into main: !" in out and f"as {merged[:12]}" in out, out  # the release stays on main
    assert "the revert FAILED: git push" in out and "no revert MR was opened" in out, out
    assert f"revert by hand: `git revert -m 1 {merged[:12]}` on main" in out, out
    assert registry_digest(env, "v3.2.0") in main_file(env, "overlays/aks/hello/kustomization.yaml")


@pytest.mark.parametrize(
    ("merge_method", "squash_option", "pipelines", "tag"),
    [("ff", "default_off", False, "v2.0.1"), ("ff", "always", True, "v2.0.2")],
    ids=["fast-forward", "squash-ff-pipeline-must-succeed"],
)
# Last in this module: the tests above expect v2.0.0 to be the release main holds.
def test_gitlab_auto_approved_deploy_verifies_the_commit_the_target_got(
    gitlab: tuple[FakeGitlab, Environment], merge_method: str, squash_option: str, pipelines: bool, tag: str
) -> None:
    """twincd merges through GitLab's API as GitLab behaves: mergeability checked asynchronously,
    a required pipeline (auto-merge), fast-forward or squash; the clusters verify the commit the
    target branch got, which is no merge commit here."""
    fake, env = gitlab
    fake.check_gets, fake.merge_method, fake.squash_option = 2, merge_method, squash_option
    fake.pipelines = fake.only_allow_merge_if_pipeline_succeeds = pipelines
    # The pipeline runs on past GitLab's mergeability check (4 GETs): twincd sets auto-merge.
    fake.pipeline_gets = 3
    release_app(env, tag, page=f"<h1>hello {tag}</h1>\n")
    before = main_head(env)
    result = subprocess.run(
        [sys.executable, "-m", "twincd.cli", "--env", env.source, "deploy", "hello", tag, "--auto-approve"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TWINCD_E2E_GITLAB_TOKEN": TOKEN},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    iid = _release_mr(fake, tag)
    mr = fake.mrs[iid]
    head = main_head(env)
    assert mr.state == "merged" and mr.merge_commit_sha is None  # fast-forward: no merge commit
    if squash_option == "always":
        assert head == mr.squash_commit_sha and head != mr.sha
        assert mr.events == [f"auto-merge:{DEFAULT_USER}", f"merged:{DEFAULT_USER}:ff+squash"]
    else:
        assert head == mr.sha and mr.events == [f"merged:{DEFAULT_USER}:ff"]
    assert git_parents(env, head)[0] == before
    assert registry_digest(env, tag) in main_file(env, "overlays/eks/hello/kustomization.yaml")
    assert f"merged as {head[:12]}" in out, out
    for cluster in ("eks", "aks"):  # the clusters verified the commit the target got
        assert f'Application "hello-{cluster}" Synced and Healthy at {head[:7]}' in out, out
    assert "Release succeeded" in out, out
    calls = fake.calls()
    kinds: dict[str, int] = {}
    for method, path, status in calls:
        key = f"{method} {_endpoint(path)} {status}"
        kinds[key] = kinds.get(key, 0) + 1
    print(f"GitLab API calls of one deploy ({merge_method}, squash {squash_option}, pipelines {pipelines}):")
    print(f"  {len(calls)} in all: " + "; ".join(f"{k} x{n}" for k, n in kinds.items()))
    assert TOKEN not in out


def test_gitlab_approval_rules_stop_an_auto_approved_deploy_clearly(
    gitlab: tuple[FakeGitlab, Environment],
) -> None:
    """The project wants two approvals: twincd does not get round it; it says what is missing."""
    fake, env = gitlab
    fake.approvals_required = 2
    release_app(env, "v2.0.3", page="<h1>hello v2.0.3</h1>\n")
    before = main_head(env)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twincd.cli",
            "--env",
            env.source,
            "deploy",
            "hello",
            "v2.0.3",
            "--auto-approve",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TWINCD_E2E_GITLAB_TOKEN": TOKEN},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "needs 2 more approvals (2 required" in out and "Approve it in GitLab" in out, out
    assert main_head(env) == before  # nothing merged
    assert fake.mrs[_release_mr(fake, "v2.0.3")].state == "opened"
    assert not [c for c in fake.calls("PUT") if c[1].endswith("/merge")]


def _argv_sampler(stop: threading.Event, seen: set[str]) -> None:
    """Every process's command line while ``stop`` is not set (what `ps` shows to any user)."""
    while not stop.is_set():
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                seen.add(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue  # the process ended meanwhile
        time.sleep(0.05)


def _prefect_records(env: Environment) -> str:
    """Every log record, artifact, flow run (parameters, state messages), task run and run input."""
    api = env.prefect.api_url
    texts = []
    for what in ("logs", "artifacts", "flow_runs", "task_runs"):
        offset = 0
        while True:
            page = httpx.post(f"{api}/{what}/filter", json={"limit": 200, "offset": offset}, timeout=30)
            assert page.status_code == 200, page.text
            texts.append(page.text)
            if len(page.json()) < 200:
                break
            offset += 200
    runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200}, timeout=30).json()
    assert len(runs) < 200  # one page holds every run of the test stack
    for run in runs:
        # The server answers one input unless asked for more (api/flow_runs.py: limit=1).
        inputs = httpx.post(
            f"{api}/flow_runs/{run['id']}/input/filter", json={"prefix": "", "limit": 1000}, timeout=30
        )
        texts.append(inputs.text)
    return "\n".join(texts)


def test_no_known_secret_appears_anywhere(gitlab: tuple[FakeGitlab, Environment]) -> None:
    """Issue 16.6: a release through GitLab and Slack with every secret known; each is looked for in
    every log, artifact, state message, run input, chat message, MR, git config, daemon log and in
    the process list sampled while it ran."""
    from tests.fakes.slack import start_fake_slack
    from twincd.sandbox.stack import sandbox_secrets

    fake, gitlab_env = gitlab
    slack_token = "xoxb-e2e-known-secret-1234567890"
    running = start_fake_slack(token=slack_token)
    stop, argv = threading.Event(), set[str]()
    sampler = threading.Thread(target=_argv_sampler, args=(stop, argv), daemon=True)
    try:
        env = _variant(
            gitlab_env,
            "secrets",
            notifier={
                "type": "slack",
                "channel": "#deploys",
                "token": "env:TWINCD_E2E_SLACK",
                "api_url": running.fake.api_url,
            },
        )
        sandbox = sandbox_secrets(env)
        secrets = {
            "GitLab token": TOKEN,
            "Slack token": slack_token,
            "webhook secret": HOOK_TOKEN,
            "git token": sandbox["TWINCD_GIT_TOKEN"],
            "registry password": sandbox["TWINCD_REGISTRY_PASSWORD"],
            "TSIG key": sandbox["TWINCD_DNS_TSIG"].rsplit(":", 1)[-1],
        }
        release_app(env, "v11.0.0", page="<h1>hello 11.0.0</h1>\n")
        sampler.start()
        result = twincd(env, "deploy", "hello", "v11.0.0", "--auto-approve", TWINCD_E2E_SLACK=slack_token)
        stop.set()
        sampler.join()
        assert result.returncode == 0, result.stdout + result.stderr
        chat = [c.text + json.dumps(c.blocks) for c in running.fake.calls]
        assert len(chat) >= 3  # the release was told: there is chat to search
        mrs = [m.title + m.description + json.dumps(m.notes) for m in fake.mrs.values()]
        state = env.state_path
        git_configs = [
            p.read_text(errors="replace")
            for p in state.rglob("config")
            if p.parent.name.endswith(".git") or p.parent.name == ".git"
        ]
        git_configs.append(
            subprocess.run(["git", "config", "--global", "--list"], capture_output=True, text=True).stdout
        )
        daemon_logs = [p.read_text(errors="replace") for p in state.rglob("*.log")]
        places = {
            "the CLI's output": result.stdout + result.stderr,
            "Prefect (logs, artifacts, runs, inputs)": _prefect_records(env),
            "chat": "\n".join(chat),
            "merge requests": "\n".join(mrs),
            "git config": "\n".join(git_configs),
            "daemon logs": "\n".join(daemon_logs),
            "the process list": "\n".join(argv),
        }
        assert len(argv) > 20 and git_configs and daemon_logs
        hits = [
            f"{name} in {where}"
            for name, value in secrets.items()
            for where, text in places.items()
            if value in text
        ]
        assert all(len(v) >= 16 for v in secrets.values()), secrets.keys()
        assert hits == [], hits
    finally:
        stop.set()
        running.stop()


def test_gitlab_5xx_and_429_bursts_during_open_and_merge(gitlab: tuple[FakeGitlab, Environment]) -> None:
    """Issue 16.8: GitLab answers bursts of 502, 429 (Retry-After) and 503 while the MR is opened
    and merged: the release goes through with one MR and one merge."""
    fake, env = gitlab
    release_app(env, "v5.1.0", page="<h1>hello 5.1.0</h1>\n")
    fake.fail_next(502, 2)
    fake.fail_next(429, 2, retry_after="1")
    deploying = subprocess.Popen(
        [*TWINCD, "--env", env.source, "deploy", "hello", "v5.1.0", "--auto-approve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PREFECT_API_URL": env.prefect.api_url},
    )
    _release_mr(fake, "v5.1.0")
    fake.fail_next(503, 3)  # the next burst hits the validation note, the approvals and the merge
    out, _ = deploying.communicate(timeout=300)
    assert deploying.returncode == 0 and "Release succeeded" in out, out
    mrs = [m for m in fake.mrs.values() if m.source_branch == "twincd/hello/v5.1.0"]
    assert len(mrs) == 1 and mrs[0].state == "merged", [(m.iid, m.state) for m in mrs]
    merges = subprocess.run(
        [
            "git",
            "-C",
            str(local_repo_path(env, env.manifests.repo)),
            "log",
            "--merges",
            "--format=%s",
            "main",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert merges.count("Merge branch 'twincd/hello/v5.1.0'") == 1
    assert registry_digest(env, "v5.1.0") in main_file(env, "overlays/eks/hello/kustomization.yaml")


def test_a_failover_with_gitlab_waits_for_people_to_merge_each_switch_there(
    gitlab: tuple[FakeGitlab, Environment],
) -> None:
    """Issue 15.6: no Prefect form; each switch is a GitLab MR people approve and merge, the run
    suspended meanwhile; the merge resumes it and the failover goes on from where it waited."""
    from twincd.adapters.dns import Rfc2136, Tsig
    from twincd.sandbox import dns as sandbox_dns

    fake, env = gitlab
    assert env.dns.type == "rfc2136"
    # The stack's BIND, with the stack's key; a short TTL so that the TTL wait stays short.
    dns = Rfc2136(
        server=env.dns.server, zone=env.dns.zone, key=Tsig.parse(sandbox_dns.ensure_key(env.state_path))
    )
    dns.replace_a("web", ["127.0.0.11", "127.0.0.12"], ttl=2)
    env = _variant(env, "gitlab-failover", dns={**env.dns.model_dump(), "ttl": 2})
    started = twincd(env, "failover", "--to", "aks", "--reason", "e2e: AWS maintenance through GitLab")
    out = started.stdout + started.stderr
    assert started.returncode == 0 and "Suspended" in out, out
    run_id = run_id_of(out)
    assert "each switch below is a merge request to approve and merge on GitLab" in out
    # DNS moved (behind the health gate) and the old TTL ran out before the demotion was asked for.
    assert dns.read("web").ips == {"127.0.0.12"}
    [mr] = [m for m in fake.mrs.values() if m.source_branch.startswith("twincd/failover/active-standby-aks-")]
    assert mr.source_branch.endswith("/demote") and mr.state == "opened"
    assert flow_run_processes(run_id) == []  # nothing runs while people review
    fake.approve(mr.iid, "bob")
    fake.merge(mr.iid, user="alice")  # the Merge Request Hook resumes the run
    run = final_run(env, run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    # A run's process ships its logs in batches (PREFECT_LOGGING_TO_API_BATCH_INTERVAL, 2 s): the
    # last ones may reach the API after the final state does.
    wait_for(lambda: "step 4 of 4 done" in run_logs(env, run_id), "the run's last log lines", 30)
    logs = run_logs(env, run_id)
    assert "merged as" in logs and "by alice" in logs and "approved by bob" in logs, logs
    assert "Resumed: carrying out the plan made before the wait" in logs
    assert "components/standby" in main_file(env, "overlays/eks/hello/kustomization.yaml")
    # Back, in an emergency: twincd merges on GitLab itself, still through MRs that say why.
    back = twincd(env, "failover", "--active-active", "--reason", "e2e: back", "--emergency", timeout=600)
    assert back.returncode == 0, back.stdout + back.stderr
    assert dns.read("web").ips == {"127.0.0.11", "127.0.0.12"}
    assert "components/active" in main_file(env, "overlays/eks/hello/kustomization.yaml")

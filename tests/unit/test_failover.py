"""Failover planning rules: each transition per app, evacuation, constraints, health gating, the TTL
wait, and the no-op plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from twincd.errors import PermanentError
from twincd.failover import (
    AppState,
    Constraint,
    FailoverPlan,
    Health,
    HealthGate,
    HealthGateFailed,
    Overlay,
    PlanError,
    Record,
    ReplaceRecord,
    Role,
    SwitchComponents,
    Target,
    Topology,
    WaitTtl,
    branch_name,
    check_record_change,
    component_path,
    consecutive,
    gate,
    plan_failover,
    role_of,
    switch_edit,
)

EKS, AKS = "127.0.0.11", "127.0.0.12"
EKS_B = "127.0.0.21"  # eks's second ingress IP (an NLB has one per availability zone)
CLUSTERS = ("eks", "aks")


def app(
    name: str,
    eks: Role,
    aks: Role,
    record: set[str] | None,
    *,
    ttl: int | None = 60,
    constraint: Constraint | None = None,
) -> AppState:
    overlays = tuple(
        Overlay(c, name, f"overlays/{c}/{name}/kustomization.yaml", role)
        for c, role in (("eks", eks), ("aks", aks))
    )
    records = () if record is None else (Record(name, f"{name}.example.test", frozenset(record), ttl, 30),)
    return AppState(name, overlays, records, constraint)


def topology(
    *apps: AppState, eks_ips: tuple[str, ...] = (EKS,), aks_ips: tuple[str, ...] = (AKS,)
) -> Topology:
    return Topology(CLUSTERS, (("eks", eks_ips), ("aks", aks_ips)), apps)


def web(eks: Role, aks: Role, record: set[str] | None) -> Topology:
    return topology(app("web", eks, aks, record))


ON_AKS = {"eks": "aks", "aks": "aks"}  # one Argo CD, on aks, syncs both (the reference setup)
LEDGER_ONLY_AS = Constraint("active-standby", "cross-cloud DB latency")


def steps(plan: FailoverPlan) -> list[str]:
    out = []
    for a in plan.actions:
        if isinstance(a, SwitchComponents):
            out.append(f"{a.step}:{','.join(f'{o.app}@{o.cluster}' for o in a.overlays)}")
        elif isinstance(a, HealthGate):
            out.append(f"health:{','.join(f'{x}@{c}' for x, c in a.checks)}")
        elif isinstance(a, WaitTtl):
            out.append(f"ttl:{a.seconds}{':skip' if a.skip else ''}")
        else:
            assert isinstance(a, ReplaceRecord)
            out.append(f"dns:{a.app}:{','.join(sorted(a.new))}")
    return out


def healthy(
    *checks: tuple[str, str], sick: tuple[tuple[str, str], ...] = ()
) -> dict[tuple[str, str], Health]:
    return {
        **{k: Health(k[0], k[1], True, ("ok",)) for k in checks},
        **{k: Health(k[0], k[1], False, ("API server unreachable",)) for k in sick},
    }


def test_active_active_to_standby_gates_dns_waits_the_old_ttl_then_demotes() -> None:
    plan = plan_failover(web("active", "active", {EKS, AKS}), Target("active-standby", "aks"))
    assert steps(plan) == ["health:web@aks", f"dns:web:{AKS}", "ttl:60", "demote:web@eks"]
    demote = plan.actions[-1]
    assert isinstance(demote, SwitchComponents) and demote.role == "standby"
    assert [o.file for o in demote.overlays] == ["overlays/eks/web/kustomization.yaml"]
    record = plan.actions[1]
    assert isinstance(record, ReplaceRecord) and record.ttl == 30  # the configured TTL is written


def test_the_ttl_wait_is_the_old_sets_ttl_as_read_and_emergency_skips_it_visibly() -> None:
    current = web("active", "active", {EKS, AKS})
    slow = topology(app("web", "active", "active", {EKS, AKS}, ttl=300))
    assert steps(plan_failover(slow, Target("active-standby", "aks")))[2] == "ttl:300"
    plan = plan_failover(current, Target("active-standby", "aks"), emergency=True)
    assert steps(plan)[2] == "ttl:60:skip"
    assert "**TTL wait** skipped (emergency)" in plan.markdown(emergency=True)
    # No IP leaves the record: no resolver can send clients to a demoted side, no wait.
    grow = plan_failover(web("standby", "active", {AKS}), Target("active-active"))
    assert not any(isinstance(a, WaitTtl) for a in grow.actions)


def test_standby_to_active_active_promotes_first_then_gates_then_dns() -> None:
    plan = plan_failover(web("standby", "active", {AKS}), Target("active-active"))
    assert steps(plan) == ["promote:web@eks", "health:web@eks,web@aks", f"dns:web:{EKS},{AKS}"]


def test_moving_the_active_side_promotes_gates_dns_waits_then_demotes_in_that_printed_order() -> None:
    plan = plan_failover(web("standby", "active", {AKS}), Target("active-standby", "eks"))
    assert steps(plan) == ["promote:web@eks", "health:web@eks", f"dns:web:{EKS}", "ttl:60", "demote:web@aks"]
    md = plan.markdown(reason="AKS region outage")
    assert "# Failover: active-standby-eks" in md and "Reason: AKS region outage" in md
    assert (
        md.index("**promote** eks")
        < md.index("**health gate** web on eks")
        < md.index("**dns**")
        < md.index("**TTL wait** 60 s")
        < md.index("**demote** aks")
    )
    assert "- **web**: eks standby, aks active; web.example.test: 127.0.0.12 → active-standby on eks" in md


def test_already_at_target_is_a_noop() -> None:
    for current, target in [
        (web("active", "active", {EKS, AKS}), Target("active-active")),
        (web("standby", "active", {AKS}), Target("active-standby", "aks")),
    ]:
        plan = plan_failover(current, target)
        assert plan.noop and plan.actions == ()
        assert "Already at the target: nothing to do." in plan.markdown()


def test_dns_drift_alone_is_repaired_behind_a_health_gate() -> None:
    # Overlays already at the target but someone edited the record by hand.
    plan = plan_failover(web("active", "active", {EKS}), Target("active-active"))
    assert steps(plan) == ["health:web@eks,web@aks", f"dns:web:{EKS},{AKS}"]


def test_every_ingress_ip_of_a_serving_cluster_is_published() -> None:
    current = topology(app("web", "standby", "active", {AKS}), eks_ips=(EKS, EKS_B))
    plan = plan_failover(current, Target("active-active"))
    assert steps(plan)[-1] == f"dns:web:{EKS},{AKS},{EKS_B}"
    # Already holding every IP: nothing to do for DNS; holding one of eks's two: repaired.
    assert plan_failover(
        topology(app("web", "active", "active", {EKS, EKS_B, AKS}), eks_ips=(EKS, EKS_B)),
        Target("active-active"),
    ).noop
    part = plan_failover(
        topology(app("web", "active", "active", {EKS, AKS}), eks_ips=(EKS, EKS_B)), Target("active-active")
    )
    assert steps(part) == ["health:web@eks,web@aks", f"dns:web:{EKS},{AKS},{EKS_B}"]


def test_apps_are_planned_alone_or_together_each_with_its_own_record() -> None:
    current = topology(app("web", "active", "active", {EKS, AKS}), app("api", "active", "active", {EKS, AKS}))
    one = plan_failover(current, Target("active-standby", "aks", apps=("api",)))
    assert steps(one) == ["health:api@aks", f"dns:api:{AKS}", "ttl:60", "demote:api@eks"]
    assert [c.app for c in one.changes] == ["api"] and one.target.label == "api-active-standby-aks"
    both = plan_failover(current, Target("active-standby", "aks"))
    assert steps(both) == [
        "health:web@aks,api@aks",
        f"dns:web:{AKS}",
        f"dns:api:{AKS}",
        "ttl:60",
        "demote:web@eks,api@eks",  # one switch (one MR) for every app
    ]
    with pytest.raises(PlanError, match="unknown app 'shop'"):
        plan_failover(current, Target("active-active", apps=("shop",)))


def test_evacuation_promotes_standby_apps_on_the_other_side_and_narrows_active_active_ones() -> None:
    current = topology(
        app("web", "active", "active", {EKS, AKS}),
        app("ledger", "standby", "active", {AKS}, constraint=LEDGER_ONLY_AS),
        app("batch", "active", "standby", {EKS}),  # already off aks: untouched
    )
    plan = plan_failover(current, Target(evacuate=("aks",)))
    assert plan.target.label == "evacuate-aks"
    assert steps(plan) == [
        "promote:ledger@eks",
        "health:web@eks,ledger@eks",
        f"dns:web:{EKS}",
        f"dns:ledger:{EKS}",
        "ttl:60",
        "demote:web@aks,ledger@aks",
    ]
    assert [(c.app, c.target) for c in plan.changes] == [
        ("web", "active-standby on eks"),
        ("ledger", "active-standby on eks"),  # the constraint is kept
        ("batch", "active-standby on eks"),
    ]
    md = plan.markdown()
    assert "constraint: only active-standby: cross-cloud DB latency" in md and "BROKEN" not in md


def test_breaking_a_constraint_is_refused_unless_forced_and_the_plan_says_why() -> None:
    current = topology(app("ledger", "standby", "active", {AKS}, constraint=LEDGER_ONLY_AS))
    with pytest.raises(PlanError, match=r"ledger must stay active-standby \(cross-cloud DB latency\)"):
        plan_failover(current, Target("active-active"))
    plan = plan_failover(current, Target("active-active"), force=True)
    assert "only active-standby: cross-cloud DB latency (BROKEN by --force)" in plan.markdown()
    # Moving the active side keeps the constraint: no force needed.
    assert steps(plan_failover(current, Target("active-standby", "eks")))[0] == "promote:ledger@eks"
    only_aa = topology(
        app("web", "active", "active", {EKS, AKS}, constraint=Constraint("active-active", "SLA"))
    )
    with pytest.raises(PlanError, match="web must stay active-active"):
        plan_failover(only_aa, Target(evacuate=("aks",)))


def test_mixed_overlays_switch_only_those_not_yet_switched() -> None:
    mixed = AppState(
        "web",
        (
            Overlay("eks", "web", "overlays/eks/web/kustomization.yaml", "standby"),
            Overlay("aks", "web", "overlays/aks/web/kustomization.yaml", "unknown"),
        ),
        (Record("web", "web.example.test", frozenset({AKS}), 60, 60),),
    )
    plan = plan_failover(topology(mixed), Target("active-active"))
    promote = plan.actions[0]
    assert isinstance(promote, SwitchComponents)
    assert [o.file for o in promote.overlays] == [
        "overlays/eks/web/kustomization.yaml",
        "overlays/aks/web/kustomization.yaml",
    ]
    assert mixed.role("aks") == "unknown"


def test_dns_none_plans_no_record_change_and_says_so() -> None:
    plan = plan_failover(web("active", "active", None), Target("active-standby", "eks"))
    assert steps(plan) == ["health:web@eks", "demote:web@aks"]
    assert "web: DNS is not managed by twincd" in plan.markdown() and "eks (127.0.0.11)" in plan.markdown()


def test_bad_targets_are_refused() -> None:
    current = web("active", "active", {EKS, AKS})
    with pytest.raises(PlanError, match="unknown cluster\\(s\\) 'gke'; known: eks, aks"):
        plan_failover(current, Target("active-standby", "gke"))
    with pytest.raises(PlanError, match="takes no active cluster"):
        plan_failover(current, Target("active-active", "eks"))
    with pytest.raises(PlanError, match="leaves nothing to serve"):
        plan_failover(current, Target(evacuate=("eks", "aks")))
    with pytest.raises(PlanError, match="aks have no ingress IP"):
        plan_failover(
            topology(app("web", "active", "active", {EKS}), aks_ips=()), Target("active-standby", "aks")
        )


def test_gate_never_publishes_an_unhealthy_cluster() -> None:
    plan = plan_failover(web("standby", "active", {AKS}), Target("active-active"))
    with pytest.raises(HealthGateFailed, match=r"health gate failed \(web on eks: API server unreachable\)"):
        gate(plan, healthy(("web", "aks"), sick=(("web", "eks"),)))
    with pytest.raises(HealthGateFailed, match="web on eks: not checked"):
        gate(plan, healthy(("web", "aks")))
    gate(plan, healthy(("web", "eks"), ("web", "aks")))


def test_never_remove_the_last_healthy_ip() -> None:
    # Moving to eks while only aks is healthy: the gate stops it before the record loses aks.
    plan = plan_failover(web("active", "active", {EKS, AKS}), Target("active-standby", "eks"))
    with pytest.raises(HealthGateFailed, match="web on eks"):
        gate(plan, healthy(("web", "aks"), sick=(("web", "eks"),)))
    # The record check on its own, as the last line of defence before the write.
    old = frozenset({EKS, AKS})
    forged = ReplaceRecord("web", "web", "web.example.test", old, frozenset({EKS}), 60)
    with pytest.raises(HealthGateFailed, match="refusing to publish 127.0.0.11"):
        check_record_change(plan, forged, healthy(("web", "aks"), sick=(("web", "eks"),)))
    empty = ReplaceRecord("web", "web", "web.example.test", old, frozenset(), 60)
    with pytest.raises(HealthGateFailed, match="refusing to remove the last IP"):
        check_record_change(plan, empty, healthy(("web", "aks")))
    unknown = ReplaceRecord("web", "web", "web.example.test", old, frozenset({"127.0.0.99"}), 60)
    with pytest.raises(HealthGateFailed, match="refusing to publish 127.0.0.99"):
        check_record_change(plan, unknown, healthy(("web", "aks")))
    # Another app's health is not this app's.
    with pytest.raises(HealthGateFailed, match="refusing to publish 127.0.0.11"):
        check_record_change(plan, forged, healthy(("api", "eks"), ("web", "aks")))


def test_consecutive_needs_a_streak_and_stops_when_it_can_no_longer_be_reached() -> None:
    answers = iter([True, False, True, True, True])
    slept: list[float] = []
    ok, seen = consecutive(
        lambda: (next(answers), "GET"), successes=3, attempts=5, interval=1, sleep=slept.append
    )
    assert ok and seen == "GET (3 in a row)" and len(slept) == 4
    calls: list[int] = []

    def sick() -> tuple[bool, str]:
        calls.append(1)
        return False, "HTTP 308"

    ok, seen = consecutive(sick, successes=3, attempts=10, interval=0, sleep=lambda s: None)
    assert not ok and seen == "HTTP 308 (0 of 3 healthy answers in a row within 10 tries)"
    assert len(calls) == 8  # after the 8th failure, 2 tries cannot make 3 in a row


def test_roles_and_component_paths_follow_the_overlay_location() -> None:
    file = "overlays/eks/hello/kustomization.yaml"
    assert component_path(file, "active") == "../../../components/active"
    assert (
        role_of(
            "components:\n  - ../../../components/standby\n  - ../../../components/monitoring\n", file=file
        )
        == "standby"
    )
    assert role_of("components:\n  - ../../../components/active/\n", file=file) == "active"
    assert role_of("resources: [../../../base/hello]\n", file=file) == "unknown"
    overlay = Overlay("eks", "hello", file, "standby")
    assert switch_edit(overlay, "active") == (["../../../components/standby"], ["../../../components/active"])
    with pytest.raises(PlanError, match="not valid YAML"):
        role_of("components: [", file=file)


def test_branch_names_are_per_target_run_and_step() -> None:
    name = branch_name(Target("active-standby", "aks"), "1B2C3D4E-5f6a-7b8c", "promote")
    assert name == "twincd/failover/active-standby-aks-1b2c3d4e/promote"
    assert branch_name(Target(evacuate=("aks",)), "ab", "demote") == "twincd/failover/evacuate-aks-ab/demote"


# ---- health and role judgements (pure; the tasks read the cluster and hand the objects over) ----


def _deployment(replicas: int | None, available: int | None) -> dict[str, object]:
    spec = {} if replicas is None else {"replicas": replicas}
    status = {} if available is None else {"availableReplicas": available}
    return {"spec": spec, "status": status}


def test_workload_health_needs_the_workload_at_full_replicas() -> None:
    from twincd.failover import workload_health

    what = "Deployment hello/hello"
    ok = workload_health("hello", "aks", what, _deployment(2, 2))
    assert ok == Health("hello", "aks", True, ("Deployment hello/hello: 2/2 replicas available",))
    short = workload_health("shop", "aks", "Deployment shop/web", _deployment(3, 1))
    assert not short.healthy and short.checks == ("Deployment shop/web 1/3 replicas available",)
    missing = workload_health("hello", "eks", what, None)
    assert missing.checks == ("Deployment hello/hello not found",) and not missing.healthy
    assert not workload_health("hello", "eks", what, _deployment(0, 0)).healthy  # a standby takes no traffic
    # spec.replicas defaults to 1, as the API server does
    assert workload_health("hello", "eks", what, _deployment(None, 1)).healthy


def test_a_failed_probe_makes_a_healthy_cluster_unhealthy() -> None:
    from twincd.failover import with_probe

    base = Health("hello", "aks", True, ("2/2 replicas available",))
    assert with_probe(base, "GET https://x/healthz: HTTP 200", True).healthy
    failed = with_probe(base, "GET https://x/healthz: HTTP 308", False)
    assert not failed.healthy and failed.checks[-1] == "GET https://x/healthz: HTTP 308"


def test_role_verdict_checks_the_replica_count_of_a_rolled_out_revision() -> None:
    from twincd.domain import Phase, RolloutVerdict
    from twincd.failover import role_verdict

    done = RolloutVerdict("eks", Phase.SUCCEEDED, "rolled out", ("d",))
    standby = role_verdict(done, app="hello", role="standby", replicas=0, revision="a" * 40)
    assert standby.phase is Phase.SUCCEEDED and standby.message == "hello: rolled out"
    wrong = role_verdict(done, app="hello", role="standby", replicas=2, revision="a" * 40)
    assert wrong.phase is Phase.FAILED
    assert wrong.message == "hello: spec.replicas is 2, expected 0 (standby) after aaaaaaaaaaaa"
    assert role_verdict(done, app="hello", role="active", replicas=0, revision="b" * 40).phase is Phase.FAILED
    failed = RolloutVerdict("eks", Phase.FAILED, "ImagePullBackOff")
    assert role_verdict(failed, app="hello", role="active", replicas=2, revision="c" * 40) is failed


def test_read_overlays_names_a_missing_overlay(tmp_path: Path) -> None:
    from twincd.failover import read_overlays

    (tmp_path / "overlays/eks/hello").mkdir(parents=True)
    (tmp_path / "overlays/eks/hello/kustomization.yaml").write_text(
        "resources: [../../../base/hello]\ncomponents: [../../../components/standby]\n"
    )
    files = {("eks", "hello"): "overlays/eks/hello/kustomization.yaml"}
    (overlay,) = read_overlays(tmp_path, repo="manifests.git", files=files)
    assert overlay == Overlay("eks", "hello", "overlays/eks/hello/kustomization.yaml", "standby")
    with pytest.raises(PermanentError, match="overlays/aks/hello/kustomization.yaml does not exist"):
        read_overlays(
            tmp_path, repo="manifests.git", files={("aks", "hello"): "overlays/aks/hello/kustomization.yaml"}
        )


def test_argo_cd_unreachable_switches_are_applied_directly_and_the_plan_says_so_first() -> None:
    current = topology(
        app("web", "active", "active", {EKS, AKS}),
        app("ledger", "standby", "active", {AKS}, constraint=LEDGER_ONLY_AS),
    )
    down = {"aks": "connection refused"}
    plan = plan_failover(current, Target(evacuate=("aks",)), unreachable=down, argocd=ON_AKS)
    promote, demote = plan.actions[0], plan.actions[-1]
    assert isinstance(promote, SwitchComponents) and promote.direct == ("eks",) and promote.unverified == ()
    assert isinstance(demote, SwitchComponents) and demote.direct == () and demote.unverified == ("aks",)
    md = plan.markdown()
    assert "Argo CD unreachable (it runs on aks): applying directly" in md
    assert "apply to eks directly (Argo CD unreachable)" in md
    assert "except on aks (unreachable: not verified now)" in md
    # Argo CD reachable (it runs on a cluster that answers): nothing is applied by twincd.
    normal = plan_failover(current, Target(evacuate=("aks",)), unreachable={}, argocd=ON_AKS)
    assert all(not a.direct for a in normal.actions if isinstance(a, SwitchComponents))


def test_promoting_on_an_unreachable_cluster_is_refused_before_anything_changes() -> None:
    current = topology(app("ledger", "standby", "active", {AKS}))
    with pytest.raises(
        PlanError, match=r"cannot promote on eks: its API server is unreachable \(timed out\)"
    ):
        plan_failover(
            current, Target("active-standby", "eks"), unreachable={"eks": "timed out"}, argocd=ON_AKS
        )

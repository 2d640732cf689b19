"""Failover planning rules: each transition, health gating, and the no-op plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from twincd.errors import PermanentError
from twincd.failover import (
    FailoverPlan,
    Health,
    HealthGate,
    HealthGateFailed,
    Overlay,
    PlanError,
    ReplaceRecord,
    Role,
    SwitchComponents,
    Target,
    Topology,
    branch_name,
    check_record_change,
    component_path,
    gate,
    plan_failover,
    role_of,
    switch_edit,
)

EKS, AKS = "127.0.0.11", "127.0.0.12"


def topology(eks: Role, aks: Role, record: set[str] | None, apps: tuple[str, ...] = ("hello",)) -> Topology:
    overlays = tuple(
        Overlay(c, a, f"overlays/{c}/{a}/kustomization.yaml", role)
        for c, role in (("eks", eks), ("aks", aks))
        for a in apps
    )
    return Topology(
        ("eks", "aks"),
        (("eks", EKS), ("aks", AKS)),
        overlays,
        None if record is None else frozenset(record),
        "web.example.test",
    )


def steps(plan: FailoverPlan) -> list[str]:
    out = []
    for a in plan.actions:
        if isinstance(a, SwitchComponents):
            out.append(f"{a.step}:{','.join(a.clusters)}")
        elif isinstance(a, HealthGate):
            out.append(f"health:{','.join(a.clusters)}")
        else:
            assert isinstance(a, ReplaceRecord)
            out.append(f"dns:{','.join(sorted(a.new))}")
    return out


def healthy(*clusters: str, sick: tuple[str, ...] = ()) -> dict[str, Health]:
    return {
        **{c: Health(c, True, ("ok",)) for c in clusters},
        **{c: Health(c, False, ("API server unreachable",)) for c in sick},
    }


def test_active_active_to_standby_promotes_nothing_gates_dns_then_demotes() -> None:
    plan = plan_failover(topology("active", "active", {EKS, AKS}), Target("active-standby", "aks"))
    assert steps(plan) == ["health:aks", f"dns:{AKS}", "demote:eks"]
    demote = plan.actions[-1]
    assert isinstance(demote, SwitchComponents) and demote.role == "standby"
    assert [o.file for o in demote.overlays] == ["overlays/eks/hello/kustomization.yaml"]


def test_standby_to_active_active_promotes_first_then_gates_then_dns() -> None:
    plan = plan_failover(topology("standby", "active", {AKS}), Target("active-active"))
    assert steps(plan) == ["promote:eks", "health:eks,aks", f"dns:{EKS},{AKS}"]


def test_moving_the_active_side_promotes_before_dns_and_demotes_after() -> None:
    plan = plan_failover(topology("standby", "active", {AKS}), Target("active-standby", "eks"))
    assert steps(plan) == ["promote:eks", "health:eks", f"dns:{EKS}", "demote:aks"]
    md = plan.markdown(reason="AKS region outage")
    assert "# Failover to active-standby-eks" in md and "Reason: AKS region outage" in md
    # The printed order is the execution order.
    assert (
        md.index("**promote** eks")
        < md.index("**health gate** eks")
        < md.index("**dns**")
        < md.index("**demote** aks")
    )
    assert "current: eks standby, aks active; web.example.test: 127.0.0.12" in md


def test_already_at_target_is_a_noop() -> None:
    for current, target in [
        (topology("active", "active", {EKS, AKS}), Target("active-active")),
        (topology("standby", "active", {AKS}), Target("active-standby", "aks")),
    ]:
        plan = plan_failover(current, target)
        assert plan.noop and plan.actions == ()
        assert "Already at the target: nothing to do." in plan.markdown()


def test_dns_drift_alone_is_repaired_behind_a_health_gate() -> None:
    # Overlays already at the target but someone edited the record by hand.
    plan = plan_failover(topology("active", "active", {EKS}), Target("active-active"))
    assert steps(plan) == ["health:eks,aks", f"dns:{EKS},{AKS}"]


def test_mixed_overlays_switch_only_those_not_yet_switched() -> None:
    current = Topology(
        ("eks", "aks"),
        (("eks", EKS), ("aks", AKS)),
        (
            Overlay("eks", "hello", "overlays/eks/hello/kustomization.yaml", "standby"),
            Overlay("eks", "api", "overlays/eks/api/kustomization.yaml", "active"),
            Overlay("aks", "hello", "overlays/aks/hello/kustomization.yaml", "active"),
            Overlay("aks", "api", "overlays/aks/api/kustomization.yaml", "unknown"),
        ),
        frozenset({AKS}),
        "web.example.test",
    )
    plan = plan_failover(current, Target("active-active"))
    promote = plan.actions[0]
    assert isinstance(promote, SwitchComponents)
    assert [o.file for o in promote.overlays] == [
        "overlays/eks/hello/kustomization.yaml",
        "overlays/aks/api/kustomization.yaml",
    ]
    assert current.role("eks") == "unknown"


def test_dns_none_plans_no_record_change_and_says_so() -> None:
    plan = plan_failover(topology("active", "active", None), Target("active-standby", "eks"))
    assert steps(plan) == ["health:eks", "demote:aks"]
    assert "not managed by twincd" in plan.markdown() and "eks (127.0.0.11)" in plan.markdown()


def test_bad_targets_are_refused() -> None:
    with pytest.raises(PlanError, match="one of eks, aks; got 'gke'"):
        plan_failover(topology("active", "active", {EKS, AKS}), Target("active-standby", "gke"))
    with pytest.raises(PlanError, match="takes no active cluster"):
        plan_failover(topology("active", "active", {EKS, AKS}), Target("active-active", "eks"))
    no_ip = Topology(
        ("eks", "aks"),
        (("eks", EKS), ("aks", None)),
        topology("active", "active", set()).overlays,
        frozenset({EKS}),
        "web",
    )
    with pytest.raises(PlanError, match="aks have no ingress_ip"):
        plan_failover(no_ip, Target("active-standby", "aks"))


def test_gate_never_publishes_an_unhealthy_cluster() -> None:
    plan = plan_failover(topology("standby", "active", {AKS}), Target("active-active"))
    with pytest.raises(HealthGateFailed, match=r"health gate failed for eks \(eks: API server unreachable\)"):
        gate(plan, healthy("aks", sick=("eks",)))
    with pytest.raises(HealthGateFailed, match="eks: not checked"):
        gate(plan, healthy("aks"))
    gate(plan, healthy("eks", "aks"))


def test_never_remove_the_last_healthy_ip() -> None:
    # Moving to eks while only aks is healthy: the gate stops it before the record loses aks.
    plan = plan_failover(topology("active", "active", {EKS, AKS}), Target("active-standby", "eks"))
    with pytest.raises(HealthGateFailed, match="health gate failed for eks"):
        gate(plan, healthy("aks", sick=("eks",)))
    # The record check on its own, as the last line of defence before the write.
    forged = FailoverPlan(
        plan.current,
        plan.target,
        ("eks",),
        (ReplaceRecord("web.example.test", frozenset({EKS, AKS}), frozenset({EKS})),),
    )
    with pytest.raises(HealthGateFailed, match="refusing to publish 127.0.0.11"):
        check_record_change(forged, healthy("aks", sick=("eks",)))
    empty = FailoverPlan(
        plan.current, plan.target, (), (ReplaceRecord("web.example.test", frozenset({AKS}), frozenset()),)
    )
    with pytest.raises(HealthGateFailed, match="refusing to remove the last IP"):
        check_record_change(empty, healthy("aks"))
    unknown = FailoverPlan(
        plan.current,
        plan.target,
        ("eks",),
        (ReplaceRecord("web.example.test", frozenset({AKS}), frozenset({"127.0.0.99"})),),
    )
    with pytest.raises(HealthGateFailed, match="the last healthy IP would go"):
        check_record_change(unknown, healthy("aks"))


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


# ---- health and role judgements (pure; the tasks read the cluster and hand the objects over) ----


def _deployment(replicas: int | None, available: int | None) -> dict[str, object]:
    spec = {} if replicas is None else {"replicas": replicas}
    status = {} if available is None else {"availableReplicas": available}
    return {"spec": spec, "status": status}


def test_workload_health_needs_every_workload_at_full_replicas() -> None:
    from twincd.failover import workload_health

    ok = workload_health("aks", [("hello", "Deployment hello/hello", _deployment(2, 2))])
    assert ok == Health("aks", True, ("hello: 2/2 replicas available",))
    short = workload_health(
        "aks",
        [
            ("hello", "Deployment hello/hello", _deployment(2, 2)),
            ("shop", "Deployment shop/web", _deployment(3, 1)),
            ("late", "Deployment late/web", None),  # not reached: the first failure ends the check
        ],
    )
    assert not short.healthy
    assert short.checks == (
        "hello: 2/2 replicas available",
        "shop: Deployment shop/web 1/3 replicas available",
    )
    missing = workload_health("eks", [("hello", "Deployment hello/hello", None)])
    assert missing.checks == ("hello: Deployment hello/hello not found",) and not missing.healthy
    scaled_down = workload_health("eks", [("hello", "Deployment hello/hello", _deployment(0, 0))])
    assert not scaled_down.healthy  # a standby takes no traffic
    defaulted = workload_health("eks", [("hello", "Deployment hello/hello", _deployment(None, 1))])
    assert defaulted.healthy  # spec.replicas defaults to 1, as the API server does


def test_a_failed_probe_makes_a_healthy_cluster_unhealthy() -> None:
    from twincd.failover import with_probe

    base = Health("aks", True, ("hello: 2/2 replicas available",))
    assert with_probe(base, "GET http://x/healthz: HTTP 200", True).healthy
    failed = with_probe(base, "GET http://x/healthz: HTTP 503", False)
    assert not failed.healthy and failed.checks[-1] == "GET http://x/healthz: HTTP 503"


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

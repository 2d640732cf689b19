"""`twincd seed`: a sample app repository and a manifests monorepo as bare git repos.

The app builds `FROM scratch` with a static busybox (no base image can be pulled here), and the
monorepo has the reference team's shape: `base/<app>`, `overlays/<cluster>/<app>` and the
`components/active|standby` that the failover flow switches. Idempotent: existing repos and
tags are left alone.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

CONTAINERFILE = """\
# A static busybox serving one page: no base image to pull.
FROM scratch
COPY busybox /bin/busybox
COPY index.html /www/index.html
EXPOSE 8080
ENTRYPOINT ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
"""

NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: {app}
"""

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {app}
  namespace: {app}
  labels:
    app.kubernetes.io/name: {app}
spec:
  replicas: 2
  progressDeadlineSeconds: 60
  selector:
    matchLabels:
      app.kubernetes.io/name: {app}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {app}
    spec:
      # Not twincd's images: a migration step and a metrics sidecar, pinned by tag by hand (as
      # teams do); validation warns about them, verification looks only at the {app} image.
      initContainers:
        - name: migrate
          image: busybox:1.36
          command: ["/bin/true"]
      containers:
        - name: {app}
          image: {app}
          ports:
            - containerPort: 8080
          envFrom:
            - secretRef:
                name: {app}-credentials
        - name: metrics
          image: prom/statsd-exporter:v0.27.1
          ports:
            - containerPort: 9102
"""

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: {app}
  namespace: {app}
spec:
  selector:
    app.kubernetes.io/name: {app}
  ports:
    - port: 80
      targetPort: 8080
"""

# Sealed with the key both clusters share; the ciphertext is a placeholder of the right shape.
SEALED_SECRET = """\
apiVersion: bitnami.com/v1alpha1
kind: SealedSecret
metadata:
  name: {app}-credentials
  namespace: {app}
spec:
  encryptedData:
    API_TOKEN: AgBy3i4OJSWK+PiTySYZZA9rO43cGDEq
  template:
    metadata:
      name: {app}-credentials
      namespace: {app}
"""

BASE_KUSTOMIZATION = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - namespace.yaml
  - deployment.yaml
  - service.yaml
  - sealedsecret.yaml
"""

OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
# {app} on {cluster}: the release image is pinned by digest under `images:` by twincd.
resources:
  - ../../../base/{app}

components:
  - ../../../components/{role}
"""

COMPONENT = """\
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
# {what}
patches:
  - target:
      kind: Deployment
    patch: |-
      - op: replace
        path: /spec/replicas
        value: {replicas}
"""


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        env={
            "GIT_AUTHOR_NAME": "twincd seed",
            "GIT_AUTHOR_EMAIL": "seed@twincd.local",
            "GIT_COMMITTER_NAME": "twincd seed",
            "GIT_COMMITTER_EMAIL": "seed@twincd.local",
            "PATH": "/usr/bin:/bin",
            "HOME": str(cwd),
        },
    ).stdout


def _publish(bare: Path, files: dict[str, str | Path], message: str, tag: str | None = None) -> None:
    """Create ``bare`` holding one commit of ``files`` on main (and ``tag``)."""
    with tempfile.TemporaryDirectory(prefix="twincd-seed-") as tmp:
        work = Path(tmp)
        _git(work, "init", "-q", "-b", "main")
        for rel, content in files.items():
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copy2(content, target)
            else:
                target.write_text(content)
        _git(work, "add", "-A")
        _git(work, "commit", "-q", "-m", message)
        if tag:
            _git(work, "tag", "-a", tag, "-m", f"release {tag}")
        bare.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
        _git(work, "push", "-q", str(bare), "main", *([tag] if tag else []))


def seed_app(bare: Path, *, app: str = "hello", tag: str = "v1.0.0") -> bool:
    """The sample app repository, tagged ``tag``. Returns False when it already existed."""
    if (bare / "HEAD").exists():
        return False
    _publish(
        bare,
        {
            "Containerfile": CONTAINERFILE,
            "busybox": BUSYBOX,
            "index.html": f"<h1>{app}</h1>\n",
        },
        f"{app}: first release",
        tag=tag,
    )
    return True


def manifests_files(
    *, apps: Mapping[str, Collection[str]] | Sequence[str], clusters: list[str]
) -> dict[str, str | Path]:
    """The monorepo's files; ``apps``: each app's serving clusters (a list: every cluster serves)."""
    serving = apps if isinstance(apps, Mapping) else {app: clusters for app in apps}
    files: dict[str, str | Path] = {
        "README.md": "# Manifests monorepo\n\nManaged by twincd: `base/<app>`, `overlays/<cluster>/<app>`, "
        "`components/{active,standby}`.\n",
        "components/active/kustomization.yaml": COMPONENT.format(what="Serving: full replicas.", replicas=2),
        "components/standby/kustomization.yaml": COMPONENT.format(
            what="Standby: scaled to zero, ready to be switched to active.", replicas=0
        ),
    }
    for app in serving:
        for name, text in [
            ("kustomization.yaml", BASE_KUSTOMIZATION),
            ("namespace.yaml", NAMESPACE),
            ("deployment.yaml", DEPLOYMENT),
            ("service.yaml", SERVICE),
            ("sealedsecret.yaml", SEALED_SECRET),
        ]:
            files[f"base/{app}/{name}"] = text.format(app=app)
        for cluster in clusters:
            role = "active" if cluster in serving[app] else "standby"
            files[f"overlays/{cluster}/{app}/kustomization.yaml"] = OVERLAY.format(
                app=app, cluster=cluster, role=role
            )
    return files


def seed_manifests(
    bare: Path, *, apps: Mapping[str, Collection[str]] | Sequence[str], clusters: list[str]
) -> bool:
    """The manifests monorepo. Returns False when it already existed."""
    if (bare / "HEAD").exists():
        return False
    _publish(bare, manifests_files(apps=apps, clusters=clusters), "Manifests monorepo: first layout")
    return True

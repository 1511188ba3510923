"""``distml k8s validate``: every manifest of a folder against the schemas the API server would use.

- Custom resources (Argo Workflow and WorkflowTemplate, TrainJob, ClusterTrainingRuntime, PyTorchJob,
  RayCluster, RayJob, InferenceService, ServiceMonitor, PrometheusRule) against the ``openAPIV3Schema`` of their
  upstream CRDs (a
  folder of CRD YAML files), each against its own CRD: a kind whose CRD is not in the folder is an error, never
  checked against a stand-in. The structural schema becomes a JSON Schema the way the API server reads it:
  unknown fields are errors (kubectl's default strict field validation), ``nullable``,
  ``x-kubernetes-int-or-string`` and ``x-kubernetes-preserve-unknown-fields`` are honoured; CEL rules
  (``x-kubernetes-validations``) are not evaluated.
- Core objects (ConfigMap, Deployment, RBAC...) against the Kubernetes OpenAPI schemas of the
  ``kubernetes-validate`` package, in its strict form (unknown fields are errors).
- Manifests inside an Argo resource step (``resource.manifest``) are parsed and validated too.
- Names and labels as the API server checks them; the kustomization's resources must exist; a RayJob's
  ``clusterSelector`` must name a RayCluster of the folder (KubeRay would wait for it forever).

Each problem names the file, the object, the field path and what is wrong.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distml.errors import UsageError

K8S_VERSION = "1.33"  # the Kubernetes API the core objects are checked against
CRDS_ENV = "DISTML_K8S_CRDS"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_MAX_ERRORS_PER_OBJECT = 10


@dataclass
class Problem:
    file: str
    obj: str  # Kind/name, and where it is embedded
    path: str  # the field path: spec.templates[3].resource.manifest
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.obj}: {self.path or '(object)'}: {self.message}"


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)  # "file: Kind/name (against what)"
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def find_crds(explicit: Path | None) -> Path:
    """The CRD folder: ``--crds``, else ``$DISTML_K8S_CRDS``, else ``../shared/k8s-crds`` or ``./k8s-crds``."""
    candidates = [explicit] if explicit else []
    if not explicit and os.environ.get(CRDS_ENV):
        candidates.append(Path(os.environ[CRDS_ENV]))
    if not candidates:
        candidates = [Path("../shared/k8s-crds"), Path("k8s-crds")]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    raise UsageError(
        f"no CRD schemas at {' or '.join(map(str, candidates))}",
        hint=f"pass --crds DIR (or set {CRDS_ENV}) with the upstream CRD YAML files; docs/kubernetes.md lists them",
    )


class Schemas:
    """The JSON schemas of the custom resources in a CRD folder, by (apiVersion, kind)."""

    def __init__(self, crd_dir: Path) -> None:
        self.crd_dir = crd_dir
        paths = sorted(crd_dir.glob("*.yaml"))
        stamp = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
        self.by_kind = dict(_load_crds(stamp))

    def custom(self, api_version: str, kind: str) -> tuple[dict[str, Any], str] | None:
        return self.by_kind.get((api_version, kind))


@functools.lru_cache(maxsize=4)
def _load_crds(stamp: tuple[tuple[str, int, int], ...]) -> dict[tuple[str, str], tuple[dict[str, Any], str]]:
    """Parse the CRD files named in ``stamp`` (path, mtime, size: a changed file is read again).

    Parsing megabytes of CRD YAML is most of a validation's time; a process that validates several folders
    against the same CRDs (the tests) reads them once.
    """
    by_kind: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for name, _, _ in stamp:
        path = Path(name)
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec.get("versions", []):
                raw = (version.get("schema") or {}).get("openAPIV3Schema")
                if raw is None:
                    continue
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                by_kind[key] = (structural_to_jsonschema(raw), f"CRD {path.name}")
    return by_kind


def structural_to_jsonschema(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema as JSON Schema, read the way the API server reads it."""
    if isinstance(node, list):
        return [structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in (
            "description",
            "format",
            "x-kubernetes-validations",
            "x-kubernetes-list-type",
            "x-kubernetes-list-map-keys",
            "x-kubernetes-map-type",
            "x-kubernetes-embedded-resource",
            "example",
            "externalDocs",
        ):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: structural_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = structural_to_jsonschema(value)
        elif key in ("nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        # The API server prunes unknown fields; kubectl (strict field validation, its default) rejects them.
        out["additionalProperties"] = False
    return out


def validate_dir(folder: Path, crd_dir: Path, k8s_version: str = K8S_VERSION) -> Report:
    """Check every ``*.yaml``/``*.yml``/``*.json`` file under ``folder``."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder", hint="distml k8s render --out DIR writes one")
    schemas = Schemas(crd_dir)
    report = Report()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))
    if not files:
        raise UsageError(f"{folder} holds no manifests (*.yaml)")
    clusters: set[str] = set()  # RayClusters of the folder, and the RayJobs' selected clusters
    selected: list[tuple[str, str, str]] = []
    for path in files:
        rel = str(path.relative_to(folder))
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
                report.checked.append(f"{rel}: JSON")
                continue
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except (yaml.YAMLError, ValueError) as exc:
            report.problems.append(Problem(rel, "(file)", "", f"does not parse: {exc}"))
            continue
        for i, doc in enumerate(docs):
            _check(doc, rel, f"document {i + 1}", "", schemas, k8s_version, report)
            _ray_refs(doc, rel, clusters, selected)
            if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
                for j, res in enumerate(doc.get("resources") or []):
                    if not (path.parent / res).exists():
                        report.problems.append(Problem(rel, "Kustomization", f"resources[{j}]", f"{res} not found"))
    for file, job, cluster in selected:
        if cluster not in clusters:
            where = "spec.clusterSelector.ray.io/cluster"
            report.problems.append(Problem(file, f"RayJob/{job}", where, f"no RayCluster {cluster!r} in {folder}"))
    return report


def _ray_refs(doc: Any, file: str, clusters: set[str], selected: list[tuple[str, str, str]]) -> None:
    """Note a RayCluster's name, or the cluster a RayJob selects (a RayJob with its own cluster selects none)."""
    if not isinstance(doc, dict) or not str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return
    meta: dict[str, Any] = doc["metadata"] if isinstance(doc.get("metadata"), dict) else {}
    spec: dict[str, Any] = doc["spec"] if isinstance(doc.get("spec"), dict) else {}
    if doc.get("kind") == "RayCluster":
        clusters.add(str(meta.get("name")))
    elif doc.get("kind") == "RayJob" and isinstance(spec.get("clusterSelector"), dict):
        name = meta.get("name") or f"{meta.get('generateName', '')}*"
        selected.append((file, str(name), str(spec["clusterSelector"].get("ray.io/cluster"))))


def _check(doc: Any, file: str, where: str, prefix: str, schemas: Schemas, k8s_version: str, report: Report) -> None:
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        report.problems.append(Problem(file, where, prefix, "not a Kubernetes object (needs apiVersion and kind)"))
        return
    api, kind = str(doc["apiVersion"]), str(doc["kind"])
    meta: dict[str, Any] = doc["metadata"] if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "?")
    obj = f"{kind}/{name}" + (" (embedded)" if prefix else "")
    if kind == "Kustomization":
        report.checked.append(f"{file}: Kustomization (its resources must exist)")
        return
    report.problems += [Problem(file, obj, _join(prefix, p), m) for p, m in _metadata_problems(meta)]
    custom = schemas.custom(api, kind)
    if custom is not None:
        schema, against = custom
        problems = list(_schema_problems(doc, schema))
    elif "." in api.split("/")[0] and api.split("/")[0] not in _CORE_GROUPS:
        report.problems.append(
            Problem(file, obj, _join(prefix, "apiVersion"), f"no schema for {api} {kind} (not in {schemas.crd_dir})")
        )
        return
    else:
        against = f"Kubernetes {k8s_version} OpenAPI (strict)"
        problems = _core_problems(doc, k8s_version)
    report.problems += [Problem(file, obj, _join(prefix, p), m) for p, m in problems[:_MAX_ERRORS_PER_OBJECT]]
    report.checked.append(
        f"{file}: {kind}/{name}" + (f" in {where} {prefix}" if prefix else "") + f" (against {against})"
    )
    for i, template in enumerate(
        ((doc.get("spec") or {}).get("templates") or []) if kind.startswith("Workflow") else []
    ):
        manifest = (template.get("resource") or {}).get("manifest") if isinstance(template, dict) else None
        if isinstance(manifest, str):
            at = f"spec.templates[{i}].resource.manifest"
            try:
                inner = [d for d in yaml.safe_load_all(manifest) if d is not None]
            except yaml.YAMLError as exc:
                report.problems.append(Problem(file, obj, at, f"does not parse: {exc}"))
                continue
            for d in inner:
                _check(d, file, f"{kind}/{name}", _join(prefix, at), schemas, k8s_version, report)


_CORE_GROUPS = {
    "rbac.authorization.k8s.io",
    "networking.k8s.io",
    "storage.k8s.io",
    "scheduling.k8s.io",
    "policy",
    "apps",
    "batch",
    "autoscaling",
    "coordination.k8s.io",
    "discovery.k8s.io",
}


def _schema_problems(doc: dict[str, Any], schema: dict[str, Any]) -> Iterator[tuple[str, str]]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        best = jsonschema.exceptions.best_match([error, *error.context]) if error.context else error
        yield _path(best.absolute_path), best.message


def _core_problems(doc: dict[str, Any], k8s_version: str) -> list[tuple[str, str]]:
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except SchemaNotFoundError as exc:
        return [("apiVersion", exc.message)]
    except jsonschema.ValidationError as exc:
        return [(_path(exc.absolute_path), exc.message)]
    return []


def _metadata_problems(meta: dict[str, Any]) -> Iterator[tuple[str, str]]:
    name = meta.get("name") or meta.get("generateName")
    if not name:
        yield "metadata.name", "missing (an object needs a name, or generateName)"
    elif "{{" not in str(name):  # an Argo parameter: known when the workflow runs
        bare = str(name).rstrip("-") if meta.get("generateName") and not meta.get("name") else str(name)
        if len(bare) > 253 or not _DNS_SUBDOMAIN.match(bare):
            yield "metadata.name", f"{name!r} is not a DNS-1123 name (lower-case letters, digits, '-' and '.')"
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or ("{{" not in value and not _LABEL_VALUE.match(value)):
            yield f"metadata.labels.{key}", f"{value!r} is not a label value (<= 63 of [A-Za-z0-9-_.], a string)"
    for key, value in (meta.get("annotations") or {}).items():
        if not isinstance(value, str):
            yield f"metadata.annotations.{key}", f"{value!r} must be a string"


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(prefix: str, path: str) -> str:
    return f"{prefix} > {path}" if prefix and path else prefix or path

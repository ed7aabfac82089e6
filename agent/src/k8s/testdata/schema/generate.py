#!/usr/bin/env python3
"""Regenerates the Kubernetes schema the manifest test validates against.

The schemas are the strict JSON schemas (unknown fields rejected) that the
PyPI package kubernetes-validate bundles, derived from the Kubernetes
OpenAPI document (Apache-2.0). This keeps only the kinds listed below and
the definitions they reach, without descriptions, so the test runs offline
from one small file:

    python3 -m venv /tmp/kv && /tmp/kv/bin/pip install kubernetes-validate
    /tmp/kv/bin/python generate.py 1.30.0 > k8s-v1.30-strict.json
"""

import json
import re
import sys
from pathlib import Path

import kubernetes_validate

KINDS = [
    "io.k8s.api.admissionregistration.v1.ValidatingAdmissionPolicy",
    "io.k8s.api.admissionregistration.v1.ValidatingAdmissionPolicyBinding",
    "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition",
    "io.k8s.api.apps.v1.DaemonSet",
    "io.k8s.api.core.v1.ConfigMap",
    "io.k8s.api.core.v1.Namespace",
    "io.k8s.api.core.v1.Pod",
    "io.k8s.api.core.v1.PodList",
    "io.k8s.api.core.v1.Secret",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.ServiceAccount",
    "io.k8s.api.rbac.v1.ClusterRole",
    "io.k8s.api.rbac.v1.ClusterRoleBinding",
    "io.k8s.api.rbac.v1.Role",
    "io.k8s.api.rbac.v1.RoleBinding",
]
REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")


def main() -> None:
    version = sys.argv[1]
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = base / f"v{version}-local-strict" / "_definitions.json"
    defs = json.loads(path.read_text())["$defs"]

    seen, todo = set(), list(KINDS)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(refs(defs[name]))

    kinds = {}
    for name in KINDS:
        for gvk in defs[name].get("x-kubernetes-group-version-kind", []):
            api = gvk["version"] if not gvk["group"] else f'{gvk["group"]}/{gvk["version"]}'
            kinds[f'{api} {gvk["kind"]}'] = name
    out = {
        "source": f"kubernetes-validate {kubernetes_validate.__version__}, "
        f"v{version}-local-strict/_definitions.json",
        "kinds": kinds,
        "$defs": {name: clean(defs[name]) for name in sorted(seen)},
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


def refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            # (JSONSchemaProps has a property named "$ref".)
            if key == "$ref" and isinstance(value, str):
                yield REF.match(value).group(1)
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def clean(node):
    """Drops descriptions and makes every $ref local (`#/$defs/NAME`)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description":
                continue
            if key == "$ref":
                out[key] = "#/$defs/" + REF.match(value).group(1)
            elif key in ("properties", "$defs"):
                out[key] = {k: clean(v) for k, v in value.items()}
            else:
                out[key] = clean(value)
        return out
    if isinstance(node, list):
        return [clean(v) for v in node]
    return node


if __name__ == "__main__":
    main()

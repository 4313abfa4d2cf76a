#!/usr/bin/env python3
"""Validates mesh's Kubernetes manifests; run by `cargo xtask test` (xtask/src/manifests.rs).

1. Every object of every rendered kustomization, and every built-in object of
   daemonset/examples, against the real Kubernetes JSON schemas (kubernetes-validate,
   strict: unknown fields are errors) of every Kubernetes minor from 1.29 to the newest
   the installed kubernetes-validate knows.
2. Every custom resource (examples, refusals) against the openAPIV3Schema of the CRD the
   kustomization renders, read the way the API server reads it: int-or-string, nullable,
   and unknown fields refused (kubectl's default strict field validation). The examples
   must pass; the refusals marked `validate.mesh.dev/refused-by: schema` must fail, those
   marked `controller` (admitted by schema and CEL, refused by the controller) must pass.
   CEL rules are not evaluated here: mesh-controller's tests run them (kube's CEL engine).
3. A few rules of the install itself: the node agent is not privileged and adds exactly
   BPF, NET_ADMIN and SYS_ADMIN; no Bidirectional mount propagation; the controller runs
   as non-root with a read-only root filesystem and no capabilities.

Usage: validate.py --rendered FILE... --examples DIR --refusals FILE
"""

import argparse
import copy
import glob
import os
import sys

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

MIN_VERSION = (1, 29)


def minor(version):
    major, minor_, *_ = version.split(".")
    return int(major), int(minor_)


def versions():
    known = sorted({minor(v) for v in kv_utils.all_versions()})
    chosen = [v for v in known if v >= MIN_VERSION]
    if not chosen:
        sys.exit(f"kubernetes-validate {kubernetes_validate.__version__} knows no version >= 1.29")
    return [f"{major}.{minor_}.0" for major, minor_ in chosen]


def documents(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(doc):
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "?")
    return f"{doc.get('kind')} {ns + '/' if ns else ''}{name}"


def as_api_server_reads(schema, root=True):
    """The CRD's openAPIV3Schema as plain JSON Schema with the API server's reading."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.get("x-kubernetes-int-or-string") and "type" not in node:
            node["type"] = ["integer", "string"]
        if node.pop("nullable", False) and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node and None not in node["enum"]:
                node["enum"] = node["enum"] + [None]
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key in ("properties",):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    walk(schema)
    if root:
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    return schema


def crd_validators(objects):
    """(apiVersion, kind) -> validator, from the CRDs among `objects`."""
    out = {}
    for doc in objects:
        if doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        for version in spec["versions"]:
            schema = as_api_server_reads(version["schema"]["openAPIV3Schema"])
            jsonschema.Draft202012Validator.check_schema(schema)
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            out[key] = jsonschema.Draft202012Validator(schema)
    return out


def schema_errors(validator, doc):
    return sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message[:300]}"
        for e in validator.iter_errors(doc)
    )


def check_install(objects, failures):
    for doc in objects:
        kind = doc.get("kind")
        if kind not in ("Deployment", "DaemonSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            sc = c.get("securityContext") or {}
            where = f"{name_of(doc)} container {c['name']}"
            if sc.get("privileged"):
                failures.append(f"{where}: privileged")
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation") == "Bidirectional":
                    failures.append(f"{where}: Bidirectional mount propagation needs privileged")
            caps = sc.get("capabilities") or {}
            if kind == "DaemonSet":
                if sorted(caps.get("add", [])) != ["BPF", "NET_ADMIN", "SYS_ADMIN"]:
                    failures.append(f"{where}: capabilities.add {caps.get('add')}")
                if caps.get("drop") != ["ALL"]:
                    failures.append(f"{where}: capabilities.drop {caps.get('drop')}")
                if sc.get("allowPrivilegeEscalation") is False and "SYS_ADMIN" in caps.get("add", []):
                    failures.append(f"{where}: allowPrivilegeEscalation false with SYS_ADMIN is refused")
            else:
                pod_sc = pod.get("securityContext") or {}
                for key, want in (
                    ("allowPrivilegeEscalation", False),
                    ("readOnlyRootFilesystem", True),
                ):
                    if sc.get(key) is not want:
                        failures.append(f"{where}: {key} is not {want}")
                if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                    failures.append(f"{where}: not runAsNonRoot")
                if caps.get("drop") != ["ALL"] or caps.get("add"):
                    failures.append(f"{where}: capabilities {caps}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rendered", action="append", required=True)
    parser.add_argument("--examples", required=True)
    parser.add_argument("--refusals", required=True)
    args = parser.parse_args()

    failures = []
    chosen = versions()
    rendered = {path: documents(path) for path in args.rendered}
    examples = []
    for path in sorted(glob.glob(os.path.join(args.examples, "*.yaml"))):
        examples += [(os.path.basename(path), d) for d in documents(path)]

    # 1. Built-in kinds against the Kubernetes schemas of every version.
    builtin = [(label, d) for label, docs in rendered.items() for d in docs]
    builtin += [(label, d) for label, d in examples if "mesh.dev/" not in d.get("apiVersion", "")]
    for version in chosen:
        for label, doc in builtin:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures.append(f"{label}: {name_of(doc)} on Kubernetes {version}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                failures.append(f"{label}: {name_of(doc)}: no schema in Kubernetes {version}")
    print(
        f"validate: {len(builtin)} objects valid on Kubernetes "
        f"{', '.join(v.rsplit('.', 1)[0] for v in chosen)}"
        if not failures
        else "validate: Kubernetes schemas: failures below"
    )

    # 2. Custom resources against the rendered CRDs.
    validators = {}
    for docs in rendered.values():
        validators.update(crd_validators(docs))
    if not validators:
        failures.append("no CustomResourceDefinition in the rendered manifests")
    custom = [(label, d) for label, d in examples if "mesh.dev/" in d.get("apiVersion", "")]
    for label, doc in custom:
        validator = validators.get((doc.get("apiVersion"), doc.get("kind")))
        if validator is None:
            failures.append(f"{label}: {name_of(doc)}: no CRD for {doc.get('apiVersion')} {doc.get('kind')}")
            continue
        for error in schema_errors(validator, doc):
            failures.append(f"{label}: {name_of(doc)}: {error}")
    refused = 0
    for doc in documents(args.refusals):
        validator = validators.get((doc.get("apiVersion"), doc.get("kind")))
        by = ((doc.get("metadata") or {}).get("annotations") or {}).get("validate.mesh.dev/refused-by")
        errors = schema_errors(validator, doc) if validator else ["no CRD"]
        if by == "schema" and not errors:
            failures.append(f"{args.refusals}: {name_of(doc)}: the schema admits it")
        elif by == "schema":
            refused += 1
        elif by == "controller" and errors:
            failures.append(f"{args.refusals}: {name_of(doc)}: refused by the schema, not by {by}: {errors}")
        elif by not in ("schema", "cel", "controller"):
            failures.append(f"{args.refusals}: {name_of(doc)}: refused-by {by!r}")
    print(f"validate: {len(custom)} example policies valid; {refused} bad policies refused by the CRD schema")

    # 3. The install's own rules.
    for docs in rendered.values():
        check_install(docs, failures)

    if failures:
        print(f"validate: {len(failures)} problem(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        sys.exit(1)
    print("validate: manifests ok")


if __name__ == "__main__":
    main()

"""Generate the CustomResourceDefinitions from the pydantic models.

`perennial crds write` writes `crds/*.yaml` and the Helm chart's templates of them
(`charts/perennial/templates/crds/`, see `chart_crd_dir`);
`perennial crds check` exits non-zero with a unified diff when they are stale.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic.json_schema import GenerateJsonSchema, NoDefault

from .api import KINDS
from .api.common import CATEGORY, GROUP, VERSION

# Keywords a structural schema may carry (everything else from pydantic is dropped).
_KEEP = {
    "type", "description", "properties", "required", "items", "enum", "default", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "minItems", "maxItems", "minProperties", "maxProperties", "additionalProperties", "format",
    "nullable", "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
}


class _SchemaGenerator(GenerateJsonSchema):
    """Also publishes defaults made by `default_factory`, so the API server fills them in
    (CEL rules can then rely on `self.feedback.enabled` or `self.tests` being present)."""

    def get_default_value(self, schema: Any) -> Any:
        if "default_factory" in schema and not schema.get("default_factory_takes_data"):
            value = schema["default_factory"]()
            if isinstance(value, pydantic.BaseModel):
                return value.model_dump(mode="json", by_alias=True, exclude_defaults=True)
            return value
        return schema.get("default", NoDefault)


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline $refs and turn pydantic's JSON Schema into an OpenAPI v3 structural schema."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        # Field-level keywords (description, default) win over the referenced type's.
        merged = {**target, **node}
        if "description" in node:
            merged["description"] = node["description"]
        return _resolve(merged, defs)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions are not structural: {options}")
        rest = {k: v for k, v in node.items() if k != "default" or v is not None}
        return _resolve({**options[0], **rest, **({"description": node["description"]} if "description" in node else {})}, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("default", 0) is None:
        del node["default"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEEP:
            continue
        if key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
        elif key in ("items",):
            out[key] = _resolve(value, defs)
        elif key == "additionalProperties":
            if value is False:
                continue  # structural schemas forbid unknown fields by pruning; extra=forbid is implicit
            out[key] = _resolve(value, defs) if isinstance(value, dict) else value
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
        out.setdefault("type", "object")
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def openapi_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_SchemaGenerator)
    defs = raw.pop("$defs", {})
    schema = _resolve(raw, defs)
    props = schema["properties"]
    kind = model.model_fields["kind"].default
    spec = props.pop("spec")
    props.clear()
    props["apiVersion"] = {"type": "string", "maxLength": 64, "description": "APIVersion of this object: `perennial.ai/v1alpha1`."}
    props["kind"] = {"type": "string", "maxLength": 64, "description": f"Kind of this object: `{kind}`."}
    props["metadata"] = {"type": "object"}
    props["spec"] = spec
    status_model = model.model_fields["status"].annotation.__args__[0]
    status_raw = status_model.model_json_schema(by_alias=True, mode="validation", schema_generator=_SchemaGenerator)
    status = _resolve(status_raw, status_raw.pop("$defs", {}))
    status["description"] = "Observed state, written by the operator."
    props["status"] = status
    schema["required"] = ["spec"]
    schema["description"] = model.description
    return schema


def subresources(model: type) -> dict[str, Any]:
    out: dict[str, Any] = {"status": {}}
    scale = getattr(model, "scale", None)
    if scale is not None:
        out["scale"] = scale.to_dict()
    return out


def crd(model: type) -> dict[str, Any]:
    kind = model.model_fields["kind"].default
    columns = []
    for c in model.printer_columns:
        col = {"name": c.name, "type": c.type, "jsonPath": c.json_path}
        if c.description:
            col["description"] = c.description
        if c.priority:
            col["priority"] = c.priority
        columns.append(col)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{model.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "perennial", "app.kubernetes.io/part-of": "perennial"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": model.plural,
                "singular": model.singular,
                "shortNames": list(model.short_names),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources(model),
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": openapi_schema(model)},
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [crd(m) for m in KINDS]


HEADER = "# Generated by `perennial crds write` from operator/perennial/api. Do not edit.\n"


def render(obj: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=120, allow_unicode=True)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def targets(root: Path | None = None) -> list[Path]:
    """Directories of generated CRDs: `crds/` (plain YAML for kubectl) and the Helm chart's templates."""
    root = root or repo_root()
    return [root / "crds", chart_crd_dir(root)]


def chart_crd_dir(root: Path | None = None) -> Path:
    """The chart's CRDs are templates, not `crds/`: Helm installs `crds/` once and never upgrades it, while
    templates are updated by `helm upgrade` (cert-manager's `crds.enabled`/`crds.keep`). A chart may not have
    both: a CRD in `crds/` and in a template would make `helm install` fail on the object it just created."""
    return (root or repo_root()) / "charts" / "perennial" / "templates" / "crds"


TEMPLATE_HEADER = "# Generated by `perennial crds write` from operator/perennial/api. Do not edit.\n"
_KEEP_SENTINEL = "perennial.ai/crds-keep-sentinel"


def render_template(obj: dict[str, Any]) -> str:
    """The chart's template of one CRD: installed when `crds.enabled` in mode `operator`, kept on uninstall
    when `crds.keep` (`helm.sh/resource-policy: keep`); template delimiters in the schema's text are escaped."""
    obj = copy.deepcopy(obj)
    obj["metadata"]["annotations"] = {"perennial.ai/generated-by": "perennial crds write", _KEEP_SENTINEL: "x"}
    body = yaml.safe_dump(obj, sort_keys=False, width=120, allow_unicode=True).replace("{{", '{{ "{{" }}')
    keep = "    {{- if .Values.crds.keep }}\n    helm.sh/resource-policy: keep\n    {{- end }}\n"
    body = body.replace(f"    {_KEEP_SENTINEL}: x\n", keep)
    return (TEMPLATE_HEADER + '{{- if and .Values.crds.enabled (eq .Values.mode "operator") }}\n' + body + "{{- end }}\n")


def expected_files(root: Path | None = None) -> dict[Path, str]:
    files = {}
    plain, chart = targets(root)
    for obj in all_crds():
        files[plain / f"{obj['metadata']['name']}.yaml"] = render(obj)
        files[chart / f"{obj['metadata']['name']}.yaml"] = render_template(obj)
    return files


def write(root: Path | None = None) -> list[Path]:
    written = []
    for path, text in expected_files(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def check(root: Path | None = None) -> list[str]:
    """Return diffs (empty when everything is up to date)."""
    problems = []
    expected = expected_files(root)
    for path, text in expected.items():
        current = path.read_text() if path.exists() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(True), text.splitlines(True), f"{path} (on disk)", f"{path} (from the models)")
            problems.append("".join(diff) or f"{path}: missing")
    for directory in targets(root):
        for stray in sorted(directory.glob("*.yaml")) if directory.exists() else []:
            if stray not in expected:
                problems.append(f"{stray}: not generated from any model; remove it")
    return problems

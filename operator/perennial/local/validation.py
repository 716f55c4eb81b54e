"""CRD structural-schema handling for the embedded API server.

Pruning, defaulting and validation of custom objects against a CRD's
``openAPIV3Schema``, including CEL ``x-kubernetes-validations`` (evaluated with
``cel-expr-python``), with error messages shaped like kube-apiserver's.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable

from .patches import json_copy

_MISSING = object()


@dataclass
class FieldError:
    """One cause of a 422 Invalid, as in ``metav1.StatusCause``."""

    reason: str  # FieldValueRequired, FieldValueNotSupported, FieldValueInvalid, ...
    field: str  # e.g. "spec.method"; "<nil>" for the root
    detail: str  # e.g. 'Unsupported value: "XYZ": supported values: "SFT"'

    @property
    def message(self) -> str:
        return f"{self.field}: {self.detail}"

    def as_cause(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.detail, "field": self.field}


def go_repr(value: Any) -> str:
    """Render a value the way kube-apiserver's field errors do."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)
    if value is None:
        return "null"
    return f'"{type_name(value)}"'


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _idx(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _matches_type(typ: str, value: Any) -> bool:
    if typ == "object":
        return isinstance(value, dict)
    if typ == "array":
        return isinstance(value, list)
    if typ == "string":
        return isinstance(value, str)
    if typ == "boolean":
        return isinstance(value, bool)
    if typ == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if typ == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


# --------------------------------------------------------------------------- pruning


def prune(schema: dict | None, value: Any, *, root: bool = False, skip: frozenset = frozenset()) -> Any:
    """Drop fields unknown to a structural schema (in place where possible); the top-level keys in ``skip`` are
    left as they are (values already pruned under this schema)."""
    if schema is None:
        return value
    if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
        return value
    if isinstance(value, dict):
        props = schema.get("properties")
        addl = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        embedded = bool(schema.get("x-kubernetes-embedded-resource"))
        for key in list(value):
            if root and key in ("apiVersion", "kind", "metadata") or key in skip:
                continue
            if embedded and key in ("apiVersion", "kind", "metadata"):
                continue
            if props is not None and key in props:
                value[key] = prune(props[key], value[key])
            elif isinstance(addl, dict):
                value[key] = prune(addl, value[key])
            elif addl is True or preserve:
                continue
            elif props is not None or addl is False or schema.get("type") == "object":
                del value[key]
        return value
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            return [prune(items, v) for v in value]
    return value


def unknown_fields(schema: dict | None, value: Any, path: str = "", *, root: bool = False,
                   skip: frozenset = frozenset()) -> list[str]:
    """Paths of fields that pruning would drop (for fieldValidation=Strict), not looking into the top-level keys
    in ``skip`` (values already pruned under this schema)."""
    out: list[str] = []
    if schema is None or (schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties")):
        return out
    if isinstance(value, dict):
        props = schema.get("properties")
        addl = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        for key, sub in value.items():
            if (root or schema.get("x-kubernetes-embedded-resource")) and key in ("apiVersion", "kind", "metadata") \
                    or key in skip:
                continue
            p = _join(path, key)
            if props is not None and key in props:
                out += unknown_fields(props[key], sub, p)
            elif isinstance(addl, dict):
                out += unknown_fields(addl, sub, p)
            elif addl is True or preserve:
                continue
            elif props is not None or schema.get("type") == "object":
                out.append(p)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            out += unknown_fields(schema["items"], sub, _idx(path, i))
    return out


# --------------------------------------------------------------------------- defaulting


def apply_defaults(schema: dict | None, value: Any, *, skip: frozenset = frozenset()) -> Any:
    """Fill in ``default`` values of absent properties, recursively, except under the top-level keys in ``skip``
    (values already defaulted under this schema)."""
    if schema is None:
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key in skip:
                continue
            if key not in value and "default" in sub:
                value[key] = json_copy(sub["default"])
            elif key in value and value[key] is None and "default" in sub and not sub.get("nullable"):
                value[key] = json_copy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict):
            for key in list(value):
                if key not in props and key not in skip:
                    value[key] = apply_defaults(addl, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


# --------------------------------------------------------------------------- CEL

_cel_lock = threading.Lock()
_cel_env: Any = None
_cel_cache: dict[str, Any] = {}


def _env() -> Any:
    global _cel_env
    if _cel_env is None:
        from cel_expr_python import cel
        from cel_expr_python.ext import ext_optional, ext_strings

        _cel_env = cel.NewEnv(
            variables={"self": cel.Type.DYN, "oldSelf": cel.Type.DYN},
            extensions=[ext_optional.ExtOptional(), ext_strings.ExtStrings()],
        )
    return _cel_env


_cel_error_type: Any = None


def compile_rule(rule: str) -> Any:
    """Compile (and cache) a CEL expression; raises ``ValueError`` on a bad rule."""
    expr = _cel_cache.get(rule)  # a hit needs no lock: entries are only ever added
    if expr is not None:
        return expr
    with _cel_lock:
        if rule in _cel_cache:
            return _cel_cache[rule]
        try:
            expr = _env().compile(rule)
        except Exception as exc:  # cel raises RuntimeError with the compiler message
            raise ValueError(f"compilation failed: {exc}") from None
        _cel_cache[rule] = expr
        return expr


_SCALARS = frozenset({str, int, float, bool})
_scalar_results: dict[tuple[str, type, Any], tuple[Any, str | None]] = {}
SCALAR_RESULTS = 4096


def _eval(rule: str, data: dict[str, Any], activations: dict[int, Any] | None = None) -> tuple[Any, str | None]:
    """Evaluate a rule on ``data``; ``activations``: the rules of one schema node share the CEL activation of
    the same variables (``data`` holds the same values for every rule of that node), built once.

    A rule on a scalar ``self`` alone (a short string, a number, a boolean) is a pure function of that value:
    its outcome is remembered (by rule, type and value: ``1``, ``1.0`` and ``true`` are different keys), as
    defaulted fields (``weight: "1"``) repeat the same value object after object."""
    if len(data) == 1:
        value = data["self"]
        kind = type(value)
        if kind in _SCALARS and (kind is not str or len(value) <= 256):
            key = (rule, kind, value)
            hit = _scalar_results.get(key)
            if hit is None:
                hit = _eval_now(rule, data, activations)
                if len(_scalar_results) >= SCALAR_RESULTS:
                    _scalar_results.clear()
                _scalar_results[key] = hit
            return hit
    return _eval_now(rule, data, activations)


def _eval_now(rule: str, data: dict[str, Any], activations: dict[int, Any] | None) -> tuple[Any, str | None]:
    global _cel_error_type
    expr = _cel_cache.get(rule) or compile_rule(rule)
    if _cel_error_type is None:
        from cel_expr_python import cel

        _cel_error_type = cel.Type.ERROR
    with _cel_lock:
        if activations is None:
            result = expr.eval(data=data)
        else:
            activation = activations.get(len(data))  # {self} or {self, oldSelf}
            if activation is None:
                activation = activations[len(data)] = _env().Activation(data=data)
            result = expr.eval(activation=activation)
        if result.type() == _cel_error_type:
            return None, str(result.value())
        return result.value(), None


_OLDSELF = re.compile(r"\boldSelf\b")
_transition: dict[str, bool] = {}


def _is_transition(text: str) -> bool:
    """Whether a rule refers to ``oldSelf`` (a transition rule), cached by its text."""
    hit = _transition.get(text)
    if hit is None:
        hit = _transition[text] = bool(_OLDSELF.search(text))
    return hit


def check_cel_rules(schema: dict) -> list[FieldError]:
    """Compile every CEL rule of a schema (CRD admission)."""
    errors: list[FieldError] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        for i, rule in enumerate(node.get("x-kubernetes-validations") or []):
            for key in ("rule", "messageExpression"):
                if key in rule:
                    try:
                        compile_rule(rule[key])
                    except ValueError as exc:
                        errors.append(FieldError("FieldValueInvalid", f"{path}.x-kubernetes-validations[{i}].{key}",
                                                 f"Invalid value: {json.dumps(rule[key])}: {exc}"))
        for key, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.properties[{key}]")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    walk(schema, "spec.validation.openAPIV3Schema")
    return errors


# --------------------------------------------------------------------------- validation


def validate(schema: dict | None, value: Any, old: Any = _MISSING, *, root: bool = True) -> list[FieldError]:
    """Validate ``value`` against a structural schema; ``old`` enables transition rules."""
    errors: list[FieldError] = []
    if schema is None:
        return errors
    _validate(schema, value, old, "", errors, root=root)
    return errors


def _validate(schema: dict, value: Any, old: Any, path: str, errors: list[FieldError], root: bool = False) -> None:
    if old is not _MISSING and type(value) is type(old) and value == old:
        # Validation ratcheting (kube-apiserver, CRDValidationRatcheting): an unchanged value is not validated
        # again — a status write does not re-run the spec's rules.
        return
    field = path or "<nil>"
    if value is None:
        if schema.get("nullable"):
            return
        typ = schema.get("type")
        if typ:
            errors.append(FieldError("FieldValueTypeInvalid", field,
                                     f'Invalid value: "null": {field} in body must be of type {typ}: "null"'))
        return

    typ = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or _matches_type("integer", value)):
            errors.append(FieldError("FieldValueTypeInvalid", field,
                                     f'Invalid value: "{type_name(value)}": {field} in body must be of type '
                                     f'integer,string: "{type_name(value)}"'))
            return
    elif typ and not _matches_type(typ, value):
        errors.append(FieldError("FieldValueTypeInvalid", field,
                                 f'Invalid value: "{type_name(value)}": {field} in body must be of type {typ}: '
                                 f'"{type_name(value)}"'))
        return

    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(go_repr(v) for v in schema["enum"])
        errors.append(FieldError("FieldValueNotSupported", field,
                                 f"Unsupported value: {go_repr(value)}: supported values: {supported}"))

    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(FieldError("FieldValueTooLong", field,
                                     f"Too long: may not be more than {schema['maxLength']} bytes"))
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(FieldError("FieldValueInvalid", field,
                                     f"Invalid value: {go_repr(value)}: {field} in body should be at least "
                                     f"{schema['minLength']} chars long"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(FieldError("FieldValueInvalid", field,
                                     f"Invalid value: {go_repr(value)}: {field} in body should match "
                                     f"'{schema['pattern']}'"))
        fmt = schema.get("format")
        if fmt and not _check_format(fmt, value):
            errors.append(FieldError("FieldValueInvalid", field,
                                     f"Invalid value: {go_repr(value)}: {field} in body must be of type {fmt}: "
                                     f"{go_repr(value)}"))

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema:
            lo = schema["minimum"]
            if schema.get("exclusiveMinimum") is True and value <= lo:
                errors.append(FieldError("FieldValueInvalid", field,
                                         f"Invalid value: {go_repr(value)}: {field} in body should be greater than {go_repr(lo)}"))
            elif value < lo:
                errors.append(FieldError("FieldValueInvalid", field,
                                         f"Invalid value: {go_repr(value)}: {field} in body should be greater than "
                                         f"or equal to {go_repr(lo)}"))
        if "maximum" in schema:
            hi = schema["maximum"]
            if schema.get("exclusiveMaximum") is True and value >= hi:
                errors.append(FieldError("FieldValueInvalid", field,
                                         f"Invalid value: {go_repr(value)}: {field} in body should be less than {go_repr(hi)}"))
            elif value > hi:
                errors.append(FieldError("FieldValueInvalid", field,
                                         f"Invalid value: {go_repr(value)}: {field} in body should be less than "
                                         f"or equal to {go_repr(hi)}"))
        if "multipleOf" in schema and schema["multipleOf"] and (value / schema["multipleOf"]) % 1:
            errors.append(FieldError("FieldValueInvalid", field,
                                     f"Invalid value: {go_repr(value)}: {field} in body should be a multiple of "
                                     f"{go_repr(schema['multipleOf'])}"))

    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(FieldError("FieldValueTooMany", field,
                                     f"Too many: {len(value)}: must have at most {schema['maxItems']} items"))
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(FieldError("FieldValueInvalid", field,
                                     f"Invalid value: {len(value)}: {field} in body should have at least "
                                     f"{schema['minItems']} items"))
        if schema.get("uniqueItems") or schema.get("x-kubernetes-list-type") == "set":
            seen: list[Any] = []
            for i, item in enumerate(value):
                if item in seen:
                    errors.append(FieldError("FieldValueDuplicate", _idx(path, i),
                                             f"Duplicate value: {go_repr(item)}"))
                seen.append(item)
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen_keys: list[Any] = []
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    k = tuple(item.get(x) for x in keys)
                    if k in seen_keys:
                        errors.append(FieldError("FieldValueDuplicate", _idx(path, i),
                                                 f"Duplicate value: {json.dumps(dict(zip(keys, k)))}"))
                    seen_keys.append(k)
        items = schema.get("items")
        if isinstance(items, dict):
            # transition rules correlate list items only through listType=map keys, as kube-apiserver does
            old_by_key: dict[tuple, Any] = {}
            map_keys = schema.get("x-kubernetes-list-map-keys") or []
            if schema.get("x-kubernetes-list-type") == "map" and isinstance(old, list):
                for o in old:
                    if isinstance(o, dict):
                        old_by_key[tuple(o.get(k) for k in map_keys)] = o
            for i, item in enumerate(value):
                item_old = _MISSING
                if old_by_key and isinstance(item, dict):
                    item_old = old_by_key.get(tuple(item.get(k) for k in map_keys), _MISSING)
                _validate(items, item, item_old, _idx(path, i), errors)

    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for req in schema.get("required") or []:
            if req not in value:
                errors.append(FieldError("FieldValueRequired", _join(path, req), "Required value"))
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(FieldError("FieldValueTooMany", field,
                                     f"Too many: {len(value)}: must have at most {schema['maxProperties']} items"))
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            errors.append(FieldError("FieldValueInvalid", field,
                                     f"Invalid value: {len(value)}: {field} in body should have at least "
                                     f"{schema['minProperties']} properties"))
        addl = schema.get("additionalProperties")
        for key, sub in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                continue
            sub_old = old.get(key, _MISSING) if isinstance(old, dict) else _MISSING
            if key in props:
                _validate(props[key], sub, sub_old, _join(path, key), errors)
            elif isinstance(addl, dict):
                _validate(addl, sub, sub_old, _join(path, key), errors)

    for combinator in ("allOf",):
        for sub in schema.get(combinator) or []:
            _validate(sub, value, old, path, errors)
    if schema.get("anyOf"):
        if not any(not validate(sub, value, root=False) for sub in schema["anyOf"]):
            errors.append(FieldError("FieldValueInvalid", field,
                                     f"Invalid value: {go_repr(value)}: {field} in body must match at least one schema in anyOf"))
    if schema.get("oneOf"):
        n = sum(1 for sub in schema["oneOf"] if not validate(sub, value, root=False))
        if n != 1:
            errors.append(FieldError("FieldValueInvalid", field,
                                     f"Invalid value: {go_repr(value)}: {field} in body must match exactly one schema in oneOf"))
    if isinstance(schema.get("not"), dict) and not validate(schema["not"], value, root=False):
        errors.append(FieldError("FieldValueInvalid", field,
                                 f"Invalid value: {go_repr(value)}: {field} in body must not match the schema"))

    rules = schema.get("x-kubernetes-validations")
    if rules:
        if len(rules) == 1:
            _check_rule(rules[0], value, old, path, errors)
            return
        activations: dict[int, Any] = {}
        passed = _passed_together(rules, value)
        for i, rule in enumerate(rules):
            if i not in passed:
                _check_rule(rule, value, old, path, errors, activations)


_batches: dict[tuple[str, ...], Any] = {}


def _passed_together(rules: list[dict], value: Any) -> frozenset[int]:
    """The indexes of the rules (not transition rules) that hold for ``value``, from one evaluation of all of
    them as one CEL list, ``[(rule0), (rule1), ...]``: one conversion of ``self`` and one call instead of one per
    rule. Only a rule that evaluated to ``true`` is settled here; any other outcome (false, an error anywhere in
    the list, a rule that does not compile) leaves its rules to be evaluated one by one as before, so errors
    and messages are exactly those of evaluating each rule alone."""
    indexes = [i for i, r in enumerate(rules) if not _is_transition(r.get("rule", ""))]
    if len(indexes) < 2:
        return frozenset()
    texts = tuple(rules[i].get("rule", "") for i in indexes)
    expr = _batches.get(texts, _MISSING)
    if expr is _MISSING:
        try:
            for text in texts:
                compile_rule(text)
            with _cel_lock:
                expr = _env().compile("[" + ", ".join(f"({t}\n)" for t in texts) + "]")
        except Exception:  # noqa: BLE001 - evaluated one by one instead
            expr = None
        _batches[texts] = expr
    if expr is None:
        return frozenset()
    global _cel_error_type
    if _cel_error_type is None:
        from cel_expr_python import cel

        _cel_error_type = cel.Type.ERROR
    with _cel_lock:
        result = expr.eval(data={"self": value})
        if result.type() == _cel_error_type:
            return frozenset()
        values = result.plain_value()
    if not isinstance(values, list) or len(values) != len(indexes):
        return frozenset()
    return frozenset(i for i, v in zip(indexes, values) if v is True)


def _check_rule(rule: dict, value: Any, old: Any, path: str, errors: list[FieldError],
                activations: dict[int, Any] | None = None) -> None:
    text = rule.get("rule", "")
    transition = _is_transition(text)
    if transition and old is _MISSING:
        return
    data = {"self": value}
    if transition:
        data["oldSelf"] = old
    field = path or "<nil>"
    if rule.get("fieldPath"):
        fp = rule["fieldPath"].lstrip(".")
        field = _join(path, fp) if path else fp
    try:
        result, err = _eval(text, data, activations)
    except ValueError as exc:
        errors.append(FieldError("FieldValueInvalid", field, f"Invalid value: {go_repr(value)}: {exc}"))
        return
    if err is not None:
        errors.append(FieldError("FieldValueInvalid", field,
                                 f"Invalid value: {go_repr(value)}: {err} evaluating rule: {text}"))
        return
    if result is True:
        return
    message = rule.get("message") or f"failed rule: {text}"
    if rule.get("messageExpression"):
        try:
            msg, merr = _eval(rule["messageExpression"], data)
            if merr is None and isinstance(msg, str) and msg.strip():
                message = msg
        except ValueError:
            pass
    reason = {
        "FieldValueRequired": "FieldValueRequired",
        "FieldValueForbidden": "FieldValueForbidden",
        "FieldValueDuplicate": "FieldValueDuplicate",
    }.get(rule.get("reason", ""), "FieldValueInvalid")
    if reason == "FieldValueRequired":
        detail = f"Required value: {message}"
    elif reason == "FieldValueForbidden":
        detail = f"Forbidden: {message}"
    else:
        detail = f"Invalid value: {go_repr(value)}: {message}"
    errors.append(FieldError(reason, field, detail))


_FORMATS = {
    "date-time": re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"),
    "date": re.compile(r"^\d{4}-\d{2}-\d{2}$"),
    "uuid": re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
    "hostname": re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
}


def _check_format(fmt: str, value: str) -> bool:
    pattern = _FORMATS.get(fmt)
    return pattern is None or bool(pattern.match(value))


def admit(schema: dict, obj: dict, old: Any = _MISSING, *, settled: Iterable[str] = (),
          owned: bool = False) -> tuple[dict, list[str], list[FieldError]]:
    """What kube-apiserver does to a custom object before it stores it: (the object pruned and defaulted, the
    fields pruning dropped, the validation errors — OpenAPI schema and CEL rules). Used by the embedded API
    server and, offline, by `perennial-trainer grade` (same rules, same messages).

    ``settled``: top-level keys whose values are known to be this schema's own output (the unchanged ``spec``
    of an object this same schema admitted, on a ``/status`` write). Pruning and defaulting such a value again
    changes nothing when the schema is :func:`admission_idempotent`, so they are skipped then; validation is
    the same either way (an unchanged value is ratcheted). ``owned``: ``obj`` is the caller's own copy, pruned
    and defaulted in place instead of copied first."""
    skip = frozenset(settled) if settled and admission_idempotent(schema) else frozenset()
    unknown = unknown_fields(schema, obj, root=True, skip=skip)
    obj = prune(schema, obj if owned else json_copy(obj), root=True, skip=skip)
    obj = apply_defaults(schema, obj, skip=skip)
    errors = validate(schema, obj, old)
    meta_schema = (schema.get("properties") or {}).get("metadata")
    if meta_schema:
        errors = [e for e in errors if not e.field.startswith("metadata")] + validate(
            {"type": "object", "properties": {"metadata": meta_schema}}, {"metadata": obj.get("metadata")},
            root=False)
    return obj, unknown, errors


_idempotent: dict[int, tuple[dict, bool]] = {}


def admission_idempotent(schema: dict) -> bool:
    """Whether pruning then defaulting is idempotent under ``schema``: admitting a value this schema already
    admitted gives that value back, with no unknown fields.

    Pruning and defaulting are each idempotent; pruning after defaulting undoes nothing unless a ``default``
    (defaulted in turn) carries fields its own schema would prune. kube-apiserver refuses such a CRD; this
    server does not, so each schema is checked once (cached by identity: schemas are never changed in place,
    a CRD update registers new ones)."""
    key = id(schema)
    hit = _idempotent.get(key)
    if hit is not None and hit[0] is schema:
        return hit[1]
    clean = True

    def walk(node: Any) -> None:
        nonlocal clean
        if not isinstance(node, dict) or not clean:
            return
        if "default" in node:
            value = apply_defaults(node, json_copy(node["default"]))
            if unknown_fields(node, value) or prune(node, json_copy(value)) != value:
                clean = False
                return
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        for k in ("items", "additionalProperties"):
            if isinstance(node.get(k), dict):
                walk(node[k])

    walk(schema)
    if len(_idempotent) > 4096:
        _idempotent.clear()
    _idempotent[key] = (schema, clean)
    return clean


def strict_decoding_message(kind: str, version: str, unknown: list[str]) -> str:
    """kube-apiserver's 400 for unknown fields under ``fieldValidation=Strict`` (kubectl's default)."""
    return (f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: '
            + ", ".join(f'unknown field "{u}"' for u in unknown))


class Invalid(ValueError):
    """A custom object the API server would refuse: ``code`` 422 (Invalid) or 400 (strict decoding)."""

    def __init__(self, message: str, code: int, errors: list[FieldError]) -> None:
        super().__init__(message)
        self.code = code
        self.errors = errors


def check_custom_object(crd: dict, doc: dict, *, strict: bool = True) -> dict:
    """Admit ``doc`` offline as kube-apiserver would admit it as an object of ``crd`` (its served version's
    schema, CEL rules included; ``strict``: unknown fields are errors, as under kubectl's default
    ``--validate=strict``). Returns the pruned, defaulted object; raises :class:`Invalid` with the API
    server's message."""
    names = crd["spec"]["names"]
    kind_group = f"{names['kind']}.{crd['spec']['group']}"
    version = next(v for v in crd["spec"]["versions"] if v.get("storage", True))
    schema = version["schema"]["openAPIV3Schema"]
    name = str(((doc.get("metadata") or {}) if isinstance(doc.get("metadata"), dict) else {}).get("name", ""))
    obj, unknown, errors = admit(schema, doc)
    if unknown and strict:
        raise Invalid(strict_decoding_message(names["kind"], version["name"], unknown), 400, [])
    errors += [e for e in validate_metadata(obj) if e.field != "metadata.namespace"]
    if errors:
        raise Invalid(invalid_message(kind_group, name, errors), 422, errors)
    return obj


def invalid_message(kind_group: str, name: str, errors: list[FieldError]) -> str:
    """``TrainingRun.perennial.ai "foo" is invalid: spec.x: ...`` (bracketed when several)."""
    msgs = [e.message for e in errors]
    body = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
    return f'{kind_group} "{name}" is invalid: {body}'


# --------------------------------------------------------------------------- metadata and built-in kinds

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_MSG = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and "
              "must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', "
              "regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")
_QNAME_MSG = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
              "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
              "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")


def _qualified_name_errors(key: str, field: str) -> list[FieldError]:
    errors = []
    prefix, _, name = key.rpartition("/")
    if prefix:
        if len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix):
            errors.append(FieldError("FieldValueInvalid", field,
                                     f"Invalid value: {go_repr(key)}: prefix part a lowercase RFC 1123 subdomain "
                                     "must consist of lower case alphanumeric characters, '-' or '.', and must "
                                     "start and end with an alphanumeric character"))
    if not name:
        errors.append(FieldError("FieldValueInvalid", field,
                                 f"Invalid value: {go_repr(key)}: name part must be non-empty"))
    elif len(name) > 63:
        errors.append(FieldError("FieldValueInvalid", field,
                                 f"Invalid value: {go_repr(key)}: name part must be no more than 63 characters"))
    elif not _QUALIFIED_NAME.match(name):
        errors.append(FieldError("FieldValueInvalid", field, f"Invalid value: {go_repr(key)}: {_QNAME_MSG}"))
    return errors


def validate_metadata(obj: dict) -> list[FieldError]:
    """Labels, annotation keys and ownerReferences, as ObjectMeta validation does."""
    meta = obj.get("metadata") or {}
    errors: list[FieldError] = []
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        return [FieldError("FieldValueTypeInvalid", "metadata.labels", "Invalid value: must be an object")]
    for key, value in labels.items():
        errors += _qualified_name_errors(str(key), "metadata.labels")
        if not isinstance(value, str):
            errors.append(FieldError("FieldValueTypeInvalid", f"metadata.labels.{key}",
                                     f'Invalid value: "{type_name(value)}": must be of type string'))
        elif len(value) > 63:
            errors.append(FieldError("FieldValueInvalid", "metadata.labels",
                                     f"Invalid value: {go_repr(value)}: must be no more than 63 characters"))
        elif not _LABEL_VALUE.match(value):
            errors.append(FieldError("FieldValueInvalid", "metadata.labels",
                                     f"Invalid value: {go_repr(value)}: {_LABEL_MSG}"))
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items() if isinstance(annotations, dict) else ():
        errors += _qualified_name_errors(str(key), "metadata.annotations")
        if not isinstance(value, str):
            errors.append(FieldError("FieldValueTypeInvalid", f"metadata.annotations.{key}",
                                     f'Invalid value: "{type_name(value)}": must be of type string'))
    if isinstance(annotations, dict) and sum(len(k) + len(str(v)) for k, v in annotations.items()) > 262144:
        errors.append(FieldError("FieldValueTooLong", "metadata.annotations",
                                 "Too long: may not be more than 262144 bytes"))
    controllers = 0
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for req in ("apiVersion", "kind", "name", "uid"):
            if not (ref or {}).get(req):
                detail = "Invalid value: \"\": uid must not be empty" if req == "uid" else (
                    "Invalid value: \"\": name must not be empty" if req == "name" else
                    f"Invalid value: \"\": {req} must not be empty" if req == "kind" else
                    "Invalid value: \"\": version must not be empty")
                errors.append(FieldError("FieldValueInvalid", f"metadata.ownerReferences[{i}].{req}", detail))
        controllers += bool((ref or {}).get("controller"))
    if controllers > 1:
        errors.append(FieldError("FieldValueInvalid", "metadata.ownerReferences",
                                 "Invalid value: []v1.OwnerReference{...}: Only one reference can have "
                                 "Controller set to true"))
    return errors


def validate_builtin(group: str, plural: str, obj: dict, old: dict | None) -> list[FieldError]:
    """The few built-in rules operators trip over: name formats and immutable fields."""
    errors: list[FieldError] = []
    name = (obj.get("metadata") or {}).get("name", "")
    spec = obj.get("spec") or {}
    old_spec = (old or {}).get("spec") or {}
    if (group, plural) == ("", "services") and old is None and not (len(name) <= 63 and _DNS1035_LABEL.match(name)):
        errors.append(FieldError("FieldValueInvalid", "metadata.name",
                                 f"Invalid value: {go_repr(name)}: a DNS-1035 label must consist of lower case "
                                 "alphanumeric characters or '-', start with an alphabetic character, and end with "
                                 "an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
                                 "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"))
    if (group, plural) == ("batch", "jobs") and old is None and len(name) > 63:
        errors.append(FieldError("FieldValueInvalid", "metadata.name",
                                 f"Invalid value: {go_repr(name)}: must be no more than 63 characters"))
    if (group, plural) == ("batch", "jobs") and old is None:
        errors += _generated_selector_errors(obj)
    if old is None:
        return errors
    if (group, plural) == ("batch", "jobs"):
        if spec.get("template") != old_spec.get("template"):
            errors.append(FieldError("FieldValueInvalid", "spec.template",
                                     "Invalid value: core.PodTemplateSpec{...}: field is immutable"))
        for f in ("completions", "selector", "completionMode"):
            if f in old_spec and spec.get(f) != old_spec.get(f):
                errors.append(FieldError("FieldValueInvalid", f"spec.{f}",
                                         f"Invalid value: {go_repr(spec.get(f))}: field is immutable"))
    if (group, plural) in (("apps", "deployments"), ("apps", "replicasets")):
        if "selector" in old_spec and spec.get("selector") != old_spec.get("selector"):
            errors.append(FieldError("FieldValueInvalid", "spec.selector",
                                     "Invalid value: v1.LabelSelector{...}: field is immutable"))
    if (group, plural) in (("", "configmaps"), ("", "secrets")) and old.get("immutable"):
        if obj.get("data") != old.get("data") or obj.get("binaryData") != old.get("binaryData"):
            errors.append(FieldError("FieldValueForbidden", "data",
                                     "Forbidden: field is immutable when `immutable` is set"))
        if not obj.get("immutable"):
            errors.append(FieldError("FieldValueForbidden", "immutable",
                                     "Forbidden: field is immutable when `immutable` is set"))
    if (group, plural) == ("", "secrets") and old.get("type") and obj.get("type") != old.get("type"):
        errors.append(FieldError("FieldValueInvalid", "type",
                                 f"Invalid value: {go_repr(obj.get('type'))}: field is immutable"))
    if (group, plural) == ("", "services"):
        if old_spec.get("clusterIP") not in (None, "", "None") and spec.get("clusterIP") not in (
                None, old_spec.get("clusterIP")):
            errors.append(FieldError("FieldValueInvalid", "spec.clusterIPs[0]",
                                     f"Invalid value: []string{{{go_repr(spec.get('clusterIP'))}}}: may not change "
                                     "once set"))
    if (group, plural) == ("", "persistentvolumeclaims"):
        a = {k: v for k, v in spec.items() if k not in ("resources", "volumeName", "volumeAttributesClassName")}
        b = {k: v for k, v in old_spec.items() if k not in ("resources", "volumeName", "volumeAttributesClassName")}
        if a != b:
            errors.append(FieldError("FieldValueForbidden", "spec",
                                     "Forbidden: spec is immutable after creation except resources.requests and "
                                     "volumeAttributesClassName for bound claims"))
    return errors


# --------------------------------------------------------------------------- structural schemas (CRD admission)

_FORBIDDEN_KEYWORDS = ("$ref", "$schema", "id", "definitions", "additionalItems", "patternProperties",
                       "dependencies")
_JUNCTOR_FORBIDDEN = ("type", "description", "default", "additionalProperties", "nullable")


def structural_errors(schema: dict, path: str) -> list[FieldError]:
    """The structural-schema rules kube-apiserver enforces on a CRD version's ``openAPIV3Schema``."""
    errors: list[FieldError] = []
    if not isinstance(schema, dict):
        return [FieldError("FieldValueRequired", path, "Required value: must be an object")]
    if not schema.get("type"):
        errors.append(FieldError("FieldValueRequired", f"{path}.type", "Required value: must not be empty at the root"))
    elif schema["type"] != "object":
        errors.append(FieldError("FieldValueInvalid", f"{path}.type",
                                 f"Invalid value: {go_repr(schema['type'])}: must be object at the root"))
    meta = (schema.get("properties") or {}).get("metadata")
    if isinstance(meta, dict):
        extra = set((meta.get("properties") or {})) - {"name", "generateName"}
        if extra or set(meta) - {"type", "properties", "description"}:
            errors.append(FieldError("FieldValueForbidden", f"{path}.properties[metadata]",
                                     "Forbidden: must not specify anything other than name and generateName, but "
                                     "metadata is implicitly specified"))
    _structural(schema, path, errors, root=True)
    return errors


def _structural(node: Any, path: str, errors: list[FieldError], *, root: bool = False,
                where: str = "") -> None:
    if not isinstance(node, dict):
        return
    for kw in _FORBIDDEN_KEYWORDS:
        if kw in node:
            errors.append(FieldError("FieldValueForbidden", f"{path}.{kw}", f"Forbidden: {kw} is not supported"))
    if where and not node.get("type") and not node.get("x-kubernetes-int-or-string") \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        errors.append(FieldError("FieldValueRequired", f"{path}.type",
                                 f"Required value: must not be empty for specified {where}"))
    if node.get("properties") and node.get("additionalProperties") not in (None, False) and \
            node.get("additionalProperties") is not True:
        errors.append(FieldError("FieldValueForbidden", f"{path}.additionalProperties",
                                 "Forbidden: additionalProperties and properties are mutual exclusive"))
    if node.get("uniqueItems") is True:
        errors.append(FieldError("FieldValueForbidden", f"{path}.uniqueItems",
                                 "Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes "
                                 "quadratic"))
    if node.get("x-kubernetes-list-type") == "map":
        if not node.get("x-kubernetes-list-map-keys"):
            errors.append(FieldError("FieldValueRequired", f"{path}.x-kubernetes-list-map-keys",
                                     "Required value: must not be empty if x-kubernetes-list-type is map"))
        items = node.get("items") or {}
        if isinstance(items, dict) and items.get("type") != "object":
            errors.append(FieldError("FieldValueInvalid", f"{path}.items.type",
                                     f"Invalid value: {go_repr(items.get('type'))}: must be object if parent array's "
                                     "x-kubernetes-list-type is map"))
        for key in node.get("x-kubernetes-list-map-keys") or []:
            ks = ((items or {}).get("properties") or {}).get(key) if isinstance(items, dict) else None
            if ks is None:
                errors.append(FieldError("FieldValueRequired", f"{path}.items.properties[{key}]",
                                         "Required value: must be defined for list map keys"))
            elif key not in (items.get("required") or []) and "default" not in ks:
                errors.append(FieldError("FieldValueRequired", f"{path}.items.required",
                                         f"Required value: all map keys must be required or have a default, "
                                         f"{key!r} is not"))
    for junctor in ("allOf", "anyOf", "oneOf", "not"):
        if node.get("x-kubernetes-int-or-string") and junctor in ("anyOf", "allOf"):
            continue  # the int-or-string patterns are the allowed exception
        subs = node.get(junctor)
        subs = [subs] if isinstance(subs, dict) else (subs or [])
        for i, sub in enumerate(subs):
            sub_path = f"{path}.{junctor}" if junctor == "not" else f"{path}.{junctor}[{i}]"
            _junctor_check(sub, sub_path, errors)
    for key, sub in (node.get("properties") or {}).items():
        _structural(sub, f"{path}.properties[{key}]", errors, where="object fields")
    if isinstance(node.get("additionalProperties"), dict):
        _structural(node["additionalProperties"], f"{path}.additionalProperties", errors, where="object fields")
    if isinstance(node.get("items"), dict):
        _structural(node["items"], f"{path}.items", errors, where="array items")
    elif isinstance(node.get("items"), list):
        errors.append(FieldError("FieldValueForbidden", f"{path}.items",
                                 "Forbidden: items must be a schema object and not an array"))
    elif node.get("type") == "array" and "items" not in node:
        errors.append(FieldError("FieldValueRequired", f"{path}.items",
                                 "Required value: must be specified"))


def default_errors(schema: dict, path: str) -> list[FieldError]:
    """Every ``default`` must itself be valid against its schema (after pruning), as kube-apiserver checks."""
    errors: list[FieldError] = []

    def walk(node: Any, p: str) -> None:
        if not isinstance(node, dict):
            return
        if "default" in node and node["default"] is not None:
            value = apply_defaults(node, prune(node, json_copy(node["default"])))
            for e in validate(node, value, root=False):
                detail = e.detail
                sub = "" if e.field == "<nil>" else "." + e.field
                errors.append(FieldError(e.reason, f"{p}.default{sub}", detail))
        for key, sub_node in (node.get("properties") or {}).items():
            walk(sub_node, f"{p}.properties[{key}]")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{p}.{key}")

    walk(schema, path)
    return errors


def _junctor_check(node: Any, path: str, errors: list[FieldError]) -> None:
    """Inside allOf/anyOf/oneOf/not, only value validations are allowed (kube's structural rule)."""
    if not isinstance(node, dict):
        return
    for kw in _JUNCTOR_FORBIDDEN:
        if kw in node:
            errors.append(FieldError("FieldValueForbidden", f"{path}.{kw}", "Forbidden: must be empty to be structural"))
    for key, sub in (node.get("properties") or {}).items():
        _junctor_check(sub, f"{path}.properties[{key}]", errors)
    if isinstance(node.get("items"), dict):
        _junctor_check(node["items"], f"{path}.items", errors)


def selector_matches(selector: Any, labels: dict) -> bool:
    """Whether a metav1.LabelSelector (matchLabels, matchExpressions) selects ``labels``."""
    if not isinstance(selector, dict):
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _generated_selector_errors(job: dict) -> list[FieldError]:
    """The Job strategy's ValidateGeneratedSelector: unless ``manualSelector``, the selector is the server's."""
    spec = job.get("spec") or {}
    uid = (job.get("metadata") or {}).get("uid")
    if spec.get("manualSelector") is True or not uid:
        return []
    errors = []
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    for key in ("controller-uid", "batch.kubernetes.io/controller-uid"):
        if key in labels and labels[key] != uid:
            errors.append(FieldError("FieldValueInvalid", f"spec.template.metadata.labels[{key}]",
                                     f"Invalid value: {go_repr(labels[key])}: must be '{uid}'"))
    if not selector_matches(spec.get("selector"), {"batch.kubernetes.io/controller-uid": uid}):
        errors.append(FieldError("FieldValueInvalid", "spec.selector",
                                 "Invalid value: v1.LabelSelector{...}: `selector` not auto-generated"))
    return errors

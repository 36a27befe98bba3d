"""Which JSON-schema keywords the grammar backend enforces. A keyword it would silently ignore must be
refused (400, naming it), never turned into unconstrained output."""
from __future__ import annotations

from typing import Any

# Keywords the backend turns into grammar rules (each checked against violating outputs; xgrammar
# ignores uniqueItems, contains and dependentRequired, so they are refused).
ENFORCED = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "unevaluatedProperties", "patternProperties",
    "propertyNames", "minProperties", "maxProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "pattern", "format",
})
# Annotations: they never constrain a document, so ignoring them is exact.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "$anchor",
    "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType", "discriminator",
})
FORMATS = frozenset({
    "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uri-reference",
    "uri-template", "uuid", "json-pointer",
})
_SUBSCHEMA = ("additionalProperties", "unevaluatedProperties", "propertyNames", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")


def check_schema(schema: Any, path: str = "#") -> None:
    """Raise ValueError naming the first keyword or format that cannot be enforced."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"the JSON schema at {path} must be an object or a boolean")
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise ValueError(f"the JSON schema keyword {key!r} (at {path}) is not supported for constrained "
                             f"output")
        if key == "format" and (not isinstance(value, str) or value not in FORMATS):
            raise ValueError(f"the JSON schema format {value!r} (at {path}) is not supported for constrained "
                             f"output; supported formats: {', '.join(sorted(FORMATS))}")
        if key in _SUBSCHEMA:
            check_schema(value, f"{path}/{key}")
        elif key in _SUBSCHEMA_MAPS:
            if not isinstance(value, dict):
                raise ValueError(f"{key!r} (at {path}) must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{path}/{key}/{name}")
        elif key in _SUBSCHEMA_LISTS:
            if not isinstance(value, list):
                raise ValueError(f"{key!r} (at {path}) must be an array")
            for i, sub in enumerate(value):
                check_schema(sub, f"{path}/{key}/{i}")

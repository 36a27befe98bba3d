"""check_schema: the JSON-schema keyword allowlist of constrained output (pure Python, no tokenizer)."""
from __future__ import annotations

import pytest

from radixserve.constrained.schema import check_schema

# ---------------------------------------------------------------- accepted

ACCEPTED = {
    "nested_objects": {
        "type": "object",
        "title": "Order",
        "description": "An order with a customer and lines",
        "properties": {
            "customer": {
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 80},
                               "email": {"type": "string", "format": "email"}},
                "required": ["name"],
                "additionalProperties": False,
            },
            "lines": {
                "type": "array",
                "minItems": 1,
                "maxItems": 10,
                "items": {"type": "object",
                          "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                          "required": ["sku", "qty"]},
            },
        },
        "required": ["customer", "lines"],
    },
    "defs_and_ref": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://example.com/person.json",
        "$defs": {
            "Address": {"type": "object",
                        "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["street"]},
        },
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/Address"}, "work": {"$ref": "#/$defs/Address"}},
    },
    "definitions_legacy": {
        "definitions": {"Id": {"type": "integer", "exclusiveMinimum": 0}},
        "type": "array", "items": {"$ref": "#/definitions/Id"},
    },
    "anyof_oneof_nullable": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]},
            "kind": {"oneOf": [{"const": "a"}, {"const": "b"}]},
            "maybe": {"type": ["string", "null"], "default": None},
        },
    },
    "enums": {"type": "object",
              "properties": {"color": {"enum": ["red", "green", "blue"], "default": "red"},
                             "level": {"type": "integer", "enum": [1, 2, 3]},
                             "fixed": {"const": 42}}},
    "string_formats": {
        "type": "object",
        "properties": {
            "email": {"type": "string", "format": "email"},
            "when": {"type": "string", "format": "date-time"},
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "site": {"type": "string", "format": "uri"},
            "ip": {"type": "string", "format": "ipv4"},
        },
    },
    "integer_and_number_bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "step": {"type": "integer", "multipleOf": 5},
        },
    },
    "annotations_everywhere": {
        "type": "object",
        "title": "T", "description": "D", "$comment": "c", "deprecated": False,
        "examples": [{"a": 1}],
        "properties": {"a": {"type": "integer", "title": "A", "description": "the a", "default": 1,
                             "readOnly": True, "examples": [1, 2]}},
    },
    "array_tuple": {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "integer"}],
        "items": False,
    },
    "object_misc": {
        "type": "object",
        "patternProperties": {"^x-": {"type": "string"}},
        "propertyNames": {"pattern": "^[a-z-]+$"},
        "minProperties": 1, "maxProperties": 5,
        "unevaluatedProperties": False,
    },
    # Values of annotation / data keywords are data, not schemas: keywords inside them are not checked.
    "keywords_inside_data_are_ignored": {
        "type": "object",
        "default": {"not": 1, "allOf": []},
        "examples": [{"if": True}],
        "properties": {"not": {"type": "string"}, "format": {"type": "string"}, "allOf": {"enum": [{"not": 1}]}},
    },
    "boolean_subschemas": {"type": "object", "properties": {"anything": True, "never": False},
                           "additionalProperties": True},
}


@pytest.mark.parametrize("schema", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_accepts_realistic_schemas(schema):
    check_schema(schema)


@pytest.mark.parametrize("schema", [True, False, {}])
def test_accepts_trivial_schemas(schema):
    check_schema(schema)


# ---------------------------------------------------------------- rejected: unsupported keyword


@pytest.mark.parametrize(
    "schema,keyword,path",
    [
        ({"not": {"type": "string"}}, "not", "#"),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf", "#"),
        ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}, "else": {}}, "if", "#"),
        ({"type": "object", "then": {"required": ["b"]}}, "then", "#"),
        ({"type": "object", "else": {"required": ["b"]}}, "else", "#"),
        ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas", "#"),
        ({"type": "object", "properties": {"x": {"type": "array", "items": {"not": {"const": 1}}}}},
         "not", "#/properties/x/items"),
        ({"$defs": {"A": {"type": "object", "allOf": []}}, "$ref": "#/$defs/A"}, "allOf", "#/$defs/A"),
        ({"anyOf": [{"type": "string"}, {"type": "object", "properties": {"q": {"if": {}}}}]},
         "if", "#/anyOf/1/properties/q"),
        ({"type": "array", "prefixItems": [{"type": "integer"}, {"minContains": 1}]},
         "minContains", "#/prefixItems/1"),
        ({"type": "object", "additionalProperties": {"type": "object", "dependentSchemas": {}}},
         "dependentSchemas", "#/additionalProperties"),
        ({"type": "string", "contentSchema": {"type": "object"}}, "contentSchema", "#"),
        ({"type": "object", "properties": {"a": {"type": "string", "x-custom": 1}}}, "x-custom", "#/properties/a"),
    ],
    ids=["not", "allOf", "if-then-else", "then", "else", "dependentSchemas", "nested-items-not",
         "defs-allOf", "anyOf-props-if", "prefixItems-minContains", "additionalProperties", "contentSchema",
         "vendor-extension"],
)
def test_rejects_unsupported_keyword_naming_keyword_and_path(schema, keyword, path):
    with pytest.raises(ValueError) as ei:
        check_schema(schema)
    msg = str(ei.value)
    assert repr(keyword) in msg, msg
    assert f"(at {path})" in msg, msg


@pytest.mark.parametrize(
    "schema,fmt,path",
    [
        ({"type": "string", "format": "regex"}, "regex", "#"),
        ({"type": "string", "format": "credit-card"}, "credit-card", "#"),
        ({"type": "object", "properties": {"p": {"type": "string", "format": "phone"}}}, "phone", "#/properties/p"),
        ({"type": "integer", "format": "int32"}, "int32", "#"),
    ],
)
def test_rejects_unsupported_format_naming_format_and_path(schema, fmt, path):
    with pytest.raises(ValueError) as ei:
        check_schema(schema)
    msg = str(ei.value)
    assert repr(fmt) in msg, msg
    assert f"(at {path})" in msg, msg
    assert "email" in msg and "uuid" in msg, msg  # lists what is supported


# ---------------------------------------------------------------- rejected: not a schema where one is expected


@pytest.mark.parametrize(
    "schema,path",
    [
        (5, "#"),
        ("string", "#"),
        (None, "#"),
        ([{"type": "string"}], "#"),
        ({"properties": {"x": 5}}, "#/properties/x"),
        ({"properties": {"x": "string"}}, "#/properties/x"),
        ({"$defs": {"A": []}}, "#/$defs/A"),
        ({"anyOf": [{"type": "string"}, 3]}, "#/anyOf/1"),
        ({"oneOf": [None]}, "#/oneOf/0"),
        ({"prefixItems": ["x"]}, "#/prefixItems/0"),
        ({"patternProperties": {"^a": 1}}, "#/patternProperties/^a"),
    ],
)
def test_rejects_non_schema_values(schema, path):
    with pytest.raises(ValueError) as ei:
        check_schema(schema)
    msg = str(ei.value)
    assert f"at {path} must be an object or a boolean" in msg, msg


@pytest.mark.parametrize(
    "schema,keyword,kind",
    [
        ({"properties": [{"type": "string"}]}, "properties", "an object"),
        ({"$defs": "A"}, "$defs", "an object"),
        ({"patternProperties": ["^a"]}, "patternProperties", "an object"),
        ({"anyOf": {"type": "string"}}, "anyOf", "an array"),
        ({"oneOf": "x"}, "oneOf", "an array"),
        ({"type": "array", "prefixItems": {"type": "string"}}, "prefixItems", "an array"),
    ],
)
def test_rejects_malformed_containers(schema, keyword, kind):
    with pytest.raises(ValueError) as ei:
        check_schema(schema)
    msg = str(ei.value)
    assert repr(keyword) in msg and "(at #)" in msg and f"must be {kind}" in msg, msg


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": 5},
        {"type": "object", "additionalProperties": "no"},
        {"type": "array", "contains": []},
        {"type": "array", "items": [{"not": {"type": "string"}}]},
    ],
    ids=["items-number", "additionalProperties-string", "contains-list", "items-list-with-not"],
)
def test_rejects_non_schema_value_of_single_subschema_keyword(schema):
    with pytest.raises(ValueError):
        check_schema(schema)


@pytest.mark.parametrize("fmt", [["email"], {"name": "email"}])
def test_unhashable_format_is_a_value_error(fmt):
    with pytest.raises(ValueError, match="format"):
        check_schema({"type": "string", "format": fmt})

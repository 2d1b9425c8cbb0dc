"""JSON schemas for the structured-output tests (engine and server): nested objects, arrays, enums, bounded
numbers, required / optional fields, additionalProperties false (OpenAI `strict`). Strings and arrays are bounded
so that even a random model finishes well within the token budget."""
from __future__ import annotations

import jsonschema

S = {"type": "string", "maxLength": 8}

SCHEMAS = {
    "invoice": {"type": "object", "properties": {
        "number": S, "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
        "paid": {"type": "boolean"}}, "required": ["number", "total", "paid"], "additionalProperties": False},
    "person_optional": {"type": "object", "properties": {
        "name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "email": S},
        "required": ["name"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "vendor": {"type": "object", "properties": {"name": S, "address": {"type": "object", "properties": {
            "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"],
            "additionalProperties": False}}, "required": ["name", "address"], "additionalProperties": False}},
        "required": ["vendor"], "additionalProperties": False},
    "line_items": {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1,
                                                                     "maximum": 9}},
                  "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "enum_shape": {"type": "object", "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]}, "color": {"type": "string", "enum": ["red", "blue"]}},
        "required": ["shape", "color"], "additionalProperties": False},
    "bounded_numbers": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "integer", "exclusiveMinimum": 10,
                                                                      "exclusiveMaximum": 20},
        "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125}}, "required": ["x", "y", "score"],
        "additionalProperties": False},
    "string_array": {"type": "array", "items": S, "minItems": 2, "maxItems": 4},
    "ui_element": {"type": "object", "properties": {
        "kind": {"enum": ["button", "link", "input"]}, "label": S,
        "bbox": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 4,
                 "maxItems": 4}}, "required": ["kind", "bbox"], "additionalProperties": False},
    "nullable_anyof": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "null"}]},
        "unit": {"type": ["string", "null"], "maxLength": 4}}, "required": ["value", "unit"],
        "additionalProperties": False},
    "receipt_defs": {"$defs": {"money": {"type": "object", "properties": {
        "amount": {"type": "integer", "minimum": 0, "maximum": 9999}, "currency": {"enum": ["USD", "EUR"]}},
        "required": ["amount", "currency"], "additionalProperties": False}},
        "type": "object", "properties": {"subtotal": {"$ref": "#/$defs/money"}, "tax": {"$ref": "#/$defs/money"}},
        "required": ["subtotal", "tax"], "additionalProperties": False},
    "const_and_bool": {"type": "object", "properties": {"version": {"const": 2}, "ok": {"type": "boolean"}},
                       "required": ["version", "ok"], "additionalProperties": False},
}


def check(text: str, schema: dict) -> None:
    """The text is JSON valid against the schema (raises with the reason otherwise)."""
    import json

    jsonschema.validate(json.loads(text), schema)

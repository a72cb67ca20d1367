"""`response_format` of both APIs → the JSON schema text that `SamplingParams.json_schema` constrains to.

Spellings accepted, on either route:
- native (LoRAX): `{"type": "json_object", "schema": {...}}`, and `{"type": "json_schema", "schema": {...}}`;
- OpenAI: `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- `{"type": "json_object"}` without a schema: any JSON object, as OpenAI's JSON mode.
"""

from __future__ import annotations

import json

from loraplex.sampling.structured import JSON_OBJECT_SCHEMA
from loraplex.server.protocol import ResponseFormat


def json_schema_of(fmt: ResponseFormat | None) -> str | None:
    """The schema the output must follow; None for free text. ValueError when a json_schema has no schema."""
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.schema_
    if fmt.json_schema is not None and "schema" in fmt.json_schema:
        schema = fmt.json_schema["schema"]
    if schema is None:
        if fmt.type == "json_schema":
            raise ValueError('response_format of type "json_schema" needs a schema: give json_schema.schema '
                             '(OpenAI) or schema (LoRAX)')
        return JSON_OBJECT_SCHEMA
    return json.dumps(schema)

"""Request input: path segments, the query string and the JSON body, decoded into their annotations.

Each decoder is built once per route, at start-up. Only what the client sent maps to the client's
errors: a body declared as anything but UTF-8 JSON, or compressed, is a 415 (read as it is, it
would be "not JSON"), a body that is not JSON a 400, a non-finite number (`nan`, `inf`) in the
path or the query a 422, as JSON refuses one in the body, and input of the
wrong shape a 422 naming every field that is wrong (msgspec reports the first; the error path
looks at each field on its own). A body without a `Content-Type` is read as JSON.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
import msgspec.inspect
from starlette.requests import Request

from errors import MESSAGES, FieldError, MalformedRequestError, RequestValidationError, UnsupportedMediaTypeError
from openapi import Param, type_schema

Binder = Callable[[Request], Awaitable[Any]]
NOT_FINITE = "Expected a finite number"
SHOWN_CHARACTERS = 256  # the longest offending string a 422 echoes in `validation_errors[].value`
_MSGSPEC_PATH = re.compile(r" - at `\$\.?(.*)`$")  # where msgspec says the problem is
# application/json, or a structured +json type (application/merge-patch+json), with any parameters.
_JSON_MEDIA_TYPE = re.compile(r"\s*application/(?:[\w.-]+\+)?json\s*(?:;|$)", re.IGNORECASE)
_CHARSET = re.compile(r';\s*charset\s*=\s*"?([^";\s]*)', re.IGNORECASE)  # JSON is UTF-8 (RFC 8259)
_UTF8 = re.compile(r"utf-?8|us-ascii|ascii", re.IGNORECASE)  # ASCII text is UTF-8 too


def path_binder(name: str, kind: Any) -> Binder:
    form = _text_form(msgspec.inspect.type_info(kind))

    async def path(request: Request) -> Any:
        raw = request.path_params[name]
        if form is not None and not form[0].fullmatch(raw):
            raise RequestValidationError([FieldError(name, form[1], _shown(raw))])
        try:
            value = msgspec.convert(raw, kind, strict=False)
        except msgspec.ValidationError as exc:
            raise RequestValidationError(_in_text_terms(validation_errors(exc, raw, prefix=name))) from None
        if not _finite(value):
            raise RequestValidationError([FieldError(name, NOT_FINITE, _shown(raw))])
        return value

    return path


def struct_params(kind: type[msgspec.Struct], location: str) -> list[Param]:
    """The OpenAPI parameters of a `query` or `headers` Struct: one per field, `location` "query" or "header"."""
    _, components = type_schema(kind)
    schema = components.pop(kind.__name__)  # the Struct itself is not documented, its fields are
    required = set(schema.get("required", ()))
    properties = schema.get("properties", {})
    return [Param(name, location, prop, name in required, components) for name, prop in properties.items()]


def query_binder(kind: type[msgspec.Struct]) -> Binder:
    """The query string as `kind`: a sequence field (`?tag=a&tag=b`) gets every value.

    Any other field given twice is a 422, as for headers: a proxy or firewall that checked the
    first `?id=` and a handler taking the last would each act on a different request. Names no
    field reads are left to the Struct (ignored, or refused with `forbid_unknown_fields`).
    """
    declared = msgspec.structs.fields(kind)
    fields = {f.encode_name for f in declared}
    many = {f.encode_name for f in declared if _takes_many(msgspec.inspect.type_info(f.type))}

    def read(request: Request) -> dict[str, Any]:
        values: dict[str, Any] = {}
        twice: list[str] = []
        for name, value in request.query_params.multi_items():
            if name in many:
                values.setdefault(name, []).append(value)
            elif name not in values:
                values[name] = value
            elif name in fields and name not in twice:
                twice.append(name)
        if twice:
            raise RequestValidationError([FieldError(name, _GIVEN_TWICE) for name in twice])
        return values

    return _fields_binder(kind, read)


def headers_binder(kind: type[msgspec.Struct]) -> Binder:
    """Request headers as `kind`, a field per header, matched without regard to case (`if_match:
    str | None = msgspec.field(name="If-Match")`, or `rename="kebab"` on the Struct).

    A sequence field takes every value, from repeated lines and from comma-separated ones (`X-Ids:
    1,2`, as OpenAPI's `simple` style and proxies that join lines write them). Any other field
    given twice is a 422: one reader taking the first and another the last (a guard's check and
    the handler) would each act on a different request.
    """
    fields = msgspec.structs.fields(kind)
    wire = {f.encode_name.lower(): f.encode_name for f in fields}
    if len(wire) < len(fields):
        raise ValueError(f"{kind.__name__}: two fields name one header (header names ignore case)")
    many = {f.encode_name for f in fields if _takes_many(msgspec.inspect.type_info(f.type))}

    def read(request: Request) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, value in request.headers.items():  # lower case, as sent
            if (field := wire.get(name)) is None:
                continue
            if field in many:
                values.setdefault(field, []).extend(item.strip() for item in _LIST_ITEM.findall(value))
            elif field in values:
                raise RequestValidationError([FieldError(field, _GIVEN_TWICE)])
            else:
                values[field] = value
        return values

    return _fields_binder(kind, read)


_GIVEN_TWICE = "Given more than once"
_LIST_ITEM = re.compile(r'(?:[^,"]|"[^"]*")+')  # one item of a comma-separated header value (RFC 9110 5.6.1)


def _fields_binder(kind: type[msgspec.Struct], read: Callable[[Request], dict[str, Any]]) -> Binder:
    """`kind` from the text values `read` finds in a request, each written as its schema says (`_text_form`)."""
    fields = [(f, msgspec.inspect.type_info(f.type)) for f in msgspec.structs.fields(kind)]
    # Fields that may hold a float: text converted to one may be `nan` or `inf`, which JSON cannot carry.
    floats = [f for f, info in fields if _holds_float(info)]
    forms = {f.encode_name: form for f, info in fields if (form := _text_form(info))}
    # Unions of an integer and more (`int | Literal["all"]`): checked once read, by what came of the text.
    mixed = [f for f, info in fields if _int_among_others(info)]

    async def bind(request: Request) -> Any:
        values = read(request)
        errors = _misread(values, forms)
        try:
            decoded = msgspec.convert(values, kind, strict=False)
        except msgspec.ValidationError as exc:
            named = {error.field.partition("[")[0] for error in errors}  # a field's misread items name it once
            errors += [
                e
                for e in validation_errors(exc, values, kind=kind, strict=False)
                if e.field.partition("[")[0] not in named
            ]
        else:
            errors += [
                FieldError(f.encode_name, _INTEGER_FORM[1], _shown(text))
                for f in mixed
                for text, value in _read_as(values.get(f.encode_name), getattr(decoded, f.name))
                if type(value) is int and not _INTEGER_FORM[0].fullmatch(text)
            ]
        if errors:
            raise RequestValidationError(_in_text_terms(errors))
        if wrong := [f.encode_name for f in floats if not _finite(getattr(decoded, f.name))]:
            raise RequestValidationError([FieldError(name, NOT_FINITE, _shown(values[name])) for name in wrong])
        return decoded

    return bind


def _text_form(info: msgspec.inspect.Type) -> tuple[re.Pattern[str], str] | None:
    """The text a path or query value of this type must be, where msgspec's lax conversion (the
    one that reads text) takes more than the type's schema says, and the message when it is not.

    Lax, `1e1` and `10.0` are the integer 10, so one resource would answer at several paths; a bare
    number is a date-time in Unix seconds (`20260101` is a day in August 1970) or a duration in
    seconds, where the schema documents RFC 3339 and ISO 8601 text. None: nothing more is taken.
    """
    kinds = _member_kinds(info)
    # Only where every member is of the one kind: `int | Literal["all"]` or `int | UUID` takes more.
    return _FORMS.get(kinds.pop()) if len(kinds) == 1 else None


_NOT_A_NUMBER = re.compile(r"(?![-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$).*", re.DOTALL)
# No leading zero: msgspec refuses `05` too, but says only that it got text.
_INTEGER_FORM = (re.compile(r"-?(?:0|[1-9][0-9]*)|null"), "Expected an integer, written in digits")
_FORMS: dict[type, tuple[re.Pattern[str], str]] = {
    msgspec.inspect.IntType: _INTEGER_FORM,
    msgspec.inspect.DateTimeType: (
        _NOT_A_NUMBER,
        "Expected an RFC 3339 date-time (2025-09-23T10:30:00Z), not a number",
    ),
    msgspec.inspect.TimeDeltaType: (_NOT_A_NUMBER, "Expected an ISO 8601 duration (PT30S), not a number"),
}


# msgspec's words for a text value it could not read as a scalar, as a reader of a query string
# or a header would put them: every such value is text, so "got `str`" says nothing.
_TEXT_MESSAGES = {
    "Expected `bool`, got `str`": "Expected true or false (or 1 or 0)",
    "Expected `bool | null`, got `str`": "Expected true or false (or 1 or 0), or null",
    "Expected `float`, got `str`": "Expected a number",
    "Expected `float | null`, got `str`": "Expected a number, or null",
}


def _in_text_terms(errors: list[FieldError]) -> list[FieldError]:
    return [FieldError(e.field, _TEXT_MESSAGES.get(e.message, e.message), e.value) for e in errors]


def _int_among_others(info: msgspec.inspect.Type) -> bool:
    """Whether a field's type is a union of an integer and another type (None aside), or a sequence of one."""
    kinds = _member_kinds(info)
    return msgspec.inspect.IntType in kinds and len(kinds) > 1


def _member_kinds(info: msgspec.inspect.Type) -> set[type]:
    """The kinds of type a field's value or a sequence's items may be, None aside: `null`, which
    msgspec reads as None, is in each form."""
    kinds = {type(item) for kind in _alternatives(info) for item in (_items(kind) or (kind,))}
    kinds.discard(msgspec.inspect.NoneType)
    return kinds


def _read_as(texts: str | list[str] | None, values: Any) -> list[tuple[str, Any]]:
    """Each text of a field with the value read from it; a sequence's item by item."""
    if texts is None:
        return []
    return list(zip(texts, values, strict=False)) if isinstance(texts, list) else [(texts, values)]


def _misread(values: dict[str, Any], forms: dict[str, tuple[re.Pattern[str], str]]) -> list[FieldError]:
    """Each query or header value whose text is not of its field's form (`_text_form`); a sequence's
    item by item (`ids[1]`)."""
    errors = []
    for name, (form, message) in forms.items():
        given = values.get(name)
        texts = enumerate(given) if isinstance(given, list) else () if given is None else ((None, given),)
        errors += [FieldError(f"{name}[{i}]" if i is not None else name, message, _shown(text))
                   for i, text in texts if not form.fullmatch(text)]  # fmt: skip
    return errors


def _finite(value: Any) -> bool:
    """No NaN or infinity in `value` (a float, or a sequence of them): the JSON body refuses them too."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple | set | frozenset):
        return all(_finite(item) for item in value)
    return True


def _holds_float(info: msgspec.inspect.Type) -> bool:
    """Whether a query or header field's type may hold a float, bounds, `| None` and sequences aside."""
    return any(
        isinstance(kind, msgspec.inspect.FloatType) or any(_holds_float(item) for item in _items(kind))
        for kind in _alternatives(info)
    )


def _takes_many(info: msgspec.inspect.Type) -> bool:
    """Whether a query or header field is a sequence (list, set, tuple), bounds and `| None` aside."""
    return any(isinstance(kind, _SEQUENCES) for kind in _alternatives(info))


def _alternatives(info: msgspec.inspect.Type) -> Iterator[msgspec.inspect.Type]:
    """The types a field's type may be, its bounds (`Meta`) and unions (`| None`) unwrapped."""
    if isinstance(info, msgspec.inspect.Metadata):
        yield from _alternatives(info.type)
    elif isinstance(info, msgspec.inspect.UnionType):
        for member in info.types:
            yield from _alternatives(member)
    else:
        yield info


def _items(info: msgspec.inspect.Type) -> tuple[msgspec.inspect.Type, ...]:
    """The types a sequence's items may be; none for any other type."""
    if isinstance(info, msgspec.inspect.TupleType):
        return info.item_types
    return (info.item_type,) if isinstance(info, _ONE_ITEM_TYPE) else ()


_ONE_ITEM_TYPE = (msgspec.inspect.ListType, msgspec.inspect.SetType, msgspec.inspect.FrozenSetType,
                  msgspec.inspect.VarTupleType)  # fmt: skip
_SEQUENCES = (*_ONE_ITEM_TYPE, msgspec.inspect.TupleType)


def body_binder(kind: type[msgspec.Struct]) -> Binder:
    decoder = msgspec.json.Decoder(kind)  # built once per route

    async def body(request: Request) -> Any:
        media_type = request.headers.get("content-type")
        if media_type is not None and not _JSON_MEDIA_TYPE.match(media_type):
            # A browser sends text/plain and form bodies across sites without asking first (no CORS
            # preflight); read as JSON anyway, they would let any page post on a signed-in user's behalf.
            raise UnsupportedMediaTypeError(f"{MESSAGES[415]}: send the body as application/json")
        if media_type is not None and (charset := _CHARSET.search(media_type)) and not _UTF8.fullmatch(charset[1]):
            raise UnsupportedMediaTypeError(f"{MESSAGES[415]}: send the body in UTF-8, not {charset[1][:40]!r}")
        coding = request.headers.get("content-encoding", "").strip()
        if coding and coding.lower() != "identity":  # read as it is, a gzipped body is "not JSON"
            raise UnsupportedMediaTypeError(f"{MESSAGES[415]}: send the body uncompressed, not {coding[:40]!r}")
        raw = await request.body()
        try:
            return decoder.decode(raw)
        except msgspec.ValidationError as exc:
            wrong_shape = exc  # found while parsing: the rest of the body may not even be JSON
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _malformed(exc) from None
        try:
            document = msgspec.json.decode(raw)
        except msgspec.ValidationError:  # valid JSON with a number no float holds (1e400): name its field
            raise RequestValidationError([_field_error(wrong_shape, None, "")]) from None
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _malformed(exc) from None
        raise RequestValidationError(validation_errors(wrong_shape, document, kind=kind))

    return body


def _malformed(exc: Exception) -> MalformedRequestError:
    """400 for a body that is not JSON, or nested deeper than msgspec decodes (about 1,000 levels)."""
    if isinstance(exc, RecursionError):
        return MalformedRequestError("Malformed request body: JSON nested too deeply")
    return MalformedRequestError("Malformed request body: not valid JSON")


def validation_errors(
    exc: msgspec.ValidationError,
    document: Any,
    *,
    kind: type[msgspec.Struct] | None = None,
    strict: bool = True,
    prefix: str = "",
) -> list[FieldError]:
    """Every field's problem with `document` as `kind`, where msgspec stops at the first (`exc`).

    Only on the error path: each field is converted on its own, missing and unknown ones named.
    """
    errors = []
    if kind is not None and isinstance(document, dict):
        known = set()
        for field in msgspec.structs.fields(kind):
            known.add(field.encode_name)
            if field.encode_name not in document:
                if field.required:
                    errors.append(FieldError(field.encode_name, "Field required"))
                continue
            value = document[field.encode_name]
            try:
                msgspec.convert(value, field.type, strict=strict)
            except msgspec.ValidationError as field_exc:
                errors.append(_field_error(field_exc, value, field.encode_name))
        if kind.__struct_config__.forbid_unknown_fields:
            errors += [
                FieldError(name, "Unknown field", _shown(value))
                for name, value in document.items()
                if name not in known
            ]
    return errors or [_field_error(exc, document, prefix)]


def _field_error(exc: msgspec.ValidationError, value: Any, prefix: str) -> FieldError:
    """msgspec's `Expected `int`, got `str` - at `$.a[0]`` as the field `prefix.a[0]` and its message."""
    text = str(exc)
    match = _MSGSPEC_PATH.search(text)
    path = match.group(1) if match else ""
    field = f"{prefix}.{path}" if prefix and path and not path.startswith("[") else prefix + path
    return FieldError(field, text[: match.start()] if match else text, None if path else _shown(value))


def _shown(value: Any) -> Any:
    """The offending value, echoed when it is a scalar of a readable size; else null.

    A list or object may nest a thousand levels (the envelope could not even be encoded) and a
    string may be a megabyte: the field's name and message say what is wrong with them.
    """
    if isinstance(value, str):
        return value if len(value) <= SHOWN_CHARACTERS else None
    return value if isinstance(value, int | float | bool) else None

"""The shape of data read from a run folder, checked by type before any of it is used.
Unpickled plain data, or JSON, can still be the wrong data: a list where a dict belongs,
a string where a step count belongs. A schema says what tdpo-train writes, and `check`
names the first place where a value differs from it.

A schema is one of:
- a type: int (not bool), float (an int too), any other by isinstance (bool, str,
  type(None), torch.Tensor, torch.Size, ...; object: anything);
- a dict {key: schema}: a dict with those keys (each value checked), none other;
- MapOf(key schema, value schema): a dict of any size;
- ListOf(schema): a list or tuple of any length;
- Seq([schema, ...]): a list or tuple of those, one each;
- AnyOf(schema, ...): one of them;
- Fields(cls, {attribute: schema}): an instance of cls with those attributes (those
  that cls, a dataclass, declares);
- like(value): what `value` is, its dicts' keys optional (see like)."""
from __future__ import annotations

import collections

import torch


DICTS = (dict, collections.OrderedDict)  # a module's state_dict is an OrderedDict


class Malformed(ValueError):
    pass


class MapOf:
    def __init__(self, key, value):
        self.key, self.value = key, value


class ListOf:
    def __init__(self, item):
        self.item = item


class Seq:
    def __init__(self, items: list):
        self.items = items


class AnyOf:
    def __init__(self, *options):
        self.options = options


class Fields:
    def __init__(self, cls, attributes: dict):
        self.cls, self.attributes = cls, attributes


class _Partial(dict):
    """A dict schema whose keys may be missing (like's)."""


SCALAR = AnyOf(bool, int, float, str, type(None))
PLAIN = AnyOf(SCALAR, ListOf(SCALAR))  # a hyperparameter: a number, a string, a tuple


def _name(schema) -> str:
    if isinstance(schema, type):
        return {int: "a whole number", float: "a number", bool: "true or false",
                str: "a string", type(None): "nothing (None)",
                torch.Tensor: "a tensor"}.get(schema, schema.__name__)
    if isinstance(schema, dict):
        return "a dict of " + ", ".join(map(repr, schema)) if schema else "an empty dict"
    if isinstance(schema, MapOf):
        return "a dict"
    if isinstance(schema, ListOf):
        return "a list"
    if isinstance(schema, Seq):
        return f"a list of {len(schema.items)}"
    if isinstance(schema, Fields):
        return f"a {schema.cls.__name__}"
    return " or ".join(_name(o) for o in schema.options)


def _is(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check(value, schema, where: str = "it") -> None:
    """Raises Malformed, naming where (`where` and the keys and indices below it), if
    `value` does not have the shape `schema` describes."""
    def wrong():
        return Malformed(f"{where} is {type(value).__name__}, where tdpo-train writes "
                         f"{_name(schema)}")

    if isinstance(schema, type):
        if not _is(value, schema):
            raise wrong()
    elif isinstance(schema, dict):
        if type(value) not in DICTS:
            raise wrong()
        extra = value.keys() - schema.keys()
        missing = set() if isinstance(schema, _Partial) else schema.keys() - value.keys()
        if extra or missing:
            raise Malformed(f"{where} has keys {sorted(map(repr, extra))} that tdpo-train "
                            f"does not write" if extra else
                            f"{where} lacks the keys {sorted(map(repr, missing))}")
        for key, item in value.items():
            check(item, schema[key], f"{where}[{key!r}]")
    elif isinstance(schema, MapOf):
        if type(value) not in DICTS:
            raise wrong()
        for key, item in value.items():
            check(key, schema.key, f"a key of {where} ({key!r})")
            check(item, schema.value, f"{where}[{key!r}]")
    elif isinstance(schema, ListOf):
        if type(value) not in (list, tuple):
            raise wrong()
        for i, item in enumerate(value):
            check(item, schema.item, f"{where}[{i}]")
    elif isinstance(schema, Seq):
        if type(value) not in (list, tuple) or len(value) != len(schema.items):
            raise wrong()
        for i, (item, item_schema) in enumerate(zip(value, schema.items)):
            check(item, item_schema, f"{where}[{i}]")
    elif isinstance(schema, Fields):
        if type(value) is not schema.cls:
            raise wrong()
        declared = getattr(schema.cls, "__dataclass_fields__", schema.attributes)
        for name, attribute in schema.attributes.items():
            if name not in declared:  # a field that this torch release's class lacks
                continue
            if not hasattr(value, name):
                raise Malformed(f"{where} lacks its {name}")
            check(getattr(value, name), attribute, f"{where}.{name}")
    else:
        for option in schema.options:
            try:
                return check(value, option, where)
            except Malformed:
                pass
        raise wrong()


def like(value):
    """The schema of what `value` is, for state that this run's own objects write (a
    scheduler's, an optimizer's hyperparameters): the same types, lists of the same
    length, and dicts with no key that `value` lacks (a missing one keeps its value)."""
    if isinstance(value, dict):
        return _Partial({k: like(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return Seq([like(v) for v in value])
    if isinstance(value, torch.Tensor):
        return torch.Tensor
    return type(value) if not isinstance(value, float) else float

"""Reading a run folder's files as data, never as code. A checkpoint is a pickle, and
unpickling can call any function the file names, so a checkpoint copied from elsewhere
could run code when it is loaded; and torch's own weights-only allowlist is more than
data (importing torch.distributed.checkpoint adds traceback.FrameSummary to it, which
reads a line of any file when it is built). So every pickle here is read by an unpickler
of ours that knows only the few globals tdpo-train's files name (ALLOWED_IN_TORCH_FILES,
and torch.distributed.checkpoint's metadata classes for its .metadata), then checked by
type against what tdpo-train writes (schema.py), before any of it is used. Every file
is opened without following a link, and must be a regular file. The sharded form is read
by a storage reader of ours (dcp_reader): its .metadata once, through that unpickler,
and its shards through it too, so torch's own reading (its plain-pickle fallback on a
rank-local __<rank>.metadata included) never runs. A file that fails any of this is
refused with a SystemExit that names it and says why."""
from __future__ import annotations

import collections
import enum
import errno
import functools
import io
import json
import os
import pathlib
import pickle
import posixpath
import types
import zipfile

import torch

from . import schema
from .run_folder import what_is_wrong

HOW_TO_CONTINUE = ("A run folder is read as data: nothing in it is run, and a file "
                   "holds only tensors, numbers, strings, lists and dicts in the shape "
                   "tdpo-train writes. Nothing in the run folder was changed. Resume a run "
                   "folder that tdpo-train wrote, or start the run over with a new --out")


def refusal(path: str, why: str) -> SystemExit:
    return SystemExit(f"tdpo-train: refused to load {path}: {why}. {HOW_TO_CONTINUE}")


def open_file(path: str):
    """`path` opened for reading in binary mode, refused unless it is a regular file of
    its own: a symbolic link is not followed, a device or a pipe not read."""
    try:  # O_NONBLOCK: opening a pipe does not wait for a writer (fstat refuses it)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise refusal(path, "it is a symbolic link" if e.errno == errno.ELOOP else
                      f"it cannot be opened ({e.strerror})") from None
    why = what_is_wrong(os.fstat(fd))
    if why is not None:
        os.close(fd)
        raise refusal(path, why)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check(obj, shape, path: str, what: str = "it"):
    """obj (`what` the file at `path` holds), refused unless it has `shape` (a schema)."""
    try:
        schema.check(obj, shape, what)
    except schema.Malformed as e:
        raise refusal(path, str(e)) from None
    return obj


def json_file(path: str, shape):
    """The JSON value in `path`, of `shape`."""
    with open_file(path) as f:
        try:
            obj = json.loads(f.read().decode("utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise refusal(path, f"it is not JSON ({e})") from None
    return check(obj, shape, path)


class _AllowlistUnpickler(pickle.Unpickler):
    """pickle, with every global the file names looked up in `allowed`: nothing else is
    imported or called."""
    allowed: dict = {}

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"it holds {module}.{name}, which is not plain "
                                         "data")
        return self.allowed[module, name]


def _named(*objects) -> dict:
    return {(o.__module__, o.__qualname__): o for o in objects}


class _TorchFileUnpickler(_AllowlistUnpickler):
    # All that torch.save names for tdpo-train's state (dicts, lists, tuples, numbers,
    # strings and tensors): a tensor's rebuild function and the OrderedDict of its
    # (empty) hooks. torch.load finds its storage types itself.
    allowed = _named(torch._utils._rebuild_tensor_v2, collections.OrderedDict)


# What torch.load takes as pickle_module: torch.load subclasses its Unpickler to find
# storage types and tensor data, and calls nothing else of it for a zip file (the only
# format read).
_TORCH_PICKLE = types.SimpleNamespace(__name__=__name__, Unpickler=_TorchFileUnpickler)


def _torch_object(f, path: str):
    """The object in the file `f` that torch.save wrote, read by _TorchFileUnpickler."""
    try:
        names = zipfile.ZipFile(f).namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise refusal(path, "it is not a file that torch.save wrote (a bare pickle, "
                      "say)") from None
    prefixes = {n.split("/", 1)[0] for n in names}
    climbing = [n for n in names if n.startswith("/") or "\\" in n or
                ".." in posixpath.normpath(n).split("/") or "/" not in n]
    if climbing or len(prefixes) != 1:
        raise refusal(path, "its zip members are not one archive folder's ("
                      f"{(climbing or sorted(names))[0]!r})")
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise refusal(path, "it is a TorchScript archive, which holds code")
    if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        # torch.load would then swap our unpickler for its own allowlist (which admits
        # traceback.FrameSummary) or, given ours, fail with a message about pickle_module.
        raise SystemExit(f"tdpo-train: cannot read {path} while TORCH_FORCE_WEIGHTS_ONLY_LOAD "
                         "is set: it makes torch.load use torch's weights-only allowlist "
                         "in place of tdpo-train's stricter unpickler. Unset it for "
                         "tdpo-train; nothing in the run folder was changed")
    f.seek(0)
    try:
        return torch.load(f, map_location="cpu", weights_only=False,
                          pickle_module=_TORCH_PICKLE)
    except pickle.UnpicklingError as e:
        raise refusal(path, str(e)) from None
    except Exception as e:  # whatever a malformed file raises: it is not loaded either
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise refusal(path, "it is not a file that torch.save wrote "
                      f"({type(e).__name__}: {first})") from None


def torch_file(path: str, shape):
    """The object in the file torch.save wrote at `path`, of `shape` (a schema)."""
    with open_file(path) as f:
        obj = _torch_object(f, path)
    return check(obj, shape, path)


def torch_bytes(data: bytes, where: str, shape):
    """The object torch.save wrote as `data` (an entry of a shard), of `shape`."""
    return check(_torch_object(io.BytesIO(data), where), shape, where)


# -- torch.distributed.checkpoint

@functools.cache
def _metadata_unpickler():
    """An unpickler of torch.distributed.checkpoint's .metadata: its metadata dataclasses,
    and the torch types (dtypes, layouts, sizes) and paths they hold."""
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md
    allowed = _named(md.Metadata, md.TensorStorageMetadata, md.TensorProperties,
                     md._MEM_FORMAT_ENCODING, md.ChunkStorageMetadata,
                     md.BytesStorageMetadata, md.MetadataIndex, md.StorageMeta,
                     fs._StorageInfo, torch.Size, torch.serialization._get_layout,
                     pathlib.PosixPath)
    allowed |= {("torch", name): v for name, v in vars(torch).items()
                if isinstance(v, torch.dtype)}
    allowed["builtins", "getattr"] = _enum_member
    return type("MetadataUnpickler", (_AllowlistUnpickler,), {"allowed": allowed})


def _enum_member(cls, name):
    """getattr(cls, name) of a .metadata pickle, allowed only where it names a member of an
    enum (md._MEM_FORMAT_ENCODING): the form some Pythons pickle a member in (Debian 12's
    3.11.2; 3.10.13, 3.11.7, 3.12.1 and 3.13.0 call the class with the member's value)."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__):
        raise pickle.UnpicklingError(f"it names builtins.getattr of {cls!r}.{name}, which is "
                                     "not a member of a torch.distributed.checkpoint enum")
    return cls[name]


@functools.cache
def _metadata_shape():
    """What a .metadata that torch.distributed.checkpoint wrote holds."""
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.metadata import MetadataIndex
    optional = functools.partial(schema.AnyOf, type(None))
    tensor = schema.Fields(md.TensorStorageMetadata, {
        "properties": schema.Fields(md.TensorProperties, {
            "dtype": torch.dtype, "layout": torch.layout, "requires_grad": bool,
            "memory_format": torch.memory_format, "pin_memory": bool}),
        "size": torch.Size,
        "chunks": schema.ListOf(schema.Fields(md.ChunkStorageMetadata, {
            "offsets": torch.Size, "sizes": torch.Size}))})
    return schema.Fields(md.Metadata, {
        "state_dict_metadata": schema.MapOf(str, schema.AnyOf(
            tensor, schema.Fields(md.BytesStorageMetadata, {}))),
        "planner_data": optional(schema.MapOf(str, schema.ListOf(schema.AnyOf(str, int)))),
        # tdpo-train writes no stream transforms (compression): none is applied
        "storage_data": schema.MapOf(
            schema.Fields(MetadataIndex, {"fqn": str, "offset": optional(torch.Size),
                                          "index": optional(int)}),
            schema.Fields(fs._StorageInfo, {"relative_path": str, "offset": int,
                                            "length": int,
                                            "transform_descriptors": optional(
                                                schema.Seq([]))})),
        "storage_meta": optional(schema.Fields(md.StorageMeta, {
            "checkpoint_id": optional(str, pathlib.PurePath), "save_id": optional(str),
            "load_id": optional(str), "modules": schema.ListOf(str)})),
        "version": optional(str)})


def dcp_metadata(folder: str):
    """The .metadata of the torch.distributed.checkpoint folder `folder`, refused unless
    it holds that metadata and nothing else, its shards files of the folder."""
    path = os.path.join(folder, ".metadata")
    with open_file(path) as f:
        try:
            metadata = _metadata_unpickler()(f).load()
        except pickle.UnpicklingError as e:
            raise refusal(path, str(e)) from None
        except Exception as e:  # whatever a malformed file raises: it is not loaded either
            raise refusal(path, "it is not checkpoint metadata "
                          f"({type(e).__name__}: {e})") from None
    check(metadata, _metadata_shape(), path)
    for info in metadata.storage_data.values():
        name = info.relative_path
        if os.path.basename(name) != name or name in ("", ".", "..") or \
                info.offset < 0 or info.length < 0:
            raise refusal(path, f"it points at data outside {folder} ({name!r})")
        open_file(os.path.join(folder, name)).close()  # a regular file, not a link
    return metadata


def dcp_reader(folder: str):
    """A reader of the torch.distributed.checkpoint folder `folder` for dcp.load."""
    return _reader_class()(folder)


@functools.cache
def _reader_class():
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import LoadItemType

    class CheckedReader(FileSystemReader):
        """torch's file-system reader, every file read through safe_load."""

        def read_metadata(self, *args, **kwargs):
            # Whatever it is asked (torch 2.7 and later ask again for rank=R when the
            # first call fails, and then read __R.metadata with plain pickle), the
            # folder's one .metadata is read; a refusal is a SystemExit, which torch's
            # `except Exception` around the first call does not take for a failure to
            # fall back from, and no other failure comes out of here.
            metadata = dcp_metadata(str(self.path))
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

        def read_data(self, plan, planner):
            folder, by_file = str(self.path), {}
            for item in plan.items:
                by_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                   []).append(item)
            for name, items in by_file.items():
                path = os.path.join(folder, name)
                with open_file(path) as f:
                    for item in items:
                        _read_item(f, path, item, self.storage_data[item.storage_index],
                                   planner)
            done = torch.futures.Future()
            done.set_result(None)
            return done

    def _read_item(f, path, item, info, planner):
        where = f"{path} (its entry {item.storage_index.fqn})"
        f.seek(info.offset)
        data = f.read(info.length)
        if len(data) != info.length:
            raise refusal(where, "the file is shorter than its .metadata says")
        if item.type == LoadItemType.BYTE_IO:
            # handed on as torch.save writes plain data: what the planner loads is that
            plain = io.BytesIO()
            torch.save(torch_bytes(data, where, schema.PLAIN), plain)
            plain.seek(0)
            planner.load_bytes(item, plain)
            return
        try:
            tensor = narrow_tensor_by_index(torch_bytes(data, where, torch.Tensor),
                                            item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
        except SystemExit:
            raise
        except Exception as e:
            raise refusal(where, f"it does not fit its .metadata ({e})") from None
        if target.size() != tensor.size():
            raise refusal(where, f"it holds a tensor of size {tuple(tensor.size())}, where "
                          f"this run's has {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(item, target)

    return CheckedReader


def refusal_in(error: BaseException) -> SystemExit | None:
    """The refusal among the failures of a torch.distributed.checkpoint load (which wraps
    every process's exception in one CheckpointException), if there is one."""
    failures = getattr(error, "failures", {}).values()
    return next((e for e, _ in failures if isinstance(e, SystemExit)), None)

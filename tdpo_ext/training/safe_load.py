"""Reading a checkpoint without running code from it. A checkpoint is a pickle, and
unpickling can call any function the file names, so a checkpoint copied from elsewhere
could run code when it is loaded. Every file of one is read here with only plain data
allowed: torch.load(weights_only=True) for the files tdpo-train writes (tensors, numbers,
strings, lists, tuples, dicts) and for torch.distributed.checkpoint's non-tensor entries,
and an unpickler that knows only torch.distributed.checkpoint's own metadata classes for
its .metadata file, which torch reads with plain pickle. A file holding anything else is
refused with a SystemExit that names it and says why, before any of it is used."""
from __future__ import annotations

import enum
import io
import os
import pathlib
import pickle
import re
import zipfile

import torch

HOW_TO_CONTINUE = ("A checkpoint is loaded without running code from it, so it may hold "
                   "only tensors, numbers, strings, lists and dicts (what tdpo-train "
                   "writes). Nothing in the run folder was changed. Resume from a "
                   "checkpoint that tdpo-train wrote, or start the run over with a new --out")


def refusal(path: str, why: str) -> SystemExit:
    return SystemExit(f"tdpo-train: refused to load {path}: {why}. {HOW_TO_CONTINUE}")


def _what_torch_refused(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only error that names what the file holds (its advice
    to allowlist that, or to load with weights_only=False, is what must not be done)."""
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|"
                      r"\.\s|\n\n|$)", str(error), re.S)
    return found.group(1).strip() if found else "not a weights-only torch file"


def torch_file(path: str):
    """The object in a file torch.save wrote, loaded with weights_only=True."""
    if not zipfile.is_zipfile(path):
        raise refusal(path, "it is not a file that torch.save wrote (a bare pickle, say)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refusal(path, "it holds something other than plain data "
                      f"({_what_torch_refused(e)})") from None


def _metadata_classes() -> dict:
    """What a .metadata pickle of torch.distributed.checkpoint may name: its own metadata
    dataclasses, and the torch types (dtypes, layouts, sizes) and paths they hold."""
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md
    classes = [md.Metadata, md.TensorStorageMetadata, md.TensorProperties,
               md._MEM_FORMAT_ENCODING, md.ChunkStorageMetadata, md.BytesStorageMetadata,
               md.MetadataIndex, md.StorageMeta, fs._StorageInfo, torch.Size,
               torch.serialization._get_layout, pathlib.PosixPath]
    allowed = {(c.__module__, c.__qualname__): c for c in classes}
    allowed |= {("torch", name): v for name, v in vars(torch).items()
                if isinstance(v, torch.dtype)}
    allowed["builtins", "getattr"] = _enum_member
    return allowed


def _enum_member(cls, name):
    """getattr(cls, name) of a .metadata pickle, allowed only where it names a member of an
    enum (md._MEM_FORMAT_ENCODING): the form some Pythons pickle a member in (Debian 12's
    3.11.2; 3.10.13, 3.11.7, 3.12.1 and 3.13.0 call the class with the member's value)."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__):
        raise pickle.UnpicklingError(f"it names builtins.getattr of {cls!r}.{name}, which is "
                                     "not a member of a torch.distributed.checkpoint enum")
    return cls[name]


class _MetadataUnpickler(pickle.Unpickler):
    """pickle, with every global the file names looked up in an allowlist: nothing else
    is imported or called."""

    def __init__(self, file, allowed: dict):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not "
                                         "torch.distributed.checkpoint metadata")
        return self.allowed[module, name]


def check_dcp_metadata(folder: str) -> None:
    """Refuses a torch.distributed.checkpoint folder whose .metadata holds anything but its
    metadata, or points at data outside the folder. torch's FileSystemReader then unpickles
    the same bytes with plain pickle: the same objects, as every global it looks up has
    been found in the allowlist here."""
    from torch.distributed.checkpoint.metadata import Metadata
    path = os.path.join(folder, ".metadata")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, _metadata_classes()).load()
    except pickle.UnpicklingError as e:
        raise refusal(path, str(e)) from None
    except Exception as e:  # whatever a malformed file raises: it is not loaded either
        raise refusal(path, f"it is not checkpoint metadata ({type(e).__name__}: {e})") \
            from None
    if not isinstance(metadata, Metadata):
        raise refusal(path, f"it holds a {type(metadata).__name__}, not checkpoint metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".",
                                                                                   ".."):
            raise refusal(path, f"it points at data outside {folder} ({name!r})")


def weights_only_load_planner(folder: str):
    """torch.distributed.checkpoint's default load planner, the non-tensor entries (the
    optimizer's hyperparameters) of the checkpoint in `folder` loaded with
    weights_only=True rather than plain pickle."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise refusal(f"{folder} (its entry {read_item.dest_index.fqn})",
                              f"it holds something other than plain data "
                              f"({_what_torch_refused(e)})") from None
            # Handed on as torch.save writes plain data: what the planner loads is that.
            plain = io.BytesIO()
            torch.save(obj, plain)
            plain.seek(0)
            super().load_bytes(read_item, plain)

    return WeightsOnlyLoadPlanner()


def refusal_in(error: BaseException) -> SystemExit | None:
    """The refusal among the failures of a torch.distributed.checkpoint load (which wraps
    every process's exception in one CheckpointException), if there is one."""
    failures = getattr(error, "failures", {}).values()
    return next((e for e, _ in failures if isinstance(e, SystemExit)), None)

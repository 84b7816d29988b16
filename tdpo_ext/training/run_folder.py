"""A run folder to resume is checked whole before anything in it is read or written: a
symbolic link in it (a file or a folder) would send a read or a write outside it, a
file with other hard links would let an append reach a file elsewhere, a device or a
pipe is no file tdpo-train writes, and a folder where a file belongs (or the reverse)
would be taken for "no checkpoint" and the stage's record started over. Any of these
is refused, naming the path, with nothing changed."""
from __future__ import annotations

import os
import stat

# Names that tdpo-train gives only to folders (a stage's sharded checkpoint, the one
# it replaces, a model folder, the SFT stage); every other name is a file's, or a folder
# in a model folder that transformers wrote.
FOLDER_NAMES = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "final", "final.tmp",
                "sft")
# Suffixes of the files tdpo-train writes and reads: never a folder.
FILE_SUFFIXES = (".pt", ".json", ".jsonl", ".txt", ".png", ".safetensors", ".distcp",
                 ".metadata")


def what_is_wrong(st: os.stat_result) -> str | None:
    """Why an entry (its lstat) is not a file that a run folder may hold, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file (a device, a pipe or a socket)"
    if st.st_nlink > 1:
        return (f"it has {st.st_nlink - 1} other hard link(s), so a write to it could "
                f"change a file outside the folder")
    return None


def refuse_unsafe_entries(folder: str) -> None:
    """Refuses (SystemExit naming the path) a run folder with a link, a special file,
    or a folder where a file belongs (or the reverse), anywhere under it."""
    if not os.path.isdir(folder):  # the folder named by the user may be a link
        raise SystemExit(f"tdpo-train: --resume {folder}: no such folder")
    for entry in _entries(folder):
        st = entry.stat(follow_symlinks=False)
        why = None
        if stat.S_ISDIR(st.st_mode):
            if entry.name.endswith(FILE_SUFFIXES):
                why = "it is a folder where tdpo-train writes a file"
        elif entry.name in FOLDER_NAMES:
            why = ("it is a symbolic link" if stat.S_ISLNK(st.st_mode) else
                   "it is not a folder, where tdpo-train writes one")
        else:
            why = what_is_wrong(st)
        if why is not None:
            raise SystemExit(f"tdpo-train: refused to resume {folder}: {entry.path}: {why}. "
                             "Nothing in the run folder was changed. A run folder is "
                             "resumed only as tdpo-train wrote it: replace the entry with "
                             "the file itself, or start the run over with a new --out")


def _entries(folder: str):
    """Every entry under folder, links not followed."""
    with os.scandir(folder) as it:
        for entry in it:
            yield entry
            if entry.is_dir(follow_symlinks=False):
                yield from _entries(entry.path)

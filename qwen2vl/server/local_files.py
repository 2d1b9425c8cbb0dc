"""Reading `file://` media from `--allowed-local-media-path` without a check-then-open race.

The path is walked one component at a time from a descriptor of the allowed directory (`openat` with
`O_NOFOLLOW`), so no symbolic link is followed anywhere and `..` cannot climb out; a link swapped in after any
check is refused by the kernel at open time. The opened descriptor is then verified with `fstat` (a regular file)
and, where `/proc` exists, its kernel path is checked to lie inside the directory.
"""
from __future__ import annotations

import os
import stat
import urllib.parse
import urllib.request


class LocalFileError(Exception):
    """Refused or unreadable; the message never names server paths."""


def relative_parts(url: str, root: str) -> list[str]:
    """`file://` URL → its path components below `root` (raises LocalFileError when outside it)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise LocalFileError("file:// URLs must refer to the local host.")
    path = os.path.normpath(urllib.request.url2pathname(parsed.path))
    root = os.path.abspath(root)
    if os.path.commonpath([path, root]) != root or path == root:
        raise LocalFileError("the file is outside the allowed local media path.")
    return os.path.relpath(path, root).split(os.sep)


def read_local(url: str, root: str, max_bytes: int) -> bytes:
    parts = relative_parts(url, root)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fds = [os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))]
    try:
        for i, part in enumerate(parts):
            if part in ("", ".", ".."):
                raise LocalFileError("the file is outside the allowed local media path.")
            last = i == len(parts) - 1
            try:
                fds.append(os.open(part, flags | (0 if last else getattr(os, "O_DIRECTORY", 0)), dir_fd=fds[-1]))
            except FileNotFoundError:
                raise LocalFileError("file not found.") from None
            except OSError:  # ELOOP (a symbolic link), ENOTDIR, EACCES, ...
                raise LocalFileError("the file cannot be opened (symbolic links are not followed).") from None
        fd = fds[-1]
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LocalFileError("not a regular file.")
        proc_path = f"/proc/self/fd/{fd}"
        if os.path.exists(proc_path):  # belt and braces: where the kernel says the opened file lives
            real_root = os.path.realpath(root)
            if os.path.commonpath([os.readlink(proc_path), real_root]) != real_root:
                raise LocalFileError("the file is outside the allowed local media path.")
        if st.st_size > max_bytes:
            raise LocalFileError(f"the file is over the {max_bytes}-byte limit.")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise LocalFileError(f"the file is over the {max_bytes}-byte limit.")
        return data
    finally:
        for fd in fds:
            os.close(fd)

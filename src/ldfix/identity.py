"""The identity of a loaded object's file *now*, inside the target's root,
and whether that file holds what is mapped.

Paths come from untrusted memory: they are resolved with openat2 and
RESOLVE_IN_ROOT against /proc/PID/root (".." and absolute symlinks stay
inside; magic links refused), only regular files outside procfs/sysfs are
opened, and nothing on the host's own tree is ever looked up."""

from __future__ import annotations

import errno
import os
import posixpath
import struct
from collections.abc import Sequence
from typing import NamedTuple

from ldfix import elf, native
from ldfix.elf import notes_and_first_load
from ldfix.errors import LdfixError
from ldfix.memory import Memory
from ldfix.model import FileId
from ldfix.procfs import Process

MAX_PATH = 4096


class FileFacts(NamedTuple):
    id: FileId
    size: int
    build_id: bytes | None
    header: bytes      # ELF header + program headers
    first_page: bytes  # up to 4 KiB of the first PT_LOAD when it starts at offset 0


class ImageFacts(NamedTuple):
    build_id: bytes | None
    header: bytes
    first_page: bytes


class FileProblem(Exception):
    """The file cannot be looked at; `missing` tells whether it is absent."""

    def __init__(self, reason: str, missing: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


class RootView:
    """The target's filesystem view: its root, and its cwd within that root."""

    def __init__(self, proc: Process) -> None:
        self.rootfd = proc.open_root()
        root = proc.readlink("root") or "/"
        cwd = proc.readlink("cwd")
        self.cwd: str | None = None
        if cwd is not None:
            if root == "/":
                self.cwd = cwd
            elif cwd == root or cwd.startswith(root.rstrip("/") + "/"):
                self.cwd = "/" + cwd[len(root):].lstrip("/")

    def close(self) -> None:
        os.close(self.rootfd)

    def resolve(self, name: bytes) -> bytes:
        if not name:
            raise FileProblem("no path recorded", missing=True)
        if len(name) > MAX_PATH or b"\0" in name:
            raise FileProblem("recorded path too long or malformed", missing=True)
        if not name.startswith(b"/"):
            if self.cwd is None:
                raise FileProblem("relative path, and the process's cwd is outside its root",
                                  missing=True)
            name = posixpath.join(os.fsencode(self.cwd), name)
        return name

    def open_file(self, path: str) -> int | None:
        """A readable descriptor of a regular file at `path` inside the root, or None."""
        try:
            pfd = native.open_in_root(self.rootfd, os.fsencode(path))
        except OSError:
            return None
        try:
            return native.open_regular(pfd)
        except OSError:
            return None
        finally:
            os.close(pfd)

    def _open_path(self, name: bytes) -> int:
        path = self.resolve(name)
        try:
            return native.open_in_root(self.rootfd, path)
        except OSError as exc:
            gone = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            raise FileProblem("no such file in the process's root" if gone
                              else f"cannot resolve: {os.strerror(exc.errno or 0)}",
                              missing=True) from None

    def probe(self, name: bytes, stored: FileId | None) -> tuple[FileId, FileFacts | None]:
        """The current id of `name`; its facts too, but only when the id is not
        `stored` (one lookup; the file is opened and read only then; never
        with stored=None)."""
        pfd = self._open_path(name)
        try:
            st = os.fstat(pfd)
            fid = FileId(st.st_dev, st.st_ino)
            if stored is None or fid == stored:
                return fid, None
            return fid, self._facts_at(pfd, fid, st.st_size)
        finally:
            os.close(pfd)

    def _facts_at(self, pfd: int, fid: FileId, size: int) -> FileFacts:
        try:
            fd = native.open_regular(pfd)
        except OSError as exc:
            reason = {errno.EINVAL: "not a regular file",
                      errno.EXDEV: "on procfs or sysfs"}.get(exc.errno or 0, os.strerror(exc.errno or 0))
            raise FileProblem(reason, missing=True) from None
        try:
            return file_facts(fd, fid, size)
        finally:
            os.close(fd)

    def facts(self, name: bytes) -> FileFacts:
        """fstat and ELF identity of `name` as the target would open it."""
        pfd = self._open_path(name)
        try:
            st = os.fstat(pfd)
            return self._facts_at(pfd, FileId(st.st_dev, st.st_ino), st.st_size)
        finally:
            os.close(pfd)


def file_facts(fd: int, fid: FileId, size: int) -> FileFacts:
    try:
        f = elf.ElfFile(fd, size)
        notes, first = notes_and_first_load(f.phdr_bytes, f.ehdr.e_phnum)
        first_page = f.pread(0, min(4096, first[1], size)) if first and first[0] == 0 else b""
        return FileFacts(fid, size, f.build_id(notes), f.header_bytes + f.phdr_bytes, first_page)
    except (LdfixError, OSError):
        return FileFacts(fid, size, None, b"", b"")


def image_facts(mem: Memory, images: Sequence[tuple[int, int]]) -> list[ImageFacts | None]:
    """What is mapped for each (load bias, map start): build-id, headers, first page.

    Batched: one read of all headers, one of all program headers, one of all
    notes and first pages."""
    heads = mem.read_many([(start, elf.EHDR_SIZE) for _, start in images])
    ph_regions: list[tuple[int, int]] = []
    phnums: list[int] = []
    for (_, start), raw in zip(images, heads):
        phnum = -1
        if len(raw) == elf.EHDR_SIZE and raw[:4] == b"\x7fELF" and raw[4] == 2 and raw[5] == 1:
            phoff, = struct.unpack_from("<Q", raw, 32)
            phentsize, count = struct.unpack_from("<HH", raw, 54)
            if phentsize == elf.PHDR_SIZE and count <= elf.MAX_PHNUM:
                phnum = count
        phnums.append(phnum)
        ph_regions.append((start + phoff, phnum * elf.PHDR_SIZE) if phnum >= 0 else (start, 0))
    phs = mem.read_many(ph_regions)
    more: list[tuple[int, int]] = []
    plans: list[tuple[int, int, int] | None] = []   # (first note index, note count, page index)
    for (bias, start), phnum, raw in zip(images, phnums, phs):
        if phnum < 0 or len(raw) != phnum * elf.PHDR_SIZE:
            plans.append(None)
            continue
        notes, first = notes_and_first_load(raw, phnum)
        page = min(4096, first[1]) if first and first[0] == 0 else 0
        plans.append((len(more), len(notes), len(more) + len(notes)))
        # Loader arithmetic is modulo 2**64: l_addr is "negative" for an
        # object mapped below its link-time address (prelink).
        more.extend(((bias + vaddr) % (1 << 64), size) for _off, vaddr, size in notes)
        more.append((start, page))
    data = mem.read_many(more)
    out: list[ImageFacts | None] = []
    for head, raw, plan in zip(heads, phs, plans):
        if plan is None:
            out.append(None)
            continue
        first_note, n_notes, page_at = plan
        bid = None
        for note_bytes in data[first_note:first_note + n_notes]:
            bid = elf.build_id_from_notes(note_bytes) if note_bytes else None
            if bid:
                break
        out.append(ImageFacts(bid, head + raw, data[page_at]))
    return out


def same_content(image: ImageFacts | None, f: FileFacts) -> tuple[bool | None, str]:
    """(True/False, how decided); None when it cannot be decided."""
    if image is None:
        return None, "the mapped image's ELF headers are unreadable"
    if image.build_id and f.build_id:
        if image.build_id == f.build_id:
            return True, "same build-id"
        return False, "build-id differs"
    if image.build_id or f.build_id:
        return False, "build-id present on one side only"
    if not image.header or image.header != f.header:
        return False, "ELF headers differ"
    if not image.first_page or image.first_page != f.first_page:
        return False, "first page differs"
    return True, "same ELF headers and first page (no build-id)"

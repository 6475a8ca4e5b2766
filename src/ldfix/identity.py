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
from collections.abc import Callable, Sequence
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


class ImageFacts(NamedTuple):
    build_id: bytes | None
    header: bytes


class Probe(NamedTuple):
    """A file's current id as a lookup found it (None: `problem` says why),
    and its build-id when the id was not the stored one and one was found
    (None otherwise: then facts() tells the rest)."""
    current: FileId | None
    problem: str
    build_id: bytes | None


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
        self.compare_budget = COMPARE_BUDGET  # bytes same_bytes may still read
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
            raise FileProblem(_lookup_problem(exc.errno or 0), missing=True) from None

    def probe_many(self, names: Sequence[bytes], stored: Sequence[FileId] | None) -> list[Probe]:
        """probe() of every name in one native call: the current ids, and the
        build-id of each file whose id is not its stored one (none is read
        with stored=None)."""
        out: list[Probe | None] = [None] * len(names)
        paths: list[bytes] = []
        where: list[int] = []
        for i, name in enumerate(names):
            try:
                paths.append(self.resolve(name))
                where.append(i)
            except FileProblem as exc:
                out[i] = Probe(None, exc.reason, None)
        want = [stored[i] for i in where] if stored is not None else None
        for i, (err, open_err, dev, ino, bid) in zip(where, native.probe_files(self.rootfd, paths, want)):
            if err:
                out[i] = Probe(None, _lookup_problem(err), None)
            elif open_err:
                out[i] = Probe(None, _open_problem(open_err), None)
            else:
                out[i] = Probe(FileId(dev, ino), "", bid)
        return out  # type: ignore[return-value]

    def _facts_at(self, pfd: int, fid: FileId, size: int) -> FileFacts:
        try:
            fd = native.open_regular(pfd)
        except OSError as exc:
            raise FileProblem(_open_problem(exc.errno or 0), missing=True) from None
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

    def same_bytes(self, name: bytes, expect: FileId, mapped_fd: int) -> tuple[bool | None, str]:
        """Whether the file at `name` (still the one with id `expect`) holds
        exactly the bytes of the mapped file open at `mapped_fd`.

        Bounded: files of at most COMPARE_MAX bytes, and COMPARE_BUDGET bytes
        per process over all its files (a container could otherwise make
        every run read gigabytes)."""
        mapped = os.fstat(mapped_fd)
        if FileId(mapped.st_dev, mapped.st_ino) == expect:
            # After a real restore the mapping is of the very file the path
            # names now: comparing it with itself would read it twice for nothing.
            return True, "no build-id; the mapped file is the file itself"
        try:
            pfd = self._open_path(name)
        except FileProblem as exc:
            return None, exc.reason
        try:
            st = os.fstat(pfd)
            if FileId(st.st_dev, st.st_ino) != expect:
                return None, "the file was replaced while it was being compared"
            try:
                fd = native.open_regular(pfd)
            except OSError as exc:
                return None, _open_problem(exc.errno or 0)
        finally:
            os.close(pfd)
        try:
            limit = min(COMPARE_MAX, self.compare_budget)
            same, how, used = compare_files(mapped_fd, fd, limit)
            self.compare_budget -= used
            return same, how
        finally:
            os.close(fd)


COMPARE_MAX = 256 << 20      # bytes of one file compared at most (no build-id only)
COMPARE_BUDGET = 1 << 30     # bytes compared per process, over all its files
COMPARE_CHUNK = 1 << 20


def compare_files(a: int, b: int, limit: int = COMPARE_MAX) -> tuple[bool | None, str, int]:
    """Byte-compare two open regular files of at most `limit` bytes, in
    bounded chunks: (same or None when undecided, how, bytes read of each)."""
    size_a, size_b = os.fstat(a).st_size, os.fstat(b).st_size
    if size_a != size_b:
        return False, "no build-id; the file's size differs from the mapped file's", 0
    if size_a > limit:
        return None, (f"no build-id, and comparing the file would read more than ldfix allows "
                      f"({limit >> 20} MiB left of {COMPARE_MAX >> 20} per file, "
                      f"{COMPARE_BUDGET >> 20} per process)"), 0
    off = 0
    while off < size_a:
        want = min(COMPARE_CHUNK, size_a - off)
        x, y = os.pread(a, want, off), os.pread(b, want, off)
        if len(x) != want or len(y) != want:
            return None, "no build-id, and a file came back short while comparing", off
        off += want
        if x != y:
            return False, "no build-id; the file's bytes differ from the mapped file's", off
    return True, "no build-id; byte-identical to the mapped file", off


def _lookup_problem(err: int) -> str:
    if err in (errno.ENOENT, errno.ENOTDIR):
        return "no such file in the process's root"
    return f"cannot resolve: {os.strerror(err)}"


def _open_problem(err: int) -> str:
    return {errno.EINVAL: "not a regular file",
            errno.EXDEV: "on procfs or sysfs"}.get(err, os.strerror(err))


def file_facts(fd: int, fid: FileId, size: int) -> FileFacts:
    try:
        f = elf.ElfFile(fd, size)
        notes, _first = notes_and_first_load(f.phdr_bytes, f.ehdr.e_phnum)
        return FileFacts(fid, size, f.build_id(notes), f.header_bytes + f.phdr_bytes)
    except (LdfixError, OSError):
        return FileFacts(fid, size, None, b"")


IMAGE_CHUNK = 256


def image_facts(mem: Memory, images: Sequence[tuple[int, int]]) -> list[ImageFacts | None]:
    """What is mapped for each (load bias, map start): build-id and ELF headers.

    Batched: per 256 images (memory stays bounded whatever the target
    claims), one read of all headers, one of all program headers, one of all
    notes."""
    out: list[ImageFacts | None] = []
    for i in range(0, len(images), IMAGE_CHUNK):
        out += _image_facts(mem, images[i:i + IMAGE_CHUNK])
    return out


def _image_facts(mem: Memory, images: Sequence[tuple[int, int]]) -> list[ImageFacts | None]:
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
    plans: list[tuple[int, int] | None] = []   # (first note index, note count)
    for (bias, start), phnum, raw in zip(images, phnums, phs):
        if phnum < 0 or len(raw) != phnum * elf.PHDR_SIZE:
            plans.append(None)
            continue
        notes, _first = notes_and_first_load(raw, phnum)
        plans.append((len(more), len(notes)))
        # Loader arithmetic is modulo 2**64: l_addr is "negative" for an
        # object mapped below its link-time address (prelink).
        more.extend(((bias + vaddr) % (1 << 64), size) for _off, vaddr, size in notes)
    data = mem.read_many(more)
    out: list[ImageFacts | None] = []
    for head, raw, plan in zip(heads, phs, plans):
        if plan is None:
            out.append(None)
            continue
        first_note, n_notes = plan
        bid = None
        for note_bytes in data[first_note:first_note + n_notes]:
            bid = elf.build_id_from_notes(note_bytes) if note_bytes else None
            if bid:
                break
        out.append(ImageFacts(bid, head + raw))
    return out


def same_content(image: ImageFacts | None, f: FileFacts,
                 compare: Callable[[], tuple[bool | None, str]] | None = None) -> tuple[bool | None, str]:
    """(True/False, how decided); None when it cannot be decided.

    Build-ids decide when both sides have one.  Without any, only the whole
    file can: `compare` byte-compares the mapped file with the current one
    (None when the mapped file cannot be opened: then undecided).  Matching
    headers and a matching first page are not enough: two builds can differ
    in a later page only."""
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
    if compare is None:
        return None, "no build-id, and nothing to compare the bytes with"
    return compare()

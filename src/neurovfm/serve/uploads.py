"""Receiving a study: a multipart upload streamed to disk under limits, zip archives unpacked
without letting any entry escape the upload folder.

Names are never trusted: every file is stored under a numbered name (``d0000/f00012.dcm``), so a
folder or file named after a patient never reaches the disk, a log or a URL, and no entry name can
point outside the folder. Only what ingest needs survives the renaming: a NIfTI file and its JSON
sidecar keep a shared stem, plus the BIDS suffix (``_T1w``, ``_ct``...) and the ``ce-`` entity that
ingest reads for sequence and contrast. Limits are checked while the bytes arrive, not afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from neurovfm.ingest.nifti import _BIDS_SEQ

ZIP_MAGIC = b"PK\x03\x04"
ZIP_EXPANSION = 4  # unpacked bytes allowed per uploaded byte (DICOM deflates 2-4x; more smells of a zip bomb)
MULTIPART_OVERHEAD = 1024 * 1024  # boundaries and part headers on top of the file bytes
_SAFE_EXT = re.compile(r"\.[a-z0-9]{1,5}")
_CHUNK = 1 << 20


class UploadError(Exception):
    """A refused upload: ``status`` is the HTTP status (413 too large, 400 malformed or unsafe)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _split_ext(name: str) -> tuple[str, str]:
    low = name.lower()
    for ext in (".nii.gz", ".nii", ".json"):
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    stem, ext = os.path.splitext(name)
    return stem, (ext.lower() if _SAFE_EXT.fullmatch(ext.lower()) else "")


class SafeNames:
    """Numbered relative paths for untrusted file names (see the module doc)."""

    def __init__(self) -> None:
        self._dirs: dict[tuple[str, ...], str] = {}
        self._stems: dict[tuple[tuple[str, ...], str], int] = {}
        self._n = 0

    def path_for(self, original: str) -> str:
        parts = [p for p in re.split(r"[\\/]+", original or "") if p not in ("", ".", "..")]
        folder = tuple(parts[:-1])
        d = self._dirs.setdefault(folder, f"d{len(self._dirs):04d}")
        stem, ext = _split_ext(parts[-1] if parts else "file")
        if ext in (".nii.gz", ".nii", ".json"):  # a NIfTI and its sidecar must keep one stem
            key = (folder, stem.lower())
            if key not in self._stems:
                self._stems[key] = self._n
                self._n += 1
            num, keep = self._stems[key], _bids_keep(stem)
        else:
            num, keep = self._n, ""
            self._n += 1
        return os.path.join(d, f"f{num:05d}{keep}{ext}")


def _bids_keep(stem: str) -> str:
    parts = stem.split("_")
    out = "_ce-x" if any(p.lower().startswith("ce-") for p in parts[:-1]) else ""
    last = parts[-1].lower()
    return out + (f"_{last}" if last in _BIDS_SEQ else "")


@dataclass
class Received:
    """What an upload left in its folder: counts only (names are not kept)."""

    files: int = 0
    bytes: int = 0
    unpacked: int = 0  # bytes unpacked from zip archives, all of them together
    zips: list[str] = field(default_factory=list)


class MultipartReceiver:
    """Feed the request body chunk by chunk; file parts are written under ``folder`` with safe
    names. Raises :class:`UploadError` as soon as a limit is crossed."""

    def __init__(self, content_type: str, folder: str, max_bytes: int, max_files: int, names: SafeNames):
        ctype, params = parse_options_header(content_type)
        if ctype != b"multipart/form-data" or b"boundary" not in params:
            raise UploadError(400, "send the study as multipart/form-data (field 'files')")
        self.folder, self.max_bytes, self.max_files, self.names = folder, max_bytes, max_files, names
        self.got = Received()
        self._fh = None
        self._path = ""
        self._head = b""
        self._hname = b""
        self._hval = b""
        self._headers: dict[bytes, bytes] = {}
        self._field_bytes = 0
        cb = {"on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
              "on_header_field": self._hfield, "on_header_value": self._hvalue, "on_header_end": self._hend,
              "on_headers_finished": self._headers_done}
        self.parser = MultipartParser(params[b"boundary"], cb)

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def finish(self) -> Received:
        self.parser.finalize()
        self._close()
        if self.got.files == 0:
            raise UploadError(400, "the upload holds no files")
        return self.got

    # -- parser callbacks
    def _begin(self) -> None:
        self._headers, self._hname, self._hval = {}, b"", b""

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._hval += data[start:end]

    def _hend(self) -> None:
        self._headers[self._hname.lower()] = self._hval
        self._hname, self._hval = b"", b""

    def _headers_done(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"filename" not in opts:  # a plain form field: ignored, but counted against the limit
            self._fh = None
            return
        self.got.files += 1
        if self.got.files > self.max_files:
            raise UploadError(413, f"too many files: the limit is {self.max_files} per study")
        original = opts[b"filename"].decode("utf-8", "replace")
        self._path = os.path.join(self.folder, self.names.path_for(original))
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        self._fh = open(self._path, "wb")
        self._head = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        self.got.bytes += n
        if self.got.bytes > self.max_bytes:
            raise UploadError(413, f"upload too large: the limit is {human_size(self.max_bytes)}")
        if self._fh is None:
            return
        if len(self._head) < 4:
            self._head += data[start:start + 4 - len(self._head)]
        self._fh.write(data[start:end])

    def _end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if self._head.startswith(ZIP_MAGIC):
                self.got.zips.append(self._path)

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def human_size(n: int) -> str:
    return f"{n / (1024 * 1024):.3g} MB" if n >= 1024 * 1024 else f"{n} bytes"


def _unsafe_entry(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry may not be unpacked, or None."""
    name = info.filename
    if "\x00" in name:
        return "a name with a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if any(p == ".." for p in re.split(r"[\\/]+", name)):
        return "a '..' path that leaves the upload folder"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if info.flag_bits & 0x1:
        return "an encrypted entry"
    return None


def unpack_zip(zpath: str, folder: str, names: SafeNames, got: Received, max_bytes: int, max_files: int) -> None:
    """Unpack ``zpath`` under ``folder`` (entries renamed by ``names``) and delete it. Every entry
    is checked before anything is written: one unsafe entry refuses the whole archive."""
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError):
        raise UploadError(400, "a file looks like a zip archive but cannot be read as one") from None
    with zf:
        entries = [i for i in zf.infolist() if not i.is_dir()]
        for info in zf.infolist():
            why = _unsafe_entry(info)
            if why:
                raise UploadError(400, f"zip archive refused: it holds {why}")
        budget = max_bytes * ZIP_EXPANSION
        if got.files - 1 + len(entries) > max_files:
            raise UploadError(413, f"too many files: the archive holds {len(entries)}, the limit is {max_files}")
        too_big = UploadError(413, f"archive too large unpacked: the limit is {human_size(budget)}")
        if got.unpacked + sum(i.file_size for i in entries) > budget:
            raise too_big
        for info in entries:
            dest = os.path.join(folder, names.path_for(info.filename))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as dst:
                while True:
                    buf = src.read(_CHUNK)
                    if not buf:
                        break
                    got.unpacked += len(buf)
                    if got.unpacked > budget:  # the sizes in the directory may lie
                        raise too_big
                    dst.write(buf)
    os.remove(zpath)
    got.files += len(entries) - 1


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)

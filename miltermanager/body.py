"""The message body kept by the manager to replay it to later children: memory, then a temp file."""

import os
import tempfile

from . import probes

DEFAULT_MAX_MEMORY = 5 * 1024 * 1024


class BodyBuffer:
    """A message body, appended chunk by chunk and replayed as often as needed.

    Up to max_memory bytes stay in memory as the list of appended chunks (appending costs one
    list append, no copy). The append that passes the bound moves everything to an anonymous
    temporary file (in tmpdir if given, else tempfile's default): it has no name, so nothing is
    left on disk even if the process dies. The file is read back in pieces, never whole.

    An I/O error (no permission, disk full) raises OSError naming the buffer and the directory;
    the appended chunk is then not part of the body. close() frees the memory or the file.
    """

    def __init__(self, max_memory=DEFAULT_MAX_MEMORY, tmpdir=None):
        self.max_memory = max_memory
        self.tmpdir = tmpdir
        self._chunks = []
        self._file = None
        self._size = 0
        self._closed = False

    @property
    def size(self):
        """The body's length in bytes."""
        return self._size

    @property
    def in_memory(self):
        """Tell whether the body is still held in memory (not yet in the temporary file)."""
        return self._file is None

    def append(self, chunk):
        """Add chunk (bytes, or any bytes-like object, which is copied) at the end of the body."""
        if self._closed:
            raise ValueError("append to a closed BodyBuffer")
        if not chunk:
            return
        if type(chunk) is not bytes:
            # A memoryview may point into the receive buffer, which changes after this call.
            chunk = bytes(chunk)
        if self._file is None:
            if self._size + len(chunk) <= self.max_memory:
                self._chunks.append(chunk)
                self._size += len(chunk)
                return
            self._move_to_file()
        _write(self._file, chunk, self._size)
        self._size += len(chunk)

    def chunks(self, size):
        """Iterate over the whole body in pieces of size bytes (the last one may be shorter).

        The pieces are bytes. The iterator replays the body as it was when chunks() was called;
        call it again for another replay.
        """
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, not {size}")
        if self._closed:
            raise ValueError("replay of a closed BodyBuffer")
        if self._file is None:
            return _split(self._chunks[:], size)
        return _read(self._file, self._size, size)

    def close(self):
        """Free the memory or close (and so delete) the temporary file; closing twice is fine."""
        if self._file is not None and not self._closed and probes.body_spooled is not None:
            probes.body_spooled(self._size)
        self._closed = True
        self._chunks = []
        if self._file is not None:
            self._file.close()

    def _move_to_file(self):
        """Copy the chunks held in memory to a new temporary file; on failure keep them in memory."""
        try:
            # Unbuffered: every write reaches the file, so pread() sees it without a flush.
            file = tempfile.TemporaryFile(prefix="milter-manager-body-", dir=self.tmpdir, buffering=0)
        except OSError as error:
            directory = self.tmpdir or tempfile.gettempdir()
            raise OSError(error.errno, f"message body buffer: cannot create a temporary file"
                                       f" in {directory}: {error.strerror}") from error
        try:
            offset = 0
            for chunk in self._chunks:
                _write(file, chunk, offset)
                offset += len(chunk)
        except BaseException:
            file.close()
            raise
        self._file = file
        # A new list, not clear(): an iterator from chunks() may still walk the old one.
        self._chunks = []


class BodyChunks:
    """A body held in memory as the chunks it came in (a child's replaced body), replayable.

    It offers what the message chain and the final replies use of a
    BodyBuffer: chunks(size), size and close().
    """

    __slots__ = ("_chunks", "size")

    def __init__(self, chunks):
        self._chunks = tuple(chunks)
        self.size = sum(len(chunk) for chunk in self._chunks)

    def chunks(self, size):
        """Iterate over the whole body in pieces of size bytes (the last one may be shorter)."""
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, not {size}")
        return _split(self._chunks, size)

    def close(self):
        pass

    def __eq__(self, other):
        if not isinstance(other, BodyChunks):
            return NotImplemented
        return b"".join(self._chunks) == b"".join(other._chunks)

    def __repr__(self):
        return f"<BodyChunks {self.size} bytes>"


def _write(file, chunk, end):
    """Write all of chunk at end, the file's current length; cut a partial write off on failure."""
    fd = file.fileno()
    view = memoryview(chunk)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as error:
        try:
            os.ftruncate(fd, end)
            os.lseek(fd, end, os.SEEK_SET)
        except OSError:
            pass
        raise OSError(error.errno, f"message body buffer: cannot write {len(chunk)} bytes to its"
                                   f" temporary file after {end} bytes: {error.strerror}") from error


def _split(chunks, size):
    """Yield the bytes in chunks regrouped into pieces of size bytes; copy only to join or cut."""
    parts = []
    filled = 0
    for chunk in chunks:
        length = len(chunk)
        if not parts and length == size:
            yield chunk  # the common case: the MTA's chunks already have the wanted size
            continue
        offset = 0
        view = None
        while offset < length:
            take = min(size - filled, length - offset)
            if take == length:
                parts.append(chunk)
            else:
                if view is None:
                    view = memoryview(chunk)
                parts.append(view[offset:offset + take])
            filled += take
            offset += take
            if filled == size:
                yield _joined(parts)
                parts = []
                filled = 0
    if parts:
        yield _joined(parts)


def _joined(parts):
    """One bytes object from parts (bytes or memoryviews)."""
    if len(parts) == 1 and type(parts[0]) is bytes:
        return parts[0]
    return b"".join(parts)


def _read(file, total, size):
    """Yield the first total bytes of file in pieces of size bytes, with pread (no shared offset)."""
    offset = 0
    while offset < total:
        # fileno() each time: it raises ValueError once the buffer is closed, where a saved
        # descriptor number could by then belong to another file.
        piece = os.pread(file.fileno(), min(size, total - offset), offset)
        if not piece:
            raise OSError(f"message body buffer: its temporary file ends at {offset} bytes,"
                          f" expected {total}")
        offset += len(piece)
        yield piece

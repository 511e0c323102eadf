"""BodyBuffer: the message body kept in memory up to a bound, then in an anonymous temp file."""

import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import TestCase

from miltermanager.body import DEFAULT_MAX_MEMORY, BodyBuffer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = bytes(range(256)) * 1000  # 256000 bytes, no repeat within a piece of 255 bytes or less


def filled(body, chunk_size, max_memory=DEFAULT_MAX_MEMORY, tmpdir=None):
    """A BodyBuffer holding body, appended in chunks of chunk_size bytes."""
    buffer = BodyBuffer(max_memory=max_memory, tmpdir=tmpdir)
    for start in range(0, len(body), chunk_size):
        buffer.append(body[start:start + chunk_size])
    return buffer


def open_files_under(directory):
    """The descriptors of this process that point at a file in directory (deleted ones too)."""
    prefix = os.path.realpath(directory) + os.sep
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            found.append(int(fd))
    return found


class SmallBodyTests(TestCase):
    """A body below max_memory stays in memory."""

    def test_small_body(self):
        """A few chunks are kept in memory and replayed as one piece."""
        buffer = filled(b"Hello,\r\nworld.\r\n", 4)
        self.addCleanup(buffer.close)
        self.assertTrue(buffer.in_memory)
        self.assertEqual(buffer.size, 16)
        self.assertEqual(list(buffer.chunks(65535)), [b"Hello,\r\nworld.\r\n"])

    def test_empty_body(self):
        """An empty body has size 0 and replays as no piece at all; empty appends are ignored."""
        buffer = BodyBuffer()
        buffer.append(b"")
        self.assertEqual(buffer.size, 0)
        self.assertTrue(buffer.in_memory)
        self.assertEqual(list(buffer.chunks(65535)), [])
        buffer.close()

    def test_chunk_kept_without_copy(self):
        """A chunk of exactly the replay size comes back as the very object appended."""
        chunk = b"x" * 65535
        buffer = BodyBuffer()
        buffer.append(chunk)
        buffer.append(b"tail")
        self.assertEqual([len(piece) for piece in buffer.chunks(65535)], [65535, 4])
        self.assertIs(next(buffer.chunks(65535)), chunk)

    def test_bytes_like_copied(self):
        """A bytearray or memoryview is copied: changing it afterwards changes nothing."""
        source = bytearray(b"abcdef")
        buffer = BodyBuffer()
        buffer.append(source)
        buffer.append(memoryview(source)[:2])
        source[:] = b"XXXXXX"
        self.assertEqual(list(buffer.chunks(100)), [b"abcdefab"])
        self.assertEqual({type(piece) for piece in buffer.chunks(3)}, {bytes})

    def test_exactly_at_bound(self):
        """A body of exactly max_memory bytes stays in memory; one byte more moves it to a file."""
        buffer = filled(b"0123456789" * 10, 7, max_memory=100, tmpdir=self.mktemp_dir())
        self.addCleanup(buffer.close)
        self.assertTrue(buffer.in_memory)
        self.assertEqual(buffer.size, 100)
        buffer.append(b"!")
        self.assertFalse(buffer.in_memory)
        self.assertEqual(buffer.size, 101)
        self.assertEqual(b"".join(buffer.chunks(30)), b"0123456789" * 10 + b"!")

    def mktemp_dir(self):
        """A fresh empty directory."""
        path = self.mktemp()
        os.makedirs(path)
        return path


class ChunkingTests(TestCase):
    """chunks(size) regroups the body into pieces of size bytes, in memory and from the file."""

    def check(self, buffer, size):
        """The pieces are size bytes long but the last, and join to the body."""
        pieces = list(buffer.chunks(size))
        self.assertEqual(b"".join(pieces), BODY)
        self.assertTrue(all(len(piece) == size for piece in pieces[:-1]))
        self.assertTrue(0 < len(pieces[-1]) <= size)
        self.assertEqual(len(pieces), -(-len(BODY) // size))

    def test_sizes_in_memory(self):
        """Replay sizes 1, 7, 255, 4096, 65535 and one larger than the body, from memory."""
        for chunk_size in (1000, 65535, 3):
            buffer = filled(BODY, chunk_size)
            self.assertTrue(buffer.in_memory)
            for size in (1, 7, 255, 4096, 65535, len(BODY) + 1):
                self.check(buffer, size)
            buffer.close()

    def test_sizes_from_file(self):
        """Replay sizes 1, 7, 255, 4096, 65535 and one larger than the body, from the file."""
        tmpdir = self.mktemp()
        os.makedirs(tmpdir)
        buffer = filled(BODY, 65535, max_memory=100000, tmpdir=tmpdir)
        self.addCleanup(buffer.close)
        self.assertFalse(buffer.in_memory)
        for size in (1, 7, 255, 4096, 65535, len(BODY) + 1):
            self.check(buffer, size)

    def test_bad_size(self):
        """A replay size below 1 is refused."""
        buffer = BodyBuffer()
        self.assertRaises(ValueError, buffer.chunks, 0)


class ReplayTests(TestCase):
    """The body replays as often as asked, and each replay is the body as of chunks()."""

    def setUp(self):
        self.tmpdir = self.mktemp()
        os.makedirs(self.tmpdir)

    def test_replay_twice(self):
        """Two successive replays, from memory and from the file, give the same body."""
        for max_memory in (DEFAULT_MAX_MEMORY, 1000):
            buffer = filled(BODY, 4000, max_memory=max_memory, tmpdir=self.tmpdir)
            self.assertEqual(b"".join(buffer.chunks(65535)), BODY)
            self.assertEqual(b"".join(buffer.chunks(65535)), BODY)
            buffer.close()

    def test_interleaved_replays(self):
        """Two replays of the file walked in turn do not disturb each other."""
        buffer = filled(BODY, 4000, max_memory=1000, tmpdir=self.tmpdir)
        self.addCleanup(buffer.close)
        first, second = buffer.chunks(1000), buffer.chunks(1000)
        pieces = [(a, b) for a, b in zip(first, second)]
        self.assertEqual(b"".join(a for a, _ in pieces), BODY)
        self.assertEqual(b"".join(b for _, b in pieces), BODY)

    def test_append_during_replay(self):
        """Chunks appended while a replay runs, even ones that move the body to the file,
        are not part of that replay but of the next."""
        buffer = BodyBuffer(max_memory=10, tmpdir=self.tmpdir)
        self.addCleanup(buffer.close)
        buffer.append(b"abcd")
        buffer.append(b"efgh")
        replay = buffer.chunks(2)
        self.assertEqual(next(replay), b"ab")
        buffer.append(b"ijkl")
        self.assertFalse(buffer.in_memory)
        self.assertEqual(list(replay), [b"cd", b"ef", b"gh"])
        file_replay = buffer.chunks(5)
        self.assertEqual(next(file_replay), b"abcde")
        buffer.append(b"mn")
        self.assertEqual(list(file_replay), [b"fghij", b"kl"])
        self.assertEqual(list(buffer.chunks(100)), [b"abcdefghijklmn"])

    def test_file_pieces_bounded(self):
        """A body in the file is read in pieces of the replay size, not whole."""
        buffer = filled(BODY, 65535, max_memory=0, tmpdir=self.tmpdir)
        self.addCleanup(buffer.close)
        self.assertEqual(buffer._chunks, [])
        self.assertEqual(max(len(piece) for piece in buffer.chunks(4096)), 4096)


class CloseTests(TestCase):
    """close() frees the memory and closes the temp file; nothing stays on disk."""

    def setUp(self):
        self.tmpdir = self.mktemp()
        os.makedirs(self.tmpdir)

    def test_close_twice(self):
        """Closing twice is harmless, in memory and with a file."""
        for max_memory in (DEFAULT_MAX_MEMORY, 10):
            buffer = filled(BODY, 1000, max_memory=max_memory, tmpdir=self.tmpdir)
            buffer.close()
            buffer.close()

    def test_closed_buffer_refuses(self):
        """A closed buffer refuses append and replay."""
        buffer = filled(b"abc", 1)
        buffer.close()
        self.assertRaises(ValueError, buffer.append, b"x")
        self.assertRaises(ValueError, buffer.chunks, 10)

    def test_nothing_on_disk(self):
        """The temp file has no name in tmpdir; after close() no descriptor points at it."""
        buffer = filled(BODY, 1000, max_memory=10, tmpdir=self.tmpdir)
        self.assertFalse(buffer.in_memory)
        self.assertEqual(os.listdir(self.tmpdir), [])
        self.assertEqual(len(open_files_under(self.tmpdir)), 1)
        buffer.close()
        self.assertEqual(open_files_under(self.tmpdir), [])
        self.assertEqual(os.listdir(self.tmpdir), [])

    def test_replay_after_close_fails(self):
        """A replay running from the file when the buffer is closed stops with an error
        instead of reading whatever the descriptor number points at by then."""
        buffer = filled(BODY, 1000, max_memory=10, tmpdir=self.tmpdir)
        replay = buffer.chunks(1000)
        next(replay)
        buffer.close()
        self.assertRaises(ValueError, next, replay)


ISOLATED = """\
import os, resource, signal, sys
from miltermanager.body import BodyBuffer
{setup}
buffer = BodyBuffer(max_memory=1000, tmpdir=sys.argv[1])
buffer.append(b"x" * 1000)
try:
    buffer.append(b"y" * 100000)
except OSError as error:
    print(type(error).__name__, error.errno, buffer.size, buffer.in_memory, sep="\\n")
    print(error)
    print(len(b"".join(buffer.chunks(4096))))
"""


class IOErrorTests(TestCase):
    """An I/O error raises OSError with a clear message and leaves the body as it was."""

    def run_isolated(self, setup, tmpdir):
        """Run ISOLATED with setup in a fresh interpreter; return its output lines.

        Dropping privileges and file size limits would upset trial's own process.
        """
        code = ISOLATED.format(setup=textwrap.dedent(setup))
        result = subprocess.run([sys.executable, "-c", code, tmpdir], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.splitlines()

    def test_unwritable_tmpdir(self):
        """A tmpdir the process may not write to gives a PermissionError naming the directory;
        the body stays in memory, complete."""
        tmpdir = os.path.abspath(self.mktemp())
        os.makedirs(tmpdir)
        os.chmod(tmpdir, 0o555)
        # root writes anywhere: the child drops to nobody once it has imported what it needs.
        setup = """
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
        """
        kind, errno, size, in_memory, message, replayed = self.run_isolated(setup, tmpdir)
        self.assertEqual((kind, errno, size, in_memory, replayed),
                         ("PermissionError", "13", "1000", "True", "1000"))
        self.assertEqual(message, "[Errno 13] message body buffer: cannot create a temporary file"
                                  f" in {tmpdir}: Permission denied")

    def test_missing_tmpdir(self):
        """A tmpdir that does not exist gives FileNotFoundError at the move to the file."""
        tmpdir = os.path.abspath(self.mktemp())
        buffer = filled(b"x" * 1000, 100, max_memory=1000, tmpdir=tmpdir)
        error = self.assertRaises(FileNotFoundError, buffer.append, b"y")
        self.assertIn(f"cannot create a temporary file in {tmpdir}", str(error))
        self.assertTrue(buffer.in_memory)
        self.assertEqual(buffer.size, 1000)

    def test_disk_full(self):
        """A write that fails (here past RLIMIT_FSIZE, as on a full disk) raises OSError;
        the partial write is cut off, so the body is what was appended before."""
        tmpdir = os.path.abspath(self.mktemp())
        os.makedirs(tmpdir)
        setup = """
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (50000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        """
        kind, errno, size, in_memory, message, replayed = self.run_isolated(setup, tmpdir)
        self.assertEqual((kind, errno, size, in_memory, replayed), ("OSError", "27", "1000", "False", "1000"))
        self.assertEqual(message, "[Errno 27] message body buffer: cannot write 100000 bytes to its"
                                  " temporary file after 1000 bytes: File too large")

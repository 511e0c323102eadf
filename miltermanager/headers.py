"""One message's working header list: children's edits chained, emitted to the MTA as one diff."""

from .protocol.messages import AddHeader, ChangeHeader, InsertHeader

_NEW = -1


class HeaderList:
    """The headers of one message as the children have edited them so far.

    Each header remembers where it came from (its position among the MTA's
    original headers, or new), so `diff` can say exactly what changed.
    Postfix's own Received: header, which milters never see, is modelled by
    its position only: insert indexes count it, change indexes do not.
    """

    __slots__ = ("_original", "_headers", "_origins", "_received")

    def __init__(self, headers=()):
        self._original = [(name, value) for name, value in headers]
        self._headers = list(self._original)
        self._origins = list(range(len(self._original)))
        self._received = 0

    def append(self, name, value):
        """Add one more of the MTA's own headers, as it arrives."""
        self._origins.append(len(self._original))
        self._original.append((name, value))
        self._headers.append((name, value))

    def __iter__(self):
        return iter(self._headers)

    def __len__(self):
        return len(self._headers)

    def __repr__(self):
        return f"<HeaderList {self._headers!r}>"

    @property
    def received_index(self):
        """Where the MTA's hidden Received: sits among all headers: 0 unless inserted above."""
        return self._received

    def copy(self):
        other = HeaderList.__new__(HeaderList)
        other._original = list(self._original)
        other._headers = list(self._headers)
        other._origins = list(self._origins)
        other._received = self._received
        return other

    def apply(self, edit):
        """Apply a child's AddHeader, InsertHeader or ChangeHeader as Postfix would."""
        headers = self._headers
        if isinstance(edit, ChangeHeader):
            key = edit.name.lower()
            wanted = edit.index or 1
            for position, (name, _) in enumerate(headers):
                if name.lower() == key:
                    wanted -= 1
                    if not wanted:
                        if edit.value:
                            headers[position] = (edit.name, edit.value)
                        else:
                            del headers[position]
                            del self._origins[position]
                            if position < self._received:
                                self._received -= 1
                        return
            if edit.value:
                headers.append((edit.name, edit.value))
                self._origins.append(_NEW)
        elif isinstance(edit, InsertHeader):
            index = edit.index
            if index <= self._received:
                self._received += 1
            else:
                index -= 1
            headers.insert(index, (edit.name, edit.value))
            self._origins.insert(index, _NEW)
        elif isinstance(edit, AddHeader):
            headers.append((edit.name, edit.value))
            self._origins.append(_NEW)
        else:
            raise TypeError(f"not a header edit: {edit!r}")

    def diff(self):
        """The edits that turn the MTA's original headers into this list.

        Order matters because the MTA applies them one by one. Changes come
        first and deletions next, while the MTA's list still holds exactly the
        original headers, so each per-name index is the original one (a new
        header of the same name cannot shift it, and Postfix's hidden
        Received: is still the first header, which its change lookup skips);
        deletions go from the highest per-name index down so the lower ones
        stay valid. New headers follow in ascending final position: when one
        is inserted, everything above it is already in place, so its final
        position is the right index. A new header below every surviving
        original header (and below the hidden Received:) is appended instead.
        """
        original = self._original
        origins = self._origins
        if self._headers == original and len(origins) == len(original) and _NEW not in origins:
            # Nothing deleted (only new headers lengthen the list) and every value as it
            # came: no edit, found in C, as on most messages.
            return []
        per_name = []
        counts = {}
        for name, _ in original:
            key = name.lower()
            count = counts[key] = counts.get(key, 0) + 1
            per_name.append(count)

        received = self._received
        last = received  # last surviving MTA header, counting the hidden one
        for position in range(len(origins) - 1, -1, -1):
            if origins[position] != _NEW:
                last = max(last, position + 1)
                break

        changes = []
        inserts = []
        adds = []
        alive = [False] * len(original)
        for position, header in enumerate(self._headers):
            origin = origins[position]
            if origin == _NEW:
                if position < last:
                    index = position + 1 if position >= received else position
                    inserts.append(InsertHeader(index, header[0], header[1]))
                else:
                    adds.append(AddHeader(header[0], header[1]))
            else:
                alive[origin] = True
                if header != original[origin]:
                    changes.append(ChangeHeader(per_name[origin], header[0], header[1]))
        for origin in range(len(original) - 1, -1, -1):
            if not alive[origin]:
                changes.append(ChangeHeader(per_name[origin], original[origin][0], b""))
        changes.extend(inserts)
        changes.extend(adds)
        return changes


_MTA_RECEIVED = (b"Received", b"by the MTA itself")


def apply_all(original, edits, received=None):
    """Apply edits to headers as Postfix's cleanup does; return the visible headers.

    The MTA's own Received: header sits above the original headers. Insert
    indexes count it; change and delete indexes skip the first header,
    whichever it is by then. Pass received=(name, value) to see it in the
    result at its final place.
    """
    own = received if received is not None else _MTA_RECEIVED
    headers = [own]
    headers.extend(original)
    for edit in edits:
        if isinstance(edit, ChangeHeader):
            key = edit.name.lower()
            wanted = edit.index or 1
            for position in range(1, len(headers)):
                if headers[position][0].lower() == key:
                    wanted -= 1
                    if not wanted:
                        if edit.value:
                            headers[position] = (edit.name, edit.value)
                        else:
                            del headers[position]
                        break
            else:
                if edit.value:
                    headers.append((edit.name, edit.value))
        elif isinstance(edit, InsertHeader):
            headers.insert(edit.index, (edit.name, edit.value))
        elif isinstance(edit, AddHeader):
            headers.append((edit.name, edit.value))
        else:
            raise TypeError(f"not a header edit: {edit!r}")
    if received is None:
        headers = [header for header in headers if header is not own]
    return headers

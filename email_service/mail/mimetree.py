"""``BytesParser(policy=policy).parsebytes(raw)``, built faster for a message held whole in memory.

The standard ``email.feedparser`` is written for data arriving in pieces: a generator that
suspends whenever its line buffer runs dry, reads every body line through two method calls, and
compiles a regular expression per multipart boundary. A sync always has the whole message, and
the bodies are most of its lines, so this parser:

- splits the message into lines exactly as the feed parser does (``BufferedSubFile``) and then
  walks a list instead of a deque fed 8 KB at a time;
- takes a body as a slice up to the next line that could end it (one starting with ``-``, a
  line break, or the end), instead of line by line;
- matches boundary lines with string operations equivalent to the feed parser's boundary
  expression, and finds trailing line breaks without regular expressions that scan the whole
  body.

Everything else is the feed parser's own code (``_new_message``, ``_pop_message``,
``_parse_headers``, the policy), and ``_parse_entity`` follows ``FeedParser._parsegen`` of
Python 3.11 step by step, so the message tree, its payloads, preambles, epilogues and defects
are the same; tests/test_mimetree.py compares the two on generated and mutilated mail.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable
from contextlib import suppress
from email import errors
from email.feedparser import NLCRE, FeedParser, NLCRE_bol, headerRE
from email.message import Message
from email.policy import Policy
from io import StringIO

# A line can be a false EOF only if it is a boundary line ("--" first), a blank line (the
# delimiter of message/delivery-status blocks) or the '' the parser pushes back at the end.
_MAY_END_A_BODY = frozenset(("-", "\r", "\n", ""))
_LINE_ENDS = ("", "\n", "\r", "\r\n")


def parse_bytes(raw: bytes, policy: Policy) -> Message:
    """The message tree of ``raw``, as ``BytesParser(policy=policy).parsebytes(raw)`` builds it."""
    return _WholeMessageParser(policy).parse(raw.decode("ASCII", errors="surrogateescape"))


def _eol_length(text: str) -> int:
    """Length of the line break ending ``text`` (what ``NLCRE_eol.search`` would match), or 0."""
    if text.endswith("\r\n"):
        return 2
    if text.endswith(("\r", "\n")):
        return 1
    return 0


class _BoundaryMatch:
    __slots__ = ("end", "linesep")

    def __init__(self, end: bool, linesep: str | None) -> None:
        self.end, self.linesep = end, linesep


class _Boundary:
    """The feed parser's boundary expression, without compiling one per multipart.

    That is ``'(?P<sep>' + re.escape(separator) + r')(?P<end>--)?(?P<ws>[ \\t]*)(?P<linesep>\\r\\n|\\r|\\n)?$'``
    used with ``match``. A line holds at most one line break, at its end, so after the
    separator, an optional "--" and spaces or tabs, what is left must be nothing or exactly one
    line break (``$`` also matches before a final newline, which the optional group has taken).
    """

    __slots__ = ("separator",)

    def __init__(self, separator: str) -> None:
        self.separator = separator

    def match(self, line: str) -> _BoundaryMatch | None:
        if not line.startswith(self.separator):
            return None
        rest = line[len(self.separator) :]
        if rest.startswith("--"):
            tail = rest[2:].lstrip(" \t")
            # Without the "--" the expression cannot match a rest starting with "--" either.
            return _BoundaryMatch(True, tail or None) if tail in _LINE_ENDS else None
        tail = rest.lstrip(" \t")
        return _BoundaryMatch(False, tail or None) if tail in _LINE_ENDS else None


class _Lines:
    """``BufferedSubFile`` after the whole text was pushed and it was closed, as a list and a position.

    Lines before the position were consumed; ``unreadline`` puts a line back into the slot just
    before it, which gives the order the deque's ``appendleft`` gives.
    """

    def __init__(self, text: str) -> None:
        # What BufferedSubFile.push(text) followed by close() leaves in its deque.
        self._lines: list[str] = StringIO(text, newline="").readlines()
        self._pos = 0
        self._eofstack: list[Callable[[str], object]] = []
        # Lines that could be a false EOF, by index, so a body is found without looking at each
        # line; built when first needed (a message without parts never needs it).
        self._candidates: list[int] | None = None

    def _candidate_index(self) -> list[int]:
        if self._candidates is None:
            self._candidates = [i for i, line in enumerate(self._lines) if line[:1] in _MAY_END_A_BODY]
        return self._candidates

    def push_eof_matcher(self, pred: Callable[[str], object]) -> None:
        self._eofstack.append(pred)

    def pop_eof_matcher(self) -> Callable[[str], object]:
        return self._eofstack.pop()

    def readline(self) -> str:
        if self._pos >= len(self._lines):
            return ""
        line = self._lines[self._pos]
        self._pos += 1
        for ateof in reversed(self._eofstack):
            if ateof(line):
                self._pos -= 1
                return ""
        return line

    def unreadline(self, line: str) -> None:
        if self._pos == 0:
            self._lines.insert(0, line)
            self._candidates = None  # every index moved
            return
        self._pos -= 1
        if self._lines[self._pos] is not line:
            self._lines[self._pos] = line
            candidates = self._candidates
            if candidates is not None and line[:1] in _MAY_END_A_BODY:
                index = bisect_left(candidates, self._pos)
                if index == len(candidates) or candidates[index] != self._pos:
                    insort(candidates, self._pos)

    def read_to_eof(self) -> list[str]:
        """What ``for line in buffered_sub_file`` collects: the lines up to a false EOF or the end.

        The loop stops at a line an EOF predicate matches (left in place) or at a '' line
        (consumed, as ``readline`` pops it before ``__next__`` sees the '').
        """
        lines, start = self._lines, self._pos
        stop = len(lines)
        consumed_marker = False
        if not self._eofstack:
            # Nothing but a '' pushed back at the end can stop the loop.
            with suppress(ValueError):  # no such line
                stop, consumed_marker = lines.index("", start), True
            self._pos = stop + 1 if consumed_marker else stop
            return lines[start:stop]
        candidates = self._candidate_index()
        for index in range(bisect_left(candidates, start), len(candidates)):
            position = candidates[index]
            line = lines[position]
            if any(ateof(line) for ateof in self._eofstack):
                stop = position
                break
            if line == "":
                stop, consumed_marker = position, True
                break
        self._pos = stop + 1 if consumed_marker else stop
        return lines[start:stop]


class _WholeMessageParser(FeedParser):
    def __init__(self, policy: Policy) -> None:
        super().__init__(policy=policy)

    def parse(self, text: str) -> Message:
        self._input = _Lines(text)  # type: ignore[assignment]
        # By id(): every part stays alive (in the tree) while the parse runs.
        self._content_types: dict[int, str] = {}
        self._parse_entity()
        # FeedParser.close() from here on.
        root = self._pop_message()
        assert not self._msgstack
        if root.get_content_maintype() == "multipart" and not root.is_multipart():
            defect = errors.MultipartInvariantViolationDefect()
            self.policy.handle_defect(root, defect)
        return root

    def _parse_entity(self) -> None:  # noqa: C901, PLR0912, PLR0915 - mirrors FeedParser._parsegen
        inp: _Lines = self._input  # type: ignore[assignment]
        self._new_message()
        headers = []
        while True:
            line = inp.readline()
            if line == "":
                break
            if not headerRE.match(line):
                if not NLCRE.match(line):
                    defect = errors.MissingHeaderBodySeparatorDefect()
                    self.policy.handle_defect(self._cur, defect)
                    inp.unreadline(line)
                break
            headers.append(line)
        self._parse_headers(headers)
        # The feed parser asks for the type up to three times here; it cannot change in between.
        ctype = self._content_types[id(self._cur)] = self._cur.get_content_type()
        if ctype == "message/delivery-status":
            while True:
                inp.push_eof_matcher(NLCRE.match)
                self._parse_entity()
                self._pop_message()
                inp.pop_eof_matcher()
                inp.readline()  # the blank line between the blocks
                line = inp.readline()
                if line == "":
                    break
                inp.unreadline(line)
            return
        maintype = ctype.split("/")[0]
        if maintype == "message":
            self._parse_entity()
            self._pop_message()
            return
        if maintype != "multipart":
            self._cur.set_payload("".join(inp.read_to_eof()))
            return
        # Inline, not a method of its own: one Python frame per level of nesting, as the feed
        # parser's generators take, so a hostile nesting depth meets the recursion limit alike.
        boundary = self._cur.get_boundary()
        if boundary is None:
            defect = errors.NoBoundaryInMultipartDefect()
            self.policy.handle_defect(self._cur, defect)
            self._cur.set_payload("".join(inp.read_to_eof()))
            return
        if str(self._cur.get("content-transfer-encoding", "8bit")).lower() not in ("7bit", "8bit", "binary"):
            defect = errors.InvalidMultipartContentTransferEncodingDefect()
            self.policy.handle_defect(self._cur, defect)
        boundaryre = _Boundary("--" + boundary)
        capturing_preamble = True
        preamble: list[str] = []
        linesep: str | None | bool = False
        close_boundary_seen = False
        while True:
            line = inp.readline()
            if line == "":
                break
            mo = boundaryre.match(line)
            if mo:
                if mo.end:
                    close_boundary_seen = True
                    linesep = mo.linesep
                    break
                if capturing_preamble:
                    if preamble:
                        # RFC 2046: the last line break belongs to the boundary.
                        lastline = preamble[-1]
                        eol = _eol_length(lastline)
                        if eol:
                            preamble[-1] = lastline[:-eol]
                        self._cur.preamble = "".join(preamble)
                    capturing_preamble = False
                    inp.unreadline(line)
                    continue
                # Consecutive boundary lines delimit no part.
                while True:
                    line = inp.readline()
                    if not boundaryre.match(line):
                        inp.unreadline(line)
                        break
                inp.push_eof_matcher(boundaryre.match)
                self._parse_entity()
                # The line break before a boundary belongs to the boundary, not to the part.
                last_type = self._content_types.get(id(self._last)) or self._last.get_content_type()
                if last_type.split("/")[0] == "multipart":
                    epilogue = self._last.epilogue
                    if epilogue == "":
                        self._last.epilogue = None
                    elif epilogue is not None:
                        eol = _eol_length(epilogue)
                        if eol:
                            self._last.epilogue = epilogue[:-eol]
                else:
                    payload = self._last._payload
                    if isinstance(payload, str):
                        eol = _eol_length(payload)
                        if eol:
                            self._last._payload = payload[:-eol]
                inp.pop_eof_matcher()
                self._pop_message()
                self._last = self._cur
            else:
                assert capturing_preamble
                preamble.append(line)
        if capturing_preamble:
            defect = errors.StartBoundaryNotFoundDefect()
            self.policy.handle_defect(self._cur, defect)
            self._cur.set_payload("".join(preamble))
            inp.read_to_eof()  # the feed parser reads the rest and keeps none of it
            self._cur.epilogue = ""
            return
        if not close_boundary_seen:
            defect = errors.CloseBoundaryNotFoundDefect()
            self.policy.handle_defect(self._cur, defect)
            return
        epilogue = [""] if linesep else []
        epilogue.extend(inp.read_to_eof())
        if epilogue:
            firstline = epilogue[0]
            bolmo = NLCRE_bol.match(firstline)
            if bolmo:
                epilogue[0] = firstline[len(bolmo.group(0)) :]
        self._cur.epilogue = "".join(epilogue)

"""HTML bodies: sanitising for display (nh3) and deriving plain text (html.parser)."""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from html.parser import HTMLParser
from typing import NamedTuple
from urllib.parse import unquote

import nh3

# Markup an email legitimately uses for layout and emphasis. Forms, frames, media, <base>,
# <meta> and <link> are dropped: they can submit data, load active content or redirect.
_TAGS = set(nh3.ALLOWED_TAGS) | {"font", "tfoot", "u", "big"}
# Removed together with their content: code, style sheets (page-wide CSS can restyle the host
# application) and document chrome whose text is not part of the message.
_CONTENT_TAGS = {"script", "style", "title", "template", "noscript", "iframe", "object", "embed", "head"}
_LAYOUT = {"align", "valign", "width", "height", "bgcolor", "border", "cellpadding", "cellspacing", "dir", "style"}
_ATTRIBUTES: dict[str, set[str]] = {tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()}
_ATTRIBUTES["*"] = {"title", "lang", "dir", "style", "align"}
_ATTRIBUTES["a"] = _ATTRIBUTES.get("a", set()) | {"href", "name", "title"}
_ATTRIBUTES["img"] = _ATTRIBUTES.get("img", set()) | {"src", "alt", "width", "height", "border"}
_ATTRIBUTES["font"] = {"color", "face", "size"}
for _tag in ("table", "tr", "td", "th", "tbody", "thead", "tfoot", "col", "colgroup", "div", "p"):
    _ATTRIBUTES[_tag] = _ATTRIBUTES.get(_tag, set()) | _LAYOUT
_ATTRIBUTES["td"] |= {"colspan", "rowspan", "nowrap"}
_ATTRIBUTES["th"] |= {"colspan", "rowspan", "nowrap"}
_URL_SCHEMES = {"http", "https", "mailto", "cid"}
# CSS properties that change appearance only. Anything that takes a url() (background,
# list-style-image, border-image, content) or can overlay the host page (position, z-index)
# is left out.
_STYLE_PROPERTIES = {
    "color",
    "background-color",
    "font",
    "font-family",
    "font-size",
    "font-style",
    "font-weight",
    "font-variant",
    "line-height",
    "letter-spacing",
    "word-spacing",
    "text-align",
    "text-decoration",
    "text-indent",
    "text-transform",
    "vertical-align",
    "white-space",
    "direction",
    "margin",
    "margin-top",
    "margin-right",
    "margin-bottom",
    "margin-left",
    "padding",
    "padding-top",
    "padding-right",
    "padding-bottom",
    "padding-left",
    "border",
    "border-top",
    "border-right",
    "border-bottom",
    "border-left",
    "border-color",
    "border-style",
    "border-width",
    "border-collapse",
    "border-spacing",
    "border-radius",
    "width",
    "min-width",
    "max-width",
    "height",
    "min-height",
    "max-height",
    "display",
    "float",
    "clear",
    "table-layout",
}
_UNSAFE_CSS = re.compile(r"url\s*\(|expression\s*\(|\\|@import|javascript:", re.IGNORECASE)


def _filter_attribute(tag: str, attribute: str, value: str) -> str | None:
    if attribute == "style":
        # Drop whole declarations that could fetch or run something, whatever the property.
        kept = [decl for decl in value.split(";") if decl.strip() and not _UNSAFE_CSS.search(decl)]
        return "; ".join(d.strip() for d in kept) or None
    return value


def _display_cleaner(attribute_filter: Callable[[str, str, str], str | None]) -> nh3.Cleaner:
    return nh3.Cleaner(
        tags=_TAGS,
        clean_content_tags=_CONTENT_TAGS,
        attributes=_ATTRIBUTES,
        attribute_filter=attribute_filter,
        url_schemes=_URL_SCHEMES,
        url_relative="deny",
        filter_style_properties=_STYLE_PROPERTIES,
        link_rel="noopener noreferrer",
    )


_DISPLAY_CLEANER = _display_cleaner(_filter_attribute)
# For text extraction only structure matters; nh3 (html5ever) first turns tag soup into a
# well-formed tree so the text pass below never gets stuck inside an unclosed element.
_TEXT_CLEANER = nh3.Cleaner(tags=_TAGS, clean_content_tags=_CONTENT_TAGS, attributes={}, url_schemes=set())


def sanitize_html(html: str) -> str:
    """HTML safe to show: no scripts, event handlers, active URLs or page-wide CSS."""
    return _DISPLAY_CLEANER.clean(html)


class RemoteContent(StrEnum):
    """Whether shown HTML may load anything from the network (the API's ``remoteContent``)."""

    ALLOW = "allow"
    BLOCK = "block"


# Attributes whose URL a browser fetches as soon as it renders the element. Of these the allow-list
# above lets through only <img src> (no srcset, no background attribute; url() never survives a
# style attribute); the others are named so that widening _ATTRIBUTES cannot let a tracker through
# unnoticed. Links (<a href>, <area href>) and citations (cite) load only when followed.
_LOADING_ATTRIBUTES = {"src", "srcset", "background", "poster", "data", "lowsrc", "dynsrc", "xlink:href"}
_LINK_TAGS = {"a", "area"}
# What parts of the message itself (RFC 2392) or inline data look like: nothing to fetch.
_LOCAL_SCHEMES = ("cid:", "data:")
# A browser ignores leading and trailing spaces and C0 controls around a URL.
_URL_PADDING = "".join(map(chr, range(0x21)))


def _loads_remote(tag: str, attribute: str, value: str) -> bool:
    if attribute not in _LOADING_ATTRIBUTES and not (attribute == "href" and tag not in _LINK_TAGS):
        return False
    # srcset lists URLs separated by commas; one piece that is not plainly local counts (a data:
    # URL with a comma in it is cut in two and so counts too: blocking errs on the safe side).
    urls = value.split(",") if attribute == "srcset" else [value]
    return any(not url.strip(_URL_PADDING).lower().startswith(_LOCAL_SCHEMES) for url in urls)


# Only <a> and <area> are allowed an href (checked here, so widening the allow-list cannot
# break it); a message none of whose attributes can load anything needs no second pass.
_HREF_ELSEWHERE = any("href" in attrs for tag, attrs in _ATTRIBUTES.items() if tag not in _LINK_TAGS)
_MAY_LOAD = re.compile(
    r"\s(?:"
    + "|".join(map(re.escape, sorted(_LOADING_ATTRIBUTES | ({"href"} if _HREF_ELSEWHERE else set()))))
    + r")\s*=",
    re.IGNORECASE,
)


class ShownHtml(NamedTuple):
    html: str
    has_remote_content: bool  # with RemoteContent.ALLOW it would load something from the network


def hold_back_remote(html: str, mode: RemoteContent) -> ShownHtml:
    """``html`` (``sanitize_html`` output) as shown in ``mode``: with ``BLOCK`` every URL it would
    fetch when rendered is removed; ``cid:`` images and links stay, and a blocked <img> keeps its
    alt, width and height. ``has_remote_content`` reports such URLs in either mode.

    Blocking runs the sanitiser's own cleaner again, only stricter, so its output can hold nothing
    the sanitiser would remove; with ``ALLOW`` the HTML comes back as it was.
    """
    if not _MAY_LOAD.search(html):
        # Most mail: no attribute that loads anything, so nothing to find or remove. The scan
        # costs far less than the cleaner's parse, and a read of a message pays it every time.
        return ShownHtml(html, False)
    found = False

    def keep(tag: str, attribute: str, value: str) -> str | None:
        nonlocal found
        kept = _filter_attribute(tag, attribute, value)
        if kept is None or not _loads_remote(tag, attribute, kept):
            return kept
        found = True
        return None if mode == RemoteContent.BLOCK else kept

    # A cleaner per call: the filter records what it found for this HTML alone (building one takes
    # about 0.06 ms), and concurrent requests in other threads never share it.
    blocked = _display_cleaner(keep).clean(html)
    return ShownHtml(blocked if mode == RemoteContent.BLOCK else html, found)


_BLOCK = {
    "address", "article", "aside", "blockquote", "center", "dd", "details", "div", "dl", "dt",
    "figcaption", "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hgroup",
    "hr", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "tfoot", "thead",
    "tr", "ul", "caption",
}  # fmt: skip
_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol", "dl", "hr"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.pending = 0  # line breaks owed before the next text; block edges merge, not add up
        self.pre = 0
        # Only reached with raw (unsanitised) HTML: html.parser treats script/style as CDATA, so
        # their end tags are found reliably; an unclosed <title> ends at <body>.
        self.skipping: str | None = None

    def _break(self, count: int) -> None:
        self.pending = max(self.pending, count)

    def _emit(self, text: str) -> None:
        if self.pending and self.parts:
            self.parts.append("\n" * self.pending)
        self.pending = 0
        self.parts.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "title"):
            self.skipping = tag
        elif tag == "body":
            self.skipping = None
        if tag == "br":
            # Consecutive <br>s are deliberate blank lines, so they add up.
            self._emit("\n")
        elif tag == "li":
            self._break(1)
            self._emit("- ")
        elif tag in ("td", "th"):
            self._emit("\t")
        elif tag in _BLOCK:
            self._break(2 if tag in _PARAGRAPH else 1)
        if tag == "pre":
            self.pre += 1
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self._emit(f" {alt} ")

    def handle_endtag(self, tag: str) -> None:
        if tag == self.skipping:
            self.skipping = None
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK or tag == "li":
            self._break(2 if tag in _PARAGRAPH else 1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        if self.skipping:
            return
        # Outside <pre>, source line breaks and indentation are not visible text.
        text = data if self.pre else re.sub(r"[ \t\r\n\f]+", " ", data)
        if text.strip() or (text and not self.pending):
            self._emit(text)


def _tidy(text: str) -> str:
    lines = []
    for line in text.replace("\xa0", " ").split("\n"):
        # Table cells become tab-separated; collapse the empty cells layout tables are full of.
        line = re.sub(r"[ \t]*\t[ \t]*", "\t", line).rstrip(" \t")
        line = re.sub(r"\t+", "\t", line).lstrip("\t")
        # Collapsed source whitespace leaves at most one leading space outside <pre>.
        lines.append(line[1:] if line.startswith(" ") and not line.startswith("  ") else line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


class _CidCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "background") and value and value[:4].lower() == "cid:":
                # RFC 2392: a cid URL is the Content-ID, percent-encoded, without brackets.
                self.cids.add(unquote(value[4:]).strip().strip("<>").lower())


def referenced_cids(html: str) -> set[str]:
    """Content-IDs (lower-case, no brackets) that ``cid:`` URLs in the HTML point at."""
    collector = _CidCollector()
    collector.feed(html)
    collector.close()
    return collector.cids


# Elements that never nest in practice or that HTML closes implicitly; they do not add depth.
_FLAT = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr",
    "p", "li", "td", "th", "tr", "dt", "dd", "option",
}  # fmt: skip


# Void elements: "<br/>" and "<br>" alike open nothing. Any other "<x/>" opens an element in
# HTML5 (the slash is ignored), as the tree builder behind nh3 does.
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# The HTML standard's "special" elements (the ones html.parser reports by name). An end tag of
# any other element (<span>, <b>, <font>...) closes nothing when a special element opened after
# it is still open: in "<span><div></span>" the </span> is ignored and the <span> stays open.
_SPECIAL = {
    "address", "applet", "area", "article", "aside", "base", "basefont", "bgsound", "blockquote",
    "body", "br", "button", "caption", "center", "col", "colgroup", "dd", "details", "dialog", "dir",
    "div", "dl", "dt", "embed", "fieldset", "figcaption", "figure", "footer", "form", "frame",
    "frameset", "h1", "h2", "h3", "h4", "h5", "h6", "head", "header", "hgroup", "hr", "html",
    "iframe", "img", "input", "keygen", "li", "link", "listing", "main", "marquee", "menu", "meta",
    "nav", "noembed", "noframes", "noscript", "object", "ol", "p", "param", "plaintext", "pre",
    "script", "search", "section", "select", "source", "style", "summary", "table", "tbody", "td",
    "template", "textarea", "tfoot", "th", "thead", "title", "tr", "track", "ul", "wbr", "xmp",
}  # fmt: skip
# The formatting elements, whose end tag a browser does not ignore there: its adoption agency
# closes them around the block ("<font><div>x</font></div>", common in mail, stays shallow).
_FORMATTING = {"a", "b", "big", "code", "em", "font", "i", "nobr", "s", "small", "strike", "strong", "tt", "u"}


class _DepthMeter(HTMLParser):
    """Depth as an HTML5 tree builder would reach it: an end tag closes only an element that is
    open (up to the innermost of that name); one that matches nothing is ignored, as there, and
    so is the end tag of a non-special element when a special one opened after it is open."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.open: list[str] = []
        # Where each name's open elements, and the special ones, sit in ``open`` (innermost last):
        # an end tag is judged without walking the stack, so this stays linear on any markup.
        self.open_at: dict[str, list[int]] = {}
        self.special_at: list[int] = []
        # Formatting elements whose end tag came while a block opened after them was open: each is
        # closed as soon as it is innermost again, as the adoption agency leaves the tree.
        self.adopted: set[int] = set()
        self.deepest = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _FLAT:
            self.open_at.setdefault(tag, []).append(len(self.open))
            if tag in _SPECIAL:
                self.special_at.append(len(self.open))
            self.open.append(tag)
            self.deepest = max(self.deepest, len(self.open))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        positions = self.open_at.get(tag)
        if tag in _FLAT or not positions:
            return
        if tag not in _SPECIAL and self.special_at and self.special_at[-1] > positions[-1]:
            if tag in _FORMATTING:
                self.adopted.add(positions[-1])
            return
        # Each element is popped once, so this stays linear however the tags are arranged.
        while True:
            closed = self._pop()
            if closed == tag:
                break
        while self.open and len(self.open) - 1 in self.adopted:
            self._pop()

    def _pop(self) -> str:
        closed = self.open.pop()
        self.open_at[closed].pop()
        self.adopted.discard(len(self.open))
        if self.special_at and self.special_at[-1] == len(self.open):
            self.special_at.pop()
        return closed


# Beyond this depth the HTML5 tree builder behind nh3 turns quadratic (see nesting_depth): such
# HTML is kept as text only when received, and refused when written through the API.
MAX_HTML_DEPTH = 1000


def nesting_depth(html: str) -> int:
    """How deeply elements nest. The HTML5 tree builder behind nh3 slows down quadratically with
    depth, so hostile markup (tens of thousands of nested <div>s) is measured first, linearly."""
    meter = _DepthMeter()
    meter.feed(html)
    meter.close()
    return meter.deepest


def html_to_text(html: str, *, sanitized: bool = False) -> str:
    """Readable plain text from HTML: tags stripped, scripts/styles dropped, line breaks kept.

    ``sanitized=True`` says the HTML is ``sanitize_html`` output (well-formed, nothing to drop),
    which saves a second pass. Markup that is neither is only safe here when not too deep (see
    ``nesting_depth``); html.parser alone copes with any depth but keeps <title> text.
    """
    extractor = _TextExtractor()
    extractor.feed(html if sanitized else _TEXT_CLEANER.clean(html))
    extractor.close()
    return _tidy("".join(extractor.parts))

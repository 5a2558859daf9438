"""Samples -> a self-contained, interactive SVG flame graph (flamegraph.pl's layout).

The root ("all") is at the bottom and spans the full width; above it one frame per process
(so different programs never merge), then each process's stacks, outermost caller first,
each box as wide as the samples whose stacks pass through it. Inlined frames of one Location
are separate boxes, caller below callee; a run of unnamed frames of one file is one
`[file]` box. Boxes narrower than MIN_WIDTH_PX are merged (see agent/render/tree.py).
Every box has a <title> tooltip with its name, samples and percent. Colors come from a hash
of the name, so the same function has the same color everywhere.

The inline script (agent/render/script.py) adds click-to-zoom and regex search, and opens
a graph taller than the window at its bottom (`all` and the processes) with the title bar
pinned; the file loads nothing else, so it works offline, from disk, as an attachment.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from xml.sax.saxutils import escape

from agent.model import ProfileSample
from agent.render.names import Kind
from agent.render.script import STYLE, script
from agent.render.tree import Box, build_tree, keep_width, layout

WIDTH = 1200.0  # px
FRAME_HEIGHT = 16.0
MARGIN = 10.0
TITLE_SPACE = 34.0  # above the frames: title, Reset Zoom, Search
FOOTER_SPACE = 20.0  # below: the hovered frame's details, the search's matched share
FONT_SIZE = 12
CHAR_WIDTH = FONT_SIZE * 0.59  # average glyph width of Verdana at FONT_SIZE
# Narrower boxes are hidden and merged: they can't be read or aimed at, and a whole-host
# graph drawn down to flamegraph.pl's 0.1 px is mostly grass.
MIN_WIDTH_PX = 2.0
# Narrower ones are not even in the file (flamegraph.pl's --minwidth), nor more than
# MAX_FRAMES of the widest (~150 bytes each; a browser loads 20,000 in about a second).
KEEP_WIDTH_PX = 0.1
MAX_FRAMES = 20_000
# Characters XML 1.0 cannot carry at all (a malformed ELF can put them in a symbol name).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value: str) -> str:
    """`value` escaped for element content, with characters XML forbids replaced."""
    return escape(_NOT_XML.sub("\ufffd", value))


def color(name: str, kind: Kind) -> str:
    """flamegraph.pl's "hot" palette for code, orange-brown for the kernel, blue for
    processes, tan for unnamed code, grey for merged narrow frames."""
    if kind == "elided":
        return "rgb(215,215,215)"
    digest = zlib.crc32(name.encode("utf-8", "surrogatepass"))
    v1, v2, v3 = (((digest >> shift) & 0xFF) / 255 for shift in (0, 8, 16))
    if kind == "process":
        return f"rgb({110 + round(40 * v1)},{170 + round(40 * v2)},{220 + round(35 * v3)})"
    if kind == "unnamed":
        return f"rgb({195 + round(30 * v1)},{180 + round(30 * v1)},{140 + round(30 * v2)})"
    if kind == "kernel":
        return f"rgb({200 + round(55 * v1)},{120 + round(60 * v2)},{round(40 * v3)})"
    return f"rgb({205 + round(50 * v3)},{round(230 * v1)},{round(55 * v2)})"


def fit_label(name: str, width: float) -> str:
    """The part of `name` that fits in `width` px ("" when not even 3 characters do)."""
    room = int((width - 6) / CHAR_WIDTH)
    if room < 3:
        return ""
    return name if len(name) <= room else name[: room - 2] + ".."


def render_box(box: Box, total: int, top: float, depth_span: int, unit: str = "samples") -> str:
    y = top + (depth_span - box.depth) * FRAME_HEIGHT  # root on the bottom row
    percent = 100.0 * box.count / total
    tooltip = f"{box.name} ({box.count:,} {unit}, {percent:.2f}%)"
    label = fit_label(box.name, box.width)
    classes = "frame" + (" elided" if box.kind == "elided" else "") + ("" if box.shown else " hide")
    left_out = ' data-left-out="{} {}"'.format(*box.left_out) if box.left_out[0] else ""
    parts = [
        f'<g class="{classes}"{left_out}><title>{xml_text(tooltip)}</title>',
        f'<rect x="{MARGIN + box.x:.2f}" y="{y:.1f}" width="{box.width:.2f}" '
        f'height="{FRAME_HEIGHT - 1:.1f}" fill="{color(box.name, box.kind)}" rx="2" ry="2"/>',
    ]
    if label:
        parts.append(
            f'<text x="{MARGIN + box.x + 3:.2f}" y="{y + FRAME_HEIGHT - 4.5:.1f}">'
            f"{xml_text(label)}</text>"
        )
    parts.append("</g>")
    return "".join(parts)


def backdrop(total_width: float, height: float, empty: bool) -> list[str]:
    """What is under the frames: the style and the background."""
    lines = [
        f"<style>{STYLE}</style>",
        f'<rect id="background" x="0" y="0" width="{total_width:g}" height="{height:g}" '
        'fill="#f8f8f8"/>',
    ]
    if empty:
        lines.append(
            f'<text x="{total_width / 2:.1f}" y="{TITLE_SPACE + 12:.0f}" '
            f'text-anchor="middle">no samples</text>'
        )
    return lines


def controls(title: str, total_width: float, height: float) -> list[str]:
    """What is over the frames (drawn after them, so on top): the header (title, Reset Zoom,
    Search) and the footer (hovered frame, matched share). The script pins both to the
    window's edges, so a graph taller than the window keeps them in sight."""
    bottom = height - MARGIN - 4
    footer_top = height - FOOTER_SPACE - MARGIN + 2
    return [
        '<g id="header">',
        f'<rect x="0" y="0" width="{total_width:g}" height="{TITLE_SPACE - 2:g}" fill="#f8f8f8"/>',
        f'<text x="{total_width / 2:.1f}" y="24" text-anchor="middle" font-size="17">'
        f"{xml_text(title)}</text>",
        f'<text id="unzoom" class="button hide" x="{MARGIN:g}" y="24">Reset Zoom</text>',
        f'<text id="search" class="button hide" x="{total_width - MARGIN:g}" y="24" '
        'text-anchor="end">Search</text>',
        "</g>",
        '<g id="footer">',
        f'<rect x="0" y="{footer_top:g}" width="{total_width:g}" height="{height - footer_top:g}" '
        'fill="#f8f8f8"/>',
        f'<text id="details" x="{MARGIN:g}" y="{bottom:.0f}"> </text>',
        f'<text id="matched" x="{total_width - MARGIN:g}" y="{bottom:.0f}" '
        'text-anchor="end"> </text>',
        "</g>",
    ]


def render_flamegraph(
    samples: Sequence[ProfileSample],
    title: str = "Flame Graph",
    min_width: float = MIN_WIDTH_PX,
    unit: str = "samples",
) -> str:
    """A standalone SVG document (UTF-8 text) showing `samples` as a flame graph; each
    sample weighs its count, in `unit`."""
    root = build_tree(samples)
    keep = keep_width(root, WIDTH, KEEP_WIDTH_PX, MAX_FRAMES)
    min_width = max(min_width, keep)  # over budget with the shown frames alone: show fewer
    boxes = list(layout(root, WIDTH, min_width, min(keep, min_width)))
    # As tall as the highest frame shown: the hidden ones above it may be a tower of slivers.
    # Zooming in grows the picture upwards when it shows them (agent/render/script.py).
    depth_span = max((box.depth for box in boxes if box.shown), default=0)
    height = TITLE_SPACE + (depth_span + 1) * FRAME_HEIGHT + FOOTER_SPACE + 2 * MARGIN
    total_width = WIDTH + 2 * MARGIN
    lines = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{total_width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {total_width:.0f} {height:.0f}" '
        f'font-family="Verdana, sans-serif" font-size="{FONT_SIZE}">',
        *backdrop(total_width, height, not boxes),
        '<g id="frames">',
        *(render_box(box, root.count, TITLE_SPACE, depth_span, unit) for box in boxes),
        "</g>",
        *controls(title, total_width, height),
        '<script type="text/ecmascript"><![CDATA[',
        script(WIDTH, MARGIN, FRAME_HEIGHT, CHAR_WIDTH, min_width, TITLE_SPACE),
        "]]></script>",
        "</svg>",
    ]
    return "\n".join(lines) + "\n"

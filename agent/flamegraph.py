"""Samples -> a self-contained SVG flame graph (Brendan Gregg's layout, no script).

The root ("all") is at the bottom and spans the full width; each box above is a callee,
as wide as the samples whose stacks pass through it. Inlined frames of one Location are
separate boxes, caller below callee. Every box carries a <title> tooltip with its name,
samples and percent; boxes narrower than MIN_WIDTH_PX are left out (with their callees).
Colors come from a hash of the name, so the same function has the same color everywhere.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from agent.model import Frame, Location, ProfileSample

WIDTH = 1200.0  # px
FRAME_HEIGHT = 16.0
MARGIN = 10.0
TITLE_SPACE = 34.0  # above the frames
FONT_SIZE = 12
CHAR_WIDTH = FONT_SIZE * 0.59  # average glyph width of Verdana at FONT_SIZE
MIN_WIDTH_PX = 0.1  # Gregg's default: narrower boxes are omitted
ROOT_NAME = "all"
# Characters XML 1.0 cannot carry at all (a malformed ELF can put them in a symbol name).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value: str) -> str:
    """`value` escaped for element content, with characters XML forbids replaced."""
    return escape(_NOT_XML.sub("\ufffd", value))


def frame_name(location: Location, frame: Frame | None) -> str:
    """A frame's function, or `0x<addr> (<mapping basename>)` when it is unsymbolized."""
    if frame is not None and frame.function:
        return frame.function
    name = f"0x{location.address:x}"
    if location.mapping is not None and location.mapping.path:
        name += f" ({os.path.basename(location.mapping.path)})"
    elif location.kernel:
        name += " ([kernel])"
    return name


def location_names(location: Location) -> list[str]:
    """The function names of one location, innermost (inlined) first, caller last."""
    if not location.frames:
        return [frame_name(location, None)]
    return [frame_name(location, frame) for frame in location.frames]


def stack_names(sample: ProfileSample) -> list[str]:
    """Every frame of a sample's stack, innermost first (inline frames expanded)."""
    return [name for location in sample.locations for name in location_names(location)]


@dataclass
class Node:
    name: str
    kernel: bool = False
    count: int = 0
    children: dict[str, Node] = field(default_factory=dict)

    def child(self, name: str, kernel: bool) -> Node:
        node = self.children.get(name)
        if node is None:
            node = self.children[name] = Node(name, kernel)
        return node


def build_tree(samples: Sequence[ProfileSample]) -> Node:
    """Merge stacks into a call tree rooted at ROOT_NAME (outermost caller first)."""
    root = Node(ROOT_NAME)
    for sample in samples:
        if sample.count <= 0:
            continue
        root.count += sample.count
        node = root
        for location in reversed(sample.locations):
            for name in reversed(location_names(location)):
                node = node.child(name, location.kernel)
                node.count += sample.count
    return root


@dataclass(frozen=True)
class Box:
    name: str
    kernel: bool
    count: int
    depth: int  # 0 = root
    x: float
    width: float


def layout(root: Node, width: float = WIDTH) -> Iterator[Box]:
    """Boxes in depth-first order; children left to right by name (like Gregg's sort)."""
    if root.count <= 0:
        return
    scale = width / root.count
    pending = [(root, 0, 0.0)]
    while pending:
        node, depth, x = pending.pop()
        box_width = node.count * scale
        if box_width < MIN_WIDTH_PX:
            continue
        yield Box(node.name, node.kernel, node.count, depth, x, box_width)
        children = []
        child_x = x
        for name in sorted(node.children):
            child = node.children[name]
            children.append((child, depth + 1, child_x))
            child_x += child.count * scale
        pending.extend(reversed(children))  # pop() takes the leftmost first


def color(name: str, kernel: bool) -> str:
    """Gregg's "hot" palette for user code, an orange-brown one for the kernel."""
    digest = zlib.crc32(name.encode("utf-8", "surrogatepass"))
    v1, v2, v3 = (((digest >> shift) & 0xFF) / 255 for shift in (0, 8, 16))
    if kernel:
        return f"rgb({200 + round(55 * v1)},{120 + round(60 * v2)},{round(40 * v3)})"
    return f"rgb({205 + round(50 * v3)},{round(230 * v1)},{round(55 * v2)})"


def fit_label(name: str, width: float) -> str:
    """The part of `name` that fits in `width` px ("" when not even 3 characters do)."""
    room = int((width - 6) / CHAR_WIDTH)
    if room < 3:
        return ""
    return name if len(name) <= room else name[: room - 2] + ".."


def render_box(box: Box, total: int, top: float, depth_span: int) -> str:
    y = top + (depth_span - box.depth) * FRAME_HEIGHT  # root on the bottom row
    percent = 100.0 * box.count / total
    tooltip = f"{box.name} ({box.count:,} samples, {percent:.2f}%)"
    label = fit_label(box.name, box.width)
    parts = [
        f"<g><title>{xml_text(tooltip)}</title>",
        f'<rect x="{MARGIN + box.x:.2f}" y="{y:.1f}" width="{box.width:.2f}" '
        f'height="{FRAME_HEIGHT - 1:.1f}" fill="{color(box.name, box.kernel)}" rx="2" ry="2"/>',
    ]
    if label:
        parts.append(
            f'<text x="{MARGIN + box.x + 3:.2f}" y="{y + FRAME_HEIGHT - 4.5:.1f}">'
            f"{xml_text(label)}</text>"
        )
    parts.append("</g>")
    return "".join(parts)


def render_flamegraph(samples: Sequence[ProfileSample], title: str = "Flame Graph") -> str:
    """A standalone SVG document (UTF-8 text) showing `samples` as a flame graph."""
    root = build_tree(samples)
    boxes = list(layout(root))
    depth_span = max((box.depth for box in boxes), default=0)
    height = TITLE_SPACE + (depth_span + 1) * FRAME_HEIGHT + 2 * MARGIN
    total_width = WIDTH + 2 * MARGIN
    lines = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{total_width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {total_width:.0f} {height:.0f}" '
        f'font-family="Verdana, sans-serif" font-size="{FONT_SIZE}">',
        '<rect x="0" y="0" width="100%" height="100%" fill="#f8f8f8"/>',
        f'<text x="{total_width / 2:.1f}" y="24" text-anchor="middle" font-size="17">'
        f"{xml_text(title)}</text>",
    ]
    if not boxes:
        lines.append(
            f'<text x="{total_width / 2:.1f}" y="{TITLE_SPACE + 12:.0f}" '
            f'text-anchor="middle">no samples</text>'
        )
    lines.append('<g id="frames">')
    lines.extend(render_box(box, root.count, TITLE_SPACE, depth_span) for box in boxes)
    lines.append("</g>")
    lines.append("</svg>")
    return "\n".join(lines) + "\n"

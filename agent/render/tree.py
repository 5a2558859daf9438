"""The flame graph's call tree and its boxes.

all -> one frame per process -> outermost caller ... leaf. Two widths bound what is drawn:
- below `keep` (0.1 px, flamegraph.pl's --minwidth, or more where that would still put
  over MAX_FRAMES in the file: agent/render/flamegraph.py) a frame is left out of the file;
- below `min_width` a frame can't be seen, read or clicked: it stays in the file (search
  finds it, zooming in shows it) but is hidden, and the narrow callees of one frame are
  drawn as one grey `[N small frames]` box at its right end (with the left-out ones),
  so the time shows without thousands of slivers.
The inline script runs this same layout again when zooming (agent/render/script.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from agent.model import ProfileSample
from agent.render.names import FrameMemo, Kind, folded_frames, process_key, process_names

ROOT_NAME = "all"


@dataclass(slots=True)
class Node:
    name: str
    kind: Kind
    count: int = 0
    children: dict[str, Node] = field(default_factory=dict)  # by name (processes: by id)


def build_tree(samples: Sequence[ProfileSample]) -> Node:
    """Merge stacks into a call tree: root, process, then outermost caller first."""
    root = Node(ROOT_NAME, "root")
    processes = process_names(samples)
    memo: FrameMemo = {}
    for sample in samples:
        if sample.count <= 0:
            continue
        # Processes are told apart by pid even where names collide (a comm can read
        # "app (pid 1)"); the key sorts by name first, as callees sort.
        pid, comm = process_key(sample)
        name = processes[pid, comm]
        path: list[tuple[str, str, Kind]] = [(f"{name}\0{pid}\0{comm}", name, "process")]
        path.extend((f.name, f.name, f.kind) for f in reversed(folded_frames(sample, memo)))
        root.count += sample.count
        node = root
        for key, name, kind in path:
            child = node.children.get(key)  # the hot loop: a million frames in a big profile
            if child is None:
                child = node.children[key] = Node(name, kind)
            child.count += sample.count
            node = child
    return root


def keep_width(root: Node, width: float, floor: float, max_frames: int) -> float:
    """The narrowest width (>= floor px) at which at most `max_frames` frames are kept.
    A frame is never wider than its caller, so "wider than W" keeps whole subtrees."""
    counts = []
    pending = [root]
    while pending:
        node = pending.pop()
        counts.append(node.count)
        pending.extend(node.children.values())
    if len(counts) <= max_frames or root.count <= 0:
        return floor
    # keep count >= (the (max_frames+1)-th largest) + 1: ties at the cut go, not the budget
    cut = heapq.nlargest(max_frames + 1, counts)[-1] + 1
    return max(floor, cut * width / root.count)


@dataclass(frozen=True)
class Box:
    name: str
    kind: Kind
    count: int
    depth: int  # 0 = root
    x: float  # px from the left end of the root
    width: float
    shown: bool = True  # False: in the file for search and zoom, hidden at this scale
    left_out: tuple[int, int] = (0, 0)  # (frames, samples) of callees not in the file


def merged_name(frames: int) -> str:
    # not "< 2 px": zoomed in, the frames left out of the file may be wider than that
    return f"[{frames} small frames]"


@dataclass(frozen=True)
class Scale:
    px_per_sample: float
    min_width: float  # px: narrower callees are hidden and merged
    keep: float  # px: narrower callees are left out of the file


# A node to lay out (node, depth, x, shown), or a merged box to yield as it is.
_Item = tuple[Node, int, float, bool] | Box


def layout(root: Node, width: float, min_width: float, keep: float) -> Iterator[Box]:
    """Boxes in pre-order: each frame, then its callees by name (as flamegraph.pl sorts
    them), then its merged box. Wide callees are packed from the left, the narrow ones
    after them, under the merged box that stands for them."""
    if root.count <= 0:
        return
    scale = Scale(width / root.count, min_width, keep)
    pending: list[_Item] = [(root, 0, 0.0, True)]
    while pending:
        item = pending.pop()
        if isinstance(item, Box):
            yield item
            continue
        node, depth, x, shown = item
        callees, left_out, merged = place_callees(node, depth + 1, x, shown, scale)
        width_px = node.count * scale.px_per_sample
        yield Box(node.name, node.kind, node.count, depth, x, width_px, shown, left_out)
        pending.extend(reversed([*callees, *([merged] if merged else [])]))


def place_callees(
    node: Node, depth: int, x: float, shown: bool, scale: Scale
) -> tuple[list[_Item], tuple[int, int], Box | None]:
    """`node`'s callees in name order with their x, what was left out of the file
    (frames, samples), and the merged box when it is wide enough to draw."""
    unit = scale.px_per_sample
    children = [node.children[name] for name in sorted(node.children)]
    narrow = {id(child) for child in children if child.count * unit < scale.min_width}
    # wide callees packed from the left, the narrow ones after them (under the merged box)
    x_of = {}
    for child in sorted(children, key=lambda child: id(child) in narrow):  # stable
        x_of[id(child)] = x
        x += child.count * unit
    kept = [child for child in children if child.count * unit >= scale.keep]
    placed: list[_Item] = [
        (child, depth, x_of[id(child)], shown and id(child) not in narrow) for child in kept
    ]
    left_out = [child.count for child in children if child.count * unit < scale.keep]
    narrow_samples = sum(child.count for child in children if id(child) in narrow)
    merged = None
    if shown and narrow_samples * unit >= scale.min_width:
        name = merged_name(len(narrow))
        merged_width = narrow_samples * unit
        merged = Box(name, "elided", narrow_samples, depth, x - merged_width, merged_width)
    return placed, (len(left_out), sum(left_out)), merged

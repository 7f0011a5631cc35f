"""See your own kernel: which tiles a Triton kernel loaded, drawn from the interpreter's loads.

Under Triton's interpreter (``TRITON_INTERPRET=1``) every ``tl.load`` passes through Python, so each load of a
watched tensor can be placed on a grid of tiles (:func:`tile_traffic`). Two ways to name the grid's rows:

- ``holds=i`` (attention kernels): a row is the tile of ``args[i]`` that the loading program last loaded (the query
  block it holds, whichever grid axis the launcher gave it), a column a tile of the walked tensor's dim -2 (the key
  block). This places the forward, the dq walk and the key-major dk/dv walk alike.
- ``holds=None`` (a 2-D walk, lesson 05): rows and columns are tiles of the walked tensor's own last two dims.

Only batch 0, head 0 of the walked tensor is drawn (every head's programs make the same visits). The masked lanes of
a load (mask False: past the end, head-dim padding) are counted at the tile of its first unmasked lane.

:func:`draw_tile_traffic` draws each kernel's grid beside what a right kernel loads (:func:`expected_tiles`:
causal, anticausal or every tile), colouring each tile loaded, skipped, wasted (loaded, nothing needed) or missed
(needed, never loaded), with the order of the visits and the share of masked lanes written in the tile.
"""
from dataclasses import dataclass, field

import numpy as np

from .loads import each_load, interpreting

PATTERNS = ("causal", "anticausal", "all")
LABELS = {"causal": ("query block", "key block"), "anticausal": ("key block", "query block"),
          "all": ("row block", "column block")}
RIGHT = {"causal": "the tiles at or below the diagonal", "anticausal": "the tiles at or right of the diagonal",
         "all": "every tile"}
# (colour, word) per kind of tile
KINDS = {"loaded": ("#6baed6", "loaded"), "skipped": ("#f0f0f0", "skipped"), "wasted": ("#fd8d3c", "wasted"),
         "missed": ("#de2d26", "missed")}


@dataclass
class TileTraffic:
    """The loads of one watched tensor on a grid of (row tile, column tile), for batch 0, head 0.

    ``visits[r, c]``: loads that touched the tile; ``elements``: its elements they read (mask True);
    ``lanes`` and ``masked``: all lanes and masked lanes of the loads placed there (by their first unmasked lane);
    ``order[(r, c)]``: the visit numbers, counted along each row (1 = the row's first load; the tiles one load reads
    share its number).
    ``rows``, ``cols``: the lengths the two axes tile (T for attention); ``widest``: the most column indices any
    one load read (rows and columns as the grid names them)."""

    row_block: int
    col_block: int
    rows: int
    cols: int
    visits: np.ndarray
    elements: np.ndarray
    lanes: np.ndarray
    masked: np.ndarray
    order: dict = field(default_factory=dict)
    widest: int = 0
    own: bool = False  # rows and columns are the walked tensor's own dims (holds=None)
    unplaced: int = 0  # loads made before the program had loaded a tile of the held tensor

    @property
    def shape(self):
        return self.visits.shape

    def masked_share(self):
        """Masked lanes over all lanes, per tile (0 where nothing was loaded)."""
        return np.divide(self.masked, self.lanes, out=np.zeros(self.shape), where=self.lanes > 0)


def _check_blocks(**blocks):
    for name, value in blocks.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int (a tile size), got {value!r}")


def expected_tiles(pattern, n_rows, n_cols, row_block, col_block):
    """The tiles a right kernel loads, a (cdiv(n_rows, row_block), cdiv(n_cols, col_block)) bool array.

    ``"causal"``: rows are query blocks, columns key blocks; a query block needs the key tiles up to its last query
    (the diagonal tile included, as the lessons' walks do). ``"anticausal"``: rows are key blocks, columns query
    blocks (a key-major walk); a key block needs the query blocks from the one holding its first key to the last.
    ``"all"``: every tile."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(map(repr, PATTERNS))}, got {pattern!r}")
    _check_blocks(row_block=row_block, col_block=col_block)
    for name, value in (("n_rows", n_rows), ("n_cols", n_cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    r = np.arange(-(-n_rows // row_block))[:, None]
    c = np.arange(-(-n_cols // col_block))[None, :]
    if pattern == "causal":
        return c * col_block <= np.minimum((r + 1) * row_block, n_rows) - 1
    if pattern == "anticausal":
        return np.minimum((c + 1) * col_block, n_cols) - 1 >= r * row_block
    return np.ones((r.size, c.size), dtype=bool)


# --------------------------------------------------------------------------------------------------------------
# recording

class _Locator:
    """Which element of ``tensor`` a load's lane addresses, if any: its index along every dim (exact for any
    strides, by a table over the storage the tensor spans)."""

    def __init__(self, tensor):
        if tensor.dim() < 2:
            raise ValueError(f"the watched tensor must have at least 2 dims (rows, columns), got shape "
                             f"{tuple(tensor.shape)}")
        self.shape, self.itemsize = tuple(tensor.shape), tensor.element_size()
        self.base = tensor.untyped_storage().data_ptr()
        offsets = np.full(self.shape, tensor.storage_offset(), dtype=np.int64)
        for dim, (size, stride) in enumerate(zip(self.shape, tensor.stride())):
            view = [1] * len(self.shape)
            view[dim] = size
            offsets = offsets + np.arange(size, dtype=np.int64).reshape(view) * stride
        offsets = offsets.reshape(-1)
        self.lo = int(offsets.min()) if offsets.size else 0
        self.table = np.full(int(offsets.max()) - self.lo + 1 if offsets.size else 0, -1, dtype=np.int64)
        self.table[offsets - self.lo] = np.arange(offsets.size)

    def locate(self, addresses):
        """(inside, index): which lanes address an element of the tensor, and their index (dims, lanes)."""
        rel = addresses - self.base
        offset = rel // self.itemsize - self.lo
        inside = (rel % self.itemsize == 0) & (offset >= 0) & (offset < self.table.size)
        flat = np.where(inside, self.table[np.clip(offset, 0, max(self.table.size - 1, 0))], -1) \
            if self.table.size else np.full(addresses.shape, -1)
        inside &= flat >= 0
        index = np.stack(np.unravel_index(np.where(inside, flat, 0), self.shape))
        return inside, index

    def head(self, index):
        """The flat index of the leading dims (batch x head), per lane."""
        return np.ravel_multi_index(tuple(index[:-2]), self.shape[:-2]) if len(self.shape) > 2 else \
            np.zeros(index.shape[1], dtype=np.int64)


def _lanes(ptrs, mask):
    addresses = ptrs.data.reshape(-1).astype(np.int64)
    on = np.ones(addresses.shape, dtype=bool) if mask is None else \
        np.broadcast_to(mask.data, ptrs.data.shape).reshape(-1).astype(bool)
    return addresses, on


def _watch(fn, args, walks, holds):
    """Runs ``fn(*args)``; returns its result and, in order, an event per load: ``("walked", program, rows,
    columns, masked lanes, lanes, anchor)`` for a load of the walked tensor's head 0 (the row and column index of
    each lane it read; ``anchor`` the (row, column) of its first unmasked lane) and ``("held", program, row,
    width)`` for a load of the held tensor (the row of its first unmasked lane, and how many rows it read)."""
    walked = _Locator(args[walks])
    held = _Locator(args[holds]) if holds is not None and holds != walks else None
    events = []

    def on_load(builder, ptrs, mask):
        addresses, on = _lanes(ptrs, mask)
        program = tuple(builder.grid_idx)
        if held is not None:
            inside, index = held.locate(addresses)
            read = inside & on
            if read.any():
                first = np.flatnonzero(read)[0]
                events.append(("held", program, int(index[-2, first]), len(np.unique(index[-2][read]))))
        inside, index = walked.locate(addresses)
        if not inside.any():
            return
        read = inside & on
        anchor = np.flatnonzero(read)[0] if read.any() else np.flatnonzero(inside)[0]
        heads = walked.head(index)
        if heads[anchor] != 0:
            return
        read &= heads == 0
        events.append(("walked", program, index[-2][read], index[-1][read], int((~on).sum()), on.size,
                       (int(index[-2, anchor]), int(index[-1, anchor]))))

    with each_load() as callbacks:
        callbacks.append(on_load)
        result = fn(*args)
    return result, events


def _next_power_of_2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def _check_args(args, walks, holds, row_block, col_block):
    import torch

    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of the function's arguments, got {type(args).__name__}")
    for name, index in (("walks", walks), ("holds", holds)):
        if index is None and name == "holds":
            continue
        if isinstance(index, bool) or not isinstance(index, int) or not -len(args) <= index < len(args):
            raise ValueError(f"{name} must be the index of one of the {len(args)} arguments, got {index!r}")
        if not isinstance(args[index], torch.Tensor):
            raise TypeError(f"args[{name}={index}] must be a tensor, got {type(args[index]).__name__}")
    _check_blocks(row_block=row_block, col_block=col_block)


def tile_traffic(fn, args, *, walks=1, holds=0, row_block=None, col_block=None):
    """``(fn(*args), TileTraffic)``: the tiles of ``args[walks]`` that the Triton kernels launched by ``fn`` load,
    under the interpreter (``holds``: see the module's notes). Tile sizes not given are read off the loads: the
    most indices one load read along the axis, rounded up to a power of two."""
    if not interpreting():
        raise RuntimeError("tile_traffic watches the loads of Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "triton is imported (on a GPU too, to see the tiles)")
    _check_args(args, walks, holds, row_block, col_block)
    walks, holds = walks % len(args), None if holds is None else holds % len(args)
    own = holds is None or holds == walks  # rows and columns: the walked tensor's own last two dims
    result, events = _watch(fn, args, walks, None if own else holds)
    walked = [e for e in events if e[0] == "walked"]
    if own:
        n_rows, n_cols = args[walks].shape[-2], args[walks].shape[-1]
        rows_read = max((len(np.unique(e[2])) for e in walked), default=1)
        widest = max((len(np.unique(e[3])) for e in walked), default=0)
    else:
        n_rows, n_cols = args[holds].shape[-2], args[walks].shape[-2]
        rows_read = max((e[3] for e in events if e[0] == "held"), default=1)
        widest = max((len(np.unique(e[2])) for e in walked), default=0)
    row_block = row_block or _next_power_of_2(max(rows_read, 1))
    col_block = col_block or _next_power_of_2(max(widest, 1))
    shape = (-(-n_rows // row_block), -(-n_cols // col_block))
    traffic = TileTraffic(row_block, col_block, n_rows, n_cols, *(np.zeros(shape, dtype=np.int64) for _ in range(4)),
                          widest=widest, own=own)
    _place(traffic, events)
    return result, traffic


def _place(traffic, events):
    """Adds each walked load to the tiles it read; a load made before its program loaded a tile of the held
    tensor waits for that tile."""
    holding, waiting, counters = {}, {}, {}

    def add(event, held_row):
        _, _, lane_rows, lane_cols, n_masked, n_lanes, (anchor_row, anchor_col) = event
        if traffic.own:
            cells_r, cells_c = lane_rows // traffic.row_block, lane_cols // traffic.col_block
            anchor = (anchor_row // traffic.row_block, anchor_col // traffic.col_block)
        else:
            cells_c = lane_rows // traffic.col_block
            cells_r = np.full(cells_c.shape, held_row)
            anchor = (held_row, anchor_row // traffic.col_block)
        np.add.at(traffic.elements, (cells_r, cells_c), 1)
        touched = set(zip(cells_r.tolist(), cells_c.tolist())) | {anchor}
        for row in {r for r, _ in touched}:  # one visit number per load and row, however many tiles it read
            counters[row] = counters.get(row, 0) + 1
        for cell in touched:
            traffic.visits[cell] += 1
            traffic.order.setdefault(cell, []).append(counters[cell[0]])
        traffic.masked[anchor] += n_masked
        traffic.lanes[anchor] += n_lanes

    for event in events:
        program = event[1]
        if event[0] == "held":
            holding[program] = event[2] // traffic.row_block
            for early in waiting.pop(program, []):
                add(early, holding[program])
        elif traffic.own:
            add(event, None)
        elif program in holding:
            add(event, holding[program])
        else:
            waiting.setdefault(program, []).append(event)
    traffic.unplaced = sum(map(len, waiting.values()))


# --------------------------------------------------------------------------------------------------------------
# drawing

def _kinds(visits, needed):
    """Per tile, one of KINDS."""
    loaded = visits > 0
    return np.where(loaded & needed, "loaded", np.where(loaded, "wasted", np.where(needed, "missed", "skipped")))


def _cell_text(traffic, r, c):
    order = traffic.order.get((r, c), [])
    text = ", ".join(map(str, order[:3])) + (", ..." if len(order) > 3 else "")
    share = traffic.masked_share()[r, c]
    return text + (f"\n{share:.0%}" if share > 0 else "")


def _right_order(pattern, needed, visits):
    """{(r, c): visit numbers} of a right walk: along each row from the diagonal outward (right to left for
    "causal" and "all", left to right for "anticausal", a key-major walk), ``visits`` times."""
    order = {}
    for r in range(needed.shape[0]):
        cols = np.flatnonzero(needed[r]).tolist()
        cols = cols if pattern == "anticausal" else cols[::-1]
        for walk in range(visits):
            for n, c in enumerate(cols):
                order.setdefault((r, c), []).append(walk * len(cols) + n + 1)
    return order


def _draw_grid(ax, kinds, texts, title, labels):
    import matplotlib.colors as mcolors

    names = list(KINDS)
    codes = np.vectorize(names.index)(kinds) if kinds.size else np.zeros(kinds.shape, dtype=int)
    cmap = mcolors.ListedColormap([KINDS[n][0] for n in names])
    ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5)
    n_rows, n_cols = kinds.shape
    small = 7 if max(n_rows, n_cols) > 6 else 8
    for r in range(n_rows):
        for c in range(n_cols):
            word = KINDS[kinds[r, c]][1] if kinds[r, c] != "loaded" else ""
            text = "\n".join(t for t in (texts[r][c], word) if t)
            ax.text(c, r, text, ha="center", va="center", fontsize=small)
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    ax.set_xticks(np.arange(-0.5, n_cols), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows), minor=True)
    ax.grid(which="minor", color="white", lw=2)
    ax.tick_params(which="minor", length=0)
    ax.set(xlabel=labels[1], ylabel=labels[0], title=title)


def traffic_figure(traffics, expected="causal", labels=None, expected_visits=1, grid=None):
    """A matplotlib Figure: one panel per ``{name: TileTraffic or None}`` (None: not written yet; the dict may be
    empty) and, last, what a right kernel loads: the ``expected`` pattern of :func:`expected_tiles`,
    ``expected_visits`` times each, on the tiles of the first traffic, or on ``grid = (rows, cols, row_block,
    col_block)``."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not isinstance(traffics, dict):
        raise TypeError(f"traffics must be a dict {{name: TileTraffic or None}}, got {type(traffics).__name__}")
    drawn = [t for t in traffics.values() if t is not None]
    if grid is None:
        if not drawn:
            raise ValueError("no traffic to take the tiles from: give grid=(rows, cols, row_block, col_block)")
        grid = (drawn[0].rows, drawn[0].cols, drawn[0].row_block, drawn[0].col_block)
    needed = expected_tiles(expected, *grid)
    labels = labels or LABELS[expected]
    width, height = min(6.0, max(3.0, 0.7 * needed.shape[1] + 0.8)), min(5.0, max(2.2, 0.7 * needed.shape[0] + 0.6))
    fig, axes = plt.subplots(1, len(traffics) + 1, squeeze=False, figsize=(width * (len(traffics) + 1), height + 1.4))
    for ax, (name, traffic) in zip(axes[0], traffics.items()):
        if traffic is None:
            ax.imshow(np.zeros(needed.shape), cmap="Greys", vmin=0, vmax=1)
            ax.text((needed.shape[1] - 1) / 2, (needed.shape[0] - 1) / 2, "not written yet", ha="center")
            ax.set(title=name, xlabel=labels[1], ylabel=labels[0], xticks=range(needed.shape[1]),
                   yticks=range(needed.shape[0]))
            continue
        if traffic.shape != needed.shape:
            raise ValueError(f"{name}: its grid is {traffic.shape} tiles, the expected one {needed.shape}: give every "
                             "kernel the same inputs and tile sizes (row_block, col_block)")
        texts = [[_cell_text(traffic, r, c) for c in range(needed.shape[1])] for r in range(needed.shape[0])]
        widest = f", widest load {traffic.widest} columns" if traffic.own else ""
        _draw_grid(ax, _kinds(traffic.visits, needed), texts,
                   f"{name}\n({traffic.row_block} x {traffic.col_block} tiles{widest})", labels)
    order = _right_order(expected, needed, expected_visits)
    want = [[", ".join(map(str, order.get((r, c), []))) for c in range(needed.shape[1])]
            for r in range(needed.shape[0])]
    walk = "right to left" if expected == "all" else "from the diagonal out"
    _draw_grid(axes[0, -1], np.where(needed, "loaded", "skipped"), want,
               f"what right looks like:\n{RIGHT[expected]}\n({grid[2]} x {grid[3]} tiles, {walk})", labels)
    fig.legend(handles=[Patch(color=color, label=word) for color, word in KINDS.values()], loc="lower center",
               ncol=len(KINDS), frameon=False, fontsize=8, title="in a tile: the order of its visits along the row, "
               "and the share of its lanes masked", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 0.97))
    return fig


def summary(name, traffic, expected="causal", expected_visits=1):
    """One line: the tiles loaded, skipped, wasted and missed, visits off the expected count, masked lanes."""
    needed = expected_tiles(expected, traffic.rows, traffic.cols, traffic.row_block, traffic.col_block)
    kinds = _kinds(traffic.visits, needed)
    count = {kind: int((kinds == kind).sum()) for kind in KINDS}
    off = int(((traffic.visits != expected_visits) & needed & (traffic.visits > 0)).sum())
    line = (f"{name}: {count['loaded'] + count['wasted']} of {needed.size} tiles loaded, {count['skipped']} skipped"
            f", {count['wasted']} wasted (nothing needed there), {count['missed']} needed but never loaded")
    if off:
        line += f"; {off} needed tiles loaded other than {expected_visits} time(s)"
    lanes = int(traffic.lanes.sum())
    return line + (f"; {int(traffic.masked.sum()) / lanes:.0%} of the lanes masked" if lanes else "")


def draw_tile_traffic(kernels, args, *, walks=1, holds=0, row_block=None, col_block=None, expected="causal",
                      labels=None, expected_visits=1):
    """Draws which tiles the Triton kernels of each function load on ``args`` (``kernels``: one function, or
    ``{name: function}``), beside what a right kernel loads, and prints a line per function.

    The loads are watched under the interpreter only; elsewhere (a GPU) it says so and draws the expected tiles
    alone, on ``row_block`` x ``col_block`` tiles. A function that is still a stub (``NotImplementedError``) gets
    an empty panel. Returns None: the picture is shown."""
    import matplotlib.pyplot as plt

    if callable(kernels) and not isinstance(kernels, dict):
        kernels = {getattr(kernels, "__name__", "your kernel"): kernels}
    if not isinstance(kernels, dict) or not kernels or not all(callable(fn) for fn in kernels.values()):
        raise TypeError("kernels must be a function or a dict {name: function}")
    if expected not in PATTERNS:
        raise ValueError(f"expected must be one of {', '.join(map(repr, PATTERNS))}, got {expected!r}")
    _check_args(args, walks, holds, row_block, col_block)
    traffics = dict.fromkeys(kernels)
    if interpreting():
        for name, fn in kernels.items():
            try:
                traffics[name] = tile_traffic(fn, args, walks=walks, holds=holds, row_block=row_block,
                                              col_block=col_block)[1]
            except NotImplementedError:
                print(f"{name}: not written yet; the last picture shows what right looks like")
                continue
            print(summary(name, traffics[name], expected, expected_visits))
    else:
        print("the loads are watched by Triton's interpreter, which is off here (a GPU): run the notebook with "
              "TRITON_INTERPRET=1 to see your kernel's tiles; below, what a right kernel loads")
        traffics = {}
    grid = None
    if all(t is None for t in traffics.values()):
        if row_block is None or col_block is None:
            print("(no picture: give row_block and col_block to draw what right looks like)")
            return None
        own = holds is None or holds == walks
        grid = (args[walks].shape[-2], args[walks].shape[-1], row_block, col_block) if own else \
            (args[holds].shape[-2], args[walks].shape[-2], row_block, col_block)
    traffic_figure(traffics, expected, labels, expected_visits, grid)
    plt.show()

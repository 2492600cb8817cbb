"""Tables kept in 512-entry leaves of machine words, and the directory compiled code walks.

The p2m and the IOMMU page tables share this shape (as hardware page tables do): a leaf is
an ``array('Q')`` of 512 entries, and a table keeps its leaves' addresses in a directory so
the compiled fast path can reach an entry without Python.
"""

from __future__ import annotations

from array import array

LEAF_SHIFT = 9
LEAF_SIZE = 1 << LEAF_SHIFT
LEAF_MASK = LEAF_SIZE - 1


class LeafDirectory:
    """The addresses of a table's leaves by leaf index, so compiled code can walk the table.

    Leaves are fixed-size arrays that live as long as their table, so their addresses hold;
    the directory itself may move when it grows, so readers take ``where()`` afresh.  Leaves
    past ``LIMIT`` (a 2 TiB address space) are left out: only Python reaches them.
    """

    LIMIT = 1 << 20
    __slots__ = ("addresses",)

    def __init__(self) -> None:
        self.addresses = array("Q")

    def note(self, index: int, leaf: array[int]) -> None:
        if index >= self.LIMIT:
            return
        have = len(self.addresses)
        if index >= have:
            grow = min(max(index + 1, 2 * have, 64), self.LIMIT) - have
            self.addresses.frombytes(bytes(8 * grow))
        self.addresses[index] = leaf.buffer_info()[0]

    def where(self) -> tuple[int, int]:
        """(address, length) of the directory."""
        return self.addresses.buffer_info()

    def forget(self, index: int) -> None:
        """A leaf was released: compiled code must see it as unwritten again."""
        if index < len(self.addresses):
            self.addresses[index] = 0

    def clear(self) -> None:
        self.addresses = array("Q")

    def disagreements(self, leaves: dict[int, array[int]]) -> list[int]:
        """Leaf indexes whose directory slot does not hold that leaf's address (for the audit)."""
        wrong = [i for i, leaf in leaves.items() if i < self.LIMIT and self.addresses[i] != leaf.buffer_info()[0]]
        return wrong + [i for i, address in enumerate(self.addresses) if address and i not in leaves]

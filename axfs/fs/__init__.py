"""The FUSE adapter: the tree's nodes and the operations that translate to kernel calls."""

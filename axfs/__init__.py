"""axfs: an operating-system layer for language models, served as a FUSE filesystem."""

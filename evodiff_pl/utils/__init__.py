"""Small shared helpers: ranks and all-reduce, atomic files, derived seeds, uint8 images, downloads."""

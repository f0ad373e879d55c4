"""Training data: the datasets (`datasets`, `image_files`), the rank-invariant stream (`stream`), augmentation."""

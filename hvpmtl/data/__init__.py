"""Data, in three wings; imports run formats <- loaders <- tools, never back up.

formats/  what lies on disk and how to read it: list and dictionary files, webdataset shards and their DALI
          index files, the data index, JPEG headers, COCO / ADE20K annotations, objects in S3, issues.
loaders/  what training and evaluation read with: the usable samples (prepare), the DALI loaders
          (pre-training, ImageFolder, multi-label), the dense tasks' loaders, views, masks, labels.
tools/    the offline `hvpmtl data` commands: index, validate, to-shards, make-synthetic, and their jobs.
"""

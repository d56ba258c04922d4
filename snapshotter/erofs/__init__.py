"""EROFS backend: a layer's metadata as an EROFS image the kernel mounts, its file data in a blob.

``layout`` places file contents in the data blob, ``writer`` writes the metadata image
(``ondisk`` holds the format), ``mount`` mounts the pair with mount(2).
"""

"""Whether an image path resolves outside the image root through a symlink (in it, or on the way to it).
A list's paths are relative to `data.root`; a textual escape (`../x`, `/x`) is refused when the list is
parsed, and this catches the same escape made by a link. `data.allow_outside_root: true` (validate's
`--allow-outside-root`) accepts such links, for roots that are folders of links by design."""
import os
import stat


class RootGuard:
    """One lstat per image: the folders' real paths are cached (a folder holds many images). Thread-safe
    enough for the reader's pool: a cache entry is computed the same by every thread."""

    def __init__(self, root: bytes | str):
        self.real_root = os.path.realpath(os.fsencode(root)).rstrip(b"/") + b"/"
        self.dirs: dict = {}

    def outside(self, p: bytes | str) -> bytes:
        """The real path when `p` resolves outside the root, else b''."""
        p = os.fsencode(p)
        try:
            link = stat.S_ISLNK(os.lstat(p).st_mode)
        except OSError:
            link = False  # missing: the reader or the image check names it
        d, name = os.path.split(p)
        if link:
            real = os.path.realpath(p)
        else:
            if d not in self.dirs:
                self.dirs[d] = os.path.realpath(d)
            real = os.path.join(self.dirs[d], name)
        return b"" if real.startswith(self.real_root) else real

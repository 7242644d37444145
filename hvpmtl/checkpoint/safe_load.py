"""Loading files people exchange without running code from them.

A checkpoint or backbone file copied from another cluster or a colleague is data, never a
program: a pickle can name any importable callable and run it while it loads. Every file hvpmtl
reads goes through one of these:

- `load_torch(path)`: `torch.load(weights_only=True)` with an allow-list of the few plain
  classes DeepSpeed puts in its ZeRO files (loss scaler, ZeRO stage enum, fragment address) and
  numpy's array reconstruction.
- `load_numpy_pickle(path)`: a plain pickle of dicts, lists and numpy arrays (Detectron2's
  `.pkl`), through an unpickler that resolves only numpy's array-rebuilding globals.
- `WeightsOnlyCheckpointEngine`: DeepSpeed's torch checkpoint engine with `load` made weights-only (and
  `save` reporting a full disk as an OSError naming the file); `install(engine)` puts it into a DeepSpeed
  engine, so `engine.load_checkpoint` is safe too (and `checkpoint.save` installs it before saving).

A refused file raises `UnsafeFileError` naming the file and the global it asked for.
"""
from __future__ import annotations

import functools
import pickle
from pathlib import Path

import torch

from hvpmtl.fileio import torch_save


class UnsafeFileError(ValueError):
    """A file that would run code (or cannot be read) when loaded."""


def deepspeed_safe_globals() -> list:
    """Plain-data classes of DeepSpeed's ZeRO checkpoint files (fp32, bf16 and fp16 engines)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def numpy_safe_globals() -> list:
    """numpy arrays as plain data (Detectron2 .pkl, torch files that hold numpy arrays)."""
    import numpy as np

    kinds = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n[:-5] in
             {"Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float16",
              "Float32", "Float64"}]
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, *kinds]


@functools.lru_cache(maxsize=None)
def _allowed() -> list:
    try:
        return numpy_safe_globals() + deepspeed_safe_globals()
    except ImportError:  # reading exported files needs no DeepSpeed
        return numpy_safe_globals()


def load_torch(path: str | Path, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True) with DeepSpeed's plain-data classes allowed.

    `mmap=True` maps tensor storages instead of reading them: a cheap full check of the pickle."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first
                   else type(e).__name__)
        raise UnsafeFileError(f"{path}: refused to load: it is not a plain weights file ({why[:300]}); "
                              "it may run code when unpickled. Re-export it with hvpmtl, or load it yourself "
                              "if you trust where it came from") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise UnsafeFileError(f"{path}: cannot be read as a torch file ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from None


class _NumpyUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_numpy_pickle(path: str | Path):
    """A pickle of plain containers and numpy arrays; any other global is refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _NumpyUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{path}: refused to load: {e} (only dicts, lists and numpy arrays may be in a "
                              ".pkl backbone); it may run code when unpickled") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UnsafeFileError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=None)
def _checkpoint_engine_class():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine; `load` is weights-only, `save` writes through a Python file so that a disk
        that is full is the kernel's OSError naming the file, not torch's RuntimeError without either."""

        def load(self, path: str, map_location=None):
            return load_torch(path, map_location=map_location)

        def save(self, state_dict, path: str):
            torch_save(state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization)

    return WeightsOnlyCheckpointEngine


def install(engine) -> None:
    """Make `engine.load_checkpoint` read its files weights-only (idempotent). DeepSpeed takes no
    checkpoint engine in `initialize`, so ours replaces the torch engine it built, keeping its settings."""
    cls = _checkpoint_engine_class()
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, cls):
        return
    if current is not None and type(current).__name__ != "TorchCheckpointEngine":
        raise UnsafeFileError(f"the DeepSpeed config selects the {type(current).__name__} checkpoint engine; "
                              "hvpmtl loads checkpoints only through the torch engine with weights-only loading")
    new = cls.__new__(cls)
    new.__dict__.update(vars(current) if current is not None else {"name": "TorchCheckpointEngine",
                                                                   "zipfile_serialization": False})
    engine.checkpoint_engine = new

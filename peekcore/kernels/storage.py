"""Storage types of a streamed chunk: the one table Python, C++ and CUDA share.

A chunk crosses into compiled code as raw bytes plus a storage code. The code
of each type, its enumerator in ``peekcore::Storage``
(``csrc/include/peekcore/pass_math.h``) and its CUDA type name in kernel
template instances (``"peekcore::sum_squares<__half>"``) all come from
``STORAGE_TYPES``; the header's enum is kept by hand and checked against
:func:`storage_enum_source` in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidTypeError

__all__ = ["STORAGE_TYPES", "StorageType", "cuda_type", "storage_code", "storage_enum_source"]


@dataclass(frozen=True)
class StorageType:
    """One storage type.

    Attributes
    ----------
    dtype : torch.dtype
        The tensor dtype.
    code : int
        Its value in ``peekcore::Storage`` (what the compiled launchers take).
    enumerator : str
        Its name in ``peekcore::Storage``.
    cuda : str
        Its CUDA type in kernel template instances.
    """

    dtype: torch.dtype
    code: int
    enumerator: str
    cuda: str


STORAGE_TYPES = (
    StorageType(torch.float16, 0, "kFloat16", "__half"),
    StorageType(torch.bfloat16, 1, "kBFloat16", "__nv_bfloat16"),
    StorageType(torch.float32, 2, "kFloat32", "float"),
    StorageType(torch.float64, 3, "kFloat64", "double"),
)
_BY_DTYPE = {s.dtype: s for s in STORAGE_TYPES}


def _lookup(dtype: torch.dtype) -> StorageType:
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        names = ", ".join(str(s.dtype).removeprefix("torch.") for s in STORAGE_TYPES)
        raise InvalidTypeError(
            f"chunks stored as {dtype} cannot be passed to the compiled kernels; "
            f"convert them to one of {names}"
        ) from None


def storage_code(dtype: torch.dtype) -> int:
    """The ``peekcore::Storage`` code of ``dtype`` (TypeError for other dtypes)."""
    return _lookup(dtype).code


def cuda_type(dtype: torch.dtype) -> str:
    """The CUDA type name of ``dtype`` in kernel template instances."""
    return _lookup(dtype).cuda


def storage_enum_source() -> str:
    """The C++ declaration of ``peekcore::Storage`` this table implies (one line)."""
    body = ", ".join(f"{s.enumerator} = {s.code}" for s in STORAGE_TYPES)
    return f"enum class Storage : int {{ {body} }};"

"""A stored layer as a lazily read ``xarray.DataArray`` whose reads are checked.

xarray's own zarr backend would read the chunk files through zarr, which
checks each file's CRC32C but not the record that binds it to its place in
the layer (a moved or swapped chunk file reads without complaint), nor that
the store is still the one that was opened. The array here reads instead
through :class:`~peekcore.store.reader.StoredLayer`, so every value of the
``DataArray`` passed the same checks as ``store[layer][...]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import MissingDependencyError

__all__ = ["layer_data_array"]


def _xarray() -> Any:
    try:
        import xarray
    except ImportError as err:
        raise MissingDependencyError("to_xarray needs xarray: `pip install xarray`") from err
    return xarray


def layer_data_array(layer: Any, coords: dict[str, Any], attrs: dict[str, Any]) -> Any:
    """``layer`` (a :class:`StoredLayer`) as a lazy ``xarray.DataArray`` in its stored dtype.

    Parameters
    ----------
    layer : StoredLayer
        The whole layer (not a shard); its ``dims`` name the dimensions.
    coords : dict
        Coordinates, as ``xarray.DataArray`` takes them.
    attrs : dict
        Attributes of the result.

    Returns
    -------
    xarray.DataArray
        Indexing it reads only the rows the index needs, each chunk file
        checked (size, CRC32C, its record); nothing is read before.
    """
    xr = _xarray()
    from xarray.core import indexing

    class CheckedArray(xr.backends.BackendArray):
        """The layer's values as xarray's lazy indexing wants them (basic keys)."""

        def __init__(self) -> None:
            self.shape = layer.shape
            self.dtype = layer._np_dtype  # stored dtype: bfloat16 as uint16 bit patterns

        def __getitem__(self, key: Any) -> np.ndarray:
            return indexing.explicit_indexing_adapter(
                key, self.shape, indexing.IndexingSupport.BASIC, layer._select
            )

    data = indexing.LazilyIndexedArray(CheckedArray())
    variable = xr.Variable(layer.dims, data, attrs=attrs)
    chunks = (layer.chunk_size, *layer.shape[1:])
    variable.encoding = {
        "chunks": chunks,
        "preferred_chunks": dict(zip(layer.dims, chunks, strict=True)),
        "dtype": layer._np_dtype,
    }
    return xr.DataArray(variable, coords=coords, name=layer.name)

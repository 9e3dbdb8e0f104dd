"""swsa_store: dataset catalogs, tasks, synthetic anomalies, backbones, ingest and the HDF5 store.

Everything that touches images, models and files lives here; the engine (``swsa_engine``)
works on the arrays this package reads out of a store.
"""

from swsa_store.store import SCHEMA_VERSION, Store, StoreError, create_store, edit_store, open_store

__all__ = ["SCHEMA_VERSION", "Store", "StoreError", "create_store", "edit_store", "open_store"]

"""Data libraries: downloads, reading sources, the one renaming step and its checks, regridding,
Zarr stores and Dask."""

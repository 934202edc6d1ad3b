"""The run directory and what is stored in it: paths, typed run files, records, cloud storage, JSON I/O."""

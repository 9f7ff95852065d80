"""Everything between mined candidates and the verified dataset: the kombinat admin client, the queue feed,
label snapshots, agreement statistics (pure math) and the verified export. Wired in `defs/labeling.py`."""

"""Block identity and the stored block format: the bottom layer of kvstore.

``hashing`` (the one block hash every component uses), ``format`` (the 64-byte block header and
its checksum), ``tier`` (HBM < DRAM < SSD). Imports nothing else from kvstore.
"""
